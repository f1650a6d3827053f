"""cr_proxy.policy: which destinations (host AND port) cr-proxy may connect to."""

from __future__ import annotations

import ipaddress

import pytest

from cr_proxy.net.policy import Destinations, ip_of, is_private, parse_authority, parse_rule

ENDPOINTS = {
    "registry.test": "http://127.0.0.1:5000",  # an address: opens nothing
    "internal.test": "http://lan-host",  # a name: lan-host:80 may resolve privately
    "named.test": "http://localhost:7000",
    "ported.test:8443": "https://127.0.0.1:8443",
}


@pytest.fixture
def destinations() -> Destinations:
    return Destinations(
        ("10.0.0.0/24", "localhost:5001", "127.0.0.2:6000", "[::1]:5000", "lan.example",
         "*.corp.example:5000"),
        ENDPOINTS,
    )


@pytest.mark.parametrize(
    ("host", "private"),
    [("127.0.0.1", True), ("127.0.0.1:9180", True), ("[::1]:5000", True), ("localhost", True),
     ("localhost.", True), ("LOCALHOST", True), ("x.localhost", True), ("10.1.2.3", True),
     ("169.254.169.254", True), ("192.168.0.1", True), ("[::ffff:127.0.0.1]", True),
     ("fd00::1", True), ("127.1", True), ("0x7f000001", True), ("2130706433", True),
     ("0177.0.0.1", True), ("0x7f.1", True), ("10.1", True), ("8.8.8.8", False),
     ("registry.test", False), ("ghcr.io:443", False), ("1.2.3.4.5", False)],
)
def test_is_private_by_literal(host: str, private: bool) -> None:
    assert is_private(host) is private


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.1", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("2130706433", "127.0.0.1"),
     ("0177.0.0.1", "127.0.0.1"), ("::ffff:10.0.0.1", "10.0.0.1"), ("::1", "::1"),
     ("8.8.8.8", "8.8.8.8"), ("registry.test", None), ("127.0.0.1 x", None), ("1.2.3.4.5", None),
     ("0x7F.0.0.1", "127.0.0.1"), ("08.0.0.1", None)],
)
def test_ip_of_reads_every_spelling_the_resolver_reads(host: str, address: str | None) -> None:
    """inet_aton's forms (what getaddrinfo accepts) are addresses, not names."""
    expected = ipaddress.ip_address(address) if address else None
    assert ip_of(host) == expected


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("ghcr.io", 443, True),  # a public name: the resolver checks its addresses
        ("registry.test", 443, True),  # an endpoint key, at its (default) port
        ("registry.test", 80, True),
        ("registry.test", 9180, False),  # ... and at no other
        ("ported.test", 8443, True),  # an endpoint key host:port
        ("ported.test", 443, False),
        ("127.0.0.1", 5000, False),  # an endpoint's address is not opened to everyone
        ("127.0.0.1", 9180, False),
        ("localhost", 7000, True),  # an endpoint URL's host:port
        ("localhost", 7001, False),  # ... not that host's other ports
        ("10.0.0.5", 443, True),  # a CIDR: the default ports
        ("10.0.0.5", 5000, False),
        ("10.0.1.5", 443, False),
        ("localhost", 5001, True),  # allow_private host:port, exactly
        ("localhost", 5002, False),
        ("localhost", 443, False),
        ("127.0.0.2", 6000, True),  # address:port
        ("127.0.0.2", 443, False),
        ("::1", 5000, True),  # [v6]:port
        ("::1", 443, False),
        ("lan.example", 443, True),  # a bare name: the default ports only
        ("lan.example", 22, True),  # not private by literal: its addresses decide
        ("a.corp.example", 5000, True),
        ("127.1", 443, False),
        ("0x7f000001", 5001, False),
    ],
)
def test_host_allowed(destinations: Destinations, host: str, port: int, allowed: bool) -> None:
    assert destinations.host_allowed(host, port) is allowed


@pytest.mark.parametrize(
    ("host", "port", "address", "allowed"),
    [
        ("ghcr.io", 443, "140.82.121.34", True),
        ("ghcr.io", 443, "127.0.0.1", False),  # a public-looking name into loopback
        ("vm", 443, "127.0.1.1", False),  # the machine's own name
        ("lan.example", 443, "10.9.9.9", True),  # named: any address it resolves to
        ("lan.example", 22, "10.9.9.9", False),  # ... at the default ports only
        ("lan-host", 80, "192.168.1.9", True),  # an endpoint URL's host:port
        ("lan-host", 9180, "192.168.1.9", False),
        ("localhost", 5001, "127.0.0.1", True),  # allow_private host:port
        ("localhost", 5001, "::1", True),
        ("localhost", 5002, "127.0.0.1", False),
        ("somewhere", 443, "10.0.0.7", True),  # in the CIDR, at a default port
        ("somewhere", 5000, "10.0.0.7", False),
        ("somewhere", 443, "fe80::1%eth0", False),  # scoped link-local: not an address we allow
    ],
)
def test_resolved_allowed(
    destinations: Destinations, host: str, port: int, address: str, allowed: bool
) -> None:
    assert destinations.resolved_allowed(host, port, address) is allowed


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [("example.com", 80, True), ("example.com", 8080, False), ("localhost", 5001, True),
     ("localhost", 5002, False), ("registry.test", 80, True), ("registry.test", 5000, False)],
)
def test_http_port_allowed(destinations: Destinations, host: str, port: int, allowed: bool) -> None:
    assert destinations.http_port_allowed(host, port) is allowed


@pytest.mark.parametrize(
    ("authority", "parsed"),
    [("a.test:80", ("a.test", 80)), ("[::1]:5000", ("::1", 5000)), ("[::1]", ("::1", None)),
     ("::1", ("::1", None)), ("A.Test", ("a.test", None))],
)
def test_parse_authority(authority: str, parsed: tuple[str, int | None]) -> None:
    assert parse_authority(authority) == parsed


@pytest.mark.parametrize("authority", ["a.test:0", "a.test:65536", "a.test:x", "[::1]x", "[::1"])
def test_parse_authority_refuses_bad_ports(authority: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(authority)


@pytest.mark.parametrize(
    ("entry", "pattern", "network", "port"),
    [("localhost:5000", "localhost", None, 5000), ("LAN.example", "lan.example", None, None),
     ("*.corp.example:5000", "*.corp.example", None, 5000), ("*", "*", None, None),
     ("10.0.0.0/8", "", "10.0.0.0/8", None), ("10.0.0.5:5000", "", "10.0.0.5/32", 5000),
     ("[fd00::5]:5000", "", "fd00::5/128", 5000), ("fd00::5", "", "fd00::5/128", None),
     ("[fd00::5]", "", "fd00::5/128", None)],
)
def test_parse_rule(entry: str, pattern: str, network: str | None, port: int | None) -> None:
    rule = parse_rule(entry)
    assert rule.pattern == pattern
    assert rule.network == (ipaddress.ip_network(network) if network else None)
    assert rule.port == port


@pytest.mark.parametrize("entry", ["localhost:0", "localhost:99999", "bad_host", "10.0.0.0/33",
                                   "a/b", "host:port", ""])
def test_parse_rule_refuses_what_is_no_entry(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(entry)
