"""Hosts, ports, addresses and URLs as cr-proxy reads them. Pure: no I/O.

One function per question, used by the destination policy (policy.py), the
CONNECT front (front/connect.py), the upstream client (upstream/client.py)
and the inventory (cache/inventory.py):

- parse_authority: `host`, `host:port`, `[v6]`, `[v6]:port` or a bare v6
  address -> (host, port or None), as the configuration names them;
- connect_target: a CONNECT or proxy request's authority -> (host, port),
  strictly (RFC 9112 3.2.3: a port is required unless a default is given);
- ip_of: the address a host literal names to the resolver (inet_aton's
  numeric IPv4 spellings included); ip_literal: strictly an address literal;
- is_loopback: does host[:port] name this machine;
- split_url: a URL -> (scheme, host[:port] as stored, path?query);
- dial_target: a URL -> (host, port) as it is dialled.

Every error is a ValueError; callers turn it into their protocol's error.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from cr_proxy.oci.reference import is_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEME_PORTS = {"http": 80, "https": 443}
# The numeric IPv4 spellings inet_aton (and so getaddrinfo) accepts besides
# dotted quads: 127.1, 0x7f000001, 2130706433, 0177.0.0.1. Only these reach
# inet_aton, which would also take "127.0.0.1 anything".
NUMERIC_V4_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}")


def port_of(text: str, authority: str) -> int:
    """A TCP port, 1-65535, in decimal digits; ValueError naming `authority`."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {authority[:100]!r}")
    return int(text)


def parse_authority(authority: str) -> tuple[str, int | None]:
    """host, host:port, [v6], [v6]:port or a bare v6 address -> (the bare
    host, lower case; the port, None when none is given). ValueError on a
    port that is not one."""
    text = authority.strip().lower()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad authority {authority[:100]!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, None
    return host, port_of(port_text, authority)


def connect_target(authority: str, default_port: int | None = None) -> tuple[str, int]:
    """A request target's `host:port` (CONNECT) or URL authority (with the
    scheme's `default_port`) -> (host: lower case, no brackets, no root
    dot; port). The host must be a host name or an address literal."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or "]" in port_text:
        if default_port is None:
            raise ValueError(f"CONNECT target {authority[:100]!r} has no port")
        host, port_text = authority, str(default_port)
    # RFC 3986 3.2.2: an IPv6 literal is bracketed, and only an IPv6 literal
    # is; anything else holds no colon (or `a:1:443` would read as host `a:1`).
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        address = ip_literal(inner)
        if not isinstance(address, ipaddress.IPv6Address):
            raise ValueError(f"bad host in {authority[:100]!r}")
        return inner.lower(), port_of(port_text, authority)
    # "localhost." is localhost: the root's dot goes, so the policy sees the name.
    host = host.lower().removesuffix(".")
    port = port_of(port_text, authority)
    if ":" in host or not (is_host(host) or ip_literal(host) is not None):
        raise ValueError(f"bad host in {authority[:100]!r}")
    return host, port


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def ip_literal(text: str) -> IPAddress | None:
    """The address `text` spells in standard notation (ipaddress's reading:
    dotted quad or IPv6, no brackets); None for anything else."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ip_of(host: str) -> IPAddress | None:
    """The address a host literal names, as the resolver would read it
    (numeric IPv4 spellings included, an IPv4-mapped IPv6 address as IPv4);
    None for a name."""
    address = ip_literal(host)
    if address is not None:
        return unmapped(address)
    if NUMERIC_V4_RE.fullmatch(host.lower()) is None:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_loopback(host: str) -> bool:
    """host[:port] names this machine (localhost, 127/8, ::1), read as a
    checked domain spells it (lower case)."""
    if host.startswith("["):
        bare = host[1 : host.find("]")]
    else:
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if bare == "localhost":
        return True
    address = ip_literal(bare)
    return address is not None and address.is_loopback


def split_url(url: str) -> tuple[str, str, str]:
    """-> (scheme, host[:port] as stored: without the default ports 80 and
    443, path?query). ValueError on a port that is not a number."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port and parts.port not in SCHEME_PORTS.values():
        host = f"{host}:{parts.port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, path


def dial_target(url: str) -> tuple[str, int]:
    """The host (lower case; "" if the URL names none) and port a URL is
    dialled at: its own port, else its scheme's (http or https)."""
    parts = urlsplit(url)
    port = parts.port or SCHEME_PORTS.get(parts.scheme)
    if port is None:
        raise ValueError(f"{url[:100]!r} names no port and no scheme we know")
    return parts.hostname or "", port
