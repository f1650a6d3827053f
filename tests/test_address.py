"""cr_proxy.net.address: the one reader of hosts, ports, addresses and URLs,
by value and by property (hypothesis)."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cr_proxy.cache.scan import redirect_target
from cr_proxy.net.address import (
    connect_target,
    dial_target,
    ip_literal,
    ip_of,
    is_loopback,
    parse_authority,
    split_url,
    unmapped,
)
from cr_proxy.oci.reference import is_host

LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
NAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(
    lambda name: ip_of(name) is None  # 127.1 and 10 are addresses, not names
)
PORTS = st.integers(min_value=1, max_value=65535)
V4 = st.ip_addresses(v=4)
V6 = st.ip_addresses(v=6)


@pytest.mark.parametrize(
    ("authority", "default_port", "parsed"),
    [("localhost.:443", None, ("localhost", 443)), ("[::1]:5000", None, ("::1", 5000)),
     ("127.1:80", None, ("127.1", 80)), ("a.test", 80, ("a.test", 80)),
     ("[::1]", 80, ("::1", 80)), ("a.test:8080", 80, ("a.test", 8080))],
)
def test_connect_target(authority: str, default_port: int | None, parsed: tuple[str, int]) -> None:
    assert connect_target(authority, default_port) == parsed


@pytest.mark.parametrize(
    ("authority", "message"),
    [("host", "has no port"), ("host:65536", "bad port"), ("host:-1", "bad port"),
     ("a_b:443", "bad host"), ("[::1]", "has no port"), ("[::g]:443", "bad host"),
     ("::1", "bad host")],
)
def test_connect_target_refuses(authority: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        connect_target(authority)


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1", "127.0.0.1"), ("::ffff:10.0.0.1", "::ffff:10.0.0.1"), ("127.1", None),
     ("[::1]", None), ("fe80::1%eth0", "fe80::1%eth0"), ("localhost", None)],
)
def test_ip_literal_is_strict(text: str, address: str | None) -> None:
    assert ip_literal(text) == (ipaddress.ip_address(address) if address else None)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("[::1]", True), ("::1", True), ("127.9.9.9", True), ("localhost:5000", True),
     ("127.1", False), ("LOCALHOST", False), ("localhost.test", False)],
)
def test_is_loopback_by_value(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("url", "parts"),
    [("https://A.Example/x", ("https", "a.example", "/x")), ("http://h:80", ("http", "h", "/")),
     ("http://[::1]:5000/v2/?a=1", ("http", "::1:5000", "/v2/?a=1")),
     ("/relative", ("", "", "/relative"))],
)
def test_split_url_by_value(url: str, parts: tuple[str, str, str]) -> None:
    assert split_url(url) == parts


@given(NAMES, PORTS)
def test_a_name_and_port_read_back_alike_by_both_authority_readers(name: str, port: int) -> None:
    assert is_host(name)
    assert parse_authority(f"{name}:{port}") == (name, port)
    assert parse_authority(name.upper()) == (name, None)
    assert connect_target(f"{name.upper()}.:{port}") == (name, port)
    assert connect_target(name, default_port=port) == (name, port)


@given(V6, PORTS)
def test_a_bracketed_v6_literal_reads_back_as_its_address(address: ipaddress.IPv6Address,
                                                          port: int) -> None:
    text = str(address)
    assert parse_authority(f"[{text}]:{port}") == (text, port)
    assert parse_authority(text) == (text, None)
    assert connect_target(f"[{text}]:{port}") == (text, port)
    assert ip_of(text) == unmapped(address)


@given(V4, PORTS)
def test_every_spelling_of_a_v4_address_is_that_address(address: ipaddress.IPv4Address,
                                                         port: int) -> None:
    value = int(address)
    assert ip_of(str(address)) == address
    assert ip_of(str(value)) == address
    assert ip_of(hex(value)) == address
    assert ip_of(f"::ffff:{address}") == address  # mapped: the IPv4 it carries
    assert ip_literal(hex(value)) is None  # only the resolver reads those
    assert is_loopback(f"{address}:{port}") is address.is_loopback
    assert connect_target(f"{address}:{port}") == (str(address), port)


@given(st.one_of(NAMES, V4.map(str), V6.map(lambda a: f"[{a}]")), PORTS,
       st.sampled_from(["http", "https"]))
def test_split_url_drops_only_the_default_ports(host: str, port: int, scheme: str) -> None:
    _, stored, target = split_url(f"{scheme}://{host}:{port}/a/b?q=1#frag")
    bare = host.strip("[]")
    assert stored == (bare if port in (80, 443) else f"{bare}:{port}")
    assert target == "/a/b?q=1"


@given(st.text(max_size=40))
def test_the_readers_never_raise_anything_but_value_error(text: str) -> None:
    for reader in (parse_authority, connect_target):
        with contextlib.suppress(ValueError):
            reader(text)
    ip_of(text)
    ip_literal(text)
    is_loopback(text)


@pytest.mark.parametrize(
    ("url", "target"),
    [("https://Reg.Example", ("reg.example", 443)), ("http://lan-host", ("lan-host", 80)),
     ("http://127.0.0.1:5000/v2/", ("127.0.0.1", 5000)), ("https://[::1]:8443", ("::1", 8443)),
     ("https:///x", ("", 443))],
)
def test_dial_target(url: str, target: tuple[str, int]) -> None:
    assert dial_target(url) == target


@pytest.mark.parametrize("url", ["ftp://host/x", "//host/x", "https://host:x/"])
def test_dial_target_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        dial_target(url)


@pytest.mark.parametrize(
    ("record", "target"),
    [("307 https://cdn.example:443/a/b?sig=1", ("cdn.example", "a/b")),
     ("302 http://cdn.test:8080/x", ("cdn.test:8080", "x")),
     ("302 /relative", None), ("302 http://:x/a", None), ("302 https://cdn.example:99999/a", None),
     ("302 https://../a", None)],
)
def test_a_redirect_record_reads_back_as_the_host_and_path_it_links(
    record: str, target: tuple[str, str] | None,
) -> None:
    assert redirect_target(record) == target
