"""Counters and gauges (prometheus_client), and the small HTTP app that
shows them: `/metrics` for Prometheus and `/` a read-only status page (the counters,
and what the caller adds: serve names incomplete and stale images), on
`listen.metrics` (loopback by default: only local clients reach it).

Who feeds what: the fetcher counts misses, revalidations, stale answers,
bytes fetched, resumed downloads, upstream errors and coalesced requests,
and in a cluster the misses each peer answered, failovers and peers'
refused answers (upstream/peers.py); the upstream side
(upstream/health.py) registries going down, down now, and the requests
their outage saved; hits are served by
nginx, which the fetcher never sees, so they come from nginx's access log
through the usage feed (usage.py); cache size and evictions from the
evictor.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """One registry per instance, so tests can run several side by side."""

    __slots__ = (
        "bytes_fetched", "bytes_served", "cache_bytes", "cluster_changes", "cluster_members",
        "coalesced", "dummy_tokens",
        "evictions", "hits", "mirror_auth_denied", "misses", "peer_errors", "peer_failovers",
        "peer_requests",
        "private_checks", "private_denied",
        "registry", "requests", "resumes", "revalidations",
        "stale_served", "upstream_down", "upstream_errors", "upstream_outages",
        "upstream_skipped",
    )

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter(
            "crproxy_hits", "Requests answered from the cache", ["kind"], registry=r
        )
        self.misses = Counter("crproxy_misses", "Requests fetched upstream", ["kind"], registry=r)
        self.revalidations = Counter(
            "crproxy_revalidations", "Stale tags checked upstream", ["result"], registry=r
        )
        self.stale_served = Counter(
            "crproxy_stale_served",
            "Stale tags, tag lists and referrers served because the upstream failed "
            "(registry: as upstream_errors)",
            ["registry"], registry=r,
        )
        self.bytes_served = Counter(
            "crproxy_bytes_served_from_cache", "Body bytes of cache hits", registry=r
        )
        self.bytes_fetched = Counter(
            "crproxy_bytes_fetched_upstream", "Body bytes downloaded from upstreams", registry=r
        )
        self.upstream_errors = Counter(
            "crproxy_upstream_errors",
            "Upstream failures (registry: a configured or answering one, else \"other\")",
            ["registry", "code"], registry=r,
        )
        # Registries down (upstream/health.py); registry: as upstream_errors.
        self.upstream_outages = Counter(
            "crproxy_upstream_outages", "Times a registry went down (a connect to one of its "
            "hosts failed)", ["registry"], registry=r,
        )
        self.upstream_down = Gauge(
            "crproxy_upstream_down", "Registries down now, probed in the background",
            ["registry"], registry=r,
        )
        self.upstream_skipped = Counter(
            "crproxy_upstream_skipped", "Upstream requests not made because their registry "
            "is down", ["registry"], registry=r,
        )
        # Private content (fetch/private.py).
        self.private_checks = Counter(
            "crproxy_private_checks", "Client credentials checked for a private repository "
            "(how: cached verdict, upstream, offline)", ["how"], registry=r,
        )
        self.private_denied = Counter(
            "crproxy_private_denied", "Requests for private content refused, by reason",
            ["reason"], registry=r,
        )
        # Mirror client authentication (nginx.py, mirror_auth), from the usage
        # feed: nginx's refusals carry their reason as the request type.
        self.mirror_auth_denied = Counter(
            "crproxy_mirror_auth_denied", "Mirror requests mirror_auth refused, by reason",
            ["reason"], registry=r,
        )
        self.coalesced = Counter(
            "crproxy_coalesced", "Misses that joined a download already running", registry=r
        )
        # fetch/resume.py: how="range" continued with a 206, "restart" read a
        # 200 again from the start (an upstream ignoring Range), "failed" a
        # resume attempt that brought nothing (an error answer, no connection).
        self.resumes = Counter(
            "crproxy_blob_resumes", "Blob downloads asked again after their upstream "
            "connection broke", ["how"], registry=r,
        )
        self.dummy_tokens = Counter(
            "crproxy_dummy_tokens", "Token requests answered offline", registry=r
        )
        self.requests = Counter(
            "crproxy_requests", "Requests seen by nginx", ["type", "status"], registry=r
        )
        # Cluster (cluster.*): misses sent to their owner through nginx's
        # ring, by the peer that answered; owners skipped on the way (failed,
        # down or slow: the next on the ring answered); and peers' answers
        # refused (wrong bytes, a cut body, an error status).
        self.peer_requests = Counter(
            "crproxy_peer_requests", "Blob misses answered by their owner node", ["peer"],
            registry=r,
        )
        self.peer_failovers = Counter(
            "crproxy_peer_failovers", "Owner nodes skipped because they failed; the next "
            "node on the ring answered", ["peer"], registry=r,
        )
        self.peer_errors = Counter(
            "crproxy_peer_errors", "Peers' answers refused (reason: digest, truncated, "
            "status, unreachable); the upstream was asked instead", ["peer", "reason"],
            registry=r,
        )
        # The ring's members (cluster.peers, or a DNS name's addresses now),
        # and how often a DNS name's answer changed the ring (a reload each).
        self.cluster_members = Gauge(
            "crproxy_cluster_members", "Nodes on the cluster's ring, this one included",
            registry=r,
        )
        self.cluster_changes = Counter(
            "crproxy_cluster_changes", "Times the ring was rendered again because "
            "cluster.peers' DNS name resolved to other addresses", registry=r,
        )
        self.evictions = Counter("crproxy_evictions", "Images evicted for space", registry=r)
        self.cache_bytes = Gauge("crproxy_cache_bytes", "Bytes in the digest store", registry=r)

    def __repr__(self) -> str:
        return f"<Metrics hits={self.total(self.hits):.0f} misses={self.total(self.misses):.0f}>"

    @staticmethod
    def total(metric: Counter) -> float:
        return sum(
            sample.value
            for family in metric.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    @staticmethod
    def by_label(metric: Counter, label: str) -> dict[str, float]:
        """A labelled counter's totals per value of one label."""
        out: dict[str, float] = {}
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels.get(label, "")
                    out[key] = out.get(key, 0.0) + sample.value
        return out

    def peer_rows(self) -> list[tuple[str, str]]:
        """The status page's cluster rows: for each peer, the misses it
        answered as their owner (its share of this node's, seen so far),
        the failovers from it and its refused answers."""
        answered = self.by_label(self.peer_requests, "peer")
        failovers = self.by_label(self.peer_failovers, "peer")
        refused = self.by_label(self.peer_errors, "peer")
        total = sum(answered.values())
        rows = []
        for peer in sorted(set(answered) | set(failovers) | set(refused)):
            share = f"{answered.get(peer, 0) / total:.0%}" if total else "n/a"
            rows.append((f"peer {peer or '(ring unreachable)'}",
                         f"owned {answered.get(peer, 0):.0f} misses ({share}), "
                         f"failed over {failovers.get(peer, 0):.0f}, "
                         f"refused {refused.get(peer, 0):.0f}"))
        return rows

    def cache_size(self) -> float:
        """The cache_bytes gauge, read through the collector's samples (a
        gauge without labels has exactly one)."""
        (family,) = self.cache_bytes.collect()
        return family.samples[0].value

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# More rows for the status page, computed by the caller (serve: the
# incomplete and stale images, ops/status.py).
StatusExtra = Callable[[], Awaitable[list[tuple[str, str]]]]


def make_app(metrics: Metrics, extra: StatusExtra | None = None) -> web.Application:
    async def prometheus(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def status(_: web.Request) -> web.Response:
        hits, misses = metrics.total(metrics.hits), metrics.total(metrics.misses)
        ratio = f"{hits / (hits + misses):.1%}" if hits + misses else "n/a"
        rows = [
            ("hit ratio", ratio),
            ("hits", f"{hits:.0f}"),
            ("misses", f"{misses:.0f}"),
            ("bytes served from cache", f"{metrics.total(metrics.bytes_served):.0f}"),
            ("bytes fetched upstream", f"{metrics.total(metrics.bytes_fetched):.0f}"),
            ("coalesced requests", f"{metrics.total(metrics.coalesced):.0f}"),
            ("stale answers served", f"{metrics.total(metrics.stale_served):.0f}"),
            ("cache size (bytes)", f"{metrics.cache_size():.0f}"),
            ("evictions", f"{metrics.total(metrics.evictions):.0f}"),
            *metrics.peer_rows(),
            *(await extra() if extra else []),
        ]
        body = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
        )
        page = (
            "<!doctype html><meta charset=utf-8><title>cr-proxy</title>"
            "<style>body{font-family:sans-serif}th{text-align:left;padding-right:2em}</style>"
            f"<h1>cr-proxy</h1><table>{body}</table><p><a href=/metrics>metrics</a></p>"
        )
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/", status)
    return app
