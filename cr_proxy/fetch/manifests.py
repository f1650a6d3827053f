"""Manifests and tags: GET and HEAD of /v2/<name>/manifests/<reference>.

Policy (distribution's proxymanifeststore and proxytagservice): a manifest
by digest is local-first and immutable. A tag is served from the cache
while fresh (tag_ttl since the upstream last confirmed it), then
upstream-first: a HEAD compares digests and a moved tag is fetched again;
when the upstream cannot be reached, answers 5xx or 429, the stale copy is
served, at once while its registry is down (upstream/health.py). A client
waits `timeouts.stale_budget` for the revalidation, then gets the stale
copy while it finishes in the background (stale-while-revalidate).
Concurrent misses and revalidations of one path are merged (Shared: at
most one revalidation per tag, shielded from the clients that left it).
A manifest is stored only whole, verified against the digest asked for and
the one the upstream named, of a known type and at most MAX_MANIFEST bytes.
"""

from __future__ import annotations

import logging
import time

import aiohttp
from aiohttp import web

from cr_proxy.cache.layout import Kind, RegistryPath, Target
from cr_proxy.cache.store import SHAPE_CONFLICTS, StoredManifest
from cr_proxy.errors import (
    DigestMismatch,
    ManifestInvalid,
    NotFound,
    UpstreamError,
    UpstreamUnreachable,
    offline_miss,
)
from cr_proxy.fetch.context import (
    API_HEADERS,
    STALE,
    STALE_OK_STATUSES,
    FetchContext,
    cache_headers,
    client_auth,
    in_thread,
    read_bounded,
)
from cr_proxy.fetch.flight import Shared, StillRunning
from cr_proxy.oci.manifest import MANIFEST_ACCEPT, MAX_MANIFEST, manifest_media_type
from cr_proxy.oci.reference import digest_of, is_digest

log = logging.getLogger("cr_proxy.fetcher")



class Manifests:
    __slots__ = ("ctx", "shared")

    def __init__(self, ctx: FetchContext) -> None:
        self.ctx = ctx
        self.shared = Shared()

    def __repr__(self) -> str:
        return f"<Manifests {self.shared!r}>"

    async def get(self, request: web.Request, target: Target) -> web.StreamResponse:
        # `cr-proxy warm` asks for a revalidation whatever the tag's age.
        forced = request.headers.get("X-CR-Revalidate") == "1"
        from_peer = bool(request.headers.get("X-CR-Peer"))
        stored, cache = await self.lookup(target, client_auth(request), forced, from_peer)
        return _response(stored, cache)

    async def lookup(self, target: Target, auth: str | None,
                     forced: bool = False, from_peer: bool = False
                     ) -> tuple[StoredManifest, str]:
        """The manifest a GET of `target` answers, by the policy above, and
        its X-Cache (HIT, MISS, STALE, REVALIDATED). Also the way in for
        callers that are no HTTP client (cr_proxy/edge resolves modules).
        `from_peer`: a cluster peer asks; filled here, never sent on."""
        ctx = self.ctx
        domain, path = target.domain, target.rpath.path
        stored = await in_thread(ctx.store.read_manifest, domain, path)
        if stored is None:
            rpath = target.rpath
            what = f"{rpath.name}{'@' if rpath.by_digest else ':'}{rpath.ref}"
            with offline_miss("MANIFEST_UNKNOWN", what, domain):
                stored = await self.shared.run(
                    ("manifest", domain, path), lambda: self._fetch(target, auth, from_peer)
                )
            ctx.metrics.misses.labels(kind="manifest").inc()
            return stored, "MISS"
        fresh_enough = time.time() - stored.validated_at < ctx.config.tag_ttl and not forced
        if target.rpath.by_digest or fresh_enough:
            ctx.metrics.hits.labels(kind="manifest-fetch").inc()
            return stored, "HIT"
        if ctx.upstream.skips(domain):
            # Down: not even a revalidation already running is waited for.
            return self._stale(stored, target, "failed", f"{domain} is down")
        # A client waits timeouts.stale_budget for the upstream, then gets
        # the stale copy while the revalidation finishes in the background
        # (`cr-proxy warm` waits for the upstream's word).
        budget = None if forced else ctx.config.timeouts.stale_budget
        try:
            # A forced revalidation (warm) wants the upstream's word, not
            # the owner's cached copy: asked as a peer's would be.
            direct = forced or from_peer
            fresh = await self.shared.run(
                ("revalidate", domain, path),
                lambda: self._revalidate(target, stored, auth, direct),
                within=budget,
            )
        except StillRunning:
            # Maybe stuck on a kept-alive connection into a cut cable: a
            # probe on a new one tells soon (upstream/health.py).
            ctx.upstream.suspect(domain)
            return self._stale(stored, target, "late", f"no answer within {budget:g}s; "
                               "revalidating in the background")
        except (UpstreamUnreachable, UpstreamError) as err:
            return self._stale(stored, target, "failed", err.message)
        changed = "same" if fresh.digest == stored.digest else "changed"
        ctx.metrics.revalidations.labels(result=changed).inc()
        return fresh, "REVALIDATED"

    async def cached(self, target: Target) -> web.StreamResponse | None:
        """The stored manifest as it is (a tag: stale), asking no one; None
        when none is stored."""
        stored = await in_thread(self.ctx.store.read_manifest, target.domain,
                                 target.rpath.path)
        if stored is None:
            return None
        if target.rpath.by_digest:
            return _response(stored, "HIT")
        return _response(*self._stale(stored, target, "failed", "its privacy undecided"))

    def _stale(self, stored: StoredManifest, target: Target, result: str,
               why: str) -> tuple[StoredManifest, str]:
        """The cached copy of a tag the upstream could not confirm now."""
        ctx, domain = self.ctx, target.domain
        # Counted, not warned: the upstream's outage is warned of once
        # (upstream/health.py), and one line per stale answer drowned it.
        log.debug("serving stale %s/%s: %s", domain, target.rpath.path, why)
        ctx.metrics.stale_served.labels(registry=ctx.upstream.registry_label(domain)).inc()
        ctx.metrics.revalidations.labels(result=result).inc()
        return stored, "STALE"

    async def revalidate_tag(self, domain: str, name: str, tag: str) -> bool:
        """Background refresh of one cached tag; True if it moved upstream."""
        rpath = RegistryPath(Kind.MANIFEST, name, tag)
        target = Target(self._registry_of(domain), domain, rpath)
        stored = await in_thread(self.ctx.store.read_manifest, domain, rpath.path)
        if stored is None:
            return False
        fresh = await self.shared.run(
            ("revalidate", domain, rpath.path), lambda: self._revalidate(target, stored, None)
        )
        self.ctx.metrics.revalidations.labels(
            result="same" if fresh.digest == stored.digest else "changed"
        ).inc()
        return fresh.digest != stored.digest

    def _registry_of(self, domain: str) -> str:
        """The registry name a cache domain serves (for its credentials)."""
        for name, host in self.ctx.config.registry_hosts.items():
            if host == domain:
                return name
        return domain

    async def _revalidate(
        self, target: Target, stored: StoredManifest, auth: str | None, from_peer: bool = False
    ) -> StoredManifest:
        """Ask upstream whether the tag still points where we have it; in a
        cluster (not for a peer), ask the tag's owner node instead, which
        answers from its cache while fresh and else asks the upstream."""
        owned = await self._from_owner(target, from_peer)
        if owned is not None:
            return owned
        response = await self.ctx.upstream.registry(
            "HEAD", target, headers={"Accept": MANIFEST_ACCEPT}, client_auth=auth
        )
        response.release()
        if response.status in STALE_OK_STATUSES or response.status == 401:
            raise UpstreamError(message=f"{target.domain} answered {response.status}")
        if response.status == 404:
            raise NotFound("MANIFEST_UNKNOWN", f"{target.rpath.name}:{target.rpath.ref} "
                           "no longer exists upstream")
        upstream_digest = response.headers.get("Docker-Content-Digest")
        if response.status == 200 and upstream_digest == stored.digest:
            try:
                await in_thread(self.ctx.store.touch_validated, target.domain, target.rpath.path)
            except FileNotFoundError:  # removed meanwhile (rm, eviction): store it again
                return await self._fetch(target, auth)
            return StoredManifest(stored.body, stored.content_type, stored.digest, time.time())
        return await self._fetch(target, auth)

    async def _fetch(
        self, target: Target, auth: str | None, from_peer: bool = False
    ) -> StoredManifest:
        """GET a manifest; stored only whole, verified and of a known kind.
        By digest in a cluster, and not for a peer (a peer's miss is filled
        here, never sent on), its owner node is asked first; an answer of
        its that fails the checks is counted and the upstream asked."""
        ctx = self.ctx
        owned = await self._from_owner(target, from_peer)
        if owned is not None:
            return owned
        response = await ctx.upstream.registry(
            "GET", target, headers={"Accept": MANIFEST_ACCEPT}, client_auth=auth
        )
        return await self._store(target, response)

    async def _from_owner(self, target: Target, from_peer: bool) -> StoredManifest | None:
        """In a cluster, the manifest from its owner node (by digest: the
        digest's; by tag: the owner of registry/name:tag), checked as an
        upstream's answer would be and stored; None when this node owns it,
        for a peer's request (filled here, never sent on), or when the
        owner's answer failed (counted): the caller asks the upstream. A
        tag the owner could only answer stale is stored as due for
        revalidation."""
        peers = self.ctx.peers
        if peers is None or from_peer:
            return None
        answer = await peers.open(target, MANIFEST_ACCEPT)
        if answer is None:
            return None
        try:
            return await self._store(target, answer.response,
                                     keep=self.ctx.config.cluster.keep_local,
                                     stale_ok=True)
        except DigestMismatch as err:
            peers.refused(answer, target, "digest", err.message)
        except (ManifestInvalid, UpstreamError, aiohttp.ClientError, TimeoutError) as err:
            peers.refused(answer, target, "truncated", str(err))
        finally:
            answer.response.release()
        return None

    async def _store(
        self, target: Target, response: aiohttp.ClientResponse, keep: bool = True,
        stale_ok: bool = False,
    ) -> StoredManifest:
        """A source's manifest answer checked, and committed unless `keep` is
        false. `stale_ok`: a peer's answer, whose X-Cache STALE says its
        upstream could not confirm it: stored as validated long ago."""
        ctx = self.ctx
        domain, rpath = target.domain, target.rpath
        validated_long_ago = stale_ok and response.headers.get("X-Cache") == STALE
        async with response:
            if response.status == 404:
                raise NotFound("MANIFEST_UNKNOWN", f"manifest {rpath.name}:{rpath.ref} "
                               f"not found on {domain}")
            if response.status == 401:
                raise UpstreamError("UNAUTHORIZED", f"{domain} refused access to {rpath.name}")
            if response.status != 200:
                raise UpstreamError(message=f"{domain} answered {response.status}")
            # A trickle never trips timeouts.read: the same floor as blobs.
            with ctx.upstream.rate_guard(response.content):
                body = await _read_manifest(response, domain)
            header_type = response.headers.get("Content-Type", "")
            claimed = response.headers.get("Docker-Content-Digest")
        digest, content_type = await in_thread(_check_manifest, body, header_type, target, claimed)
        now = 0.0 if validated_long_ago else time.time()
        if not keep:
            return StoredManifest(body, content_type, digest, now)
        try:
            await in_thread(
                ctx.store.commit_manifest, domain, rpath, body, digest, content_type, now,
                ctx.upstream.challenges.for_repository(domain, rpath.name),
            )
        except SHAPE_CONFLICTS as err:
            # Still a good answer for this client; the tree cannot hold the name.
            log.warning("cannot cache %s/%s: %s", domain, rpath.path, err)
        ctx.fill.grew(len(body))
        return StoredManifest(body, content_type, digest, now)


def _response(stored: StoredManifest, cache: str) -> web.Response:
    return web.Response(
        body=stored.body,
        headers={"Content-Type": stored.content_type, "Docker-Content-Digest": stored.digest,
                 **cache_headers(cache, stored.validated_at), **API_HEADERS},
    )


async def _read_manifest(response: aiohttp.ClientResponse, domain: str) -> bytes:
    return await read_bounded(response, MAX_MANIFEST, f"{domain}: manifest", ManifestInvalid)


def _check_manifest(
    body: bytes, header_type: str, target: Target, claimed: str | None
) -> tuple[str, str]:
    """(digest, media type) of an upstream manifest, once the body matches
    the digest asked for and the one the upstream named, and parses as a
    manifest or index of a known type. A Docker-Content-Digest outside the
    digest grammar is ignored, as distribution's client does: it is never
    stored, the digest we computed is."""
    domain, rpath = target.domain, target.rpath
    algorithm = rpath.ref.split(":", 1)[0] if rpath.by_digest else "sha256"
    digest = digest_of(body, algorithm)
    if rpath.by_digest and digest != rpath.ref:
        raise DigestMismatch(message=f"{domain} sent {digest} for {rpath.ref}")
    if claimed and is_digest(claimed) and digest_of(body, claimed.split(":", 1)[0]) != claimed:
        raise DigestMismatch(message=f"{domain} claimed {claimed}, body is {digest}")
    return digest, manifest_media_type(body, header_type)
