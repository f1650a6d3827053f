"""Pushes through the mirror (push.enabled): relayed to the registry with
cr-proxy's own login, and written through to the cache.

A push names its registry as a pull does, by a path prefix
(`/v2/registry.example/app/blobs/uploads/`), or, with push.default_target
set, not at all. Every upload form of the distribution spec is relayed as
it comes (monolithic POST+PUT, chunked PATCH with Content-Range, upload
status GET, DELETE, cross-repository mount), its body streamed to the
upstream in the pieces it arrives in, and the upstream's Locations made
ours again (`/v2/<prefix>/<name>/...`), so the client never learns the
upstream's host and keeps talking to us.

Write-through: an upload's bytes are hashed into a temp file as they pass
(Store.upload_writer), in a thread beside the relay (writes.py); once the
upstream answered the final PUT with 201 and the bytes hash to the digest
the client named, the file moves into the digest store under the
repository's blob path. A manifest PUT is read
whole (MAX_MANIFEST), relayed, and answered only when the upstream has
answered, with the upstream's status and body: only a 201 stores it (by
digest, and by tag for a tag PUT). A pushed image is then pulled from the
cache at once, offline too. An upload we cannot follow byte for byte (one
begun before a restart, a Content-Range that is not where we are) is still
relayed, just not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cr_proxy.cache.layout import (
    DOCKER_HUB,
    Kind,
    RegistryPath,
    Target,
    check_name,
    check_path,
    normalise_registry,
    resolve_domain,
    split_prefix,
)
from cr_proxy.cache.store import BlobWriter
from cr_proxy.errors import (
    BadRequest,
    CrProxyError,
    DestinationRefused,
    DigestMismatch,
    NotFound,
    TokenRefused,
    Unsupported,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from cr_proxy.fetch.blobs import blob_head, upstream_head
from cr_proxy.fetch.context import (
    FetchContext,
    client_auth,
    in_thread,
    read_bounded,
)
from cr_proxy.fetch.held import Held
from cr_proxy.fetch.private import Privacy, Undecided
from cr_proxy.fetch.writes import PipedWrites
from cr_proxy.oci.manifest import MANIFEST_MEDIA_TYPES, MAX_MANIFEST
from cr_proxy.oci.reference import digest_of, is_digest, is_tag
from cr_proxy.upstream.uploads import PushAuth

log = logging.getLogger("cr_proxy.push")

# /v2/<name>/blobs/uploads/<session> and /v2/<name>/manifests/<ref>; the
# name may carry a registry prefix.
PUSH_PATH_RE = re.compile(
    r"^/v2/(?P<name>.+)/(?P<what>blobs/uploads|blobs|manifests)/(?P<ref>[^/]*)$")
UPLOAD_PATH_RE = re.compile(r"^/v2/.+/blobs/uploads/[^/]*$")
BLOB_PATH_RE = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
UPLOAD_START_RE = re.compile(r"[0-9]{1,19}")  # where a chunk's Content-Range starts
# What may follow /v2/<name>/ in a Location we hand a client: an upload
# session, a blob or a manifest, one plain segment each (never `.` or `..`:
# a client resolves those, and would leave the repository for another).
LOCATION_REST_RE = re.compile(
    r"blobs/uploads/[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}"
    r"|blobs/[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-fA-F0-9]{32,256}"
    r"|manifests/(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
    r"|[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-fA-F0-9]{32,256})")
# A relayed header's value (and a Location's query): visible ASCII and
# spaces, as much as a registry's upload state needs; no control bytes.
RELAYED_VALUE_RE = re.compile(r"[\x20-\x7e]{0,8192}")
SENT_HEADERS = frozenset({"content-type", "content-length", "content-range", "user-agent"})
RELAYED_HEADERS = frozenset({"content-length", "docker-content-digest", "location", "range",
                             "docker-upload-uuid", "content-range",
                             "docker-distribution-api-version", "oci-subject"})
MAX_ANSWER = 1 << 20  # bytes of an upstream's answer to a push we read (JSON, errors)


@dataclass(frozen=True, slots=True)
class PushTarget:
    registry: str
    domain: str  # the host that serves it: the cache's <domain>
    name: str  # the repository upstream
    client_name: str  # the name as the client spelt it, its prefix included
    what: str  # "blobs/uploads", "blobs" (a probe: HEAD) or "manifests"
    ref: str  # the upload session (may be ""), the blob's digest or the manifest reference
    # https_proxy mode: the client talks to the registry itself, logged in
    # as itself; its Authorization is relayed (none of cr-proxy's logins).
    proxied: bool = False
    client_auth: str | None = None

    @property
    def path(self) -> str:
        """The path upstream."""
        return f"/v2/{self.name}/{self.what}/{self.ref}"


def push_target(path: str, default_target: str, registry_hosts: dict[str, str]) -> PushTarget:
    """A push request's registry and repository; a name without a registry
    prefix goes to push.default_target, or is refused."""
    match = PUSH_PATH_RE.match(path)
    if match is None:
        raise Unsupported(message=f"{path[:200]} is not a push path this mirror relays")
    check_path(path)
    client_name, ref = match["name"], match["ref"]
    prefix, name = split_prefix(client_name)
    if prefix is None and not default_target:
        raise Unsupported(message="push to <mirror>/<registry>/<repository>: "
                          "push.default_target is not set")
    registry = normalise_registry(prefix or default_target)
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    check_name(name)
    if match["what"] == "manifests" and not (is_tag(ref) or is_digest(ref)):
        raise BadRequest("TAG_INVALID", f"invalid reference {ref[:140]!r}")
    if match["what"] == "blobs" and not is_digest(ref):
        raise BadRequest("DIGEST_INVALID", f"invalid digest {ref[:140]!r}")
    return PushTarget(registry, resolve_domain(registry, registry_hosts), name, client_name,
                      match["what"], ref)


def proxied_target(path: str, domain: str, client_auth: str | None) -> PushTarget:
    """An https_proxy client's write to `domain` (the host it asked for)."""
    match = PUSH_PATH_RE.match(path)
    if match is None or match["what"] == "blobs":
        raise Unsupported(message=f"{path[:200]} is not a push path")
    check_path(path)
    name, ref = check_name(match["name"]), match["ref"]
    if match["what"] == "manifests" and not (is_tag(ref) or is_digest(ref)):
        raise BadRequest("TAG_INVALID", f"invalid reference {ref[:140]!r}")
    return PushTarget(domain, domain, name, name, match["what"], ref, proxied=True,
                      client_auth=client_auth)


@dataclass(slots=True)
class Upload:
    """What we follow of one upload session: its bytes so far, or nothing
    once it went where we cannot follow (broken: relayed, never stored);
    between requests, when it was last used and where it is upstream (to
    cancel it there once abandoned)."""

    pipe: PipedWrites | None = None  # its bytes so far, into a temp file
    broken: bool = False
    last: float = 0.0  # time.monotonic() of its last answer
    target: PushTarget | None = None
    upstream: str = ""  # its upstream path and query (upload state) as last given

    def size(self) -> int:
        return self.pipe.writer.size if self.pipe is not None else 0

    def take(self) -> BlobWriter | None:
        """Its bytes so far, no write following (one in flight is waited for)."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return None
        pipe.close()
        return pipe.writer

    def drop(self) -> None:
        writer = self.take()
        if writer is not None:
            writer.abort()


FillBlob = Callable[[Target], Awaitable[Path]]


class Pushes:
    __slots__ = ("_sweeper", "auth", "cancels", "commits", "ctx", "fill_blob", "fills", "held",
                 "privacy", "touched", "uploads", "writes")

    def __init__(self, ctx: FetchContext, writes: Executor, privacy: Privacy | None = None,
                 fill_blob: FillBlob | None = None) -> None:
        self.ctx = ctx
        self.writes = writes  # hashes and writes uploads (writes.py), shared with pulls
        # A blob the upstream mounted that we have no copy of is fetched
        # (Blobs.ensure), so the pushed image is whole in the cache.
        self.fill_blob = fill_blob
        self.fills: set[asyncio.Task[None]] = set()
        # (domain, digest) -> (repository, the commit of its upload): the
        # final PUT is answered before its fsync and rename (_finish).
        # Each commit in progress -> (domain, digest, repository): a digest
        # pushed to two repositories at once has two, each waited for by
        # its own repository's manifest.
        self.commits: dict[asyncio.Task[None], tuple[str, str, str]] = {}
        # What is pushed to a private repository is marked so before it is
        # named in the tree, as what is pulled (private.py).
        self.privacy = privacy
        self.auth = PushAuth(ctx.upstream)
        self.held = Held(ctx.store)
        # (domain, name, upstream session id) -> what we follow of it
        self.uploads: dict[tuple[str, str, str], Upload] = {}
        self.cancels: set[asyncio.Task[None]] = set()  # uploads being cancelled upstream
        # digest -> time.monotonic() a push last stored, mounted or was told
        # of it: what eviction keeps (pending()).
        self.touched: dict[str, float] = {}
        self._sweeper: asyncio.Task[None] | None = None  # cancels abandoned uploads

    def __repr__(self) -> str:
        return f"<Pushes {len(self.uploads)} uploads>"

    async def finish_commits(self, grace: float = 10.0) -> None:
        """Let the commits of blobs the upstream took (its 201 already the
        client's) finish before a shutdown: cancelled, the cache would lack
        what the client was told is pushed, and a restart would not know the
        upstream holds it (no mount from memory)."""
        tasks = list(self.commits)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in (*self.cancels, *self.fills, *self.commits):
            task.cancel()
        for upload in self.uploads.values():
            upload.drop()
        self.uploads.clear()

    def pending(self) -> set[str]:
        """The digests pushes in progress reference (stored, mounted, or
        answered held): none is evicted (cache/evict.py). A push's manifest
        makes them an image's, whose recent use keeps them; a push that
        never sends one lets go of them after push.upload_timeout."""
        horizon = time.monotonic() - self.ctx.config.push.upload_timeout
        for digest in [d for d, at in self.touched.items() if at < horizon]:
            del self.touched[digest]
        return set(self.touched)

    def _touch(self, digest: str) -> None:
        """Kept in the order of use, so what push.upload_timeout has let go
        of is at the front and goes at once (pending() is asked only when
        eviction runs: cache.max_size)."""
        now = time.monotonic()
        self.touched.pop(digest, None)
        self.touched[digest] = now
        horizon = now - self.ctx.config.push.upload_timeout
        while (oldest := next(iter(self.touched))) != digest \
                and self.touched[oldest] < horizon:
            del self.touched[oldest]

    def _keep(self, key: tuple[str, str, str], upload: Upload, target: PushTarget,
              location: str) -> None:
        """Follow the session between its requests, until its next request
        or push.upload_timeout of silence."""
        parts = urlsplit(location)
        upload.last = time.monotonic()
        upload.target = target
        upload.upstream = parts.path + (f"?{parts.query}" if parts.query else "")
        earlier = self.uploads.get(key)
        if earlier is not None and earlier is not upload:
            # Two requests of one session at once (a PATCH and a status GET):
            # the one answered last is followed, the other's file let go.
            earlier.drop()
            upload.drop()
            upload.broken = True
        self.uploads[key] = upload
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Cancel uploads idle for push.upload_timeout (the client gone
        between requests): upstream (DELETE), and their temp files here."""
        timeout = self.ctx.config.push.upload_timeout
        while self.uploads:
            await asyncio.sleep(max(0.2, min(timeout / 4, 30.0)))
            horizon = time.monotonic() - timeout
            for key, upload in list(self.uploads.items()):
                if upload.last >= horizon:
                    continue
                del self.uploads[key]
                upload.drop()
                if upload.target is not None and upload.upstream:
                    log.info("upload %s/%s idle for %.0f s: cancelled", upload.target.domain,
                             upload.upstream.split("?")[0], timeout)
                    self._cancel_later(upload.target, upload.upstream)

    def claims(self, request: web.Request) -> bool:
        """A mirror request that is ours: every write (refused 405 while
        push is off), and, push on, an upload's status GET and a pusher's
        HEAD of a blob (a push probe: "must I upload this layer?")."""
        if request.method not in ("GET", "HEAD"):
            return True
        if not self.ctx.config.push.enabled:
            return False
        if UPLOAD_PATH_RE.match(request.path):
            return True
        # A HEAD from a client that may push: pullers' HEADs (any other
        # client) keep the pull path's answer, from the cache first.
        return (request.method == "HEAD" and bool(BLOB_PATH_RE.match(request.path))
                and self._may_push(request))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        config = self.ctx.config
        if not config.push.enabled:
            raise Unsupported(message="this mirror is read-only: push to the registry itself "
                              "(or set push.enabled)")
        if not self._may_push(request):
            # nginx refuses these first, before the body (mirror-maps.conf):
            # this is the second wall.
            raise DestinationRefused(message="this client address may not push "
                                     "(push.allow_clients)")
        target = push_target(request.path, config.push.default_target,
                             dict(config.registry_hosts))
        if target.what == "blobs":
            # Not counted as the repository's activity: a probe may wait for
            # another pusher's claim, and two pushers waiting on each other's
            # claims must both see the other go silent (held.py).
            return await self._probe(request, target)
        return await self._write(request, target)

    def claims_proxied(self, request: web.Request) -> bool:
        """An https_proxy request that is ours (push on): a write to a push
        path, or an upload's status GET, from a client on push.allow_clients.
        Others are relayed as they come, uncached (passthrough.py)."""
        if not self.ctx.config.push.enabled or not PUSH_PATH_RE.match(request.path):
            return False
        if request.method in ("GET", "HEAD") and not UPLOAD_PATH_RE.match(request.path):
            return False
        return self._may_push(request)

    async def handle_proxied(self, request: web.Request, domain: str) -> web.StreamResponse:
        """An https_proxy client's upload or manifest PUT: relayed with its
        own login and written through as in mirror mode (no probes: the
        client's token may not reach another repository to mount from)."""
        target = proxied_target(request.path, domain, request.headers.get("Authorization"))
        return await self._write(request, target)

    async def _write(self, request: web.Request, target: PushTarget) -> web.StreamResponse:
        """An upload request or a manifest PUT, in either mode."""
        # A repository with an upload or manifest request in progress has a
        # live pusher: a claim of its is not abandoned (held.py).
        self.held.began(target.domain, target.name)
        try:
            if target.what == "manifests":
                return await self._manifest(request, target)
            return await self._upload(request, target)
        finally:
            self.held.ended(target.domain, target.name)

    async def _login(self, target: PushTarget, mount_from: str | None = None,
                     delete: bool = False) -> str | None:
        """The Authorization of a request upstream: the client's own in
        https_proxy mode, else cr-proxy's (upstream/uploads.py)."""
        if target.proxied:
            return target.client_auth
        return await self.auth.header(target.registry, target.domain, target.name, mount_from,
                                      delete=delete)

    def _may_push(self, request: web.Request) -> bool:
        """X-Forwarded-For is nginx's own, never the client's."""
        try:
            address = ipaddress.ip_address(request.headers.get("X-Forwarded-For", ""))
        except ValueError:
            return False
        return any(address in net for net in self.ctx.config.push.allow_clients)

    # --- probes: one upload per layer across images ----------------------------

    async def _probe(self, request: web.Request, target: PushTarget) -> web.StreamResponse:
        """A pusher's HEAD of a blob (_ask_upstream). While the upstream
        cannot be asked, the cache answers for a blob it holds, as it does
        a puller's HEAD (the client may be pulling; a push fails at its
        upload or manifest all the same)."""
        try:
            return await self._ask_upstream(request, target)
        except (UpstreamUnreachable, UpstreamTimeout, aiohttp.ClientError, TimeoutError):
            size = await in_thread(self._held_here, target)
            if size is None:
                raise
            log.info("push probe of %s in %s/%s answered from the cache: upstream unreachable",
                     target.ref, target.domain, target.name)
            return blob_head(target.ref, size)

    def _mount_sources(self, domain: str, holders: set[str]) -> list[str]:
        """The repositories a digest may be mounted from for a pusher: none
        that is private. A mount asks with cr-proxy's login, which may pull
        what the pusher may not: it would copy the private layer into a
        repository the pusher reads. Blocking."""
        return [name for name in sorted(holders) if not self.ctx.store.is_private(domain, name)]

    def _held_here(self, target: PushTarget) -> int | None:
        """The size of the probed blob when the cache may say it holds it
        for this repository: named here, or stored for no private
        repository (a private one's digest and size are its own). Blocking."""
        store, digest = self.ctx.store, target.ref
        path = RegistryPath(Kind.BLOB, target.name, digest).path
        if store.linked(digest, target.domain, path) is None and store.is_private_blob(digest):
            return None
        return _size_of(store.tree.blob(digest))

    async def _ask_upstream(self, request: web.Request, target: PushTarget
                            ) -> web.StreamResponse:
        """200 when the upstream holds the blob in this repository (as far
        as we know), or after a mount from another repository of the
        registry that holds it; while another pusher uploads it, after
        waiting for that upload; else the upstream's own answer, and a 404
        claims the upload for this pusher (held.py)."""
        domain, name, digest = target.domain, target.name, target.ref
        held = self.held
        await held.load(domain)
        while True:
            holders = held.holders(domain, digest)
            if name in holders:
                return await self._held_answer(request, target)
            for source in await in_thread(self._mount_sources, domain, holders):
                if await self._mount(target, source):
                    return await self._held_answer(request, target)
            if not await held.wait(domain, name, digest):
                break
        try:
            answer = await self._head(request, target)
        except NotFound:
            held.claim(domain, name, digest)
            raise
        held.add(domain, name, digest, answer.content_length)
        self._touch(digest)
        return answer

    async def _held_answer(self, request: web.Request, target: PushTarget) -> web.StreamResponse:
        """200 for a blob the upstream holds here, with its size; asked
        upstream when we never knew it."""
        self._touch(target.ref)  # the push relies on it: our copy stays too
        size = self.held.size(target.domain, target.ref)
        if size is None:
            return await self._head(request, target)
        return blob_head(target.ref, size)

    async def _head(self, request: web.Request, target: PushTarget) -> web.StreamResponse:
        """The upstream's answer to the HEAD (its redirects followed, as a
        client would), asked with the push's own login: the token the upload
        takes next covers pull too, so the registry answers at once, not
        with a 401 first and then to a pull token (a round trip per probe,
        and a client probes each layer twice)."""
        rtarget = Target(target.registry, target.domain,
                         RegistryPath(Kind.BLOB, target.name, target.ref))
        auth = client_auth(request)
        if auth is None:
            # Refused: asked as a pull is; the upload will meet the refusal.
            with contextlib.suppress(TokenRefused):
                auth = await self._login(target)
        return await upstream_head(self.ctx, rtarget, auth)

    async def _mount(self, target: PushTarget, source: str) -> bool:
        """Mount the digest from `source` into the target repository
        upstream; True when the upstream did (201)."""
        digest = target.ref
        auth = await self._login(target, source)
        headers = {"Content-Length": "0", **({"Authorization": auth} if auth else {})}
        path_qs = f"/v2/{target.name}/blobs/uploads/?{urlencode({'mount': digest, 'from': source})}"
        answer = await self.ctx.upstream.send("POST", target.domain, path_qs, headers, data=b"")
        answer.release()
        if answer.status == 201:
            log.info("mounted %s from %s into %s/%s upstream", digest, source, target.domain,
                     target.name)
            await self._mounted(digest, target)
            return True
        # The source no longer holds it (or we may not read it there): a 202
        # is an upload the registry began instead, which nobody will use.
        self.held.forget(target.domain, source, digest)
        location = urlsplit(answer.headers.get("Location", ""))
        session = self._session(location.path) if answer.status == 202 else ""
        if session:
            upload = PushTarget(target.registry, target.domain, target.name, target.client_name,
                                "blobs/uploads", session)
            self._cancel_later(upload, location.path + (f"?{location.query}"
                                                        if location.query else ""))
        log.info("mount of %s from %s into %s/%s refused (%d)", digest, source, target.domain,
                 target.name, answer.status)
        return False

    # --- blobs ---------------------------------------------------------------

    async def _upload(self, request: web.Request, target: PushTarget) -> web.StreamResponse:
        method = request.method
        # Parsed once from the query as sent (query_string is decoded already:
        # a %2B in an upload state would come back a space).
        query = list(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        mount_from = None
        if method == "POST" and request.query.get("mount") and request.query.get("from"):
            if target.proxied:  # the registry's own names: within it, as they are
                mount_from = check_name(request.query["from"])
            else:
                query, mount_from = self._mount_query(query, target)
        key = (target.domain, target.name, target.ref)
        upload = self.uploads.pop(key, None) if target.ref else Upload()
        if upload is None:
            upload = Upload(broken=True)  # begun before we started: followed no more
        final = method in ("PUT", "POST") and "digest" in request.query
        self._check_range(request, upload)
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() in SENT_HEADERS)
        body = self._body(request, upload) if request.can_read_body else None
        path_qs = target.path + (f"?{urlencode(query)}" if query else "")
        sending = False
        try:
            # Within: a login that fails (or a client gone meanwhile) drops
            # the upload it took out, temp file and all.
            auth = await self._login(target, mount_from, delete=method == "DELETE")
            if auth:
                headers["Authorization"] = auth
            sending = True
            answer = await self.ctx.upstream.send(method, target.domain, path_qs, headers,
                                                  data=body)
        except BaseException:
            self._failed(upload, target, final, request)
            if sending and body is not None and target.ref:
                # A body cut short (the client gone mid-chunk, or the
                # upstream): the session is dead to both; cancel it upstream
                # rather than leave the registry a half upload.
                self._cancel_later(target, path_qs)
            raise
        try:
            response = await self._relay(request, answer, target)
        except BaseException:
            self._failed(upload, target, final, request)
            raise
        if final:
            await self._finish(upload, answer.status, request.query["digest"], target)
        elif method == "POST" and answer.status == 201 and mount_from:
            await self._mounted(request.query["mount"], target)
        elif method == "DELETE" or answer.status >= 300:
            upload.drop()
        else:
            location = answer.headers.get("Location", "")
            session = self._session(location)
            if session:
                self._keep((target.domain, target.name, session), upload, target, location)
            else:
                upload.drop()
        return response

    def _failed(self, upload: Upload, target: PushTarget, final: bool,
                request: web.Request) -> None:
        """An upload request that broke off: nothing kept, and a pusher
        waiting for this digest looks again at once (held.py)."""
        upload.drop()
        if final:
            self.held.release(target.domain, request.query["digest"])

    def _cancel_later(self, target: PushTarget, path_qs: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(target, path_qs))
        self.cancels.add(task)
        task.add_done_callback(self.cancels.discard)

    async def _cancel(self, target: PushTarget, path_qs: str) -> None:
        """Best effort: DELETE the upload upstream (its upload state as the
        client last had it)."""
        try:
            auth = await self._login(target, delete=True)
            headers = {"Authorization": auth} if auth else {}
            response = await self.ctx.upstream.send("DELETE", target.domain, path_qs, headers)
            response.release()
            log.info("upload %s%s cut short: cancelled upstream (%d)", target.domain,
                     target.path, response.status)
        except (CrProxyError, aiohttp.ClientError, OSError, TimeoutError) as err:
            log.info("upload %s%s cut short, not cancelled upstream: %s", target.domain,
                     target.path, err)

    def _mount_query(
        self, query: list[tuple[str, str]], target: PushTarget
    ) -> tuple[list[tuple[str, str]], str | None]:
        """A mount's `from` as the upstream names it; a source in another
        registry cannot be mounted: the POST then just starts an upload."""
        source = dict(query)["from"]
        prefix, name = split_prefix(source)
        registry = prefix or self.ctx.config.push.default_target
        hosts = dict(self.ctx.config.registry_hosts)
        if not registry or resolve_domain(normalise_registry(registry), hosts) != target.domain:
            return [(k, v) for k, v in query if k not in ("mount", "from")], None
        registry = normalise_registry(registry)
        if registry == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"
        check_name(name)
        if self.ctx.store.is_private(target.domain, name):
            # Asked with cr-proxy's login, a mount from a private repository
            # would copy what the pusher may not read (_mount_sources).
            return [(k, v) for k, v in query if k not in ("mount", "from")], None
        return [(k, name if k == "from" else v) for k, v in query], name

    @staticmethod
    def _check_range(request: web.Request, upload: Upload) -> None:
        """A chunk that does not start where our copy ends (a retried or
        resumed chunk): the upload is relayed on, not stored."""
        value = request.headers.get("Content-Range")
        if value is None or upload.broken:
            return
        start = value.removeprefix("bytes=").split("-", 1)[0]
        # ASCII digits, as many as an int64 has: str.isdigit takes "²" and
        # int() refuses 4,300 digits and more.
        if not UPLOAD_START_RE.fullmatch(start) or int(start) != upload.size():
            upload.drop()
            upload.broken = True

    async def _body(self, request: web.Request, upload: Upload) -> AsyncIterator[bytes]:
        """The client's body as it arrives, on to the upstream, and hashed into
        the upload's temp file in a thread meanwhile (writes.py). Each piece
        goes on when the next has come, the last only once the file holds
        every byte: the upstream cannot answer before it has the last byte,
        so an answer finds the file whole (_finish, _check_range)."""
        if not upload.broken and upload.pipe is None:
            upload.pipe = PipedWrites(self.writes, self.ctx.store.upload_writer())
        pipe = upload.pipe
        held: bytes | None = None
        async for chunk in request.content.iter_any():
            if pipe is not None:
                await pipe.add(chunk)
            if held is not None:
                yield held
            held = chunk
        if pipe is not None:
            await pipe.flush()
        if held is not None:
            yield held

    async def _finish(self, upload: Upload, status: int, digest: str,
                      target: PushTarget) -> None:
        """The final PUT answered: store the bytes if the upstream took them
        (201) and they are what the client said. A 201 goes to the client at
        once and the commit (verify, fsync, rename) follows in a task of its
        own, as a pull's client gets its last byte before the fsync: the
        fsync of a big layer is a tenth of its push. What needs the blob in
        the cache waits for it: the repository's manifest PUT (so a pushed
        image is whole in the cache once its push is done) and a mount of
        the digest (_committed)."""
        writer = upload.take()
        if status != 201 or writer is None or not is_digest(digest):
            try:
                await self._stored(writer, status, digest, target)
            finally:
                # Whatever the upstream answered, a pusher waiting for this
                # digest looks again (held.py).
                self.held.release(target.domain, digest)
            return
        task = asyncio.get_running_loop().create_task(self._commit(writer, digest, target))
        self.commits[task] = (target.domain, digest, target.name)
        task.add_done_callback(self._forget_commit)

    def _forget_commit(self, done: asyncio.Task[None]) -> None:
        self.commits.pop(done, None)

    async def _commit(self, writer: BlobWriter, digest: str, target: PushTarget) -> None:
        """A blob the upstream accepted into the cache; a failure here is
        the cache's alone (the push went through): logged, nothing kept.
        Its claim ends once it is in the cache (or not): a pusher waiting
        for it mounts it next, and finds our copy to name (held.py)."""
        try:
            await self._stored(writer, 201, digest, target)
        except Exception as err:  # an upstream's odd answer to the privacy check too
            writer.abort()
            log.warning("pushed blob %s of %s/%s not stored: %s", digest, target.domain,
                        target.name, getattr(err, "message", err))
        finally:
            self.held.release(target.domain, digest)

    async def _committed(self, domain: str, name: str | None = None,
                         digest: str | None = None) -> None:
        """Wait for the commits in progress of `digest`, or of the uploads
        to repository `name`."""
        tasks = [task for task, (d, g, n) in self.commits.items()
                 if d == domain and (g == digest or n == name)]
        if tasks:
            # asyncio.wait: a caller cancelled (its client gone) leaves them be.
            await asyncio.wait(tasks)

    async def _stored(self, writer: BlobWriter | None, status: int, digest: str,
                      target: PushTarget) -> None:
        if status == 201 and is_digest(digest):
            self.held.add(target.domain, target.name, digest,
                          writer.size if writer is not None else None)
            self._touch(digest)
        if writer is None:
            return
        if status != 201 or not is_digest(digest):
            writer.abort()
            return
        store = self.ctx.store
        path = RegistryPath(Kind.BLOB, target.name, digest).path
        try:
            writer.name(digest)
            writer.verify(None)
            await self._learn_privacy(target, RegistryPath(Kind.BLOB, target.name, digest))
            await in_thread(store.commit_blob, writer, target.domain, path)
        except DigestMismatch as err:
            writer.abort()
            log.warning("pushed blob %s/%s not stored: %s", target.domain, path, err.message)
            return
        self.ctx.fill.grew(writer.size)

    async def _mounted(self, digest: str, target: PushTarget) -> None:
        """A mount the upstream made: our copy, if we have one, is named for
        the repository too."""
        if is_digest(digest):
            self.held.add(target.domain, target.name, digest, None)
            self._touch(digest)
            # A pusher that claimed the upload mounted it instead.
            self.held.release(target.domain, digest)
            # Our copy, if its upload's commit is still under way.
            await self._committed(target.domain, digest=digest)
            rpath = RegistryPath(Kind.BLOB, target.name, digest)
            try:
                await self._learn_privacy(target, rpath)
            except Undecided as err:
                # The mount went through; only our name for it waits for
                # the registry to say whether the repository is private.
                log.info("mounted %s in %s/%s, not named: %s", digest, target.domain,
                         target.name, err.message)
                return
            named = await in_thread(self.ctx.store.link_if_stored, digest, target.domain,
                                    rpath.path)
            if named is None and self.fill_blob is not None:
                self._fill_later(Target(target.registry, target.domain, rpath))

    def _fill_later(self, target: Target) -> None:
        """Fetch a mounted blob we hold no copy of, in the background (the
        client's mount is answered already), as a client's miss would."""
        fill_blob = self.fill_blob
        assert fill_blob is not None

        async def fill() -> None:
            try:
                await fill_blob(target)
            except (CrProxyError, aiohttp.ClientError, OSError, TimeoutError) as err:
                log.warning("mounted blob %s/%s not cached: %s", target.domain,
                            target.rpath.path, getattr(err, "message", err))

        task = asyncio.create_task(fill())
        self.fills.add(task)
        task.add_done_callback(self.fills.discard)

    async def _learn_privacy(self, target: PushTarget, rpath: RegistryPath) -> None:
        """Before a pushed object is named: whether its repository is
        private (the upstream, which has just accepted it, refuses it
        without a credential), asked as for a pull."""
        if self.privacy is not None:
            await self.privacy.learn(Target(target.registry, target.domain, rpath),
                                     target.client_auth, pushed=True)

    @staticmethod
    def _session(location: str) -> str:
        path = urlsplit(location).path
        match = PUSH_PATH_RE.match(path)
        return match["ref"] if match and match["what"] == "blobs/uploads" else ""

    # --- manifests -------------------------------------------------------------

    async def _manifest(self, request: web.Request, target: PushTarget) -> web.StreamResponse:
        if request.method != "PUT":
            raise Unsupported(message=f"{request.method} of a manifest is not relayed")
        body = await _read_request(request, MAX_MANIFEST)
        content_type = request.headers.get("Content-Type", "")
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        auth = await self._login(target)
        if auth:
            headers["Authorization"] = auth
        answer = await self.ctx.upstream.send("PUT", target.domain, target.path,
                                              headers, data=body)
        status = answer.status
        response = await self._relay(request, answer, target)
        if status == 201:
            if self.privacy is not None and target.client_auth:
                self.privacy.granted(target.domain, target.name, target.client_auth)
            # Its blobs' commits first: once the client has this answer, the
            # image pulls whole from the cache.
            await self._committed(target.domain, name=target.name)
            await self._store_manifest(target, body, content_type)
        return response

    async def _store_manifest(self, target: PushTarget, body: bytes, content_type: str) -> None:
        digest = digest_of(body)
        rpath = RegistryPath(Kind.MANIFEST, target.name, target.ref)
        if content_type not in MANIFEST_MEDIA_TYPES or (rpath.by_digest and target.ref != digest):
            log.info("pushed manifest %s/%s not stored: type %r, digest %s", target.domain,
                     rpath.path, content_type[:80], digest)
            return
        try:
            await self._learn_privacy(target, rpath)
            await in_thread(self.ctx.store.commit_manifest, target.domain, rpath, body, digest,
                            content_type, time.time())
        except (CrProxyError, OSError) as err:
            # Pushed all the same: the cache only misses a copy.
            log.warning("pushed manifest %s/%s not stored: %s", target.domain, rpath.path, err)
            return
        self.ctx.fill.grew(len(body))

    # --- answers -------------------------------------------------------------

    async def _relay(
        self, request: web.Request, answer: aiohttp.ClientResponse, target: PushTarget
    ) -> web.Response:
        """The upstream's answer, whole (a push's answers are small), its
        Location ours; JSON only, as every mirror answer."""
        try:
            body = await read_bounded(answer, MAX_ANSWER, "push answer")
        finally:
            answer.release()
        # Values from the wire, checked: a control byte would make aiohttp
        # drop the client's connection after our bookkeeping took the
        # answer as given.
        headers = {k: v for k, v in answer.headers.items()
                   if k.lower() in RELAYED_HEADERS and RELAYED_VALUE_RE.fullmatch(v)}
        challenge = answer.headers.get("WWW-Authenticate", "")
        if target.proxied and challenge and RELAYED_VALUE_RE.fullmatch(challenge):
            # The client logs in itself: it must see the registry's challenge.
            headers["WWW-Authenticate"] = challenge
        if "Location" in answer.headers:
            headers["Location"] = client_location(answer.headers["Location"], target)
        headers.pop("Content-Length", None)
        response = web.Response(status=answer.status, body=body, headers=headers)
        if body:
            response.content_type = "application/json"
        return response


def client_location(location: str, target: PushTarget) -> str:
    """An upstream's Location (absolute or not) as the client must follow
    it: our path for the same repository, the query (upload state) kept.
    One outside the repository (an upload to another host) is not relayed."""
    parts = urlsplit(location)
    own = f"/v2/{target.name}/"
    if not parts.path.startswith(own) or not LOCATION_REST_RE.fullmatch(
            parts.path[len(own):]) or not RELAYED_VALUE_RE.fullmatch(parts.query):
        raise UpstreamError(message=f"{target.domain} sent a Location that is not an upload, "
                            f"blob or manifest of /v2/{target.name}/, which this mirror does "
                            "not relay")
    path = f"/v2/{target.client_name}/" + parts.path[len(own):]
    return path + (f"?{parts.query}" if parts.query else "")


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


async def _read_request(request: web.Request, limit: int) -> bytes:
    if (request.content_length or 0) > limit:
        raise BadRequest("MANIFEST_INVALID", f"manifest larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise BadRequest("MANIFEST_INVALID", f"manifest larger than {limit} bytes")
    if request.content_length is not None and len(body) != request.content_length:
        raise BadRequest("MANIFEST_INVALID", "manifest body cut short")
    return bytes(body)
