"""cr_proxy.front.connect, the edge cases its docstring promises as unit tests:
the request-line grammar, authority forms (IPv6 brackets, ports 0 and 65536),
absolute-form, the head size limit and a head split across reads. Through
the public calls only (parse_head, find_head_end, decide, client_allowed,
reply, proxy_protocol_v1): how the authority is split inside may change."""

from __future__ import annotations

import dataclasses

import pytest

from cr_proxy.config import ProxyPolicy, load
from cr_proxy.errors import ProtocolError, ProxyRefused
from cr_proxy.front.connect import (
    CONNECTED,
    MAX_HEAD,
    Action,
    client_allowed,
    decide,
    find_head_end,
    parse_head,
    proxy_protocol_v1,
    reply,
)
from cr_proxy.net.policy import Destinations


def raw(line: str, headers: str = "Host: x\r\n") -> bytes:
    return f"{line}\r\n{headers}\r\n".encode()


def target_of(line: str) -> tuple[str, int]:
    head = parse_head(raw(line))
    return head.host, head.port


# ---------------------------------------------------------------- request line


@pytest.mark.parametrize(
    "line",
    [
        "connect registry.test:443 HTTP/1.1",  # methods are case-sensitive (RFC 9110 9.1)
        "CONNECT registry.test:443 HTTP/2.0",
        "CONNECT registry.test:443 HTTP/1.2",
        "CONNECT registry.test:443 http/1.1",
        "CONNECT registry.test:443",  # no version
        "CONNECT registry.test:443 HTTP/1.1 ",  # trailing space
        "CONNECT  registry.test:443 HTTP/1.1",  # two spaces
        "CONNECT\tregistry.test:443 HTTP/1.1",
        " CONNECT registry.test:443 HTTP/1.1",
        "CONNECT HTTP/1.1",
        "",
        "ABCDEFGHIJKLMNOPQ registry.test:443 HTTP/1.1",  # a 17-letter method
        "CONNECT " + "a" * 8001 + " HTTP/1.1",  # a target past 8000 characters
    ],
)
def test_malformed_request_lines_are_refused(line: str) -> None:
    with pytest.raises(ProtocolError, match="malformed request line"):
        parse_head(raw(line))


def test_http_1_0_and_the_longest_method_are_read() -> None:
    assert target_of("CONNECT registry.test:443 HTTP/1.0") == ("registry.test", 443)
    assert parse_head(raw("ABCDEFGHIJKLMNOP /x HTTP/1.1")).method == "ABCDEFGHIJKLMNOP"


def test_a_head_that_is_not_ascii_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not ASCII"):
        parse_head("CONNECT régistry.test:443 HTTP/1.1\r\n\r\n".encode())
    with pytest.raises(ProtocolError, match="not ASCII"):
        parse_head(b"CONNECT registry.test:443 HTTP/1.1\r\nX: \xff\r\n\r\n")


def test_the_head_is_kept_as_received() -> None:
    data = raw("GET http://registry.test/v2/ HTTP/1.1", "Host: registry.test\r\nX-A: b\r\n")
    head = parse_head(data)
    assert (head.method, head.target, head.raw) == ("GET", "http://registry.test/v2/", data)


# ---------------------------------------------------------------- authority-form


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        ("registry.test:443", ("registry.test", 443)),
        ("Registry.TEST:443", ("registry.test", 443)),  # names are lower-cased
        ("registry.test.:443", ("registry.test", 443)),  # the root's dot goes
        ("registry.test:1", ("registry.test", 1)),
        ("registry.test:65535", ("registry.test", 65535)),
        ("10.0.0.1:8443", ("10.0.0.1", 8443)),
        ("[::1]:443", ("::1", 443)),  # brackets go: the policy sees the address
        ("[2001:DB8::1]:443", ("2001:db8::1", 443)),
        ("[::ffff:10.0.0.1]:443", ("::ffff:10.0.0.1", 443)),
    ],
)
def test_connect_authority_forms(target: str, parsed: tuple[str, int]) -> None:
    assert target_of(f"CONNECT {target} HTTP/1.1") == parsed


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("registry.test", "has no port"),
        ("[::1]", "has no port"),  # a colon inside the brackets is not a port
        ("[2001:db8::1]", "has no port"),
        ("registry.test:0", "bad port"),
        ("registry.test:65536", "bad port"),
        ("registry.test:99999999999999999999", "bad port"),
        ("registry.test:", "bad port"),
        ("registry.test:+443", "bad port"),
        ("registry.test:-1", "bad port"),
        ("registry.test:443/path", "bad port"),
        ("registry.test:https", "bad port"),
        (":443", "bad host"),
        ("[]:443", "bad host"),
        ("user@registry.test:443", "bad host"),
        ("under_score.test:443", "bad host"),
        ("-leading.test:443", "bad host"),
        ("[::1]x:443", "bad host"),
        ("a..b:443", "bad host"),
    ],
)
def test_connect_authority_refusals(target: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_head(raw(f"CONNECT {target} HTTP/1.1"))


@pytest.mark.parametrize("target", ["registry.test:5000:443", "::1:443", "[v1.x]:443",
                                    "[127.0.0.1]:443", "[::1:443", "::1]:443"])
def test_a_colon_outside_brackets_or_brackets_around_no_v6_are_refused(target: str) -> None:
    """RFC 3986 3.2.2: only an IPv6 literal is bracketed, and a host holds no
    colon otherwise (`a:1:443` read as host `a:1` once passed)."""
    with pytest.raises(ProtocolError):
        parse_head(raw(f"CONNECT {target} HTTP/1.1"))


# ---------------------------------------------------------------- absolute-form and origin-form


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        ("http://registry.test/v2/", ("registry.test", 80)),  # port 80 by default
        ("http://registry.test", ("registry.test", 80)),
        ("http://registry.test?x=1", ("registry.test", 80)),
        ("http://registry.test:5000/v2/", ("registry.test", 5000)),
        ("HTTP://Registry.Test/v2/", ("registry.test", 80)),  # scheme and host: any case
        ("http://user:secret@registry.test:8080/", ("registry.test", 8080)),  # userinfo dropped
        ("http://[::1]/v2/", ("::1", 80)),
        ("http://[::1]:8080/v2/", ("::1", 8080)),
    ],
)
def test_absolute_form(target: str, parsed: tuple[str, int]) -> None:
    assert target_of(f"GET {target} HTTP/1.1") == parsed


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("https://registry.test/", "only http://"),  # TLS goes by CONNECT
        ("ftp://registry.test/", "only http://"),
        ("http:///v2/", "only http://"),  # no host
        ("registry.test:80", "only http://"),  # authority-form is for CONNECT only
        ("*", "only http://"),
        ("http://registry.test:0/", "bad port"),
        ("http://registry.test:65536/", "bad port"),
        ("http://bad_host.test/", "bad host"),
    ],
)
def test_absolute_form_refusals(target: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_head(raw(f"GET {target} HTTP/1.1"))


def test_origin_form_is_a_request_to_the_proxy_itself() -> None:
    assert target_of("GET /ca.crt HTTP/1.1") == ("", 0)
    assert target_of("POST /anything?x=1 HTTP/1.1") == ("", 0)


# ---------------------------------------------------------------- the head's end and size


HEAD = b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n"


def test_the_head_ends_after_its_blank_line_and_what_follows_stays() -> None:
    assert find_head_end(HEAD) == len(HEAD)
    assert find_head_end(HEAD + b"\x16\x03\x01 the ClientHello") == len(HEAD)


def test_a_head_split_at_every_byte_is_found_only_once_whole() -> None:
    """The front reads in chunks: the blank line may arrive in pieces."""
    for cut in range(len(HEAD)):
        assert find_head_end(HEAD[:cut]) == -1, cut
    assert find_head_end(HEAD) == len(HEAD)


def test_bare_newlines_do_not_end_a_head() -> None:
    assert find_head_end(b"CONNECT registry.test:443 HTTP/1.1\n\n") == -1
    assert find_head_end(b"CONNECT registry.test:443 HTTP/1.1\r\n\n\r\n") == -1


def test_head_size_limit() -> None:
    line = b"CONNECT registry.test:443 HTTP/1.1\r\n"
    filler = MAX_HEAD - len(line) - 4 - len(b"X: \r\n")

    def head_of(size: int) -> bytes:
        return line + b"X: " + b"a" * size + b"\r\n\r\n"

    at_limit = head_of(filler + 2)  # "\r\n\r\n" ends exactly at MAX_HEAD
    assert len(at_limit) == MAX_HEAD
    assert find_head_end(at_limit) == MAX_HEAD
    with pytest.raises(ProtocolError, match="too large"):
        find_head_end(head_of(filler + 3))  # one byte past it
    # Without an end: more is awaited up to MAX_HEAD bytes, never past.
    assert find_head_end(b"a" * MAX_HEAD) == -1
    with pytest.raises(ProtocolError, match="too large"):
        find_head_end(b"a" * (MAX_HEAD + 1))


# ---------------------------------------------------------------- decide: the proxy's own requests


@pytest.fixture
def policy() -> ProxyPolicy:
    return dataclasses.replace(load(environ={}).proxy, intercept=("registry.test",))


@pytest.fixture
def destinations(policy: ProxyPolicy) -> Destinations:
    return Destinations(policy.allow_private, {"registry.test": "http://127.0.0.1:5000"})


@pytest.mark.parametrize(
    "line",
    ["GET /ca.crt HTTP/1.1", "GET /ca.crt?download=1 HTTP/1.1", "GET /ca.crt HTTP/1.0"],
)
def test_the_ca_is_served_by_get_only(
    line: str, policy: ProxyPolicy, destinations: Destinations
) -> None:
    assert decide(parse_head(raw(line)), "127.0.0.1", policy, destinations).action \
        is Action.SERVE_CA


@pytest.mark.parametrize(
    "line", ["POST /ca.crt HTTP/1.1", "HEAD /ca.crt HTTP/1.1", "GET /ca.pem HTTP/1.1",
             "GET / HTTP/1.1", "GET /ca.crt/x HTTP/1.1"],
)
def test_other_requests_to_the_proxy_itself_are_refused(
    line: str, policy: ProxyPolicy, destinations: Destinations
) -> None:
    with pytest.raises(ProxyRefused, match="this is a proxy"):
        decide(parse_head(raw(line)), "127.0.0.1", policy, destinations)


@pytest.mark.parametrize(
    ("client", "allowed"),
    [("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.9", True), ("::1", True),
     ("::ffff:127.0.0.1", True),  # an IPv4 client on a dual-stack listener
     ("::ffff:8.8.8.8", False), ("8.8.8.8", False), ("2001:db8::1", False),
     ("fd00::1", True), ("fe80::1%eth0", False), ("not-an-address", False), ("", False)],
)
def test_clients_by_address(client: str, allowed: bool, policy: ProxyPolicy) -> None:
    assert client_allowed(client, policy) is allowed


def test_a_client_not_allowed_is_refused_before_anything_else(
    policy: ProxyPolicy, destinations: Destinations
) -> None:
    with pytest.raises(ProxyRefused, match=r"client 8\.8\.8\.8 is not allowed"):
        decide(parse_head(raw("GET /ca.crt HTTP/1.1")), "8.8.8.8", policy, destinations)


# ---------------------------------------------------------------- what the front writes


def test_reply_is_a_whole_closing_answer() -> None:
    assert reply(403, "Forbidden", "no\n") == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nno\n"
    )
    assert reply(503, "Busy").endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert CONNECTED == b"HTTP/1.1 200 Connection Established\r\n\r\n"


@pytest.mark.parametrize(
    ("client", "server", "line"),
    [
        (("10.0.0.5", 40000), ("127.0.0.1", 3128), b"PROXY TCP4 10.0.0.5 127.0.0.1 40000 3128\r\n"),
        (("::1", 40000), ("::1", 3128), b"PROXY TCP6 ::1 ::1 40000 3128\r\n"),
        # One family per line: the server side follows the client's.
        (("::1", 40000), ("127.0.0.1", 3128), b"PROXY TCP6 ::1 ::1 40000 3128\r\n"),
        (("10.0.0.5", 1), ("::1", 3128), b"PROXY TCP4 10.0.0.5 127.0.0.1 1 3128\r\n"),
    ],
)
def test_proxy_protocol_line(
    client: tuple[str, int], server: tuple[str, int], line: bytes
) -> None:
    assert proxy_protocol_v1(client, server) == line
