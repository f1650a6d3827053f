"""cr_proxy.policy: which destinations cr-proxy may connect to."""

from __future__ import annotations

import ipaddress

import pytest

from cr_proxy.policy import Destinations, is_private, split_host

ENDPOINTS = {"registry.test": "http://127.0.0.1:5000", "internal.test": "http://lan-host:80"}


@pytest.mark.parametrize(
    ("host", "private"),
    [("127.0.0.1", True), ("127.0.0.1:9180", True), ("[::1]:5000", True), ("localhost", True),
     ("x.localhost", True), ("10.1.2.3", True), ("169.254.169.254", True), ("192.168.0.1", True),
     ("[::ffff:127.0.0.1]", True), ("fd00::1", True), ("8.8.8.8", False),
     ("registry.test", False), ("ghcr.io:443", False)],
)
def test_is_private_by_literal(host: str, private: bool) -> None:
    assert is_private(host) is private


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("ghcr.io", True),  # public name: the resolver checks its addresses
        ("registry.test", True),  # named in endpoints
        ("127.0.0.1:5000", False),  # an endpoint's address is not opened to everyone
        ("127.0.0.1:9180", False),
        ("10.0.0.5", True),  # allow_private CIDR
        ("10.0.1.5", False),
        ("localhost:5001", True),  # allow_private host:port
        ("localhost:5002", False),
        ("[::1]", False),
    ],
)
def test_host_allowed(host: str, allowed: bool) -> None:
    destinations = Destinations(("10.0.0.0/24", "localhost:5001"), ENDPOINTS)
    assert destinations.host_allowed(host) is allowed


def test_endpoint_reached_by_name_may_resolve_privately() -> None:
    destinations = Destinations((), ENDPOINTS)
    assert destinations.named("lan-host")
    assert not destinations.named("other-host")
    assert destinations.address_allowed(ipaddress.ip_address("8.8.8.8"))
    assert not destinations.address_allowed(ipaddress.ip_address("10.0.0.1"))


@pytest.mark.parametrize(
    ("host", "bare"),
    [("a.test:80", "a.test"), ("[::1]:5000", "::1"), ("::1", "::1"), ("A.Test", "a.test")],
)
def test_split_host(host: str, bare: str) -> None:
    assert split_host(host) == bare
