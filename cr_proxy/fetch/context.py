"""What every part of the fetcher shares: the context they are built with
(FetchContext), the cache's fill level as downloads grow it (CacheFill),
and the small helpers of an answer (registry-style errors, a client's own
credential, an executor hop). No policy here: the policy is in each
concern's module (blobs, manifests, passthrough)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.errors import CrProxyError
from cr_proxy.fetch.flight import Flights
from cr_proxy.metrics import Metrics
from cr_proxy.upstream.client import Upstream

T = TypeVar("T")
API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
# Upstream answers that say "not now" rather than "no": a stored copy may
# stand in (a stale tag, an unnamed blob).
STALE_OK_STATUSES = frozenset({429, 500, 502, 503, 504})


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def error_response(err: CrProxyError) -> web.Response:
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=API_HEADERS
    )


def client_auth(request: web.Request) -> str | None:
    """A client's own bearer token is forwarded (https_proxy mode); our dummy
    tokens are not, they mean nothing upstream."""
    value = request.headers.get("Authorization")
    if not value or "cr-proxy-offline-" in value:
        return None
    return value


class CacheFill:
    """The cache's size against cache.max_size, downloads in progress
    included: wakes the evictor (on_full, set by serve) when a commit or a
    growing download takes the cache past it."""

    __slots__ = ("_flights", "_max_size", "_metrics", "_over", "on_full")

    def __init__(self, max_size: int, metrics: Metrics, flights: Flights) -> None:
        self._max_size = max_size
        self._metrics = metrics
        self._flights = flights
        self._over = False  # the cache, downloads included, was past max_size at last look
        self.on_full: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<CacheFill over={self._over} max_size={self._max_size}>"

    def _over_limit(self) -> bool:
        return bool(self._max_size) and (
            self._metrics.cache_size() + self._flights.written() > self._max_size
        )

    def downloading(self) -> None:
        """After a download's progress: wake the evictor once per crossing
        (the periodic check covers the rest)."""
        over = self._over_limit()
        if over and not self._over and self.on_full:
            self.on_full()
        self._over = over

    def grew(self, size: int) -> None:
        """After a commit: between serve's periodic recounts, the gauge
        follows each commit."""
        self._metrics.cache_bytes.inc(size)
        if self.on_full and self._over_limit():
            self.on_full()


@dataclass(frozen=True, slots=True)
class FetchContext:
    """What the fetcher's parts are built with; one per app."""

    config: Config
    store: Store
    upstream: Upstream
    metrics: Metrics
    flights: Flights
    fill: CacheFill
