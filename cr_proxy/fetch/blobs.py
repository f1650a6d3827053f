"""Blobs: GET and HEAD of /v2/<name>/blobs/<digest>.

Policy: local-first and immutable (distribution's proxyblobstore). A blob
is named by its digest, so a stored copy is the answer wherever it was
pulled from, with two rules: a name (domain and repository) gets its own
link to the stored file only once its upstream confirmed the digest there
(a HEAD), so names clients invent create no files; while the upstream
cannot be asked, the verified copy is served unnamed. And a blob stored
for a private repository (marked: Store.has_public_blob) is served under
no other name, nor linked to one on a HEAD's word: to another name the
cache holds no such digest, and only the bytes its upstream sends name
it. A miss starts one download per source and digest (flight.py; a
private repository's is its own) that streams to every waiting client
while it fills the cache; it is refused before a byte is written when it
could never be stored (limits.max_blob_size, cache.max_size), and
committed only verified, with the redirect target that served it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from pathlib import Path

import aiohttp
from aiohttp import web

from cr_proxy.cache.layout import Target
from cr_proxy.cache.store import BlobWriter, Redirected
from cr_proxy.errors import (
    CrProxyError,
    DigestMismatch,
    NotFound,
    TooLarge,
    Truncated,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
    offline_miss,
)
from cr_proxy.fetch.context import (
    API_HEADERS,
    STALE_OK_STATUSES,
    FetchContext,
    client_auth,
    in_thread,
)
from cr_proxy.fetch.flight import Flight
from cr_proxy.fetch.resume import BREAKS, Resume
from cr_proxy.fetch.writes import WRITE_THREADS, PipedWrites
from cr_proxy.upstream.client import Hop

log = logging.getLogger("cr_proxy.fetcher")

BLOB_TYPE = "application/octet-stream"
# A verified download's held name (flight.py) lives this long: nginx opens
# it within moments of the fetcher's answer.
HELD_SECONDS = 60.0
ENSURE_FLIGHTS = 2  # flights ensure() waits for: one it joined, then its own
# X-Cache of a stored blob served under a name its upstream has not
# confirmed (it cannot be asked): a peer or site that gets it stores the
# bytes, never the name.
UNNAMED = "UNNAMED"
HELD_URI = "/_cr/held/"  # + <digest>/<held>: nginx/locations.conf
ACCEL_HEADER = "X-CR-Accel"  # "1": nginx asks, and follows X-Accel-Redirect (fetch.conf)
# The send buffer of a connection a miss is streamed to nginx on: a 1 MiB
# range of the growing file (one write batch) then goes in one sendfile.
# With the default (about 200 KiB) each range took several sendfiles, each
# after an epoll round on the event loop. The kernel caps it at
# net.core.wmem_max (docs/operations.md, "Kernel settings for misses").
STREAM_SEND_BUFFER = 4 << 20


class Blobs:
    __slots__ = ("ctx", "writes")

    def __init__(self, ctx: FetchContext) -> None:
        self.ctx = ctx
        # Hashing and writing downloads and pushed uploads, beside the event
        # loop (writes.py).
        self.writes = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="write")

    def __repr__(self) -> str:
        return f"<Blobs {self.ctx.flights!r}>"

    def close(self) -> None:
        self.writes.shutdown(wait=True)

    async def get(self, request: web.Request, target: Target) -> web.StreamResponse:
        """GET or HEAD of a blob: stored, confirmed, or downloaded once."""
        ctx = self.ctx
        digest, domain = target.rpath.ref, target.domain
        hit = await self.cached(request, target)
        if hit is not None:
            return hit
        if await in_thread(ctx.store.has_public_blob, digest):
            # Pulled before through another repository or registry, none of
            # them private: one copy.
            stored = await self._stored_elsewhere(request, target)
            cache = "HIT" if stored != ctx.store.tree.blob(digest) else UNNAMED
            hit = None if stored is None else await self._hit(request, stored, digest, cache)
            if hit is not None:
                return hit
        if request.method == "HEAD":
            if request.headers.get("X-CR-Cache-Only") == "1":
                # warm asks "is it here?" without costing an upstream request.
                raise NotFound("BLOB_UNKNOWN", f"blob {digest} is not cached")
            with self._offline_miss(target):
                return await self._head(request, target)
        ctx.metrics.misses.labels(kind="blob").inc()
        joined_before = ctx.flights.coalesced
        # One download per source and digest: a registry that trickles a
        # digest must not hold up another registry's pull of it (the first
        # verified copy is stored, the other is dropped at its commit).
        flight = ctx.flights.join(
            await self._flight_key(target),
            functools.partial(self._download, target, client_auth(request),
                              from_peer=bool(request.headers.get("X-CR-Peer"))),
        )
        joined = ctx.flights.coalesced > joined_before
        if joined:
            ctx.metrics.coalesced.inc()
        with self._offline_miss(target):
            await flight.wait_started()
        if (joined and request.method == "GET" and ctx.config.download.hold
                and request.headers.get(ACCEL_HEADER) == "1"):
            held = await flight.held_within(ctx.config.download.hold)
            if held is not None:
                return _held_response(digest, held)  # a miss's
            if flight.error and not flight.verified:
                raise flight.error  # failed before a byte went out: a clean error
            log.debug("blob %s from %s: not verified within download.hold, streamed to a "
                      "client that joined", digest, domain)
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
        # The download named the path it fetched (its commit); a reader of
        # another repository that joined it gets no name: its upstream never
        # confirmed the digest there (the next request asks, _stored_elsewhere).
        await response.write_eof()
        return response

    async def cached(self, request: web.Request, target: Target) -> web.StreamResponse | None:
        """The blob stored under this very name, asking no one; None when
        it is not."""
        digest = target.rpath.ref
        named = await in_thread(self.ctx.store.linked, digest, target.domain, target.rpath.path)
        return None if named is None else await self._hit(request, named, digest)

    async def _hit(self, request: web.Request, path: Path, digest: str, cache: str = "HIT"
                   ) -> web.StreamResponse | None:
        """A stored blob's answer (a private repository's hit, or a digest
        stored under another name), by a held name: an eviction between
        finding the file and sending it cannot take it away. Through nginx,
        nginx sends it (the held location); the fetcher's own clients get
        it from here. None when the file went before it was held (a miss)."""
        try:
            held = await in_thread(self.ctx.store.hold, path)
        except FileNotFoundError:
            return None
        self._drop_held_later(held)
        self.ctx.metrics.hits.labels(kind="blob-fetch").inc()
        if request.headers.get(ACCEL_HEADER) == "1":
            return _held_response(digest, held, cache=cache)
        return _file_response(self.ctx.store.tree.held / held, digest, cache)

    def _drop_held_later(self, held: str) -> None:
        asyncio.get_running_loop().call_later(HELD_SECONDS, self.ctx.store.drop_held, held)

    async def ensure(self, target: Target) -> Path:
        """The stored file of a blob a verified manifest of `target`'s
        repository names, for a caller that serves the file itself
        (cr_proxy/edge): its name there, else the digest store's copy (no
        new name: only an upstream's HEAD makes one), else downloaded by
        the one flight a client's miss would join, verified and committed
        under this name (a private repository's blob is stored for no
        other name: downloaded). Waiting for the commit costs nothing
        extra: a blob is only ever served whole and verified."""
        ctx = self.ctx
        digest, domain, path = target.rpath.ref, target.domain, target.rpath.path
        named = await in_thread(ctx.store.linked, digest, domain, path)
        if named is not None:
            ctx.metrics.hits.labels(kind="blob-fetch").inc()
            return named
        if await in_thread(ctx.store.has_public_blob, digest):
            ctx.metrics.hits.labels(kind="blob-fetch").inc()
            return ctx.store.tree.blob(digest)
        ctx.metrics.misses.labels(kind="blob").inc()
        for _ in range(ENSURE_FLIGHTS):
            flight = ctx.flights.join(
                # Its caller serves the stored file: kept even without
                # cluster.keep_local.
                await self._flight_key(target),
                functools.partial(self._download, target, None, keep=True),
            )
            with self._offline_miss(target):
                await flight.wait_started()
            if flight.task is not None:
                # Shielded: a caller that goes away leaves the download to finish.
                await asyncio.shield(flight.task)
            if flight.committed_path is not None:
                return flight.committed_path
            if flight.error is not None:
                raise flight.error
            # Verified but not kept: a client's flight from the digest's
            # owner (cluster.keep_local off) that this one joined. Once
            # more, as a flight of our own.
        raise Truncated(message=f"{domain}: {digest} was not stored")

    async def _flight_key(self, target: Target) -> str:
        """The download a miss joins: one per source and digest, but a
        private repository's is its own: joined by a reader of another
        repository, it sent that reader the private bytes as they came."""
        key = f"{target.domain} {target.rpath.ref}"
        if await in_thread(self.ctx.store.is_private, target.domain, target.rpath.name):
            return f"{key} {target.rpath.name}"
        return key

    @staticmethod
    def _offline_miss(target: Target) -> AbstractContextManager[None]:
        """An unreachable upstream for a blob we do not have: a 404 saying so."""
        what = f"blob {target.rpath.ref} of {target.rpath.name}"
        return offline_miss("BLOB_UNKNOWN", what, target.domain)

    async def _stored_elsewhere(self, request: web.Request, target: Target) -> Path | None:
        """The stored file for a digest cached under other names (none of
        them a private repository's: Store.has_public_blob), or None if it
        is gone meanwhile. The name gets its own link only once its
        upstream confirmed the digest there (a HEAD): a name clients invent
        must not create files (nor, by the thousand, reach the filesystem's
        link limit). When the upstream cannot be asked, the verified copy is
        served for this request only, unnamed: offline pulls go on."""
        store = self.ctx.store
        digest, domain, path = target.rpath.ref, target.domain, target.rpath.path
        if request.headers.get("X-CR-Cache-Only") == "1":
            raise NotFound("BLOB_UNKNOWN", f"blob {digest} is not cached under this name")
        if await self._confirm(target, client_auth(request)):
            return await in_thread(store.link_if_stored, digest, domain, path)
        blob = store.tree.blob(digest)
        return blob if await in_thread(blob.is_file) else None

    async def _confirm(self, target: Target, auth: str | None) -> bool:
        """True when the upstream answers 200 for this exact name and digest;
        False when it cannot say (unreachable, timed out, 429 or 5xx); a
        404 or a refusal is raised as the client's answer."""
        try:
            opened = await self.ctx.upstream.open("HEAD", target, client_auth=auth)
        except (UpstreamUnreachable, UpstreamTimeout, aiohttp.ClientError, TimeoutError) as err:
            log.info("serving stored %s for %s/%s unnamed: upstream unreachable (%s)",
                     target.rpath.ref, target.domain, target.rpath.name, err)
            return False
        status = opened.response.status
        unnamed = opened.response.headers.get("X-Cache") == UNNAMED  # a parent's: no yes
        opened.response.release()
        if status == 200:
            return not unnamed
        if status == 404:
            raise NotFound("BLOB_UNKNOWN", f"blob {target.rpath.ref} not found upstream")
        if status in STALE_OK_STATUSES:
            return False
        raise UpstreamError(message=f"{target.domain} answered {status} for {target.rpath.ref}")

    async def _head(self, request: web.Request, target: Target) -> web.StreamResponse:
        """A HEAD of a blob not stored here: in a cluster (and not a peer's
        request) its owner's answer, so the upstream sees one HEAD per blob
        for the whole cluster (none when the owner has it); else the
        upstream's."""
        peers = self.ctx.peers
        if peers is not None and not request.headers.get("X-CR-Peer"):
            size = await peers.head(target)
            if size is not None:
                return blob_head(target.rpath.ref, size)
        return await upstream_head(self.ctx, target, client_auth(request))

    async def _download(
        self, target: Target, auth: str | None, flight: Flight, *,
        from_peer: bool = False, keep: bool = False,
    ) -> None:
        """The flight's task: source -> temp file -> verify -> commit. The
        source is the digest's owner when this node is in a cluster and the
        request is not a peer's (a peer's miss is filled from the upstream
        here, never sent on: no loops), else the upstream. What the owner
        sent is committed with cluster.keep_local (or `keep`). An upstream
        body that breaks is resumed where it got to (resume.py); a peer's is
        not: the peer is counted as refused and the next try goes upstream."""
        ctx = self.ctx
        peers = ctx.peers
        if peers is not None and not from_peer:
            answer = await peers.open(target)
            if answer is not None:
                try:
                    await self._fill(target, answer.response, flight, None,
                                     keep=keep or ctx.config.cluster.keep_local)
                except DigestMismatch as err:
                    peers.refused(answer, target, "digest", err.message)
                    raise
                except (Truncated, TooLarge, aiohttp.ClientError, TimeoutError) as err:
                    peers.refused(answer, target, "truncated", str(err))
                    raise
                finally:
                    answer.response.release()
                return
        opened = await ctx.upstream.open("GET", target, client_auth=auth)
        resume = Resume(ctx, target, auth, opened, opened.response.content_length)
        try:
            fetched = await self._fill(
                target, opened.response, flight,
                ctx.upstream.challenges.for_repository(target.domain, target.rpath.name),
                resume=resume,
            )
        except DigestMismatch as err:
            log.error("registry %s sent wrong bytes for %s%s: %s", target.domain,
                      target.rpath.ref,
                      f" (after {resume.attempts} resumes)" if resume.attempts else "",
                      err.message)
            raise
        finally:
            resume.opened.response.release()
        ctx.metrics.bytes_fetched.inc(fetched)

    async def _fill(
        self, target: Target, source: aiohttp.ClientResponse, flight: Flight,
        challenge: str | None, keep: bool = True, resume: Resume | None = None,
    ) -> int:
        """A source's answer into the cache (or, `keep` false, only through
        a temp file to the flight's readers): checked, verified, committed.
        With `resume` (the upstream's), a body that breaks is asked again
        from where it got to; without (a peer's), a break is Truncated.
        Returns its size."""
        ctx = self.ctx
        digest, domain = target.rpath.ref, target.domain
        if source.status == 404:
            raise NotFound("BLOB_UNKNOWN", f"blob {digest} not found on {domain}")
        if source.status != 200:
            raise UpstreamError(message=f"{domain} answered {source.status} for {digest}")
        limit = self._size_limit(source.content_length, domain, digest)
        writer = await in_thread(ctx.store.blob_writer, digest)
        try:
            flight.started(writer.path, source.content_length)
            skip = 0
            while True:
                body = resume.opened.response.content if resume else source.content
                try:
                    await self._write_body(body, writer, flight, limit, skip)
                    break
                except BREAKS as err:
                    if resume is None:
                        raise Truncated(message=f"{domain}: body of {digest} cut short") from err
                    # The readers wait on the file; it goes on growing.
                    skip = await resume.reopen(err, writer.size)
            await in_thread(writer.verify, resume.total if resume else source.content_length)
            if ctx.config.download.hold:
                self._hold(writer, flight)
            # Clients get their last byte now; the fsync and rename follow.
            await flight.verified_whole()
            committed = None
            if keep and source.headers.get("X-Cache") == UNNAMED:
                # A peer or parent that could not ask its upstream either:
                # the verified bytes are kept, the name waits for a yes.
                committed = await in_thread(functools.partial(
                    ctx.store.commit_blob, writer, domain, target.rpath.path, named=False))
            elif keep:
                # The last answer's hops: a resume may have been redirected anew.
                redirected = _redirected(resume.opened.hops) if resume else None
                if redirected is not None and await in_thread(
                        ctx.store.is_private, domain, target.rpath.name):
                    # A CDN path holds no repository name to check a client
                    # against: a private repository's blob is named only
                    # under it (fetch/private.py).
                    redirected = None
                committed = await in_thread(
                    ctx.store.commit_blob, writer, domain, target.rpath.path, redirected,
                    challenge,
                )
            else:
                # Readers hold their own descriptors: the bytes stay theirs.
                await in_thread(writer.abort)
        except BaseException:
            await in_thread(writer.abort)
            raise
        if committed is not None:
            ctx.fill.grew(writer.size)
        await flight.finish(committed, None)
        return writer.size

    def _hold(self, writer: BlobWriter, flight: Flight) -> None:
        """The verified file under a name nginx may send (flight.py), for
        readers that wait; removed HELD_SECONDS later, long after nginx
        opened it (what it opened stays readable)."""
        try:
            flight.held = self.ctx.store.hold(writer.path)
        except OSError as err:  # readers tail the file instead
            log.warning("%s: no held name for nginx: %s", writer.digest, err)
            return
        self._drop_held_later(flight.held)

    def _size_limit(self, content_length: int | None, domain: str, digest: str) -> int:
        """The most bytes this download may write: its Content-Length when
        it has one, else limits.max_blob_size. A blob larger than that cap,
        or than the whole cache (cache.max_size), could never be stored:
        refused before a byte is written."""
        config = self.ctx.config
        cap = config.limits.max_blob_size
        if config.cache.max_size:
            cap = min(cap, config.cache.max_size)
        if content_length is not None and content_length > cap:
            raise TooLarge(message=f"{domain}: {digest} is {content_length} bytes, over the "
                           f"{cap} allowed (limits.max_blob_size, cache.max_size)")
        return cap if content_length is None else content_length

    async def _write_body(
        self, body: aiohttp.StreamReader, writer: BlobWriter, flight: Flight, limit: int,
        skip: int = 0,
    ) -> None:
        """The upstream body into the writer, pipelined (writes.py). Never
        more than `limit` bytes in the file: past it the download fails
        before the excess reaches the disk. The body continues the file (a
        resume); its first `skip` bytes are already there (an upstream that
        answered a Range with the whole blob). When the body breaks, what
        came of it is written before the error goes on, so a resume asks
        only for what is missing."""
        # Readers see each batch once it is on disk (a stalled upstream must
        # not hide its last MiB from them); the last one is reported below.
        pipe = PipedWrites(self.writes, writer,
                           on_written=functools.partial(self._progress, flight))
        received = writer.size

        async def add(chunk: bytes) -> None:
            nonlocal received, skip
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]
            received += len(chunk)
            if received > limit:
                raise TooLarge(message=f"{writer.digest}: upstream sent more than "
                               f"{limit} bytes")
            await pipe.add(chunk)

        guard = self.ctx.upstream.rate_guard(body)  # limits.min_rate
        try:
            try:
                async for chunk in body.iter_any():
                    await add(chunk)
            except BREAKS:
                await add(received_before_the_break(body))
                await pipe.flush()
                await self._progress(flight, writer.size)
                raise
            if skip:
                raise Truncated(message=f"{writer.digest}: the upstream's new answer ended "
                                "before the bytes already written")
            await pipe.flush()
            await self._progress(flight, writer.size)
        finally:
            guard.cancel()
            # Failed or cancelled mid-body: the caller closes the file next,
            # so the write in flight must be over first.
            pipe.close()

    async def _progress(self, flight: Flight, written: int) -> None:
        await flight.progress(written)
        # Downloads in progress count toward cache.max_size.
        self.ctx.fill.downloading()


def received_before_the_break(body: aiohttp.StreamReader) -> bytes:
    """The bytes a broken body had received that no read handed out yet.
    aiohttp's reads raise a body's error ahead of its buffer, which holds up
    to twice BODY_READ_BUFFER (upstream/client.py) while the write before
    is on its way to the disk: without this, a resume would ask the
    upstream for them again. aiohttp has no read for them: its error is set
    aside for the one public read that takes the buffer (read_nowait, which
    keeps its accounting), then put back. An aiohttp without that attribute
    gives nothing back: the resume then asks for more, no byte is wrong
    (tests/test_e2e_resume.py checks that each resume starts where the cut
    was)."""
    error = body.exception()
    if error is None or getattr(body, "_exception", None) is not error:
        return b""
    body._exception = None
    try:
        return body.read_nowait()
    except RuntimeError:  # a read is waiting on it: not ours to take
        return b""
    finally:
        body._exception = error


def _redirected(hops: list[Hop]) -> Redirected | None:
    """What the commit may name after a redirect: only the last hop served
    the bytes (store.commit_blob decides whether its path may be stored)."""
    if not hops:
        return None
    final = hops[-1]
    return Redirected(hops[0].status, final.location, final.target_host, final.target_path)


def _held_response(digest: str, held: str, cache: str = "MISS") -> web.Response:
    """nginx sends the held file itself (nginx/locations.conf, the held
    location), with sendfile and Range, as it sends a hit; `cache` is its
    X-Cache."""
    return web.Response(headers={"X-Accel-Redirect": f"{HELD_URI}{cache}/{digest}/{held}"})


def _file_response(path: Path, digest: str, cache: str = "HIT") -> web.FileResponse:
    return web.FileResponse(
        path, headers={"Content-Type": BLOB_TYPE, "Docker-Content-Digest": digest,
                       "X-Cache": cache, **API_HEADERS}
    )


async def _sendfile_ranges(request: web.Request, flight: Flight) -> None:
    """Zero-copy from the growing file to nginx's socket: a reader costs the
    event loop a syscall per range, not the bytes."""
    loop = asyncio.get_running_loop()
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with suppress(OSError):  # a smaller buffer is slower, not wrong
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
    async for fd, offset, count in flight.ranges():
        with open(fd, "rb", buffering=0, closefd=False) as file:
            await loop.sendfile(request.transport, file, offset, count)


async def upstream_head(ctx: FetchContext, target: Target, auth: str | None) -> web.Response:
    """The upstream's answer to a HEAD of a blob (its redirects followed, as a
    client would): 200 with the size, else a registry error."""
    opened = await ctx.upstream.open("HEAD", target, client_auth=auth)
    response = opened.response
    response.release()
    if response.status == 404:
        raise NotFound("BLOB_UNKNOWN", f"blob {target.rpath.ref} not found upstream")
    if response.status != 200:
        raise UpstreamError(message=f"{target.domain} answered {response.status} to a HEAD "
                            f"of {target.rpath.ref}")
    return blob_head(target.rpath.ref, response.content_length)


def blob_head(digest: str, size: int | None) -> web.Response:
    """A blob HEAD's 200: its digest and, when known, its size."""
    headers = {"Content-Type": BLOB_TYPE, "Docker-Content-Digest": digest, **API_HEADERS}
    if size is not None:
        headers["Content-Length"] = str(size)
    return web.Response(status=200, headers=headers)
