"""Listings: answers that name no digest and change upstream (a tag list
page, a subject's referrers), stored per query in lists/ (cache/layout.py).

Policy, as for a tag (manifests.py): served from the store while fresh
(`tag_ttl` since it was fetched), then fetched again upstream-first; when
the upstream is down, cannot be reached, answers 5xx, 429 or 401, sends
something we refuse, or has not answered within `timeouts.stale_budget`
(the fetch then finishes in the background), the stored copy is served
stale (`X-Cache: STALE`, `Age`, counted per registry in
crproxy_stale_served). Nothing stored and
the upstream unreachable: a 404 saying so (errors.offline_miss).
Concurrent fetches of one listing are merged (Shared). nginx never serves
these from disk: each answer is checked and rebuilt here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from cr_proxy.cache.layout import Kind, Target
from cr_proxy.errors import NotFound, UpstreamError, offline_miss
from cr_proxy.fetch.context import (
    STALE,
    STALE_OK_STATUSES,
    FetchContext,
    cache_headers,
    in_thread,
)
from cr_proxy.fetch.flight import Shared, StillRunning

log = logging.getLogger("cr_proxy.fetcher")

# What a stored copy stands in for: the upstream down, failing, or sending
# what we refuse (UpstreamError's leaves), or breaking off mid-answer.
STALE_OK_ERRORS = (UpstreamError, aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Listing:
    """Where one listing is stored, and how it is named in messages."""

    domain: str
    name: str
    kind: Kind
    query: str  # the file name under lists/<domain>/<name>/_<kind>/
    what: str  # "the tag list of <name>", in errors
    unknown: str = "NAME_UNKNOWN"  # the error code when it cannot be had at all


@dataclass(frozen=True, slots=True)
class Listed:
    """A listing's stored body, when it was fetched, and how it was had."""

    body: bytes
    fetched_at: float
    cache: str  # HIT, MISS, REVALIDATED or STALE

    def headers(self) -> dict[str, str]:
        return cache_headers(self.cache, self.fetched_at)


def forced(request: web.Request) -> bool:
    """`cr-proxy warm` asks for a fetch whatever the listing's age (nginx
    drops a client's own X-CR-Revalidate)."""
    return request.headers.get("X-CR-Revalidate") == "1"


def check_status(response: aiohttp.ClientResponse, target: Target, unknown: NotFound) -> None:
    """Raise unless the upstream answered 200: `unknown` for its 404, a
    stale-able UpstreamError for "not now" (5xx, 429, a 401 after our own
    login) and for anything else unexpected."""
    if response.status == 200:
        return
    if response.status == 404:
        raise unknown
    if response.status in STALE_OK_STATUSES or response.status == 401:
        raise UpstreamError(message=f"{target.domain} answered {response.status}")
    raise UpstreamError(message=f"{target.domain} answered {response.status} "
                        f"for {target.rpath.path}")


class Listings:
    """The store-or-upstream-or-stale way of every listing."""

    __slots__ = ("ctx", "shared")

    def __init__(self, ctx: FetchContext) -> None:
        self.ctx = ctx
        self.shared = Shared()

    def __repr__(self) -> str:
        return f"<Listings {self.shared!r}>"

    async def get(
        self,
        listing: Listing,
        fetch: Callable[[], Awaitable[bytes]],
        valid: Callable[[bytes], object],
        force: bool = False,
        stand_in: Callable[[], tuple[bytes, float] | None] | None = None,
    ) -> Listed:
        """The listing, from the store while fresh, else from `fetch` (the
        upstream's answer, checked, as it is to be stored), else stale.
        `valid` checks a stored body again (raises if it is not one: a
        hand edit, an older format); such a copy is neither served nor
        kept as a fallback. `stand_in` (blocking: run in a thread) makes a
        stale answer from other stored listings when none of this one is
        stored and the upstream cannot answer (a tag list's page cut from
        a whole list); never a fresh one, so online the upstream decides."""
        ctx = self.ctx
        stored = await in_thread(self.read, listing, valid)
        kind = listing.kind.value
        if stored is not None and not force and self._fresh(stored):
            return self._hit(listing, stored)
        if stored is not None and ctx.upstream.skips(listing.domain):
            # Down: not even a fetch already running is waited for.
            return self._stale(listing, stored, "failed", f"{listing.domain} is down")
        key = (kind, listing.domain, listing.name, listing.query)
        # With a copy to fall back on, a client waits timeouts.stale_budget
        # for the upstream, then gets the copy while the fetch finishes in
        # the background, as for a tag (`cr-proxy warm` waits).
        budget = None if force or stored is None else ctx.config.timeouts.stale_budget
        try:
            with offline_miss(listing.unknown, listing.what, listing.domain):
                body, fetched_at = await self.shared.run(
                    key, lambda: self._fetch(listing, fetch), within=budget)
        except StillRunning:
            assert stored is not None
            ctx.upstream.suspect(listing.domain)
            return self._stale(listing, stored, "late", f"no answer within {budget:g}s")
        except STALE_OK_ERRORS as err:
            if stored is None and stand_in is not None:
                stored = await in_thread(stand_in)
            if stored is None:
                raise
            return self._stale(listing, stored, "failed", str(getattr(err, "message", err)))
        if stored is None:
            ctx.metrics.misses.labels(kind=kind).inc()
            return Listed(body, fetched_at, "MISS")
        ctx.metrics.revalidations.labels(
            result="same" if body == stored[0] else "changed").inc()
        return Listed(body, fetched_at, "REVALIDATED")

    async def cached(
        self, listing: Listing, valid: Callable[[bytes], object],
        stand_in: Callable[[], tuple[bytes, float] | None] | None = None,
    ) -> Listed | None:
        """The stored listing, asking no one: a hit while fresh, else stale
        (as when the upstream is down); else `stand_in`'s (get()'s), stale;
        None when there is neither."""
        stored = await in_thread(self.read, listing, valid)
        if stored is None and stand_in is not None:
            stood_in = await in_thread(stand_in)
            if stood_in is not None:
                return self._stale(listing, stood_in, "failed", "its privacy undecided")
        if stored is None:
            return None
        if self._fresh(stored):
            return self._hit(listing, stored)
        return self._stale(listing, stored, "failed", "its privacy undecided")

    def _fresh(self, stored: tuple[bytes, float]) -> bool:
        return time.time() - stored[1] < self.ctx.config.tag_ttl

    def _hit(self, listing: Listing, stored: tuple[bytes, float]) -> Listed:
        self.ctx.metrics.hits.labels(kind=f"{listing.kind.value}-fetch").inc()
        return Listed(stored[0], stored[1], "HIT")

    def _stale(
        self, listing: Listing, stored: tuple[bytes, float], result: str, why: str
    ) -> Listed:
        """The stored copy of a listing the upstream could not give now."""
        # Counted, not warned: the upstream's outage is warned of once
        # (upstream/health.py).
        log.debug("serving stale %s of %s/%s: %s", listing.kind.value, listing.domain,
                  listing.name, why)
        ctx = self.ctx
        ctx.metrics.stale_served.labels(registry=ctx.upstream.registry_label(listing.domain)).inc()
        ctx.metrics.revalidations.labels(result=result).inc()
        return Listed(stored[0], stored[1], STALE)

    def read(
        self, listing: Listing, valid: Callable[[bytes], object]
    ) -> tuple[bytes, float] | None:
        """The stored listing and when it was fetched, if `valid` takes it.
        Blocking."""
        stored = self.ctx.store.read_listing(
            listing.domain, listing.name, listing.kind, listing.query)
        if stored is None:
            return None
        try:
            valid(stored[0])
        except (UpstreamError, ValueError) as err:
            log.warning("not serving the stored %s: %s", listing.what, err)
            return None
        return stored

    async def _fetch(
        self, listing: Listing, fetch: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, float]:
        body = await fetch()
        now = time.time()
        try:
            await in_thread(self.ctx.store.write_listing, listing.domain, listing.name,
                            listing.kind, listing.query, body, now)
        except OSError as err:
            # Still a good answer for this client; the next one fetches again.
            log.warning("cannot cache %s: %s", listing.what, err)
        return body, now
