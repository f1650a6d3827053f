"""The CONNECT front's protocol core: parse a proxy request head and decide
what to do with it. Pure (no I/O), so every edge case is a unit test; the
asyncio side in front.py only moves bytes.

Grammar (RFC 9110 9.3.6, RFC 9112 3):
    request-line   = method SP request-target SP HTTP-version CRLF
    CONNECT target = authority-form = uri-host ":" port
    proxy GET      = absolute-form  = "http://" authority path-abempty [ "?" query ]
    origin-form    = absolute-path [ "?" query ]     (a request to the proxy itself)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from cr_proxy.config import ProxyPolicy
from cr_proxy.errors import ProtocolError, ProxyRefused
from cr_proxy.net.address import connect_target, ip_literal, unmapped
from cr_proxy.net.policy import Destinations, matches, refusal

MAX_HEAD = 16 * 1024  # bytes of request line + headers we accept
REQUEST_LINE_RE = re.compile(r"([A-Z]{1,16}) (\S{1,8000}) HTTP/1\.[01]")


class Action(Enum):
    INTERCEPT = "intercept"  # TLS to nginx with a leaf from our CA
    TUNNEL = "tunnel"  # blind TCP relay to the real host
    FORWARD = "forward"  # plain-HTTP proxy request: to nginx's HTTP side
    SERVE_CA = "ca"  # GET /ca.crt to the proxy itself


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    target: str
    host: str  # lower-cased, no port
    port: int
    raw: bytes  # the head as received, CRLFCRLF included


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    head: Head


def find_head_end(buffer: bytes) -> int:
    """Index just past the blank line ending the head, or -1: need more."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise ProtocolError(message="request head too large")
        return -1
    if end + 4 > MAX_HEAD:
        raise ProtocolError(message="request head too large")
    return end + 4


def parse_head(raw: bytes) -> Head:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as err:
        raise ProtocolError(message="request head is not ASCII") from err
    line = text.split("\r\n", 1)[0]
    match = REQUEST_LINE_RE.fullmatch(line)
    if not match:
        raise ProtocolError(message="malformed request line")
    method, target = match.groups()
    if method == "CONNECT":
        host, port = split_authority(target)
    elif target.startswith("/"):
        host, port = "", 0
    else:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ProtocolError(message="only http:// absolute URIs are proxied; use CONNECT")
        host, port = split_authority(parts.netloc.rpartition("@")[2], default_port=80)
    return Head(method, target, host, port, raw)


def split_authority(authority: str, default_port: int | None = None) -> tuple[str, int]:
    """address.connect_target, refused as a malformed request."""
    try:
        return connect_target(authority, default_port)
    except ValueError as err:
        raise ProtocolError(message=str(err)) from err


def client_allowed(client_ip: str, policy: ProxyPolicy) -> bool:
    ip = ip_literal(client_ip.split("%")[0])
    if ip is None:
        return False
    ip = unmapped(ip)
    return any(ip.version == net.version and ip in net for net in policy.allow_clients)


def check_port(
    host: str, port: int, tls: bool, policy: ProxyPolicy, destinations: Destinations
) -> None:
    """The https_proxy port rule: a CONNECT (TLS) to a port in proxy.ports;
    plain HTTP to port 80 or a host:port the operator named. The front
    checks it on the request line; the fetcher, the enforcement point, on
    every request's Host (pipelined ones, and a Host or SNI naming another
    port than the one connected to). Raises ProxyRefused."""
    if not (port in policy.ports if tls else destinations.http_port_allowed(host, port)):
        kind = "CONNECT" if tls else "plain HTTP"
        raise ProxyRefused(message=f"{kind} to port {port} is not allowed")


def decide(
    head: Head, client_ip: str, policy: ProxyPolicy, destinations: Destinations
) -> Decision:
    """What to do with a request; raises ProxyRefused with the reason. A
    tunnelled name's addresses are checked once resolved (front._connect_tcp)."""
    if not client_allowed(client_ip, policy):
        raise ProxyRefused(message=f"client {client_ip} is not allowed to use this proxy")
    if not head.host:
        if head.method == "GET" and head.target.split("?")[0] == "/ca.crt":
            return Decision(Action.SERVE_CA, head)
        raise ProxyRefused(message="this is a proxy: use CONNECT, or GET /ca.crt for the CA")
    if not destinations.host_allowed(head.host, head.port):
        raise ProxyRefused(message=refusal(head.host, head.port))
    tls = head.method == "CONNECT"
    check_port(head.host, head.port, tls, policy, destinations)
    if not tls:
        return Decision(Action.FORWARD, head)
    if matches(head.host, policy.passthrough):
        return Decision(Action.TUNNEL, head)
    if matches(head.host, policy.intercept):
        return Decision(Action.INTERCEPT, head)
    return Decision(Action.TUNNEL, head)


def reply(status: int, reason: str, body: str = "") -> bytes:
    payload = body.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


CONNECTED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


def proxy_protocol_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The PROXY protocol v1 line nginx reads on its unix listeners, so its
    logs show the real client address."""
    family = "TCP6" if ":" in client[0] else "TCP4"
    server_host = server[0]
    if (":" in server_host) != (family == "TCP6"):
        server_host = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client[0]} {server_host} {client[1]} {server[1]}\r\n".encode()


