"""`cr-proxy warm`: fill the cache before the pulls come. This module walks
images and sums up; the fetcher it asks is fetcher_client.py's, what it
shows while it runs is progress.py's, the command is cli.py's `cmd_warm`.

Policy:

- warm is an HTTP client of a fetcher, never a second writer: every byte it
  stores goes through the same fetch-verify-store path as a client's miss
  (serve's fetcher if it runs, else one in-process: fetcher_client.py).
- Names are resolved by Docker's rules (reference.parse_reference).
- A tag is fetched with `X-CR-Revalidate: 1`: an image already cached costs
  one manifest HEAD upstream, however fresh the tag is.
- An index brings every platform's manifest (or only those `--platform`
  names); attestation manifests are skipped, indexes nest at most
  MAX_INDEX_DEPTH deep, and foreign layers are not fetched (oci/manifest.py
  decides all three, for `cr-proxy ls` too).
- A blob is first asked for with HEAD: `X-Cache: HIT` means cached, nothing
  more to do. Otherwise it is fetched with GET, its body hashed and dropped.
- One job per digest in a run (fetch/flight.py's `Shared`, the mechanism
  the fetcher merges its own work with): a blob two images share is fetched
  once, and the image that joined the running job counts it as cached. The
  fetcher merges the upstream download of two concurrent GETs too, but
  streams the whole blob to each of them: merging here keeps warm from
  moving it over the socket twice and from counting it fetched twice.
- `--referrers` also asks the referrers of every manifest warmed (the
  index, each platform's manifest) through the fetcher, which stores the
  answer (by the upstream's API, else the tag schema's index tag, cached
  as a tag), then fetches each referrer artifact (signatures,
  attestations: a manifest, an index's manifests, their blobs) and, in
  turn, the artifacts' own referrers: MAX_REFERRER_DEPTH levels, at most
  MAX_REFERRER_ARTIFACTS artifacts an image (oci/referrers.py; `cr-proxy
  check --referrers` walks the same way). Artifacts over the budget are
  said, not fetched. A referrers answer that cannot be had fails the image.
  It also fetches cosign's legacy tags of the image's own digest (the one
  a verifier of the image checks: `sha256-<hex>.sig`, `.att`, `.sbom`;
  tags, their artifacts warmed too, none is no fault; not those of each
  platform's manifest, three manifest GETs each that Docker Hub would count
  against its pull limit) and the repository's tag list (`skopeo list-tags`
  offline; an upstream refusing to list is said, not a failure).
- `--jobs` bounds the requests in flight. A failing image is reported with
  the fetcher's registry error (`CODE: message`) and makes the exit status
  non-zero; the other images still complete.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cr_proxy.cache.sizes import human_size
from cr_proxy.config import Config
from cr_proxy.errors import CrProxyError
from cr_proxy.fetch.flight import Shared
from cr_proxy.oci.manifest import MAX_INDEX_DEPTH, Blob, Platform
from cr_proxy.oci.reference import Reference, parse_reference
from cr_proxy.oci.referrers import (
    MAX_REFERRER_ARTIFACTS,
    MAX_REFERRER_DEPTH,
    legacy_tags,
    next_artifacts,
)
from cr_proxy.ops.fetcher_client import (
    Fetched,
    FetcherClient,
    client_session,
    fetcher_socket,
)

DEFAULT_JOBS = 4


# --- the image list ------------------------------------------------------------------


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


def collect_images(images: Sequence[str], from_file: Path | None) -> list[str]:
    """The images named as arguments, then those of the list file (`-`:
    stdin), each once."""
    listed = list(images)
    if from_file is not None:
        try:
            text = sys.stdin.read() if str(from_file) == "-" else from_file.read_text()
        except OSError as err:
            raise CrProxyError("LIST_UNREADABLE",
                               f"cannot read {from_file}: {err.strerror}") from err
        listed += read_image_list(text)
    return unique(listed)


# --- results ---------------------------------------------------------------------------


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
    referrers: int = 0  # referrer artifacts warmed (--referrers)
    error: str | None = None


@dataclass(slots=True)
class Summary:
    images: int = 0
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    stale: int = 0
    referrers: int = 0
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
        self.referrers += result.referrers
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
            "stale": self.stale, "referrers": self.referrers,
            "seconds": round(self.seconds, 3), "fetcher": self.fetcher,
            "started_fetcher": self.started_fetcher,
            "failures": [{"image": i, "error": e} for i, e in self.failures],
        }

    def text(self) -> str:
        failed = f", {self.images_failed} failed" if self.failures else ""
        stale = f", {self.stale} kept stale (upstream unreachable)" if self.stale else ""
        referrers = f"; {self.referrers} referrer artifacts" if self.referrers else ""
        return (
            f"warm: {self.images} images ({self.images_ok} ok{failed}{stale}){referrers}; "
            f"blobs: {self.blobs_fetched} fetched ({human_size(self.bytes_fetched)}), "
            f"{self.blobs_cached} already cached; {self.seconds:.1f} s"
        )


class Progress(Protocol):
    """What a run reports as it goes (progress.py shows it)."""

    def note(self, image: str, text: str) -> None: ...
    def expect(self, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None: ...
    def image_done(self, result: ImageResult) -> None: ...
    def close(self) -> None: ...


# --- the walk ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class BlobJob:
    """One image's request for a blob; compared by identity, so an image
    can tell its own job's outcome from one it joined."""

    ref: Reference
    blob: Blob


@dataclass(frozen=True, slots=True)
class BlobDone:
    job: BlobJob  # whose job it was
    nbytes: int | None  # fetched; None: it was cached already


class Warmer:
    """Warms images through one fetcher; shared by every image of a run so
    `jobs` bounds them all together."""

    def __init__(self, client: FetcherClient, jobs: int, platforms: Sequence[Platform],
                 default_registry: str, progress: Progress, referrers: bool = False) -> None:
        self.client = client
        self.referrers = referrers
        self.limit = asyncio.Semaphore(jobs)
        self.platforms = tuple(platforms)
        self.default_registry = default_registry
        self.progress = progress
        # One job per digest (the module docstring says why).
        self.blob_jobs = Shared()

    async def image(self, text: str) -> ImageResult:
        result = ImageResult(text)
        try:
            ref = parse_reference(text, self.default_registry)
            walked: list[str] = []  # every manifest digest, indexes too
            manifests = await self._image_manifests(ref, result, walked)
            if self.referrers:
                manifests += await self._closure(ref, walked, result)
            blobs = {b.digest: b for m in manifests for b in m.manifest.blobs}
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

    async def _image_manifests(self, ref: Reference, result: ImageResult,
                               walked: list[str]) -> list[Fetched]:
        top = await self._manifest(ref, ref.ref, revalidate=ref.digest is None)
        if top.cache == "STALE":
            result.stale = True
            self.progress.note(str(ref), "upstream unreachable: cached manifest kept (STALE)")
        return await self._expand(ref, top, str(ref), 0, self.platforms, walked)

    async def _closure(self, ref: Reference, subjects: list[str],
                       result: ImageResult) -> list[Fetched]:
        """--referrers: the tag list, the legacy tags, the referrers walk."""
        try:
            async with self.limit:
                await self.client.tag_list(ref)
        except CrProxyError as err:
            self.progress.note(str(ref), f"tag list not cached: {describe(err)}")
        tags = legacy_tags(subjects[0])  # the image's own digest (module docstring)
        legacy = [f for f in await self._all(self._legacy(ref, t) for t in tags) if f]
        result.referrers += len(legacy)
        expanded = await self._all(
            self._expand(ref, top, f"{ref}: {top.digest}", 0, (), []) for top in legacy)
        found = [m for group in expanded for m in group]
        return found + await self._referrer_manifests(ref, subjects, result)

    async def _legacy(self, ref: Reference, tag: str) -> Fetched | None:
        async with self.limit:
            return await self.client.manifest_if_any(ref, tag, revalidate=True)

    async def _referrer_manifests(self, ref: Reference, subjects: list[str],
                                  result: ImageResult) -> list[Fetched]:
        """The image manifests of the referrer artifacts of `subjects`, and
        of theirs, level by level (the module docstring's bounds)."""
        seen, found = set(subjects), []
        level = list(dict.fromkeys(subjects))
        for depth in range(MAX_REFERRER_DEPTH):
            answers = await self._all(self._referrers_of(ref, s, result) for s in level)
            budget = MAX_REFERRER_ARTIFACTS - result.referrers
            artifacts, cut = next_artifacts(answers, seen, budget)
            if cut:
                self.progress.note(str(ref), f"more than {MAX_REFERRER_ARTIFACTS} referrer "
                                   "artifacts: the rest not warmed")
            result.referrers += len(artifacts)
            tops = await self._all(self._manifest(ref, a, False) for a in artifacts)
            level = []  # the artifacts, their index entries too: the next level's subjects
            expanded = await self._all(
                self._expand(ref, top, f"{ref}: referrer {top.digest}", 0, (), level)
                for top in tops)
            found += [m for group in expanded for m in group]
            if cut or not level or depth + 1 == MAX_REFERRER_DEPTH:
                break
        return found

    async def _referrers_of(self, ref: Reference, subject: str,
                            result: ImageResult) -> list[dict[str, Any]]:
        async with self.limit:
            descriptors, cache = await self.client.referrers(ref, subject)
        if cache == "STALE":
            result.stale = True
            self.progress.note(str(ref), f"upstream unreachable: the cached referrers of "
                               f"{subject} kept (STALE)")
        return descriptors

    async def _expand(self, ref: Reference, fetched: Fetched, where: str, depth: int,
                      platforms: tuple[Platform, ...], walked: list[str]) -> list[Fetched]:
        """The image manifests below `fetched` (every manifest's digest,
        indexes too, appended to `walked`); depth: the indexes above it."""
        walked.append(fetched.digest)
        index = fetched.manifest
        if not index.is_index:
            return [fetched]
        if depth >= MAX_INDEX_DEPTH:
            raise CrProxyError("MANIFEST_INVALID", f"{where}: indexes nested too deep")
        entries = index.select(platforms)
        if not entries and not platforms and not index.entries:
            return []  # an empty index (an artifact can be one): nothing below it
        if not entries:
            wanted = ", ".join(map(str, platforms)) or "any platform"
            raise CrProxyError("PLATFORM_UNKNOWN", f"{where}: the index has no manifest for "
                               f"{wanted}")
        self.progress.note(where, f"index: {len(entries)} of {len(index.entries)} manifests")
        children = await self._all(self._manifest(ref, e.digest, False) for e in entries)
        expanded = await self._all(
            self._expand(ref, child, f"{where}@{child.digest}", depth + 1, platforms, walked)
            for child in children
        )
        return [m for group in expanded for m in group]

    async def _manifest(self, ref: Reference, target: str, revalidate: bool) -> Fetched:
        async with self.limit:
            return await self.client.manifest(ref, target, revalidate)

    async def _blob(self, ref: Reference, blob: Blob, result: ImageResult) -> None:
        job = BlobJob(ref, blob)
        done = await self.blob_jobs.run(blob.digest, lambda: self._fetch(job))
        if done.job is not job or done.nbytes is None:  # joined another image's job, or cached
            result.blobs_cached += 1
            return
        result.blobs_fetched += 1
        result.bytes_fetched += done.nbytes
        self.progress.blob_fetched(str(ref), blob.digest, done.nbytes)

    async def _fetch(self, job: BlobJob) -> BlobDone:
        """HEAD, then GET if not cached: nbytes None when it was cached."""
        ref, blob = job.ref, job.blob
        async with self.limit:
            if await self.client.blob_cached(ref, blob.digest):
                return BlobDone(job, None)
            self.progress.expect(blob.size or 0)
            nbytes, cache = await self.client.download(ref, blob.digest, blob.size,
                                                       self.progress.advance)
        # HIT: cached between our HEAD and GET (a client's pull).
        return BlobDone(job, None if cache == "HIT" else nbytes)


async def warm(config: Config, images: Sequence[str], platforms: Sequence[Platform] = (),
               jobs: int = DEFAULT_JOBS, *, progress: Progress,
               referrers: bool = False) -> Summary:
    """Warm every image; never raises for one image's failure."""
    started = time.monotonic()
    async with (
        fetcher_socket(config) as (path, own),
        client_session(path, config) as session,
    ):
        warmer = Warmer(FetcherClient(session), jobs, platforms, config.default_registry,
                        progress, referrers)
        results = await asyncio.gather(*(warmer.image(i) for i in images))
    summary = Summary.of(results, time.monotonic() - started)
    summary.fetcher, summary.started_fetcher = str(path), own
    return summary
