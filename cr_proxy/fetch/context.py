"""What every part of the fetcher shares: the context they are built with
(FetchContext), the cache's fill level as downloads grow it (CacheFill),
and the small helpers of an answer (registry-style errors, a client's own
credential, an executor hop). No policy here: the policy is in each
concern's module (blobs, manifests, passthrough)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.errors import CrProxyError, TooLarge, Truncated, Unauthorized, UpstreamError
from cr_proxy.fetch.flight import Flights
from cr_proxy.metrics import Metrics
from cr_proxy.upstream.auth import DUMMY_PREFIX
from cr_proxy.upstream.client import Upstream
from cr_proxy.upstream.peers import Peers

T = TypeVar("T")
API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
# Upstream answers that say "not now" rather than "no": a stored copy may
# stand in (a stale tag, an unnamed blob).
STALE_OK_STATUSES = frozenset({429, 500, 502, 503, 504})
STALE = "STALE"  # X-Cache of a stored answer served because the upstream failed


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def error_response(err: CrProxyError) -> web.Response:
    headers = dict(API_HEADERS)
    if isinstance(err, Unauthorized) and err.challenge:
        headers["WWW-Authenticate"] = err.challenge
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=headers
    )


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int, what: str,
    too_large: type[UpstreamError] = TooLarge,
) -> bytes:
    """A small upstream body (a manifest, a listing) whole, or an error:
    read(n) returns only what has arrived, which cut a body sent in two
    pieces at the first; an endless one ends at `limit`."""
    if (response.content_length or 0) > limit:
        raise too_large(message=f"{what} larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_large(message=f"{what} larger than {limit} bytes")
    except aiohttp.ClientPayloadError as err:
        raise Truncated(message=f"{what} body cut short") from err
    if response.content_length is not None and len(body) != response.content_length:
        raise Truncated(message=f"{what} body cut short")
    return bytes(body)


def cache_headers(cache: str, validated_at: float) -> dict[str, str]:
    """X-Cache; on a stale answer also Age, the seconds since the upstream
    last confirmed it (RFC 9111), so a client or an operator can tell."""
    headers = {"X-Cache": cache}
    if cache == STALE:
        headers["Age"] = str(max(0, int(time.time() - validated_at)))
    return headers


def client_auth(request: web.Request) -> str | None:
    """A client's own bearer token is forwarded (https_proxy mode); our dummy
    tokens are not, they mean nothing upstream."""
    value = request.headers.get("Authorization")
    if not value or DUMMY_PREFIX in value:
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
    peers: Peers | None = None  # cluster.peers set: the owners, through nginx's ring
