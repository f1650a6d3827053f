"""The cluster's owners (docs/design.md, "Cluster"): a blob miss (or a
manifest's, or a tag's) is asked of
nginx's ring (run/peers.sock, `upstream cr_peers` in cluster.conf), which
picks the digest's owner by consistent hash over cluster.peers, skips an
owner that fails (max_fails, proxy_next_upstream) and says which peers it
tried (X-CR-Peer-Addr). The hashing and the failure accounting are
nginx's; this side only asks, counts, and remembers the digests a peer
answered wrongly (those go to the upstream from then on).

A peer's answer is just another upstream body to the fetcher: written to
a temp file, hashed, and no client gets its last byte before it matches
the digest (fetch/blobs.py). The owner may be this node: nginx then
answers 421 at once (the mirror server's `$cr_peer_self`), and the caller
fills from the upstream itself.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from cr_proxy.cache.layout import Target, mirror_prefix
from cr_proxy.config import Config
from cr_proxy.metrics import Metrics
from cr_proxy.upstream.client import BODY_READ_BUFFER

log = logging.getLogger("cr_proxy.peers")

SELF_OWNS = 421  # what a node's mirror answers its own hop: "you own this digest"
# Digests some peer answered wrongly, fetched from the upstream from then on.
DISTRUSTED_MAX = 4096
PEER_CONNECTIONS = 64


def ring_key(target: Target) -> str:
    """What nginx hashes to find the owner: a digest, or for a tag
    <domain>/name:tag (the cache's domain: the same for a mirror's and an
    https_proxy client's request, and on every node)."""
    rpath = target.rpath
    return rpath.ref if rpath.by_digest else f"{target.domain}/{rpath.name}:{rpath.ref}"


@dataclass(slots=True)
class PeerAnswer:
    """The owner's 200, its body not read yet."""

    response: aiohttp.ClientResponse
    peer: str  # the peer that answered, as nginx names it (address:port)


class Peers:
    """A client of nginx's ring, for one fetcher."""

    __slots__ = ("_distrusted", "_session", "config", "metrics")

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._distrusted: OrderedDict[str, None] = OrderedDict()
        connector = aiohttp.UnixConnector(path=str(config.run_dir / "peers.sock"),
                                          limit=PEER_CONNECTIONS)
        # nginx's proxy_read_timeout towards the peers decides first (it
        # then fails over); this one only bounds a hung run/peers.sock.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeouts.connect,
            sock_read=2 * config.peer_read_timeout + config.cluster.connect_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                              auto_decompress=False,
                                              read_bufsize=BODY_READ_BUFFER)

    def __repr__(self) -> str:
        return f"<Peers {len(self.config.cluster.peers)} distrusted={len(self._distrusted)}>"

    async def close(self) -> None:
        await self._session.close()

    async def open(self, target: Target, accept: str | None = None) -> PeerAnswer | None:
        """GET a blob or a manifest from its owner, or None when this node
        owns it, when a peer answered this key wrongly before, or when no
        peer gave a usable answer: the caller then asks the upstream itself.
        The ring's key is ring_key()."""
        return await self._ask("GET", target, accept)

    async def head(self, target: Target) -> int | None:
        """HEAD a blob at its owner (which answers from its cache, or asks
        its upstream: one HEAD for the cluster): the blob's size when the
        owner has it, None when this node owns it or no peer said 200 (the
        caller then asks the upstream itself)."""
        answer = await self._ask("HEAD", target)
        if answer is None:
            return None
        answer.response.release()
        return answer.response.content_length

    async def _ask(self, method: str, target: Target, accept: str | None = None
                   ) -> PeerAnswer | None:
        digest = ring_key(target)
        if digest in self._distrusted:
            return None
        # The owner's mirror names the registry in the path, as a client
        # would; it maps it to the same cache <domain> as this node.
        path = f"/v2/{mirror_prefix(target.registry)}/{target.rpath.path.removeprefix('v2/')}"
        headers = {"X-CR-Peer": self.config.cluster.me, "X-CR-Digest": digest}
        if accept:
            headers["Accept"] = accept
        try:
            response = await self._session.request(method, f"http://cr-peers{path}",
                                                   headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as err:
            log.warning("the peers' ring (run/peers.sock) failed for %s: %s", digest, err)
            self.metrics.peer_errors.labels(peer="", reason="unreachable").inc()
            return None
        peer = self._count(response.headers.get("X-CR-Peer-Addr", ""))
        if response.status == SELF_OWNS:
            response.release()
            return None
        if response.status != 200:
            response.release()
            log.warning("peer %s answered %s to a %s of %s: asking the upstream", peer,
                        response.status, method, digest)
            self.metrics.peer_errors.labels(peer=peer, reason="status").inc()
            return None
        return PeerAnswer(response, peer)

    def _count(self, tried: str) -> str:
        """Count nginx's $upstream_addr ("a:1, b:1" when a failed and b
        answered): a request to the last, a failover from each before it.
        Returns the last."""
        peers = [p.strip() for p in tried.split(",") if p.strip()]
        if not peers:
            return ""
        for failed in peers[:-1]:
            self.metrics.peer_failovers.labels(peer=failed).inc()
        self.metrics.peer_requests.labels(peer=peers[-1]).inc()
        return peers[-1]

    def refused(self, answer: PeerAnswer, target: Target, reason: str, why: str) -> None:
        """A peer's body failed (wrong bytes, cut short, not a manifest):
        counted, and the digest is fetched from the upstream from now on
        (bounded memory)."""
        digest = ring_key(target)
        log.error("peer %s sent a bad body for %s (%s): %s; this digest is fetched from "
                  "the upstream from now on", answer.peer, digest, reason, why)
        self.metrics.peer_errors.labels(peer=answer.peer, reason=reason).inc()
        self._distrusted[digest] = None
        self._distrusted.move_to_end(digest)
        while len(self._distrusted) > DISTRUSTED_MAX:
            self._distrusted.popitem(last=False)
