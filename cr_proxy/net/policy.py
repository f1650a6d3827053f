"""Where cr-proxy may connect: the wall against using it as a doorway into
the LAN (SSRF). Pure: no I/O.

A destination is a host AND a port. One on loopback, link-local or a
private range is refused unless the operator allowed exactly it:

- an entry of `proxy.allow_private`: `host:port`, `address:port` or
  `[v6]:port` open that one port; `host`, `*.domain`, an address or a CIDR
  without a port open the default ports (80, 443) only;
- an `endpoints` key (`host` or `host:port`): that authority, and the
  host:port its URL names when the URL names a host (an address in a URL is
  dialled as it is and opens nothing). A host named by an endpoint key is
  reached only as named: the same host at another port is refused.

The same rule guards the CONNECT front (the host and port a client names,
then every address the name resolves to, front._connect_tcp), the fetcher
(a registry a mirror client names with a path prefix or `?ns=`, a Host in
https_proxy mode, a redirect target: upstream.Upstream.send) and the
addresses a name resolves to (upstream.PolicyResolver):
`Destinations.resolved_allowed` is the one check both resolvers apply.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cr_proxy.net.address import IPAddress, dial_target, ip_of, parse_authority
from cr_proxy.oci.reference import is_host

if TYPE_CHECKING:
    from cr_proxy.config import Config

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = frozenset({80, 443})  # what an allow entry without a port opens


def is_private(host: str) -> bool:
    """Loopback, link-local, private or otherwise non-global, by literal
    (host or host:port)."""
    try:
        bare = parse_authority(host)[0]
    except ValueError:
        return True
    name = bare.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = ip_of(bare)
    return address is not None and not address.is_global


def matches(host: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and (host == pattern[2:] or host.endswith(pattern[1:])):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowed destination: a host pattern or a network, and a port
    (None: the default ports)."""

    pattern: str  # host, *.domain or *; "" for a network rule
    network: IPNetwork | None
    port: int | None

    def covers(self, port: int) -> bool:
        return port in DEFAULT_PORTS if self.port is None else port == self.port

    def names(self, host: str, port: int) -> bool:
        return self.network is None and matches(host, (self.pattern,)) and self.covers(port)

    def contains(self, address: IPAddress, port: int) -> bool:
        net = self.network
        return (net is not None and address.version == net.version and address in net
                and self.covers(port))


def parse_rule(entry: str) -> Rule:
    """An allow_private entry or an endpoints key; ValueError if it is none."""
    text = entry.strip().lower()
    port: int | None = None
    if "/" in text:
        try:
            return Rule("", ipaddress.ip_network(text.strip("[]"), strict=False), None)
        except ValueError as err:
            raise ValueError(f"{entry!r} is not a CIDR") from err
    if ":" in text and ip_of(text) is None:  # not a bare IPv6 address: host:port
        text, port = parse_authority(text)
    address = ip_of(text.strip("[]"))
    if address is not None:
        return Rule("", ipaddress.ip_network(address), port)
    bare = text[2:] if text.startswith("*.") else text
    if text != "*" and not is_host(bare):
        raise ValueError(f"{entry!r} is not a host, host:port, *.domain, address or CIDR")
    return Rule(text, None, port)


class Destinations:
    """The allowed private destinations, from the configuration."""

    __slots__ = ("_endpoint_hosts", "_rules")

    def __init__(self, allow_private: Iterable[str], endpoints: dict[str, str],
                 own_urls: Iterable[str] = ()) -> None:
        """`own_urls`: more URLs the operator named (parent_mirror), reached
        as endpoints' URLs are."""
        rules = [parse_rule(entry) for entry in allow_private]
        keys = [parse_rule(key) for key in endpoints]
        rules += keys
        for url in [*endpoints.values(), *own_urls]:
            host, port = dial_target(url)
            # An endpoint reached by name must resolve even if it is private;
            # one given as an address is dialled as it is: it needs nothing
            # here and must not open that address to every client.
            if host and ip_of(host) is None:
                rules.append(Rule(host, None, port))
        self._rules = tuple(rules)
        self._endpoint_hosts = frozenset(rule.pattern for rule in keys if rule.pattern)

    @classmethod
    def of(cls, config: Config) -> Destinations:
        own = [url for url in (config.parent_mirror, config.upstream_proxy) if url]
        return cls(config.proxy.allow_private, dict(config.endpoints), own)

    def __repr__(self) -> str:
        return f"<Destinations {self._rules}>"

    def named(self, host: str, port: int) -> bool:
        """Did the operator name this host at this port?"""
        host = host.lower()
        return any(rule.names(host, port) for rule in self._rules)

    def address_allowed(self, address: IPAddress, port: int) -> bool:
        return address.is_global or any(rule.contains(address, port) for rule in self._rules)

    def host_allowed(self, host: str, port: int) -> bool:
        """May we connect to this host (bare, as a client named it) at this
        port? By its literal: a name's addresses are checked once resolved
        (resolved_allowed)."""
        host = host.lower()
        if self.named(host, port):
            return True
        if host in self._endpoint_hosts:
            return False  # an endpoint's host at a port it was not named with
        address = ip_of(host)
        if address is not None:
            return self.address_allowed(address, port)
        return not is_private(host)

    def resolved_allowed(self, host: str, port: int, address: str) -> bool:
        """May we connect to `address`, one that `host` resolved to? Both
        resolvers keep only the addresses this allows, and connect to them."""
        if self.named(host, port):
            return True
        ip = ip_of(address)
        return ip is not None and self.address_allowed(ip, port)

    def http_port_allowed(self, host: str, port: int) -> bool:
        """Plain-HTTP forwarding (https_proxy mode): port 80, or a host:port
        the operator named. The front checks it on the request line, the
        fetcher on every request's Host."""
        return port == 80 or self.named(host, port)


def refusal(host: str, port: int) -> str:
    """The message for a destination the policy refuses."""
    return (f"{host}:{port} is a loopback, link-local or private destination, or a port the "
            "operator did not name; allow it in proxy.allow_private (host:port) or endpoints")


def resolved_refusal(host: str, port: int) -> str:
    """The message for a name that resolves only to refused addresses."""
    return (f"{host} resolves only to loopback, link-local or private addresses; allow "
            f"{host}:{port} in proxy.allow_private")
