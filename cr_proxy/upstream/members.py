"""The cluster's members (docs/design.md, "Cluster"): who is on the ring,
and what share of the keys each one owns.

`cluster.peers` is either a list, the ring's entries as written (nginx
resolves a name in it once, at each (re)load), or one DNS name:port, a
Kubernetes headless Service: every address it resolves to is a node, the
ring's entries are those `address:port`s, and serve resolves the name
again every `cluster.resolve_interval` (nginx 1.22's upstreams cannot: no
`resolve` parameter) and re-renders the ring when the set changes.

`shares()` is nginx's ketama (ngx_http_upstream_hash_module.c,
`ngx_http_upstream_init_chash`) done again in Python: 160 points per
server, each crc32(host "\\0" port previous-point), a key owned by the
first point at or after crc32(key). The status page shows each member's
share of the hash space from it; tests/test_cluster_ring.py checks it
against a real nginx, key for key.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import logging
import socket
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from cr_proxy.config import Cluster, Config
from cr_proxy.errors import ConfigError

log = logging.getLogger("cr_proxy.cluster")

POINTS_PER_SERVER = 160  # nginx's, per unit of weight (every member's weight is 1)
RING = 1 << 32


def entry(address: str, port: int) -> str:
    """A ring entry as nginx names it: address:port, [v6]:port."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def addresses(host: str) -> list[str]:
    """Every address `host` resolves to (an address: itself), sorted.
    Raises OSError (socket.gaierror) when it does not resolve."""
    bare = host.strip("[]")
    try:
        return [str(ipaddress.ip_address(bare))]
    except ValueError:
        pass
    found = socket.getaddrinfo(bare, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in found}, key=_address_order)


def _address_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


@dataclass(frozen=True, slots=True)
class Members:
    """The ring's entries (sorted, this node's included) and this node's."""

    peers: tuple[str, ...]
    me: str
    listed: bool  # the name listed this node (else it was added: not yet published)


def resolve(cluster: Cluster) -> Members:
    """cluster.peers given as a DNS name -> the ring's members now: every
    address of the name on its port, and this node's entry (cluster.self's
    address among them; an address of it, else). Blocking (getaddrinfo);
    raises OSError when the name or self does not resolve, or the name has
    no address."""
    host, _, port_text = cluster.service.rpartition(":")
    port = int(port_text)
    found = [entry(a, port) for a in addresses(host)]
    if not found:
        raise OSError(f"{cluster.service} has no address")
    mine = [entry(a, port) for a in addresses(cluster.me.rpartition(":")[0])]
    me = next((m for m in mine if m in found), mine[0])
    listed = me in found
    # A node not yet in the name's answer (just started) is on its own
    # ring all the same: the others add it when their resolver lists it.
    peers = found if listed else [*found, me]
    return Members(tuple(sorted(peers, key=_entry_order)), me, listed)


def first(config: Config) -> tuple[Config, Members | None]:
    """At start: `config` with the ring's members in cluster.peers and this
    node's entry in cluster.self (None: the peers are a list, as written).
    A name that does not resolve yet (a Service with no pod published)
    starts a ring of this node alone: the next resolution adds the others."""
    cluster = config.cluster
    if not cluster.service:
        return config, None
    host, _, port = cluster.me.rpartition(":")
    try:
        me = entry(addresses(host)[0], int(port))
    except OSError as err:
        raise ConfigError(message=f"cluster.self: {cluster.me} does not resolve: {err}") from err
    try:
        members = resolve(cluster)
    except OSError as err:
        log.warning("cluster.peers: %s does not resolve (%s); starting as the only node "
                    "and resolving it again in %.0f s", cluster.service, err,
                    cluster.resolve_interval)
        members = Members((me,), me, False)
    return with_members(config, members), members


def with_members(config: Config, members: Members) -> Config:
    cluster = dataclasses.replace(config.cluster, peers=members.peers, me=members.me)
    return dataclasses.replace(config, cluster=cluster)


def _entry_order(peer: str) -> tuple[int, int, str, int]:
    """Addresses in numeric order (v4 first), then names."""
    host, _, port = peer.rpartition(":")
    try:
        version, number = _address_order(host.strip("[]"))
    except ValueError:
        return 9, 0, host, int(port or 0)
    return version, number, "", int(port or 0)


def _points(peers: Iterable[str]) -> list[tuple[int, str]]:
    points: dict[int, str] = {}
    for peer in peers:
        host, colon, port = peer.rpartition(":")
        if not colon or not port.isdigit():  # nginx: no port part
            host, port = peer, ""
        base = host.encode() + b"\0" + port.encode()
        previous = 0
        for _ in range(POINTS_PER_SERVER):
            value = zlib.crc32(base + struct.pack("<I", previous))
            points.setdefault(value, peer)  # nginx keeps the first of equal points
            previous = value
    return sorted(points.items())


def owner(peers: Iterable[str], key: str) -> str:
    """The member nginx's ring picks for `key` when none is skipped."""
    points = _points(peers)
    index = bisect.bisect_left(points, (zlib.crc32(key.encode()), ""))
    return points[index % len(points)][1]


def shares(peers: Iterable[str]) -> dict[str, float]:
    """Each member's share of the keys (0..1): the arcs of the hash space
    that end on its points."""
    points = _points(peers)
    out = dict.fromkeys(sorted({peer for _, peer in points}, key=_entry_order), 0.0)
    previous = points[-1][0] - RING if points else 0
    for value, peer in points:
        out[peer] += (value - previous) / RING
        previous = value
    return out
