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
import json
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

from .auth import dummy_token, parse_challenge
from .config import Config
from .errors import (
    CrProxyError,
    DigestMismatch,
    NotFound,
    Truncated,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .flight import Flight, Flights
from .layout import Kind, RegistryPath, Target, mirror_target, proxy_target
from .metrics import Metrics
from .reference import MANIFEST_ACCEPT, digest_of, is_digest
from .store import SHAPE_CONFLICTS, BlobWriter, Store, StoredManifest
from .upstream import Hop, Upstream

log = logging.getLogger("cr_proxy.fetcher")

T = TypeVar("T")
MAX_MANIFEST = 4 << 20  # distribution's manifest size limit
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
        "_challenges", "_writes", "config", "flights", "metrics", "on_full", "shared", "store",
        "upstream",
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
        if rpath is None:
            # The path proxy_target checked, not the raw one.
            query = f"?{request.query_string}" if request.query_string else ""
            return await self._passthrough(request, domain, request.path + query, token_ok=True,
                                           scheme=request.headers.get("X-CR-Scheme", "https"))
        return await self._registry_request(request, Target(domain, domain, rpath), mirror=False)

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
        return await self._passthrough(request, target.domain, self._relayed_path(request, target,
                                                                                   mirror))

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
        stored = await in_thread(self.store.link_if_stored, digest, domain, path)
        if stored is not None:
            # Pulled before through another repository or registry: one copy.
            self.metrics.hits.labels(kind="blob-fetch").inc()
            return self._file_response(stored, digest)
        if request.method == "HEAD":
            if request.headers.get("X-CR-Cache-Only") == "1":
                # warm asks "is it here?" without costing an upstream request.
                raise NotFound("BLOB_UNKNOWN", f"blob {digest} is not cached")
            return await self._blob_head(request, target)
        self.metrics.misses.labels(kind="blob").inc()
        joined_before = self.flights.coalesced
        flight = self.flights.join(
            digest, digest, functools.partial(self._download_blob, target, _client_auth(request))
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
        await response.write_eof()
        if flight.committed_path is not None:
            await in_thread(self.store.link_quietly, digest, domain, path)
        return response

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
            writer = await in_thread(self.store.blob_writer, digest)
            try:
                flight.started(writer.path, upstream.content_length, None)
                try:
                    await self._write_body(upstream.content, writer, flight)
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

    async def _write_body(
        self, body: aiohttp.StreamReader, writer: BlobWriter, flight: Flight
    ) -> None:
        """The upstream body into the writer, pipelined: one batch is hashed
        and written in a thread while the next arrives (awaiting each write
        before reading on made the download half as fast). One write at a
        time, so the bytes stay in order."""
        writing: concurrent.futures.Future[None] | None = None
        batch = bytearray()
        guard = self.upstream.rate_guard(body)  # limits.min_rate
        try:
            async for chunk in body.iter_any():
                batch += chunk
                if len(batch) < WRITE_BATCH:
                    continue
                if writing is not None:
                    await asyncio.wrap_future(writing)
                    await flight.progress(writer.size)
                # A new batch for what comes next: the thread owns this one.
                writing, batch = self._writes.submit(writer.write, batch), bytearray()
            if writing is not None:
                await asyncio.wrap_future(writing)
            await asyncio.wrap_future(self._writes.submit(writer.write, batch))
            await flight.progress(writer.size)
        finally:
            guard.cancel()
            if writing is not None and not writing.done():
                # Failed or cancelled mid-body: the caller closes the file
                # next, so the write in flight must be over first (one batch).
                concurrent.futures.wait([writing])

    def _grew(self, size: int) -> None:
        self.metrics.cache_bytes.inc(size)
        limit = self.config.cache.max_size
        if limit and self.on_full and self.metrics.cache_bytes._value.get() > limit:
            self.on_full()

    def _commit_blob(self, writer: BlobWriter, target: Target, hops: list[Hop]) -> Path:
        """Store the verified content, then make every name that leads to it;
        the redirect record is written only once its target is cached."""
        committed = self.store.commit_verified(writer)
        digest, domain, path = target.rpath.ref, target.domain, target.rpath.path
        source = (domain, path)
        for hop in hops:
            self.store.link_quietly(digest, hop.target_host, hop.target_path)
            self.store.record_redirect(*source, hop.status, hop.location)
            source = (hop.target_host, hop.target_path)
        self.store.link_quietly(digest, domain, path)
        self._record_challenge(domain, target.rpath)
        return committed

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
            if (response.content_length or 0) > MAX_MANIFEST:
                raise UpstreamError("MANIFEST_INVALID", "manifest too large")
            try:
                body = await response.content.read(MAX_MANIFEST + 1)
            except aiohttp.ClientPayloadError as err:
                raise Truncated(message=f"{domain}: manifest body cut short") from err
            if len(body) > MAX_MANIFEST:
                raise UpstreamError("MANIFEST_INVALID", "manifest too large")
            if response.content_length is not None and len(body) != response.content_length:
                raise Truncated(message=f"{domain}: manifest body cut short")
            content_type = response.content_type
            claimed = response.headers.get("Docker-Content-Digest")
        content_type = _manifest_type(body, content_type)
        algorithm = rpath.ref.split(":", 1)[0] if rpath.by_digest else "sha256"
        digest = digest_of(body, algorithm)
        if rpath.by_digest and digest != rpath.ref:
            raise DigestMismatch(message=f"{domain} sent {digest} for {rpath.ref}")
        if claimed and is_digest(claimed) and claimed.startswith(algorithm) and claimed != digest:
            raise DigestMismatch(message=f"{domain} claimed {claimed}, body is {digest}")
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
        scheme: str = "https",
    ) -> web.StreamResponse:
        """Relay a request we do not cache. A token request whose auth server
        cannot be reached gets a dummy token, so cached pulls go on offline."""
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
        response = web.StreamResponse(status=upstream.status, headers={
            k: v for k, v in upstream.headers.items() if k.lower() in RELAYED_RESPONSE
        })
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


def _manifest_type(body: bytes, header: str) -> str:
    """The Content-Type to store: the upstream's, or the body's mediaType."""
    if header and header not in ("application/octet-stream", "text/plain", "application/json"):
        return header
    try:
        media_type = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        media_type = None
    if isinstance(media_type, str) and media_type:
        return media_type
    return header or "application/vnd.oci.image.manifest.v1+json"


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
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
