"""cr_proxy.connect: what the CONNECT front does with a request head (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from cr_proxy.config import ProxyPolicy, load
from cr_proxy.errors import ProtocolError, ProxyRefused
from cr_proxy.front.connect import Action, check_port, decide, parse_head, split_authority
from cr_proxy.net.policy import Destinations

CLIENT = "127.0.0.1"
ENDPOINTS = {"registry.test": "http://127.0.0.1:5000", "named.test": "http://localhost:7000"}


@pytest.fixture
def policy() -> ProxyPolicy:
    defaults = load(environ={}).proxy
    return dataclasses.replace(
        defaults, intercept=("registry.test",), ports=frozenset({443, 8443, 9180}),
        passthrough=("pass.example",), allow_private=("localhost:8443", "lan.example"),
    )


@pytest.fixture
def destinations(policy: ProxyPolicy) -> Destinations:
    return Destinations(policy.allow_private, ENDPOINTS)


def head(line: str, host: str = "x") -> bytes:
    return f"{line}\r\nHost: {host}\r\n\r\n".encode()


def decided(raw: bytes, policy: ProxyPolicy, destinations: Destinations) -> Action:
    return decide(parse_head(raw), CLIENT, policy, destinations).action


@pytest.mark.parametrize(
    "target",
    ["127.1:9180", "0x7f000001:9180", "2130706433:9180", "0177.0.0.1:9180", "0x7F.1:9180",
     "localhost:9180", "localhost.:9180", "LOCALHOST:9180", "[::1]:9180",
     "[::ffff:127.0.0.1]:9180", "10.1:443", "169.254.169.254:443"],
)
def test_every_loopback_spelling_is_refused_before_any_lookup(
    target: str, policy: ProxyPolicy, destinations: Destinations
) -> None:
    with pytest.raises(ProxyRefused):
        decided(head(f"CONNECT {target} HTTP/1.1"), policy, destinations)


@pytest.mark.parametrize(
    "line",
    [
        "CONNECT registry.test:9180 HTTP/1.1",  # an endpoint's host at another port
        "CONNECT named.test:9180 HTTP/1.1",
        "CONNECT localhost:443 HTTP/1.1",  # allow_private names localhost:8443 only
        "GET http://registry.test:9180/ HTTP/1.1",
        "POST http://localhost:9180/ HTTP/1.1",
        "GET http://lan.example:8080/ HTTP/1.1",  # a bare name: plain HTTP on 80 only
        "CONNECT lan.example:22 HTTP/1.1",  # not in proxy.ports
    ],
)
def test_named_hosts_are_open_only_at_the_port_named(
    line: str, policy: ProxyPolicy, destinations: Destinations
) -> None:
    with pytest.raises(ProxyRefused):
        decided(head(line), policy, destinations)


@pytest.mark.parametrize(
    ("line", "action"),
    [
        ("CONNECT registry.test:443 HTTP/1.1", Action.INTERCEPT),
        ("CONNECT localhost:8443 HTTP/1.1", Action.TUNNEL),  # allow_private host:port
        ("CONNECT lan.example:443 HTTP/1.1", Action.TUNNEL),
        ("CONNECT pass.example:443 HTTP/1.1", Action.TUNNEL),
        ("CONNECT vm:443 HTTP/1.1", Action.TUNNEL),  # a name: its addresses are checked next
        ("CONNECT example.com.:443 HTTP/1.1", Action.TUNNEL),
        ("GET http://registry.test/v2/ HTTP/1.1", Action.FORWARD),
        ("GET http://localhost:8443/v2/ HTTP/1.1", Action.FORWARD),  # named host:port
        ("GET http://lan.example/ HTTP/1.1", Action.FORWARD),
        ("GET /ca.crt HTTP/1.1", Action.SERVE_CA),
    ],
)
def test_allowed_destinations(
    line: str, action: Action, policy: ProxyPolicy, destinations: Destinations
) -> None:
    assert decided(head(line), policy, destinations) is action


@pytest.mark.parametrize(
    ("host", "port", "tls", "allowed"),
    [("example.com", 443, True, True), ("example.com", 8443, True, True),
     ("example.com", 22, True, False), ("example.com", 80, False, True),
     ("example.com", 8443, False, False), ("localhost", 8443, False, True),
     ("registry.test", 5000, False, False)],
)
def test_check_port_is_the_front_and_fetcher_rule(
    host: str, port: int, tls: bool, allowed: bool, policy: ProxyPolicy,
    destinations: Destinations,
) -> None:
    if allowed:
        check_port(host, port, tls, policy, destinations)
    else:
        with pytest.raises(ProxyRefused, match=f"to port {port} is not allowed"):
            check_port(host, port, tls, policy, destinations)


@pytest.mark.parametrize(
    ("authority", "parsed"),
    [("localhost.:443", ("localhost", 443)), ("Example.COM:443", ("example.com", 443)),
     ("[::1]:5000", ("::1", 5000)), ("127.1:80", ("127.1", 80))],
)
def test_split_authority(authority: str, parsed: tuple[str, int]) -> None:
    assert split_authority(authority) == parsed


@pytest.mark.parametrize("authority", ["host", "host:0", "host:x", ".:443", "a..:443", "[..]:443"])
def test_split_authority_refuses_malformed_targets(authority: str) -> None:
    with pytest.raises(ProtocolError):
        split_authority(authority)
