"""What the cache holds, as images (`cr-proxy ls`), and the door to the
commands on them: disk use (diskuse.py), removal (removal.py),
verification (verify.py). Works on the tree alone (layout.py, read through
scan.py), no server needed, and is safe while `serve` runs: reading walks
the tree with os.scandir; every change is a Store unlink or rename.

Policy (what an image is and when it was used: image.py):

- The digest a name points at is the blobs/ file with the same inode (what
  nginx really serves); failing that, the docker-content-digest sidecar;
  failing that, the hash of the body.
- An image *uses* its manifest, and for an index every platform manifest
  the index names, plus each manifest's config and layers. Manifests are
  read from blobs/ by digest, so a platform manifest cached through another
  repository counts. Media types: OCI and Docker schema 2 manifests and
  indexes; anything else (schema 1, artifacts, non-JSON) uses only itself.
  Foreign layers (with `urls`) live outside the registry and are not used
  (oci/manifest.py decides that, the nesting limit and attestations).
  Used digests missing from blobs/ are `missing`, platforms never pulled
  included.
- Complete: a mirror caches what was pulled, so an index's entry (a
  platform, an attestation) whose manifest is in no blobs/ file, under no
  content/ name and not in quarantine/ was never pulled (`unpulled`): it is
  missing, but the image is not broken for it. An image is *complete* when
  nothing else is missing: the manifests of pulled platforms, their configs
  and layers. What verify quarantined or a hand removed from blobs/ (a
  platform manifest keeps its content/ name) makes an image incomplete.
- Size: the bytes of the used digests that are in blobs/, each once; what is
  missing beyond never-pulled platforms is counted apart (`missing_bytes`)
  from the sizes the manifests state.
- Platforms: `os/arch[/variant]` from an index's entries (attestation
  entries left out), or from a manifest's config blob when cached.
- Shown registry: `registry_hosts` inverted (registry-1.docker.io is shown
  as docker.io).
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cr_proxy.cache.check import Checked, Checker, Missing, ReferrersOf
from cr_proxy.cache.diskuse import DiskUsage, disk_usage
from cr_proxy.cache.image import Image, LastUsed, file_times
from cr_proxy.cache.layout import QUARANTINE, Kind, Sidecar, key_of, resolve_domain
from cr_proxy.cache.removal import Removed, remove_blobs, remove_images
from cr_proxy.cache.scan import Link, Reader, Scan
from cr_proxy.cache.store import Store
from cr_proxy.cache.verify import Verification, verify
from cr_proxy.config import Config
from cr_proxy.errors import BadRequest, ManifestInvalid, NotFound, UpstreamError
from cr_proxy.oci import manifest
from cr_proxy.oci.manifest import MAX_INDEX_DEPTH, MAX_MANIFEST, Platform, config_platform
from cr_proxy.oci.reference import (
    DEFAULT_REGISTRY,
    digest_of,
    is_digest,
    parse_reference,
)
from cr_proxy.oci.referrers import Descriptor, parse_referrers, stored_name, tag_schema_tag

MAX_CONFIG = 8 << 20  # a config blob read for its platform; bigger ones are not configs


# --- images ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """One manifest and everything below it."""

    media_type: str
    platforms: tuple[str, ...]
    digests: frozenset[str]
    manifests: frozenset[str]
    unpulled: frozenset[str] = frozenset()  # index entries never pulled (module docstring)
    cached_platforms: tuple[str, ...] = ()  # the platforms pulled
    declared: Mapping[str, int] = field(default_factory=dict)  # blob sizes the manifests state


class Resolver:
    """Reads manifests from blobs/ once per digest, for one scan. `pulled`:
    manifest digests the tree shows were pulled besides those in blobs/
    (content/ names of manifests by digest, quarantine/)."""

    __slots__ = ("_done", "pulled", "reader", "scan")

    def __init__(self, scan: Scan, reader: Reader, pulled: Iterable[str] = ()) -> None:
        self.scan = scan
        self.reader = reader
        self.pulled = frozenset(pulled)
        self._done: dict[str, Resolved] = {}

    def resolve(self, digest: str, fallback: Path | None = None, depth: int = 0) -> Resolved:
        if digest not in self._done:
            self._done[digest] = self._resolve(digest, fallback, depth)
        return self._done[digest]

    def _resolve(self, digest: str, fallback: Path | None, depth: int) -> Resolved:
        # depth: the indexes above this manifest (manifest.py's nesting limit).
        body = self._body(digest, fallback, MAX_MANIFEST) if depth <= MAX_INDEX_DEPTH else None
        if body is None:  # not cached (a platform never pulled), or nested too deep
            return Resolved("", (), frozenset({digest}), frozenset({digest}))
        try:
            parsed = manifest.parse(body)
        except ManifestInvalid:  # not a manifest at all: it uses only itself
            parsed = manifest.Manifest("")
        digests, manifests, unpulled = {digest}, {digest}, set()
        declared = {b.digest: b.size for b in parsed.blobs if b.size is not None}
        platforms = [str(p) for p in parsed.platforms]
        cached = []
        for entry in parsed.entries:
            below = self.resolve(entry.digest, None, depth + 1)
            digests |= below.digests
            manifests |= below.manifests
            unpulled |= below.unpulled
            declared.update(below.declared)
            if not self._was_pulled(entry.digest):
                unpulled.add(entry.digest)
            elif entry.platform and not entry.attestation:
                cached.append(str(entry.platform))
        if parsed.config:
            platforms += self._config_platform(parsed.config.digest)
        digests.update(blob.digest for blob in parsed.blobs)
        return Resolved(parsed.media_type, tuple(platforms), frozenset(digests),
                        frozenset(manifests), frozenset(unpulled),
                        tuple(cached) if parsed.is_index else tuple(platforms), declared)

    def _was_pulled(self, digest: str) -> bool:
        return digest in self.scan.blobs or digest in self.pulled

    def _body(self, digest: str, fallback: Path | None, limit: int) -> bytes | None:
        blob = self.scan.blobs.get(digest)
        body = self.reader.read(blob.path, limit) if blob else None
        if body is None and fallback is not None:
            body = self.reader.read(fallback, limit)
        return body

    def _config_platform(self, config: str) -> list[str]:
        body = self._body(config, None, MAX_CONFIG)
        platform = config_platform(body) if body else None
        return [str(platform)] if platform else []


@dataclass(slots=True)
class Repo:
    """The manifest names of one <domain>/<name>."""

    tags: dict[str, Link] = field(default_factory=dict)
    digests: dict[str, Link] = field(default_factory=dict)


def group_manifests(links: Iterable[Link]) -> dict[tuple[str, str], Repo]:
    repos: dict[tuple[str, str], Repo] = defaultdict(Repo)
    for link in links:
        try:
            key = key_of(link.domain, link.path)
        except BadRequest:
            continue  # a name the fetcher never makes (made by hand): not an image
        if key.kind is not Kind.MANIFEST or key.domain != link.domain:
            continue  # blobs, CDN paths, oddities: not manifests of a repository
        repo = repos[(key.domain, key.repository)]
        if key.by_digest:
            repo.digests[key.reference] = link
        else:
            repo.tags[key.reference] = link
    return repos


@dataclass(frozen=True, slots=True)
class UnusedBlob:
    """A blobs/ file no image uses."""

    digest: str
    size: int
    stored_at: float  # its file's mtime: the commit
    names: tuple[tuple[str, str], ...]  # (domain, path) of its content/ names


class Inventory:
    """The images and files of one cache tree."""

    __slots__ = ("_shown", "default_registry", "last_used", "registry_hosts", "store")

    def __init__(
        self,
        root: Path,
        registry_hosts: Mapping[str, str] | None = None,
        default_registry: str = DEFAULT_REGISTRY,
        last_used: LastUsed = file_times,
    ) -> None:
        self.store = Store(root)
        self.registry_hosts = dict(registry_hosts or {})
        self.default_registry = default_registry
        self.last_used = last_used
        self._shown = shown_registries(self.registry_hosts, default_registry)

    @classmethod
    def from_config(cls, conf: Config, last_used: LastUsed = file_times) -> Inventory:
        return cls(conf.cache_dir, conf.registry_hosts, conf.default_registry, last_used)

    def __repr__(self) -> str:
        return f"Inventory({str(self.root)!r})"

    @property
    def root(self) -> Path:
        return self.store.root

    def _scan(self) -> Scan:
        return Scan.of(self.store.tree)

    # --- ls ---------------------------------------------------------------------------

    def images(self) -> list[Image]:
        return self._images(self._scan())

    def find(self, text: str, images: list[Image] | None = None) -> list[Image]:
        """The cached images a reference names, by Docker's rules: a tag, or
        a digest (the digest-only image, or every tag pointing at it)."""
        ref = parse_reference(text, self.default_registry)
        domain = resolve_domain(ref.registry, self.registry_hosts)
        found = [
            image for image in (self.images() if images is None else images)
            if (image.domain, image.repository) == (domain, ref.name)
            and (image.digest == ref.digest if ref.digest else image.tag == ref.tag)
        ]
        if not found:
            raise NotFound("MANIFEST_UNKNOWN", f"{text} is not in the cache")
        return found

    # --- check ------------------------------------------------------------------------

    def check(self, texts: list[str], wanted: list[Platform],
              referrers: bool = False) -> list[Checked]:
        """Would each image pull from the cache alone (check.py)? An image
        not in the cache at all is one missing manifest. BadRequest for a
        reference that is not one, before anything is read. `referrers`:
        their referrers too."""
        for text in texts:
            parse_reference(text, self.default_registry)
        scan = self._scan()
        images = self._images(scan)
        checker = Checker(scan, Reader(), self._pulled(scan))
        out = []
        for text in texts:
            try:
                found = self.find(text, images)
            except NotFound as err:
                out.append(Checked(text, text, None, (), (Missing("manifest", text, err.message),)))
                continue
            out += [checker.check(text, image.name, image.digest, wanted,
                                  self.store.tree.at(image.location), image.platforms,
                                  self._referrers_of(image) if referrers else None)
                    for image in found]
        return out

    def _referrers_of(self, image: Image) -> ReferrersOf:
        """The stored referrers of a subject of `image`'s repository, as the
        fetcher answers offline (fetch/referrers.py): the stored answer
        (one it would refuse is none), else the tag schema's index cached
        as a tag."""

        def stored(subject: str) -> list[Descriptor] | None:
            what = f"the stored referrers index of {image.repository}@{subject}"
            listing = self.store.read_listing(image.domain, image.repository, Kind.REFERRERS,
                                              stored_name(subject))
            refused: UpstreamError | None = None
            if listing is not None:
                try:
                    return parse_referrers(listing[0], what)
                except UpstreamError as err:  # the fetcher does not serve it either
                    refused = err
            tag = self.store.tree.at(image.manifest(tag_schema_tag(subject)))
            body = Reader().read(tag, MAX_MANIFEST)
            if body is not None:
                return parse_referrers(body, f"the cached tag schema index of "
                                       f"{image.repository}@{subject}")
            if refused is not None:
                raise refused
            return None

        return stored

    def blob_refs(self) -> dict[str, set[str]]:
        """Every digest in blobs/ -> keys of the images that use it (empty:
        nothing does)."""
        scan = self._scan()
        refs: dict[str, set[str]] = {digest: set() for digest in scan.blobs}
        for image in self._images(scan):
            for digest in image.digests & refs.keys():
                refs[digest].add(image.key)
        return refs

    # --- du, rm, verify (one module each) -------------------------------------------------

    def usage(self) -> DiskUsage:
        return disk_usage(self._scan(), self._registry_of, self.store.listing_bytes())

    def unused_blobs(self) -> list[UnusedBlob]:
        """The blobs/ files no image uses, with their names: what a cluster
        peer asked this node for (its image lives on another node), a
        pushed layer whose manifest never came, a commit cut before its
        name. The evictor frees them by their last use, as images."""
        scan = self._scan()
        used = set().union(*(image.digests for image in self._images(scan)))
        return [UnusedBlob(blob.digest, blob.size, blob.mtime,
                           tuple(link.where for link in scan.names.get(blob.inode, ())))
                for digest, blob in sorted(scan.blobs.items()) if digest not in used]

    def remove_blobs(self, digests: Iterable[str],
                     keep: Collection[str] = frozenset()) -> Removed:
        """Free blobs no image uses now (removal.remove_blobs)."""
        scan = self._scan()
        used = set().union(*(image.digests for image in self._images(scan)))
        return remove_blobs(self.store, scan, set(digests) - used, keep)

    def remove(self, *images: Image, keep: Collection[str] = frozenset()) -> Removed:
        """Remove images (by key, as listed now) and whatever only they used,
        digests in `keep` excepted (removal.py)."""
        scan = self._scan()
        return remove_images(self.store, scan, self._images(scan), images, keep)

    def verification(self) -> Verification:
        """Hash every blobs/ file; quarantine those that fail (verify.py)."""
        return verify(self.store)

    # --- the tree read as images ----------------------------------------------------------

    def _images(self, scan: Scan) -> list[Image]:
        reader = Reader()
        repos = group_manifests(scan.links)
        resolver = Resolver(scan, reader, self._pulled(scan, repos))
        found = []
        for (domain, name), repo in sorted(repos.items()):
            found += self._repo_images(domain, name, repo, scan, resolver)
        # Times last: by now every manifest was read, so atime_trusted is final.
        return [self._timed(image, scan, reader.atime_trusted) for image in found]

    def _repo_images(
        self, domain: str, name: str, repo: Repo, scan: Scan, resolver: Resolver
    ) -> list[Image]:
        images, covered = [], set()
        for tag, link in sorted(repo.tags.items()):
            digest = self._link_digest(scan, link)
            resolved = resolver.resolve(digest, self._content(link))
            covered |= resolved.manifests
            images.append(self._image(domain, name, tag, digest, resolved, scan, link))
        by_digest = {
            d: resolver.resolve(d, self._content(link)) for d, link in repo.digests.items()
        }
        for digest, resolved in by_digest.items():
            covered |= resolved.manifests - {digest}
        for digest, resolved in sorted(by_digest.items()):
            if digest not in covered:
                link = repo.digests[digest]
                images.append(self._image(domain, name, None, digest, resolved, scan, link))
        return images

    def _image(
        self, domain: str, name: str, tag: str | None, digest: str, resolved: Resolved,
        scan: Scan, link: Link,
    ) -> Image:
        cached = resolved.digests & scan.blobs.keys()
        missing = resolved.digests - cached
        lost = missing - resolved.unpulled
        return Image(
            domain=domain,
            registry=self._registry_of(domain),
            repository=name,
            tag=tag,
            digest=digest,
            media_type=resolved.media_type,
            platforms=resolved.platforms,
            digests=resolved.digests,
            manifests=resolved.manifests,
            missing=missing,
            size=sum(scan.blobs[d].size for d in cached),
            validated_at=self._validated_at(link) if tag is not None else None,
            stored_at=0.0,
            read_at=None,
            unpulled=resolved.unpulled,
            cached_platforms=resolved.cached_platforms,
            missing_bytes=stated_size(lost, resolved.declared),
        )

    def _timed(self, image: Image, scan: Scan, atime_trusted: bool) -> Image:
        blob = scan.blobs.get(image.digest)
        stored_at = blob.mtime if blob else 0.0
        read_at = blob.atime if blob and atime_trusted else None
        image = dataclasses.replace(image, stored_at=stored_at, read_at=read_at,
                                    private=self.store.is_private(image.domain, image.repository))
        return dataclasses.replace(image, last_used=self.last_used(image))

    def _link_digest(self, scan: Scan, link: Link) -> str:
        """What a manifest name holds: the blobs/ file it is a link to, else
        its digest sidecar, else the hash of its bytes."""
        if link.inode in scan.by_inode:
            return scan.by_inode[link.inode]
        claimed = self.store.read_sidecar(Sidecar.DOCKER_CONTENT_DIGEST, *link.where)
        if claimed and is_digest(claimed):
            return claimed
        body = Reader().read(self._content(link), MAX_MANIFEST) or b""  # an orphan name
        return digest_of(body)

    def _validated_at(self, link: Link) -> float | None:
        sidecar = self.store.tree.sidecar(Sidecar.DOCKER_CONTENT_DIGEST, *link.where)
        try:
            return sidecar.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _pulled(
        self, scan: Scan, repos: dict[tuple[str, str], Repo] | None = None
    ) -> frozenset[str]:
        """Manifest digests the tree shows were pulled: in blobs/, named by
        digest under content/, or quarantined by verify."""
        if repos is None:
            repos = group_manifests(scan.links)
        named = {digest for repo in repos.values() for digest in repo.digests}
        return frozenset(scan.blobs.keys() | named | self._quarantined())

    def _quarantined(self) -> set[str]:
        """Digests verify moved to quarantine/<alg>-<hex>: pulled once."""
        try:
            names = os.listdir(self.root / QUARANTINE)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        digests = (name.replace("-", ":", 1) for name in names)
        return {digest for digest in digests if is_digest(digest)}

    def _content(self, link: Link) -> Path:
        return self.store.tree.content(*link.where)

    def _registry_of(self, domain: str) -> str:
        return self._shown.get(domain, domain)


def stated_size(digests: Iterable[str], declared: Mapping[str, int]) -> int | None:
    """The bytes the manifests state for these blobs; None when one has no
    stated size (a missing manifest: its own layers are not known)."""
    sizes = [declared.get(d) for d in digests]
    return None if None in sizes else sum(s for s in sizes if s is not None)


def shown_registries(registry_hosts: Mapping[str, str], default_registry: str) -> dict[str, str]:
    """Domain -> the registry name to show: `registry_hosts` inverted; when
    several names share a host (docker.io, index.docker.io), the default
    registry, else the first listed."""
    shown: dict[str, str] = {}
    for registry, host in registry_hosts.items():
        shown.setdefault(host, registry)
    if default_registry in registry_hosts:
        shown[registry_hosts[default_registry]] = default_registry
    return shown
