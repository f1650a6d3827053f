"""The fetcher: the aiohttp app nginx hands every miss to.

nginx serves fresh hits itself; what reaches us is a miss, a stale tag, a
token request or something we do not cache. The policy, as in
distribution's registry/proxy:

- blobs and manifests by digest are local-first and immutable: if the
  digest store has them (pulled through another repository or registry)
  we link and serve them; otherwise one download per digest (flight.py)
  streams to every waiting client while it fills the cache;
- tags are upstream-first once stale: a HEAD compares digests; when the
  upstream cannot be reached, answers 5xx or 429, the stale copy is served;
- everything else is passed through uncached (GET, HEAD) or refused with a
  registry-style error (writes, in mirror mode): this mirror is read-only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cr_proxy.cache.layout import (
    Kind,
    RegistryPath,
    Target,
    digest_url_path,
    mirror_target,
    proxy_target,
)
from cr_proxy.cache.store import SHAPE_CONFLICTS, BlobWriter, Store, StoredManifest
from cr_proxy.config import Config
from cr_proxy.errors import (
    CrProxyError,
    DestinationRefused,
    DigestMismatch,
    ManifestInvalid,
    NotFound,
    TooLarge,
    Truncated,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from cr_proxy.fetch.flight import Flight, Flights
from cr_proxy.front.connect import check_port
from cr_proxy.metrics import Metrics
from cr_proxy.net.policy import parse_authority
from cr_proxy.oci.manifest import MANIFEST_ACCEPT, MAX_MANIFEST, manifest_media_type
from cr_proxy.oci.reference import digest_of, is_digest
from cr_proxy.upstream.auth import dummy_token, parse_challenge
from cr_proxy.upstream.client import Hop, Upstream

log = logging.getLogger("cr_proxy.fetcher")

T = TypeVar("T")
WRITE_BATCH = 1 << 20  # bytes gathered before one executor hop to the disk
WRITE_THREADS = 4  # downloads hashed and written at once
STALE_OK_STATUSES = frozenset({429, 500, 502, 503, 504})
BLOB_TYPE = "application/octet-stream"
API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def error_response(err: CrProxyError) -> web.Response:
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=API_HEADERS
    )


class Shared:
    """Coalesce concurrent calls for one key into one awaited coroutine; the
    work is shielded so a caller that goes away does not cancel the others."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: dict[object, asyncio.Future[Any]] = {}

    async def run(self, key: object, work: Callable[[], Awaitable[T]]) -> T:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(work())
            self._running[key] = future
            future.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(future)


class Fetcher:
    __slots__ = (
        "_challenges", "_over", "_writes", "config", "flights", "metrics", "on_full", "shared",
        "store", "upstream",
    )

    def __init__(
        self, config: Config, store: Store, upstream: Upstream, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.upstream = upstream
        self.metrics = metrics or Metrics()
        self.flights = Flights()
        self.shared = Shared()
        self._challenges: dict[str, str] = {}  # domain -> its /v2/ challenge, as stored
        # Hashing and writing downloads, beside the event loop (hashlib and
        # os.write let go of the GIL).
        self._writes = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="write")
        # Called after a commit takes the cache past cache.max_size (serve
        # wakes the evictor with it).
        self.on_full: Callable[[], None] | None = None
        self._over = False  # the cache, downloads included, was past max_size at last look
        upstream.on_challenge = self._store_challenge

    def __repr__(self) -> str:
        return f"<Fetcher {self.store!r} {self.flights!r}>"

    async def close(self) -> None:
        await self.flights.close()
        self._writes.shutdown(wait=True)

    # --- the one route --------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except (aiohttp.ClientError, TimeoutError) as err:
            # An upstream that broke off or stalled mid-answer.
            wrapped = UpstreamTimeout if isinstance(err, TimeoutError) else UpstreamError
            return self._error(request, wrapped(message=f"upstream failed: {err or type(err)}"))
        except CrProxyError as err:
            return self._error(request, err)
        except OSError as err:
            # The cache's disk (full, a link limit, permissions): still an
            # answer a registry client understands.
            return self._error(request, CrProxyError(message=f"cache: {err.strerror or err}"))

    @staticmethod
    def _error(request: web.Request, err: CrProxyError) -> web.Response:
        if err.status >= 500:
            log.warning("%s %s: %s", request.method, request.path_qs[:200], err.message)
        return error_response(err)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        mode = request.headers.get("X-CR-Mode", "mirror")
        if mode == "mirror":
            target = mirror_target(
                request.path,
                request.query.get("ns") or None,
                self.config.default_registry,
                dict(self.config.registry_hosts),
            )
            return await self._registry_request(request, target, mirror=True)
        domain, rpath = proxy_target(request.headers.get("Host", ""), request.path)
        self._check_proxy_port(request, domain)
        if rpath is None:
            # The path proxy_target checked, not the raw one.
            query = f"?{request.query_string}" if request.query_string else ""
            return await self._passthrough(request, domain, request.path + query, token_ok=True,
                                           scheme=request.headers.get("X-CR-Scheme", "https"))
        return await self._registry_request(request, Target(domain, domain, rpath), mirror=False)

    def _check_proxy_port(self, request: web.Request, domain: str) -> None:
        """https_proxy mode: the front's port rule, enforced here on every
        request, pipelined ones included (the front sees only the first
        head). Over TLS the Host's port must be the port the client
        CONNECTed to (X-CR-Port, set by nginx from the front's PROXY line):
        an SNI and Host of host:8443 inside a tunnel to :443 must not make
        us dial 8443. Plain HTTP: port 80 or a host:port the operator named,
        whatever the request line said."""
        tls = request.headers.get("X-CR-Scheme", "https") == "https"
        host, port = parse_authority(domain)
        port = port or (443 if tls else 80)
        connected = request.headers.get("X-CR-Port")
        if tls and connected != str(port):
            raise DestinationRefused(message=f"{domain}: the Host's port is not the port "
                                     f"connected to ({connected or 'none'})")
        check_port(host, port, tls, self.config.proxy, self.upstream.destinations)

    async def _registry_request(
        self, request: web.Request, target: Target, mirror: bool
    ) -> web.StreamResponse:
        try:
            return await self._registry_kind(request, target, mirror)
        except UpstreamError as err:
            registry = self.upstream.registry_label(target.domain)
            self.metrics.upstream_errors.labels(registry=registry, code=err.code).inc()
            raise

    async def _registry_kind(
        self, request: web.Request, target: Target, mirror: bool
    ) -> web.StreamResponse:
        kind = target.rpath.kind
        if request.method not in ("GET", "HEAD"):
            if mirror:
                raise Unsupported(message="this mirror is read-only: push to the registry itself")
            return await self._passthrough(request, target.domain,
                                           self._relayed_path(request, target, mirror))
        if kind is Kind.BLOB:
            return await self._blob(request, target)
        if kind is Kind.MANIFEST:
            return await self._manifest(request, target)
        if kind is Kind.PING and mirror:
            return web.json_response({}, headers=API_HEADERS)
        return await self._passthrough(request, target.domain,
                                       self._relayed_path(request, target, mirror), mirror=mirror)

    @staticmethod
    def _relayed_path(request: web.Request, target: Target, mirror: bool) -> str:
        """What an uncached GET asks upstream: the checked path, never the raw
        one (no dot segments); in mirror mode only listing paths, with their
        paging parameters (never `ns`)."""
        rpath = target.rpath
        if not mirror:
            query = f"?{request.query_string}" if request.query_string else ""
            return "/" + rpath.path + query
        if rpath.kind is Kind.OTHER and rpath.name != "_catalog":
            raise NotFound("UNSUPPORTED", f"/{rpath.path} is not served by this mirror")
        paging = {k: v for k, v in request.query.items() if k in ("n", "last")}
        return "/" + rpath.path + (f"?{urlencode(paging)}" if paging else "")

    # --- blobs ----------------------------------------------------------------

    async def _blob(self, request: web.Request, target: Target) -> web.StreamResponse:
        digest, domain, path = target.rpath.ref, target.domain, target.rpath.path
        named = await in_thread(self.store.linked, digest, domain, path)
        if named is not None:
            self.metrics.hits.labels(kind="blob-fetch").inc()
            return self._file_response(named, digest)
        if await in_thread(self.store.has_blob, digest):
            # Pulled before through another repository or registry: one copy.
            stored = await self._stored_elsewhere(request, target)
            if stored is not None:
                self.metrics.hits.labels(kind="blob-fetch").inc()
                return self._file_response(stored, digest)
        if request.method == "HEAD":
            if request.headers.get("X-CR-Cache-Only") == "1":
                # warm asks "is it here?" without costing an upstream request.
                raise NotFound("BLOB_UNKNOWN", f"blob {digest} is not cached")
            return await self._blob_head(request, target)
        self.metrics.misses.labels(kind="blob").inc()
        joined_before = self.flights.coalesced
        # One download per source and digest: a registry that trickles a
        # digest must not hold up another registry's pull of it (the first
        # verified copy is stored, the other is dropped at its commit).
        flight = self.flights.join(
            f"{domain} {digest}", digest,
            functools.partial(self._download_blob, target, _client_auth(request)),
        )
        if self.flights.coalesced > joined_before:
            self.metrics.coalesced.inc()
        await flight.wait_started()
        response = web.StreamResponse(
            headers={"Content-Type": BLOB_TYPE, "Docker-Content-Digest": digest,
                     "X-Cache": "MISS", **API_HEADERS}
        )
        if flight.size is not None:
            response.content_length = flight.size
        await response.prepare(request)
        try:
            if flight.size is None:
                # No length: aiohttp frames the body in chunks, so it must see it.
                async for chunk in flight.read():
                    await response.write(chunk)
            else:
                await _sendfile_ranges(request, flight)
        except (TimeoutError, CrProxyError, OSError, aiohttp.ClientError) as err:
            # Headers are gone already: cutting the connection short is the
            # only way left to tell the client the body is not whole.
            log.warning("blob %s from %s cut short: %s", digest, domain, err)
            if request.transport is not None:
                request.transport.abort()
            return response
        # The download named the path it fetched (_commit_blob); a reader of
        # another repository that joined it gets no name: its upstream never
        # confirmed the digest there (the next request asks, _stored_elsewhere).
        await response.write_eof()
        return response

    async def _stored_elsewhere(self, request: web.Request, target: Target) -> Path | None:
        """The stored file for a digest cached under other names, or None if
        it is gone meanwhile. The name gets its own link only once its
        upstream confirmed the digest there (a HEAD): a name clients invent
        must not create files (nor, by the thousand, reach the filesystem's
        link limit). When the upstream cannot be asked, the verified copy is
        served for this request only, unnamed: offline pulls go on."""
        digest, domain, path = target.rpath.ref, target.domain, target.rpath.path
        if request.headers.get("X-CR-Cache-Only") == "1":
            raise NotFound("BLOB_UNKNOWN", f"blob {digest} is not cached under this name")
        if await self._confirm_blob(target, _client_auth(request)):
            return await in_thread(self.store.link_if_stored, digest, domain, path)
        blob = self.store.tree.blob(digest)
        return blob if await in_thread(blob.is_file) else None

    async def _confirm_blob(self, target: Target, client_auth: str | None) -> bool:
        """True when the upstream answers 200 for this exact name and digest;
        False when it cannot say (unreachable, timed out, 429 or 5xx); a
        404 or a refusal is raised as the client's answer."""
        try:
            opened = await self.upstream.open("HEAD", target, client_auth=client_auth)
        except (UpstreamUnreachable, UpstreamTimeout, aiohttp.ClientError, TimeoutError) as err:
            log.info("serving stored %s for %s/%s unnamed: upstream unreachable (%s)",
                     target.rpath.ref, target.domain, target.rpath.name, err)
            return False
        status = opened.response.status
        opened.response.release()
        if status == 200:
            return True
        if status == 404:
            raise NotFound("BLOB_UNKNOWN", f"blob {target.rpath.ref} not found upstream")
        if status in STALE_OK_STATUSES:
            return False
        raise UpstreamError(message=f"{target.domain} answered {status} for {target.rpath.ref}")

    async def _blob_head(self, request: web.Request, target: Target) -> web.StreamResponse:
        opened = await self.upstream.open("HEAD", target, client_auth=_client_auth(request))
        response = opened.response
        response.release()
        if response.status == 404:
            raise NotFound("BLOB_UNKNOWN", f"blob {target.rpath.ref} not found upstream")
        if response.status != 200:
            raise UpstreamError(message=f"{target.domain} answered {response.status}")
        headers = {"Content-Type": BLOB_TYPE, "Docker-Content-Digest": target.rpath.ref,
                   **API_HEADERS}
        if response.content_length is not None:
            headers["Content-Length"] = str(response.content_length)
        return web.Response(status=200, headers=headers)

    async def _download_blob(self, target: Target, client_auth: str | None, flight: Flight) -> None:
        """The flight's task: upstream -> temp file -> verify -> commit."""
        digest, domain = target.rpath.ref, target.domain
        opened = await self.upstream.open("GET", target, client_auth=client_auth)
        upstream = opened.response
        try:
            if upstream.status == 404:
                raise NotFound("BLOB_UNKNOWN", f"blob {digest} not found on {domain}")
            if upstream.status != 200:
                raise UpstreamError(message=f"{domain} answered {upstream.status} for {digest}")
            limit = self._size_limit(upstream.content_length, domain, digest)
            writer = await in_thread(self.store.blob_writer, digest)
            try:
                flight.started(writer.path, upstream.content_length, None)
                try:
                    await self._write_body(upstream.content, writer, flight, limit)
                except aiohttp.ClientPayloadError as err:
                    raise Truncated(message=f"{domain}: body of {digest} cut short") from err
                await in_thread(writer.verify, upstream.content_length)
                # Clients get their last byte now; the fsync and rename follow.
                await flight.verified_whole()
                committed = await in_thread(self._commit_blob, writer, target, opened.hops)
            except BaseException:
                await in_thread(writer.abort)
                raise
        except DigestMismatch as err:
            log.error("registry %s sent wrong bytes for %s: %s", domain, digest, err.message)
            raise
        finally:
            upstream.release()
        self.metrics.bytes_fetched.inc(writer.size)
        # Between serve's periodic recounts, the gauge follows each commit.
        self._grew(writer.size)
        await flight.finish(committed, None)

    def _size_limit(self, content_length: int | None, domain: str, digest: str) -> int:
        """The most bytes this download may write: its Content-Length when
        it has one, else limits.max_blob_size. A blob larger than that cap,
        or than the whole cache (cache.max_size), could never be stored:
        refused before a byte is written."""
        cap = self.config.limits.max_blob_size
        if self.config.cache.max_size:
            cap = min(cap, self.config.cache.max_size)
        if content_length is not None and content_length > cap:
            raise TooLarge(message=f"{domain}: {digest} is {content_length} bytes, over the "
                           f"{cap} allowed (limits.max_blob_size, cache.max_size)")
        return cap if content_length is None else content_length

    async def _write_body(
        self, body: aiohttp.StreamReader, writer: BlobWriter, flight: Flight, limit: int
    ) -> None:
        """The upstream body into the writer, pipelined: one batch is hashed
        and written in a thread while the next arrives (awaiting each write
        before reading on made the download half as fast). One write at a
        time, so the bytes stay in order. Never more than `limit` bytes:
        past it the download fails before the excess reaches the disk."""
        writing: concurrent.futures.Future[None] | None = None
        batch = bytearray()
        received = 0
        guard = self.upstream.rate_guard(body)  # limits.min_rate
        try:
            async for chunk in body.iter_any():
                received += len(chunk)
                if received > limit:
                    raise TooLarge(message=f"{writer.digest}: upstream sent more than "
                                   f"{limit} bytes")
                batch += chunk
                if len(batch) < WRITE_BATCH:
                    continue
                if writing is not None:
                    await asyncio.wrap_future(writing)
                    await self._progress(flight, writer.size)
                # A new batch for what comes next: the thread owns this one.
                writing, batch = self._writes.submit(writer.write, batch), bytearray()
            if writing is not None:
                await asyncio.wrap_future(writing)
            await asyncio.wrap_future(self._writes.submit(writer.write, batch))
            await self._progress(flight, writer.size)
        finally:
            guard.cancel()
            if writing is not None and not writing.done():
                # Failed or cancelled mid-body: the caller closes the file
                # next, so the write in flight must be over first (one batch).
                concurrent.futures.wait([writing])

    async def _progress(self, flight: Flight, written: int) -> None:
        await flight.progress(written)
        # Downloads in progress count toward cache.max_size: wake the
        # evictor when they take the cache past it (once per crossing; the
        # periodic check covers the rest).
        over = self._over_limit()
        if over and not self._over and self.on_full:
            self.on_full()
        self._over = over

    def _over_limit(self) -> bool:
        limit = self.config.cache.max_size
        return bool(limit) and (
            self.metrics.cache_size() + self.flights.written() > limit
        )

    def _grew(self, size: int) -> None:
        self.metrics.cache_bytes.inc(size)
        if self.on_full and self._over_limit():
            self.on_full()

    def _commit_blob(self, writer: BlobWriter, target: Target, hops: list[Hop]) -> Path:
        """Store the verified content, then name it: the requested path, and
        the redirect target that served it (_name_redirect_target)."""
        committed = self.store.commit_verified(writer)
        digest, domain, path = target.rpath.ref, target.domain, target.rpath.path
        if hops:
            self._name_redirect_target(digest, domain, path, hops)
        self.store.link_quietly(digest, domain, path)
        self._record_challenge(domain, target.rpath)
        return committed

    def _name_redirect_target(self, digest: str, domain: str, path: str, hops: list[Hop]) -> None:
        """Only the last hop served the bytes, so only it may be named, under
        the host that served them, and only when its URL path names the
        digest (layout.digest_url_path): then no other URL of that host can
        be answered with them. The hops before it (anyone's open redirect)
        are never stored. The registry path's redirect record, pointing at
        that target, is written once the target is in place."""
        final = hops[-1]
        stored_path = digest_url_path(final.target_path, digest)
        if stored_path is None:
            return
        self.store.link_quietly(digest, final.target_host, stored_path)
        self.store.record_redirect(domain, path, hops[0].status, final.location)

    def _file_response(self, path: Path, digest: str) -> web.FileResponse:
        return web.FileResponse(
            path, headers={"Content-Type": BLOB_TYPE, "Docker-Content-Digest": digest,
                           "X-Cache": "HIT", **API_HEADERS}
        )

    # --- manifests ------------------------------------------------------------

    async def _manifest(self, request: web.Request, target: Target) -> web.StreamResponse:
        domain, path = target.domain, target.rpath.path
        stored = await in_thread(self.store.read_manifest, domain, path)
        auth = _client_auth(request)
        if stored is None:
            stored = await self.shared.run(
                ("manifest", domain, path), lambda: self._fetch_manifest(target, auth)
            )
            self.metrics.misses.labels(kind="manifest").inc()
            return self._manifest_response(stored, "MISS")
        # `cr-proxy warm` asks for a revalidation whatever the tag's age.
        forced = request.headers.get("X-CR-Revalidate") == "1"
        fresh_enough = time.time() - stored.validated_at < self.config.tag_ttl and not forced
        if target.rpath.by_digest or fresh_enough:
            self.metrics.hits.labels(kind="manifest-fetch").inc()
            return self._manifest_response(stored, "HIT")
        try:
            fresh = await self.shared.run(
                ("revalidate", domain, path), lambda: self._revalidate(target, stored, auth)
            )
        except (UpstreamUnreachable, UpstreamError) as err:
            log.warning("serving stale %s%s: %s", domain, path, err.message)
            self.metrics.stale_served.inc()
            self.metrics.revalidations.labels(result="failed").inc()
            return self._manifest_response(stored, "STALE")
        changed = "same" if fresh.digest == stored.digest else "changed"
        self.metrics.revalidations.labels(result=changed).inc()
        return self._manifest_response(fresh, "REVALIDATED")

    async def revalidate_tag(self, domain: str, name: str, tag: str) -> bool:
        """Background refresh of one cached tag; True if it moved upstream."""
        rpath = RegistryPath(Kind.MANIFEST, name, tag)
        target = Target(self._registry_of(domain), domain, rpath)
        stored = await in_thread(self.store.read_manifest, domain, rpath.path)
        if stored is None:
            return False
        fresh = await self.shared.run(
            ("revalidate", domain, rpath.path), lambda: self._revalidate(target, stored, None)
        )
        self.metrics.revalidations.labels(
            result="same" if fresh.digest == stored.digest else "changed"
        ).inc()
        return fresh.digest != stored.digest

    def _registry_of(self, domain: str) -> str:
        """The registry name a cache domain serves (for its credentials)."""
        for name, host in self.config.registry_hosts.items():
            if host == domain:
                return name
        return domain

    async def _revalidate(
        self, target: Target, stored: StoredManifest, auth: str | None
    ) -> StoredManifest:
        """Ask upstream whether the tag still points where we have it."""
        response = await self.upstream.registry(
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
                await in_thread(self.store.touch_validated, target.domain, target.rpath.path)
            except FileNotFoundError:  # removed meanwhile (rm, eviction): store it again
                return await self._fetch_manifest(target, auth)
            return StoredManifest(stored.body, stored.content_type, stored.digest, time.time())
        return await self._fetch_manifest(target, auth)

    async def _fetch_manifest(self, target: Target, auth: str | None) -> StoredManifest:
        """GET a manifest; stored only whole, verified and of a known kind."""
        domain, rpath = target.domain, target.rpath
        response = await self.upstream.registry(
            "GET", target, headers={"Accept": MANIFEST_ACCEPT}, client_auth=auth
        )
        async with response:
            if response.status == 404:
                raise NotFound("MANIFEST_UNKNOWN", f"manifest {rpath.name}:{rpath.ref} "
                               f"not found on {domain}")
            if response.status == 401:
                raise UpstreamError("UNAUTHORIZED", f"{domain} refused access to {rpath.name}")
            if response.status != 200:
                raise UpstreamError(message=f"{domain} answered {response.status}")
            # A trickle never trips timeouts.read: the same floor as blobs.
            with self.upstream.rate_guard(response.content):
                body = await _read_manifest(response, domain)
            header_type = response.headers.get("Content-Type", "")
            claimed = response.headers.get("Docker-Content-Digest")
        digest, content_type = await in_thread(_check_manifest, body, header_type, target, claimed)
        now = time.time()
        try:
            await in_thread(self._commit_manifest, target, body, digest, content_type, now)
        except SHAPE_CONFLICTS as err:
            # Still a good answer for this client; the tree cannot hold the name.
            log.warning("cannot cache %s/%s: %s", domain, rpath.path, err)
        self._grew(len(body))
        return StoredManifest(body, content_type, digest, now)

    def _commit_manifest(
        self, target: Target, body: bytes, digest: str, content_type: str, now: float
    ) -> None:
        domain, rpath = target.domain, target.rpath
        self.store.put_bytes(body, digest)
        by_digest = RegistryPath(Kind.MANIFEST, rpath.name, digest).path
        self.store.record_manifest(domain, by_digest, digest, content_type, None)
        if not rpath.by_digest:
            self.store.record_manifest(domain, rpath.path, digest, content_type, now)
        self._record_challenge(domain, rpath)

    @staticmethod
    def _manifest_response(stored: StoredManifest, cache: str) -> web.Response:
        return web.Response(
            body=stored.body,
            headers={"Content-Type": stored.content_type, "Docker-Content-Digest": stored.digest,
                     "X-Cache": cache, **API_HEADERS},
        )

    # --- everything else --------------------------------------------------------

    async def _passthrough(
        self, request: web.Request, host: str, path_qs: str, token_ok: bool = False,
        scheme: str = "https", mirror: bool = False,
    ) -> web.StreamResponse:
        """Relay a request we do not cache. A token request whose auth server
        cannot be reached gets a dummy token, so cached pulls go on offline.
        The mirror's origin answers registry JSON only: whatever type an
        upstream names (text/html, a script), a browser there gets JSON."""
        # A multidict: Go clients send Accept once per media type.
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() in RELAYED_REQUEST
        )
        body = request.content if request.can_read_body else None
        try:
            upstream = await self.upstream.send(
                request.method, host, path_qs, headers, scheme=scheme, data=body
            )
        except UpstreamUnreachable:
            if token_ok and request.method in ("GET", "POST") and _looks_like_token(request):
                self.metrics.dummy_tokens.inc()
                return web.json_response(dummy_token())
            if path_qs.startswith("/v2/") and path_qs.rstrip("/") == "/v2":
                return await self._replay_challenge(host)
            raise
        if upstream.status == 401 and path_qs.startswith("/v2/"):
            header = upstream.headers.get("WWW-Authenticate")
            if header:
                self._store_challenge(host, path_qs.split("?")[0], header)
        relayed = {k: v for k, v in upstream.headers.items() if k.lower() in RELAYED_RESPONSE}
        if mirror:
            relayed = {k: v for k, v in relayed.items() if k.lower() != "content-type"}
            relayed["Content-Type"] = "application/json"
        response = web.StreamResponse(status=upstream.status, headers=relayed)
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 << 10):
                await response.write(chunk)
            await response.write_eof()
        finally:
            upstream.release()
        return response

    async def _replay_challenge(self, host: str) -> web.Response:
        header = await in_thread(self.store.read_sidecar, "www-authenticate", host, "/v2/")
        if not header:
            raise UpstreamUnreachable(message=f"{host} is unreachable")
        err = CrProxyError("UNAUTHORIZED", "authentication required")
        return web.Response(status=401, body=err.body(), content_type="application/json",
                            headers={"WWW-Authenticate": header, **API_HEADERS})

    def _store_challenge(self, host: str, path: str, header: str) -> None:
        """Keep the upstream's /v2/ challenge (any 401's, without its scope) to
        replay when the upstream is unreachable. Only that one file: a 401
        for a name that does not exist must not create files in the cache;
        the per-path challenges are written with what they protect (commit).
        Written inline: one small file, only when it changed."""
        plain = _without_scope(header)
        if self._challenges.get(host) == plain:
            return
        try:
            self.store.write_sidecar("www-authenticate", host, "/v2/", plain)
            self._challenges[host] = plain
        except (CrProxyError, OSError) as err:
            log.debug("not storing challenge for %s: %s", host, err)

    def _record_challenge(self, domain: str, rpath: RegistryPath) -> None:
        """The challenge a client would get for a path we just stored."""
        plain = self._challenges.get(domain)
        if plain:
            scoped = f'{plain},scope="repository:{rpath.name}:pull"'
            self.store.write_sidecar("www-authenticate", domain, rpath.path, scoped)


RELAYED_REQUEST = frozenset({"accept", "authorization", "content-type", "content-length", "range",
                             "user-agent"})
RELAYED_RESPONSE = frozenset({"content-type", "content-length", "docker-content-digest",
                              "www-authenticate", "location", "docker-distribution-api-version",
                              "link", "range", "docker-upload-uuid", "content-range"})


async def _sendfile_ranges(request: web.Request, flight: Flight) -> None:
    """Zero-copy from the growing file to nginx's socket: a reader costs the
    event loop a syscall per range, not the bytes."""
    loop = asyncio.get_running_loop()
    async for fd, offset, count in flight.ranges():
        with open(fd, "rb", buffering=0, closefd=False) as file:
            await loop.sendfile(request.transport, file, offset, count)


def _client_auth(request: web.Request) -> str | None:
    """A client's own bearer token is forwarded (https_proxy mode); our dummy
    tokens are not, they mean nothing upstream."""
    value = request.headers.get("Authorization")
    if not value or "cr-proxy-offline-" in value:
        return None
    return value


def _without_scope(header: str) -> str:
    challenge = parse_challenge(header)
    if challenge is None:
        return header
    params = ",".join(f'{k}="{v}"' for k, v in challenge.params.items() if k != "scope")
    return f"{challenge.scheme.capitalize()} {params}"


def _looks_like_token(request: web.Request) -> bool:
    return "scope" in request.query or "service" in request.query or request.path.endswith("/token")


async def _read_manifest(response: aiohttp.ClientResponse, domain: str) -> bytes:
    """The whole body, or an error: read(n) returns only what has arrived,
    which cut a manifest sent in two pieces at the first."""
    if (response.content_length or 0) > MAX_MANIFEST:
        raise ManifestInvalid(message=f"{domain}: manifest larger than {MAX_MANIFEST} bytes")
    body = bytearray()
    try:
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > MAX_MANIFEST:  # an endless answer ends here
                raise ManifestInvalid(
                    message=f"{domain}: manifest larger than {MAX_MANIFEST} bytes")
    except aiohttp.ClientPayloadError as err:
        raise Truncated(message=f"{domain}: manifest body cut short") from err
    if response.content_length is not None and len(body) != response.content_length:
        raise Truncated(message=f"{domain}: manifest body cut short")
    return bytes(body)


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


def make_app(
    config: Config, metrics: Metrics | None = None, clean_temp: bool = True
) -> web.Application:
    """The fetcher's aiohttp application: one catch-all route. Only serve
    cleans temp/ at start: a warm beside another warm must not delete the
    other's downloads in progress."""
    store = Store(config.cache_dir)
    # Request bodies (relayed pushes) are streamed from request.content, so
    # aiohttp's client_max_size, which bounds only read(), does not apply.
    app = web.Application()

    async def lifecycle(app: web.Application):
        await in_thread(store.prepare, clean_temp)
        session = Upstream.make_session(config)
        fetcher = Fetcher(config, store, Upstream(config, session), metrics)
        app["fetcher"] = fetcher
        yield
        await fetcher.close()
        await session.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app["fetcher"].handle(request)

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(_nosniff)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer says its type is the one to use: no browser may take a
    JSON body (or a relayed upstream's) for HTML or script."""
    response.headers["X-Content-Type-Options"] = "nosniff"
