"""What the cache holds: images, disk use, removal and verification
(`cr-proxy ls`, `du`, `rm`, `verify`). Works on the tree alone (layout.py),
no server needed, and is safe while `serve` runs: reading walks the tree
with os.scandir; every change is a Store unlink or rename.

Policy:

- An *image* is a tag, `content/<domain>/v2/<name>/manifests/<tag>`, or a
  manifest cached by digest only (`.../manifests/<digest>`) that no tag and
  no index of the same repository points at (shown as `name@digest`). Its
  key is `<domain>/<name>:<tag>` or `<domain>/<name>@<digest>`; its shown
  name uses the registry instead of the domain (`registry_hosts` inverted:
  registry-1.docker.io is shown as docker.io).
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
  Used digests missing from blobs/ (platforms never pulled) are `missing`.
- Size: the bytes of the used digests that are in blobs/, each once.
- Platforms: `os/arch[/variant]` from an index's entries (attestation
  entries left out), or from a manifest's config blob when cached.
- Last used (`Image.last_used`, computed by the `last_used` function given
  to Inventory, by default `file_times`): the newest of the tag's
  docker-content-digest sidecar mtime (the fetcher stored or revalidated the
  tag for a client), the manifest blob's mtime (first stored), and its atime
  (nginx reading it for a pull; at most a day late under relatime, frozen
  under noatime). The atime is trusted only when this module reads without
  touching it (O_NOATIME, allowed to the files' owner: `serve`'s user);
  otherwise it is left out. A feed of real use (nginx's access log, usage.py)
  plugs in as another `last_used` function.
- Disk use: every distinct inode under content/<domain> (a blob linked by
  ten repositories once), per domain; the total counts each inode under
  blobs/ and content/ once, so rows overlap when domains share blobs.
  `unlinked` is what blobs/ holds that no content/ name links to. Sizes are
  apparent file sizes; sidecars (a few bytes each) are not counted.
- Removal (reference counting over the whole inventory): an image's tag
  link and sidecars go first; then its repository's by-digest manifests
  (the index and its platforms) unless another image of the repository
  still uses them, so that no `name@digest` image is left behind; then
  every digest the image used and no remaining image uses is freed: each
  content/ name with its inode, under every domain (CDN redirect targets
  included), then the `redirect/` records pointing at those names, then
  the blobs/ file. Each name goes payload first, then its sidecars (the
  reverse of the commit order); in a redirect chain the name that redirects
  goes before its target; blobs/ last. Blob names of a shared blob in the
  removed image's repository stay: they still serve the right bytes.
  A pull racing the removal may leave a content/ name whose blobs/ file is
  gone; it serves correct bytes, and the next miss of that digest downloads
  it again.
- Verification: every blobs/ file is hashed (streaming) against its name.
  A failing one is first moved to `quarantine/<alg>-<hex>` (so the fetcher
  stops linking it), then every content/ name with its inode is removed
  with its sidecars (so nginx stops serving it); the next pull fetches it
  again.

JSON (`--json`; keys are stable, new ones may be added):

    ls      {"images": [{"key", "name", "registry", "domain", "repository",
                         "tag" (null for a digest-only image), "digest",
                         "media_type", "platforms": [str], "size",
                         "blobs": [digest], "missing": [digest],
                         "last_used" (Unix time, float)}]}
    du      {"domains": [{"domain", "registry", "files", "bytes"}],
             "total": {"files", "bytes"}, "unlinked": {"files", "bytes"}}
    rm      {"images": [key], "blobs": [digest], "files", "bytes"}
    verify  {"checked", "bytes", "failures": [{"digest", "actual" (null if
             unreadable), "quarantined" (path or null), "removed": [path]}]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cr_proxy.cache.layout import check_domain, check_path, resolve_domain
from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.errors import BadRequest, ManifestInvalid, NotFound
from cr_proxy.oci import manifest
from cr_proxy.oci.manifest import MAX_INDEX_DEPTH, MAX_MANIFEST, config_platform
from cr_proxy.oci.reference import (
    DEFAULT_REGISTRY,
    digest_of,
    is_digest,
    is_name,
    is_tag,
    parse_reference,
)

MAX_CONFIG = 8 << 20  # a config blob read for its platform; bigger ones are not configs
MANIFEST_PATH_RE = re.compile(r"v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")


# --- results --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Image:
    domain: str  # the cache's <domain>: the host that serves it
    registry: str  # the registry name shown (docker.io for registry-1.docker.io)
    repository: str
    tag: str | None  # None: a manifest cached by digest only
    digest: str  # what the tag points at: a manifest or an index
    media_type: str  # "" when not known
    platforms: tuple[str, ...]
    digests: frozenset[str]  # everything it uses: manifests, configs, layers
    manifests: frozenset[str]  # the manifests among them (an index and its platforms)
    missing: frozenset[str]  # used but not in blobs/
    size: int  # bytes of the used digests in blobs/, each once
    validated_at: float | None  # mtime of the tag's docker-content-digest sidecar
    stored_at: float  # mtime of the manifest's blobs/ file
    read_at: float | None  # its atime; None when not trusted
    last_used: float = 0.0

    @property
    def ref(self) -> str:
        return self.tag if self.tag is not None else self.digest

    @property
    def key(self) -> str:
        return f"{self.domain}/{self._repo_ref}"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self._repo_ref}"

    @property
    def path(self) -> str:
        """Its manifest's path under content/<domain>/ (as usage.py keys it)."""
        return f"v2/{self.repository}/manifests/{self.ref}"

    @property
    def _repo_ref(self) -> str:
        sep = ":" if self.tag is not None else "@"
        return f"{self.repository}{sep}{self.ref}"


@dataclass(frozen=True, slots=True)
class Usage:
    files: int = 0  # distinct inodes
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class DomainUsage:
    domain: str
    registry: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class DiskUsage:
    domains: tuple[DomainUsage, ...]
    total: Usage  # blobs/ and content/, each inode once
    unlinked: Usage  # blobs/ files no content/ name links to


@dataclass(frozen=True, slots=True)
class Removed:
    images: tuple[str, ...]  # keys
    blobs: tuple[str, ...]  # digests whose blobs/ file was removed
    files: int  # payloads, sidecars and blobs/ files unlinked
    bytes: int  # freed: the sizes of those blobs


@dataclass(frozen=True, slots=True)
class Failure:
    digest: str
    actual: str | None  # what the bytes hash to; None if unreadable
    quarantined: Path | None
    removed: tuple[str, ...]  # "<domain>/<path>" of the content/ names removed


@dataclass(frozen=True, slots=True)
class Verification:
    checked: int
    bytes: int
    failures: tuple[Failure, ...]


LastUsed = Callable[[Image], float]


def file_times(image: Image) -> float:
    """The default `last_used`: the newest time the tree can vouch for (see
    the module docstring)."""
    times = [image.stored_at, image.validated_at or 0.0, image.read_at or 0.0]
    return max(times)


# --- the tree, as read once ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobFile:
    digest: str
    path: Path
    inode: int
    size: int
    nlink: int
    atime: float
    mtime: float


@dataclass(frozen=True, slots=True)
class Link:
    """A payload name: content/<domain>/<path>, and its inode."""

    domain: str
    path: str
    inode: int
    size: int

    @property
    def where(self) -> tuple[str, str]:
        return self.domain, self.path


@dataclass(frozen=True, slots=True)
class Redirect:
    """A redirect/ record: <domain>/<path> answered <status> to target."""

    domain: str
    path: str
    target: tuple[str, str] | None  # (host, path) as content/ stores it


@dataclass(frozen=True, slots=True)
class Scan:
    blobs: Mapping[str, BlobFile]
    links: tuple[Link, ...]
    by_inode: Mapping[int, str] = field(default_factory=dict)  # blobs/ inode -> digest
    names: Mapping[int, tuple[Link, ...]] = field(default_factory=dict)  # inode -> links

    @classmethod
    def of(cls, root: Path) -> Scan:
        blobs = scan_blobs(root)
        links = tuple(scan_content(root))
        names: dict[int, list[Link]] = defaultdict(list)
        for link in links:
            names[link.inode].append(link)
        return cls(blobs, links, {b.inode: d for d, b in blobs.items()},
                   {inode: tuple(group) for inode, group in names.items()})


def entries(path: Path) -> list[os.DirEntry[str]]:
    """A directory's entries; none if it is missing (or went away)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def walk_files(top: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(path relative to top, entry) of every regular file below top."""
    stack = [(top, "")]
    while stack:
        directory, rel = stack.pop()
        for entry in entries(directory):
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), f"{rel}{entry.name}/"))
            elif entry.is_file(follow_symlinks=False):
                yield f"{rel}{entry.name}", entry


def lstat(entry: os.DirEntry[str]) -> os.stat_result | None:
    try:
        # A real stat, not d_ino: overlayfs may report other inode numbers there.
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None


def scan_blobs(root: Path) -> dict[str, BlobFile]:
    found = {}
    for algorithm in entries(root / "blobs"):
        for entry in entries(Path(algorithm.path)):
            digest = f"{algorithm.name}:{entry.name}"
            st = lstat(entry) if is_digest(digest) else None
            if st is not None and entry.is_file(follow_symlinks=False):
                found[digest] = BlobFile(digest, Path(entry.path), st.st_ino, st.st_size,
                                         st.st_nlink, st.st_atime, st.st_mtime)
    return found


def scan_content(root: Path) -> Iterator[Link]:
    for domain in entries(root / "content"):
        for rel, entry in walk_files(Path(domain.path)):
            st = lstat(entry)
            if st is not None:
                yield Link(domain.name, rel, st.st_ino, st.st_size)


def scan_redirects(root: Path) -> Iterator[Redirect]:
    for domain in entries(root / "redirect"):
        for rel, entry in walk_files(Path(domain.path)):
            try:
                text = Path(entry.path).read_text(errors="replace")
            except FileNotFoundError:
                continue
            yield Redirect(domain.name, rel, redirect_target(text))


def redirect_target(record: str) -> tuple[str, str] | None:
    """`<status> <url>` -> (host, path) as the fetcher links the target
    (host[:port] without a default port; path without its query)."""
    _, _, url = record.strip().partition(" ")
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    host = parts.hostname
    if parts.port and parts.port not in (80, 443):
        host = f"{host}:{parts.port}"
    try:
        return check_domain(host), check_path(parts.path or "/")
    except BadRequest:
        return None


# --- reading without disturbing access times ------------------------------------


class Reader:
    """Opens files with O_NOATIME when allowed, so that an inventory never
    looks like a pull. `atime_trusted` turns False the first time it is not
    allowed (files owned by someone else): our own reads then bump atimes."""

    __slots__ = ("atime_trusted",)

    def __init__(self) -> None:
        self.atime_trusted = True

    def open(self, path: Path) -> int:
        noatime = getattr(os, "O_NOATIME", 0)
        if noatime and self.atime_trusted:
            try:
                return os.open(path, os.O_RDONLY | noatime)
            except PermissionError:
                self.atime_trusted = False
        return os.open(path, os.O_RDONLY)

    def read(self, path: Path, limit: int) -> bytes | None:
        """The file's bytes, or None if it is missing or bigger than limit."""
        try:
            with os.fdopen(self.open(path), "rb") as f:
                data = f.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data if len(data) <= limit else None

    def hash(self, path: Path, algorithm: str) -> str | None:
        """`<alg>:<hex>` of the file, streamed; None if it is gone."""
        try:
            with os.fdopen(self.open(path), "rb") as f:
                return f"{algorithm}:{hashlib.file_digest(f, algorithm).hexdigest()}"
        except (FileNotFoundError, NotADirectoryError):
            return None


# --- images ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """One manifest and everything below it."""

    media_type: str
    platforms: tuple[str, ...]
    digests: frozenset[str]
    manifests: frozenset[str]


class Resolver:
    """Reads manifests from blobs/ once per digest, for one scan."""

    __slots__ = ("_done", "reader", "scan")

    def __init__(self, scan: Scan, reader: Reader) -> None:
        self.scan = scan
        self.reader = reader
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
        digests, manifests = {digest}, {digest}
        platforms = [str(p) for p in parsed.platforms]
        for entry in parsed.entries:
            below = self.resolve(entry.digest, None, depth + 1)
            digests |= below.digests
            manifests |= below.manifests
        if parsed.config:
            platforms += self._config_platform(parsed.config.digest)
        digests.update(blob.digest for blob in parsed.blobs)
        return Resolved(parsed.media_type, tuple(platforms), frozenset(digests),
                        frozenset(manifests))

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
        match = MANIFEST_PATH_RE.fullmatch(link.path)
        if not match or not is_name(match["name"]):
            continue  # CDN paths, oddities: not manifests of a repository
        repo, ref = repos[(link.domain, match["name"])], match["ref"]
        if is_digest(ref):
            repo.digests[ref] = link
        elif is_tag(ref):
            repo.tags[ref] = link
    return repos


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

    # --- ls ---------------------------------------------------------------------------

    def images(self) -> list[Image]:
        return self._images(Scan.of(self.root))

    def find(self, text: str) -> list[Image]:
        """The cached images a reference names, by Docker's rules: a tag, or
        a digest (the digest-only image, or every tag pointing at it)."""
        ref = parse_reference(text, self.default_registry)
        domain = resolve_domain(ref.registry, self.registry_hosts)
        found = [
            image for image in self.images()
            if (image.domain, image.repository) == (domain, ref.name)
            and (image.digest == ref.digest if ref.digest else image.tag == ref.tag)
        ]
        if not found:
            raise NotFound("MANIFEST_UNKNOWN", f"{text} is not in the cache")
        return found

    def blob_refs(self) -> dict[str, set[str]]:
        """Every digest in blobs/ -> keys of the images that use it (empty:
        nothing does)."""
        scan = Scan.of(self.root)
        refs: dict[str, set[str]] = {digest: set() for digest in scan.blobs}
        for image in self._images(scan):
            for digest in image.digests & refs.keys():
                refs[digest].add(image.key)
        return refs

    def _images(self, scan: Scan) -> list[Image]:
        reader = Reader()
        resolver = Resolver(scan, reader)
        found = []
        for (domain, name), repo in sorted(group_manifests(scan.links).items()):
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
            missing=resolved.digests - cached,
            size=sum(scan.blobs[d].size for d in cached),
            validated_at=self._validated_at(link) if tag is not None else None,
            stored_at=0.0,
            read_at=None,
        )

    def _timed(self, image: Image, scan: Scan, atime_trusted: bool) -> Image:
        blob = scan.blobs.get(image.digest)
        stored_at = blob.mtime if blob else 0.0
        read_at = blob.atime if blob and atime_trusted else None
        image = dataclasses.replace(image, stored_at=stored_at, read_at=read_at)
        return dataclasses.replace(image, last_used=self.last_used(image))

    def _link_digest(self, scan: Scan, link: Link) -> str:
        """What a manifest name holds: the blobs/ file it is a link to, else
        its digest sidecar, else the hash of its bytes."""
        if link.inode in scan.by_inode:
            return scan.by_inode[link.inode]
        claimed = self.store.read_sidecar("docker-content-digest", *link.where)
        if claimed and is_digest(claimed):
            return claimed
        body = Reader().read(self._content(link), MAX_MANIFEST) or b""  # an orphan name
        return digest_of(body)

    def _validated_at(self, link: Link) -> float | None:
        try:
            return self.store.tree.sidecar("docker-content-digest", *link.where).stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _content(self, link: Link) -> Path:
        return self.root / "content" / link.domain / link.path

    def _registry_of(self, domain: str) -> str:
        return self._shown.get(domain, domain)

    # --- du -----------------------------------------------------------------------------

    def usage(self) -> DiskUsage:
        scan = Scan.of(self.root)
        per_domain: dict[str, dict[int, int]] = defaultdict(dict)
        for link in scan.links:
            per_domain[link.domain][link.inode] = link.size
        everything = {b.inode: b.size for b in scan.blobs.values()}
        for sizes in per_domain.values():
            everything.update(sizes)
        linked = {link.inode for link in scan.links}
        unlinked = [b.size for b in scan.blobs.values() if b.inode not in linked]
        domains = tuple(
            DomainUsage(domain, self._registry_of(domain), _usage(sizes.values()))
            for domain, sizes in sorted(per_domain.items())
        )
        return DiskUsage(domains, _usage(everything.values()), _usage(unlinked))

    # --- rm -----------------------------------------------------------------------------

    def remove(self, *images: Image) -> Removed:
        """Remove images (by key, as listed now) and whatever only they used."""
        scan = Scan.of(self.root)
        current = self._images(scan)
        keys = {image.key for image in images}
        gone = [image for image in current if image.key in keys]
        remaining = [image for image in current if image.key not in keys]
        still_used = set().union(*(image.digests for image in remaining))
        files = 0
        for image in gone:
            files += self._remove_names(image, remaining)
        freed = sorted((set().union(*(i.digests for i in gone)) - still_used) & scan.blobs.keys())
        redirects = list(scan_redirects(self.root)) if freed else []
        freed_bytes = 0
        for digest in freed:
            removed, blob_gone = self._free(scan.blobs[digest], scan, redirects)
            files += removed + blob_gone
            freed_bytes += scan.blobs[digest].size if blob_gone else 0
        return Removed(tuple(i.key for i in gone), tuple(freed), files, freed_bytes)

    def _remove_names(self, image: Image, remaining: list[Image]) -> int:
        """The image's own names: its tag, then its repository's by-digest
        manifests that no other image of the repository uses."""
        kept = set().union(*(
            i.manifests for i in remaining if (i.domain, i.repository) == (image.domain,
                                                                           image.repository)
        ))
        paths = [image.path] if image.tag is not None else []
        paths += [f"v2/{image.repository}/manifests/{d}" for d in sorted(image.manifests - kept)]
        return sum(self._remove_path(image.domain, path) for path in paths)

    def _free(self, blob: BlobFile, scan: Scan, redirects: list[Redirect]) -> tuple[int, int]:
        """Every name of a blob, the records pointing at them, then the blob."""
        links = scan.names.get(blob.inode, ())
        targets = {link.where for link in links}
        suffix = f"/blobs/{blob.digest}"
        records = [r for r in redirects if r.target in targets or r.path.endswith(suffix)]
        removed = 0
        for link in chain_order(links, records):
            removed += self._remove_path(link.domain, link.path, link.inode)
        for record in records:
            removed += self.store.remove_sidecar("redirect", record.domain, record.path)
        return removed, int(self.store.remove_blob(blob.digest, blob.inode))

    def _remove_path(self, domain: str, path: str, inode: int | None = None) -> int:
        """Payload first, then its sidecars: the reverse of the commit order,
        so nginx never finds a payload without its headers."""
        removed = int(self.store.unlink_content(domain, path, inode))
        return removed + self.store.remove_sidecars(domain, path)

    # --- verify -------------------------------------------------------------------------

    def verify(self) -> list[Failure]:
        return list(self.verification().failures)

    def verification(self) -> Verification:
        """Hash every blobs/ file; quarantine those that fail."""
        scan = Scan.of(self.root)
        reader = Reader()
        failures, checked, size = [], 0, 0
        for digest, blob in sorted(scan.blobs.items()):
            actual = reader.hash(blob.path, digest.split(":", 1)[0])
            if actual is None:
                continue  # removed meanwhile (rm, an evictor): nothing to check
            checked, size = checked + 1, size + blob.size
            if actual != digest:
                failures.append(self._quarantine(blob, actual, scan))
        return Verification(checked, size, tuple(failures))

    def _quarantine(self, blob: BlobFile, actual: str, scan: Scan) -> Failure:
        # The blobs/ file goes first: while it is there the fetcher links it
        # to every new name asked for, which a scan made before would miss.
        quarantined = self.store.quarantine(blob.digest, blob.inode)
        removed = []
        for link in scan.names.get(blob.inode, ()):
            if self.store.unlink_content(link.domain, link.path, blob.inode):
                self.store.remove_sidecars(link.domain, link.path)
                removed.append(f"{link.domain}/{link.path}")
        return Failure(blob.digest, actual, quarantined, tuple(removed))


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


def chain_order(links: Iterable[Link], records: Iterable[Redirect]) -> list[Link]:
    """Links ordered so that a name that redirects goes before its target
    (nginx or a client following a stored redirect never lands on a name
    already gone while the record is still there)."""
    sources: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        if record.target is not None:
            sources[record.target].append((record.domain, record.path))

    def depth(where: tuple[str, str], seen: frozenset[tuple[str, str]]) -> int:
        before = [s for s in sources.get(where, []) if s not in seen]
        return 1 + max((depth(s, seen | {where}) for s in before), default=-1)

    return sorted(links, key=lambda link: (depth(link.where, frozenset()), link.where))


def _usage(sizes: Iterable[int]) -> Usage:
    sizes = list(sizes)
    return Usage(len(sizes), sum(sizes))


# --- output: JSON documents and tables -------------------------------------------


def images_document(images: Iterable[Image]) -> dict[str, Any]:
    return {"images": [
        {
            "key": i.key, "name": i.name, "registry": i.registry, "domain": i.domain,
            "repository": i.repository, "tag": i.tag, "digest": i.digest,
            "media_type": i.media_type, "platforms": list(i.platforms), "size": i.size,
            "blobs": sorted(i.digests), "missing": sorted(i.missing), "last_used": i.last_used,
        }
        for i in images
    ]}


def usage_document(usage: DiskUsage) -> dict[str, Any]:
    return {
        "domains": [{"domain": d.domain, "registry": d.registry, **_counts(d.usage)}
                    for d in usage.domains],
        "total": _counts(usage.total),
        "unlinked": _counts(usage.unlinked),
    }


def removed_document(removed: Removed) -> dict[str, Any]:
    return {"images": list(removed.images), "blobs": list(removed.blobs),
            "files": removed.files, "bytes": removed.bytes}


def verification_document(result: Verification) -> dict[str, Any]:
    return {"checked": result.checked, "bytes": result.bytes, "failures": [
        {"digest": f.digest, "actual": f.actual,
         "quarantined": str(f.quarantined) if f.quarantined else None,
         "removed": list(f.removed)}
        for f in result.failures
    ]}


def _counts(usage: Usage) -> dict[str, int]:
    return {"files": usage.files, "bytes": usage.bytes}


def images_table(images: Iterable[Image]) -> str:
    rows = [
        (i.name, short(i.digest), ",".join(i.platforms) or "-", human_size(i.size),
         when(i.last_used))
        for i in images
    ]
    return table(("IMAGE", "DIGEST", "PLATFORMS", "SIZE", "LAST USED"), rows, right={3})


def usage_table(usage: DiskUsage) -> str:
    rows = [(d.registry, d.domain, str(d.usage.files), human_size(d.usage.bytes))
            for d in usage.domains]
    rows.append(("unlinked", "blobs/", str(usage.unlinked.files), human_size(usage.unlinked.bytes)))
    rows.append(("total", "(each blob once)", str(usage.total.files),
                 human_size(usage.total.bytes)))
    return table(("REGISTRY", "DOMAIN", "FILES", "SIZE"), rows, right={2, 3})


def removed_text(removed: Removed) -> str:
    lines = [f"removed {key}" for key in removed.images]
    lines.append(f"freed {len(removed.blobs)} blobs, {human_size(removed.bytes)} "
                 f"({removed.files} files unlinked)")
    return "\n".join(lines)


def verification_text(result: Verification) -> str:
    lines = [
        f"CORRUPT {f.digest}: content is {f.actual}; moved to {f.quarantined}, "
        f"{len(f.removed)} names removed"
        for f in result.failures
    ]
    lines.append(f"checked {result.checked} blobs ({human_size(result.bytes)}): "
                 f"{len(result.failures) or 'none'} corrupt")
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> str:
    """Columns padded to their widest cell; `right` columns aligned right."""
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if c in right else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def short(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when(timestamp: float) -> str:
    if timestamp <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def output(document: dict[str, Any], text: str, as_json: bool) -> str:
    """What a command prints: the JSON document (--json) or the text."""
    return json.dumps(document, indent=2) if as_json else text
