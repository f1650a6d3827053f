"""Where cr-proxy may connect: the wall against using it as a doorway into
the LAN (SSRF). Pure: no I/O.

A destination on loopback, link-local or a private range is refused unless
the operator allowed it: a host named in `endpoints` (and the hosts those
URLs point at), or an entry of `proxy.allow_private` (a host, `*.domain`,
`host:port`, or a CIDR). The same rule guards the CONNECT front (the host
a client names), the fetcher (a registry a mirror client names with a path
prefix or `?ns=`, a Host in https_proxy mode, a redirect target) and the
addresses a name resolves to (upstream.PolicyResolver).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def split_host(host: str) -> str:
    """host[:port] or [v6]:port -> the bare host, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def ip_of(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_private(host: str) -> bool:
    """Loopback, link-local, private or otherwise non-global, by literal."""
    bare = split_host(host)
    if bare == "localhost" or bare.endswith(".localhost"):
        return True
    address = ip_of(bare)
    return address is not None and not address.is_global


def matches(host: str, patterns: tuple[str, ...] | frozenset[str]) -> bool:
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and (host == pattern[2:] or host.endswith(pattern[1:])):
            return True
    return False


class Destinations:
    """The allow-list for private destinations, from the configuration."""

    __slots__ = ("_names", "_networks")

    def __init__(self, allow_private: tuple[str, ...], endpoints: dict[str, str]) -> None:
        names = set(endpoints)
        for url in endpoints.values():
            # An endpoint reached by name must resolve even if it is private;
            # one given as an address is connected to directly and needs
            # nothing here (and must not open that address to everyone).
            hostname = urlsplit(url).hostname
            if hostname and ip_of(hostname) is None:
                names.add(hostname.lower())
        networks = []
        for entry in allow_private:
            if "/" in entry or ip_of(entry.strip("[]")) is not None:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            else:
                names.add(entry.lower())
        self._names = frozenset(names)
        self._networks = tuple(networks)

    @classmethod
    def of(cls, config: Config) -> Destinations:
        return cls(config.proxy.allow_private, dict(config.endpoints))

    def __repr__(self) -> str:
        return f"<Destinations {sorted(self._names)} {self._networks}>"

    def named(self, host: str) -> bool:
        """Did the operator name this host (with or without its port)?"""
        return matches(host.lower(), self._names) or matches(split_host(host), self._names)

    def host_allowed(self, host: str) -> bool:
        """May we connect to this host[:port] as named (by its literal)?"""
        if not is_private(host) or self.named(host):
            return True
        address = ip_of(split_host(host))
        return address is not None and self.address_allowed(address)

    def address_allowed(self, address: IPAddress) -> bool:
        return address.is_global or any(
            address.version == net.version and address in net for net in self._networks
        )
