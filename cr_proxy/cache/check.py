"""Would a pull of this image succeed from the cache alone, right now?
(`cr-proxy check`; the tree only: no network, no server.)

With the upstream gone, a pull needs the tag's manifest (served stale), for
an index the manifest of each platform pulled, and each manifest's config
and layers, in blobs/ and of the size the manifest states. The store
commits only verified content, so a present blob of the stated size is the
whole blob unless the disk changed it since (`cr-proxy verify` re-hashes).

Which platforms: those `--platform` names, each of which must be in the
index and pulled; without it, every platform the cache holds a manifest of
(what was pulled), and at least one. Index entries never pulled are what a
mirror never saw, not a fault (inventory.py's "complete").

With `--referrers` (what `cr-proxy warm --referrers` fetched, walked the
same way, oci/referrers.py's bounds): each checked manifest's referrers
answer must be stored (the listing in lists/, or the tag schema's index
cached as a tag: the fetcher answers offline from either), and every
artifact it lists be whole (its manifest, an index's manifests, their
blobs), and, level by level, the artifacts' own referrers answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cr_proxy.cache.scan import Reader, Scan
from cr_proxy.errors import ManifestInvalid, UpstreamError
from cr_proxy.oci.manifest import MAX_INDEX_DEPTH, MAX_MANIFEST, Entry, Manifest, Platform
from cr_proxy.oci.manifest import parse as parse_manifest
from cr_proxy.oci.referrers import (
    MAX_REFERRER_ARTIFACTS,
    MAX_REFERRER_DEPTH,
    Descriptor,
    next_artifacts,
)

# A subject's stored referrers (None: no answer stored); raises
# UpstreamError for a stored answer that is not a referrers index.
ReferrersOf = Callable[[str], list[Descriptor] | None]


@dataclass(frozen=True, slots=True)
class Missing:
    """One thing a pull would need and the cache cannot give."""

    what: str  # "manifest", "blob", "platform" or "referrers"
    name: str  # a digest, or a platform for "platform"
    reason: str

    def __str__(self) -> str:
        return f"{self.what} {self.name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Checked:
    """What `check` says of one image argument."""

    image: str  # the argument as given
    name: str  # the cached image's shown name (the argument when not cached)
    digest: str | None  # what its tag points at; None when not cached
    platforms: tuple[str, ...]  # the platforms checked
    missing: tuple[Missing, ...]

    @property
    def complete(self) -> bool:
        return not self.missing


class Checker:
    """Checks images against one scan of the tree."""

    __slots__ = ("pulled", "reader", "scan")

    def __init__(self, scan: Scan, reader: Reader, pulled: frozenset[str]) -> None:
        self.scan = scan
        self.reader = reader
        self.pulled = pulled  # manifest digests the tree shows were pulled

    def check(self, image: str, name: str, digest: str, wanted: Sequence[Platform],
              top_file: Path | None = None, own: Sequence[str] = (),
              referrers_of: ReferrersOf | None = None) -> Checked:
        """`top_file`: where the tag's manifest is read if blobs/ lacks it
        (its content/ name, which nginx serves); `own`: the platform a
        single-platform image's config states (inventory.py);
        `referrers_of`: check the referrers too (the module docstring)."""
        missing: list[Missing] = []
        top = self._manifest(digest, missing, top_file)
        checked: list[str] = []
        walked = [digest]  # the manifests checked: the referrers' subjects
        if top is not None and top.is_index:
            for entry in self._entries(top, wanted, missing):
                checked.append(str(entry.platform) if entry.platform else entry.digest)
                self._image_manifest(entry.digest, missing, 1, walked)
        elif top is not None:
            self._blobs(top, missing)
            checked = [str(p) for p in wanted] or list(own)
            for platform in wanted:
                if own and not any(platform.matches(Platform.parse(o)) for o in own):
                    missing.append(Missing("platform", str(platform),
                                           f"the image is for {', '.join(own)}"))
        if referrers_of is not None and top is not None:
            self._referrers(walked, referrers_of, missing)
        return Checked(image, name, digest, tuple(checked), tuple(missing))

    def _entries(self, index: Manifest, wanted: Sequence[Platform],
                 missing: list[Missing]) -> list[Entry]:
        entries = index.select(wanted)
        for platform in wanted:
            if not any(platform.matches(e.platform) for e in entries):
                missing.append(Missing("platform", str(platform), "not in the index"))
        if wanted:
            for entry in entries:
                if entry.digest not in self.pulled:
                    missing.append(Missing("platform", str(entry.platform),
                                           f"never pulled (manifest {entry.digest})"))
            return [e for e in entries if e.digest in self.pulled]
        pulled = [e for e in entries if e.digest in self.pulled]
        if not pulled:
            missing.append(Missing("platform", "any", "no platform of the index was pulled"))
        return pulled

    def _image_manifest(self, digest: str, missing: list[Missing], depth: int,
                        walked: list[str], every: bool = False) -> None:
        """A manifest and its blobs, an index's pulled entries (`every`:
        all of them, as warm fetches an artifact's) below it."""
        parsed = self._manifest(digest, missing)
        if parsed is None:
            return
        walked.append(digest)
        if parsed.is_index and depth < MAX_INDEX_DEPTH:
            for entry in parsed.select():
                if every or entry.digest in self.pulled:
                    self._image_manifest(entry.digest, missing, depth + 1, walked, every)
        self._blobs(parsed, missing)

    def _referrers(self, subjects: list[str], referrers_of: ReferrersOf,
                   missing: list[Missing]) -> None:
        """warm's walk (ops/warm.py), over the tree: each level's answers
        stored, their artifacts whole."""
        seen, level, count = set(subjects), list(dict.fromkeys(subjects)), 0
        for _ in range(MAX_REFERRER_DEPTH):
            answers = []
            for subject in level:
                try:
                    found = referrers_of(subject)
                except UpstreamError as err:
                    missing.append(Missing("referrers", subject, err.message))
                    continue
                if found is None:
                    missing.append(Missing("referrers", subject, "no referrers answer stored "
                                           "(cr-proxy warm --referrers stores it)"))
                    continue
                answers.append(found)
            artifacts, cut = next_artifacts(answers, seen, MAX_REFERRER_ARTIFACTS - count)
            count += len(artifacts)
            level = []
            for artifact in artifacts:
                self._image_manifest(artifact, missing, 0, level, every=True)
            if cut or not level:
                return

    def _manifest(self, digest: str, missing: list[Missing],
                  fallback: Path | None = None) -> Manifest | None:
        blob = self.scan.blobs.get(digest)
        body = self.reader.read(blob.path, MAX_MANIFEST) if blob else None
        if body is None and fallback is not None:
            body = self.reader.read(fallback, MAX_MANIFEST)
        if body is None:
            missing.append(Missing("manifest", digest, "not in the cache"))
            return None
        try:
            return parse_manifest(body)
        except ManifestInvalid:
            return Manifest("")  # not a manifest: it needs only itself

    def _blobs(self, parsed: Manifest, missing: list[Missing]) -> None:
        for blob in parsed.blobs:
            stored = self.scan.blobs.get(blob.digest)
            if stored is None:
                missing.append(Missing("blob", blob.digest, "not in the cache"))
            elif blob.size is not None and stored.size != blob.size:
                missing.append(Missing("blob", blob.digest, f"{stored.size} bytes stored, "
                                       f"the manifest states {blob.size}"))

