"""`cr-proxy warm`: fill the cache before the pulls come.

Policy:

- warm is an HTTP client of a fetcher, never a second writer: every byte it
  stores goes through the same fetch-verify-store path as a client's miss.
  If `cr-proxy serve` runs for this configuration (its `fetcher.sock`
  accepts a connection), warm asks that fetcher, so its downloads coalesce
  with client pulls (one upstream download per digest). Otherwise warm runs
  the fetcher app in-process on a private socket, `run/warm-<pid>.sock`,
  removed afterwards.
- Requests use the mirror path-prefix form (`/v2/<registry>/<name>/...`,
  `X-CR-Mode: mirror`), names resolved by Docker's rules
  (reference.parse_reference).
- A tag is fetched with `X-CR-Revalidate: 1`: an image already cached costs
  one manifest HEAD upstream, however fresh the tag is.
- An index brings every platform's manifest (or only those `--platform`
  names); attestation entries (platform `unknown/unknown`) are skipped.
- A blob is first asked for with HEAD: `X-Cache: HIT` means cached, nothing
  more to do. Otherwise it is fetched with GET, its body hashed and dropped:
  a cut connection or bytes that do not match the digest is a failure, even
  though the fetcher verifies too (it can only tell us by cutting the line).
- `--jobs` bounds the requests in flight. A failing image is reported with
  the fetcher's registry error (`CODE: message`) and makes the exit status
  non-zero; the other images still complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiohttp
from aiohttp import web

from cr_proxy.cache.sizes import human_size
from cr_proxy.config import Config
from cr_proxy.errors import BadRequest, CrProxyError
from cr_proxy.oci.reference import (
    INDEX_MEDIA_TYPES,
    MANIFEST_ACCEPT,
    Reference,
    digest_of,
    hasher,
    is_digest,
    names_registry,
    parse_reference,
)

DEFAULT_JOBS = 4
CHUNK = 1 << 20
MAX_INDEX_DEPTH = 2  # an index may name indexes (OCI allows it); deeper is nonsense
MIRROR_HEADERS = {"X-CR-Mode": "mirror"}
ATTESTATION = ("unknown", "unknown")


# --- the pure parts ------------------------------------------------------------


def read_image_list(text: str) -> list[str]:
    """Image references from a list file: one a line; `#` starts a comment
    (no reference can hold one), blank lines are ignored."""
    out = []
    for line in text.splitlines():
        ref = line.split("#", 1)[0].strip()
        if ref:
            out.append(ref)
    return out


def unique(items: Iterable[str]) -> list[str]:
    """Keep the first of each, in order: an image listed twice is warmed once."""
    return list(dict.fromkeys(items))


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadRequest("PLATFORM_INVALID", f"platform {text!r}: expected os/arch[/variant]")
        return cls(*parts)

    def matches(self, platform: Mapping[str, Any]) -> bool:
        if (platform.get("os"), platform.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or platform.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def is_attestation(entry: Mapping[str, Any]) -> bool:
    """buildx stores provenance/SBOM manifests in the index under the
    platform unknown/unknown: not something any runtime pulls."""
    platform = entry.get("platform") or {}
    if (platform.get("os"), platform.get("architecture")) == ATTESTATION:
        return True
    annotations = entry.get("annotations") or {}
    return annotations.get("vnd.docker.reference.type") == "attestation-manifest"


def select_manifests(
    index: Mapping[str, Any], platforms: Sequence[Platform]
) -> list[Mapping[str, Any]]:
    """The index entries to warm: all but attestations, or only those matching
    one of `platforms` when some are given."""
    entries = [
        e for e in index.get("manifests") or []
        if isinstance(e, Mapping) and e.get("digest") and not is_attestation(e)
    ]
    if not platforms:
        return entries
    return [e for e in entries if any(p.matches(e.get("platform") or {}) for p in platforms)]


def image_blobs(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Config and layers of an image manifest. Foreign layers (descriptors
    with `urls`, Windows base layers) live outside the registry: skipped, as
    a pull would."""
    out = []
    config = manifest.get("config")
    if isinstance(config, Mapping) and config.get("digest"):
        out.append(config)
    for layer in manifest.get("layers") or []:
        if layer.get("digest") and not layer.get("urls"):
            out.append(layer)
    return out


def mirror_path(ref: Reference, kind: str, target: str) -> str:
    """The fetcher path for `ref`'s manifest or blob `target`. The registry
    goes in the path prefix when layout's prefix rule will see it as one;
    a registry name without a dot or colon goes in `?ns=` instead."""
    if names_registry(ref.registry):
        return f"/v2/{ref.registry}/{ref.name}/{kind}/{target}"
    return f"/v2/{ref.name}/{kind}/{target}?ns={ref.registry}"


def registry_error(status: int, body: bytes) -> CrProxyError:
    """The fetcher's registry-style error as `CODE: message`, or the status."""
    try:
        first = json.loads(body)["errors"][0]
        return CrProxyError(str(first.get("code") or "UNKNOWN"), str(first.get("message") or ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return CrProxyError(f"HTTP_{status}", f"the fetcher answered {status}")


def describe(err: BaseException) -> str:
    if isinstance(err, CrProxyError):
        return f"{err.code}: {err.message}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


@dataclass(slots=True)
class ImageResult:
    """What warming one image did. `blobs_cached` counts blobs found in the
    cache, also those another image of the same run had just fetched."""

    image: str
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    stale: bool = False
    error: str | None = None


@dataclass(slots=True)
class Summary:
    images: int = 0
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    stale: int = 0
    seconds: float = 0.0
    fetcher: str = ""
    started_fetcher: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, results: Iterable[ImageResult], seconds: float = 0.0) -> Summary:
        summary = cls(seconds=seconds)
        for result in results:
            summary.add(result)
        return summary

    def add(self, result: ImageResult) -> None:
        self.images += 1
        self.blobs_fetched += result.blobs_fetched
        self.blobs_cached += result.blobs_cached
        self.bytes_fetched += result.bytes_fetched
        self.stale += result.stale
        if result.error is not None:
            self.failures.append((result.image, result.error))

    @property
    def images_failed(self) -> int:
        return len(self.failures)

    @property
    def images_ok(self) -> int:
        return self.images - self.images_failed

    @property
    def rate(self) -> float:
        """Bytes fetched per second (0 for an instant run)."""
        return self.bytes_fetched / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "images_ok": self.images_ok,
            "images_failed": self.images_failed, "blobs_fetched": self.blobs_fetched,
            "blobs_cached": self.blobs_cached, "bytes_fetched": self.bytes_fetched,
            "stale": self.stale, "seconds": round(self.seconds, 3), "fetcher": self.fetcher,
            "started_fetcher": self.started_fetcher,
            "failures": [{"image": i, "error": e} for i, e in self.failures],
        }

    def text(self) -> str:
        failed = f", {self.images_failed} failed" if self.failures else ""
        stale = f", {self.stale} kept stale (upstream unreachable)" if self.stale else ""
        return (
            f"warm: {self.images} images ({self.images_ok} ok{failed}{stale}); "
            f"blobs: {self.blobs_fetched} fetched ({human_size(self.bytes_fetched)}), "
            f"{self.blobs_cached} already cached; {self.seconds:.1f} s"
        )


# --- progress ------------------------------------------------------------------


class Progress(Protocol):
    def note(self, image: str, text: str) -> None: ...
    def expect(self, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None: ...
    def image_done(self, result: ImageResult) -> None: ...
    def close(self) -> None: ...


def _done_line(result: ImageResult) -> str:
    if result.error is not None:
        return f"cr-proxy warm: {result.image}: {result.error}"
    return (f"warm: {result.image}: done: {result.blobs_fetched} blobs fetched "
            f"({human_size(result.bytes_fetched)}), {result.blobs_cached} already cached")


class LineProgress:
    """Not a terminal: one line per image and per blob fetched."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def _say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def note(self, image: str, text: str) -> None:
        self._say(f"warm: {image}: {text}")

    def expect(self, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None:
        self._say(f"warm: {image}: fetched {digest} ({human_size(nbytes)})")

    def image_done(self, result: ImageResult) -> None:
        self._say(_done_line(result))

    def close(self) -> None:
        pass


class BarProgress:
    """A terminal: one byte bar (rate, ETA) whose total grows as blobs to
    fetch are found; image lines are written above it."""

    def __init__(self, stream: TextIO, images: int) -> None:
        from tqdm import tqdm  # only a terminal needs it

        self.images, self.done = images, 0
        self.stream = stream
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=stream,
                        dynamic_ncols=True, desc=self._desc())

    def _desc(self) -> str:
        return f"warm {self.done}/{self.images} images"

    def note(self, image: str, text: str) -> None:
        self.bar.write(f"warm: {image}: {text}", file=self.stream)

    def expect(self, nbytes: int) -> None:
        self.bar.total += nbytes
        self.bar.refresh()

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None:
        pass

    def image_done(self, result: ImageResult) -> None:
        self.done += 1
        self.bar.set_description(self._desc())
        self.bar.write(_done_line(result), file=self.stream)

    def close(self) -> None:
        self.bar.close()


def make_progress(stream: TextIO, images: int) -> Progress:
    return BarProgress(stream, images) if _terminal_width(stream) > 0 else LineProgress(stream)


def _terminal_width(stream: TextIO) -> int:
    """0 unless a terminal: a pty of no size (`script` without one) would
    show tqdm's bar as nothing at all, so it gets plain lines too."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError):
        return 0


# --- talking to a fetcher ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    doc: Mapping[str, Any]
    cache: str  # the fetcher's X-Cache: HIT, MISS, STALE, REVALIDATED

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES or (
            "manifests" in self.doc and "layers" not in self.doc
        )


class Warmer:
    """Warms images through one fetcher session; shared by every image of a
    run so `jobs` bounds them all together."""

    def __init__(self, session: aiohttp.ClientSession, jobs: int, platforms: Sequence[Platform],
                 default_registry: str, progress: Progress) -> None:
        self.session = session
        self.limit = asyncio.Semaphore(jobs)
        self.platforms = tuple(platforms)
        self.default_registry = default_registry
        self.progress = progress
        # One job per digest at a time: a layer two images share is fetched
        # by the first and found cached (and linked) by the second's HEAD.
        self.digest_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def image(self, text: str) -> ImageResult:
        result = ImageResult(text)
        try:
            ref = parse_reference(text, self.default_registry)
            manifests = await self._image_manifests(ref, result)
            blobs = {b["digest"]: b for m in manifests for b in image_blobs(m.doc)}
            await self._all(self._blob(ref, blob, result) for blob in blobs.values())
        except Exception as err:  # one image's failure, whatever it is, stops only that image
            result.error = describe(err)
        self.progress.image_done(result)
        return result

    async def _all(self, jobs: Iterable[Any]) -> list[Any]:
        """Run every job to its end, then raise the first failure: the blobs
        that can be cached still are."""
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    # --- manifests ---------------------------------------------------------------

    async def _image_manifests(self, ref: Reference, result: ImageResult) -> list[Manifest]:
        top = await self._manifest(ref, ref.ref, revalidate=ref.digest is None)
        if top.cache == "STALE":
            result.stale = True
            self.progress.note(str(ref), "upstream unreachable: cached manifest kept (STALE)")
        return await self._expand(ref, top, str(ref), 0)

    async def _expand(self, ref: Reference, manifest: Manifest, where: str,
                      depth: int) -> list[Manifest]:
        if not manifest.is_index:
            return [manifest]
        if depth >= MAX_INDEX_DEPTH:
            raise CrProxyError("MANIFEST_INVALID", f"{where}: indexes nested too deep")
        entries = select_manifests(manifest.doc, self.platforms)
        if not entries:
            wanted = ", ".join(map(str, self.platforms)) or "any platform"
            raise CrProxyError("PLATFORM_UNKNOWN", f"{where}: the index has no manifest for "
                               f"{wanted}")
        self.progress.note(where, f"index: {len(entries)} of "
                           f"{len(manifest.doc.get('manifests') or [])} manifests")
        children = await self._all(self._manifest(ref, e["digest"], False) for e in entries)
        expanded = await self._all(
            self._expand(ref, child, f"{where}@{child.digest}", depth + 1) for child in children
        )
        return [m for group in expanded for m in group]

    async def _manifest(self, ref: Reference, target: str, revalidate: bool) -> Manifest:
        headers = {**MIRROR_HEADERS, "Accept": MANIFEST_ACCEPT}
        if revalidate:
            headers["X-CR-Revalidate"] = "1"
        url = "http://fetcher" + mirror_path(ref, "manifests", target)
        async with self.limit, self.session.get(url, headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise registry_error(response.status, body)
            claimed = response.headers.get("Docker-Content-Digest", "")
            content_type = response.content_type
            cache = response.headers.get("X-Cache", "")
        digest = _check_manifest(body, target if is_digest(target) else claimed)
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise CrProxyError("MANIFEST_INVALID", f"manifest {digest} is not a JSON object")
        media_type = doc.get("mediaType") or content_type
        return Manifest(digest, str(media_type), doc, cache)

    # --- blobs ---------------------------------------------------------------------

    async def _blob(self, ref: Reference, blob: Mapping[str, Any], result: ImageResult) -> None:
        digest = blob["digest"]
        url = "http://fetcher" + mirror_path(ref, "blobs", digest)
        async with self.digest_locks[digest], self.limit:
            if await self._cached(url):
                result.blobs_cached += 1
                return
            size = blob.get("size") if isinstance(blob.get("size"), int) else None
            self.progress.expect(size or 0)
            nbytes, cache = await self._download(url, digest, size)
        if cache == "HIT":  # cached between our HEAD and GET (a client's pull)
            result.blobs_cached += 1
            return
        result.blobs_fetched += 1
        result.bytes_fetched += nbytes
        self.progress.blob_fetched(str(ref), digest, nbytes)

    async def _cached(self, url: str) -> bool:
        """HEAD: a HIT costs nothing more. Anything else, an error included,
        goes on to the GET, whose body carries the error if there is one."""
        head_headers = {**MIRROR_HEADERS, "X-CR-Cache-Only": "1"}
        async with self.session.head(url, headers=head_headers) as response:
            return response.status == 200 and response.headers.get("X-Cache") == "HIT"

    async def _download(self, url: str, digest: str, size: int | None) -> tuple[int, str]:
        """GET the blob, hash it and drop it; (bytes, X-Cache)."""
        async with self.session.get(url, headers=MIRROR_HEADERS) as response:
            if response.status != 200:
                raise registry_error(response.status, await response.read())
            cache = response.headers.get("X-Cache", "")
            digester, nbytes = hasher(digest), 0
            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    digester.update(chunk)
                    nbytes += len(chunk)
                    self.progress.advance(len(chunk))
            except aiohttp.ClientPayloadError as err:
                raise CrProxyError("TRUNCATED", f"blob {digest}: connection cut after "
                                   f"{nbytes} bytes (the fetcher found it short or wrong)"
                                   ) from err
        actual = f"{digest.split(':', 1)[0]}:{digester.hexdigest()}"
        if actual != digest or (size is not None and nbytes != size):
            raise CrProxyError("DIGEST_INVALID", f"blob {digest}: received {nbytes} bytes "
                               f"hashing to {actual}")
        return nbytes, cache


def _check_manifest(body: bytes, expected: str) -> str:
    """The body's digest, checked against the one asked for or claimed."""
    algorithm = expected.split(":", 1)[0] if is_digest(expected) else "sha256"
    digest = digest_of(body, algorithm)
    if is_digest(expected) and digest != expected:
        raise CrProxyError("DIGEST_INVALID", f"manifest is {digest}, expected {expected}")
    return digest


def client_session(socket_path: Path, config: Config) -> aiohttp.ClientSession:
    # The fetcher times the upstream out first; this only catches a fetcher
    # that hangs (connect + token exchange + redirects + a silent read).
    read = config.timeouts.connect * 3 + config.timeouts.read * 2
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket_path)),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read),
        auto_decompress=False,  # hash the bytes as stored
    )


async def serve_is_running(socket_path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError:  # no socket file, or a stale one nobody listens on
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def fetcher_socket(config: Config) -> AsyncIterator[tuple[Path, bool]]:
    """(socket, started here): serve's fetcher if it runs, else our own."""
    if await serve_is_running(config.socket_path):
        yield config.socket_path, False
        return
    from cr_proxy.fetch.app import make_app  # the same app serve runs

    path = config.run_dir / f"warm-{os.getpid()}.sock"
    runner = web.AppRunner(
        make_app(config, clean_temp=False), access_log=None, handle_signals=False
    )
    try:
        try:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            await runner.setup()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await web.UnixSite(runner, str(path)).start()
        except OSError as err:
            raise CrProxyError("FETCHER", f"cannot start a fetcher on {path}: {err}") from err
        yield path, True
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def warm(config: Config, images: Sequence[str], platforms: Sequence[Platform] = (),
               jobs: int = DEFAULT_JOBS, progress: Progress | None = None) -> Summary:
    """Warm every image; never raises for one image's failure."""
    progress = progress or LineProgress(sys.stderr)
    started = time.monotonic()
    async with (
        fetcher_socket(config) as (path, own),
        client_session(path, config) as session,
    ):
        warmer = Warmer(session, jobs, platforms, config.default_registry, progress)
        results = await asyncio.gather(*(warmer.image(i) for i in images))
    summary = Summary.of(results, time.monotonic() - started)
    summary.fetcher, summary.started_fetcher = str(path), own
    return summary


# --- the command ---------------------------------------------------------------------


def collect_images(images: Sequence[str], from_file: Path | None) -> list[str]:
    listed = list(images)
    if from_file is not None:
        try:
            text = sys.stdin.read() if str(from_file) == "-" else from_file.read_text()
        except OSError as err:
            raise CrProxyError("LIST_UNREADABLE",
                               f"cannot read {from_file}: {err.strerror}") from err
        listed += read_image_list(text)
    return unique(listed)


def run(config: Config, images: Sequence[str], from_file: Path | None = None,
        platforms: Sequence[str] = (), jobs: int = DEFAULT_JOBS, as_json: bool = False) -> int:
    """`cr-proxy warm`: 0 if every image is cached, 1 if one failed, 2 for usage."""
    wanted = collect_images(images, from_file)
    if not wanted:
        print("cr-proxy warm: no image given (IMAGE... or --from-file)", file=sys.stderr)
        return 2
    if jobs < 1:
        print("cr-proxy warm: --jobs must be at least 1", file=sys.stderr)
        return 2
    parsed = [Platform.parse(p) for p in platforms]
    progress = make_progress(sys.stderr, len(wanted))
    try:
        summary = asyncio.run(warm(config, wanted, parsed, jobs, progress))
    finally:
        progress.close()
    print(json.dumps(summary.as_dict(), indent=2) if as_json else summary.text(), flush=True)
    return 1 if summary.failures else 0
