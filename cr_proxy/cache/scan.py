"""The cache tree, read: the walkers over content/, blobs/ and the sidecar
trees, and a reader that leaves access times alone. The only code that
lists the tree's directories (layout.py names them, store.py writes them).

Policy: a walk is a snapshot taken with os.scandir while `serve` may be
writing: a name that goes away between its listing and its stat is left out,
never an error. Only regular files count (no symlinks followed), and
inode numbers come from a real stat, not d_ino (overlayfs may report other
numbers there).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cr_proxy.cache.layout import (
    BLOBS,
    CONTENT,
    LISTS,
    PRIVATE_BLOBS,
    PRIVATE_MARK,
    Kind,
    Sidecar,
    Tree,
    blob_digest,
    check_domain,
    check_path,
)
from cr_proxy.errors import BadRequest
from cr_proxy.net.address import split_url
from cr_proxy.oci.reference import is_digest, is_name


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
    """The digest store and every payload name, as read once."""

    blobs: Mapping[str, BlobFile]
    links: tuple[Link, ...]
    by_inode: Mapping[int, str] = field(default_factory=dict)  # blobs/ inode -> digest
    names: Mapping[int, tuple[Link, ...]] = field(default_factory=dict)  # inode -> links

    @classmethod
    def of(cls, tree: Tree) -> Scan:
        blobs = scan_blobs(tree)
        links = tuple(scan_content(tree))
        names: dict[int, list[Link]] = defaultdict(list)
        for link in links:
            names[link.inode].append(link)
        return cls(blobs, links, {b.inode: d for d, b in blobs.items()},
                   {inode: tuple(group) for inode, group in names.items()})


# --- walkers ----------------------------------------------------------------------


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


def walk_names(tree: Tree, top: str = CONTENT) -> Iterator[tuple[str, str, os.DirEntry[str]]]:
    """(domain, path, entry) of every file under content/ (or a sidecar
    tree): the inverse of Tree.content / Tree.sidecar, for any stored name."""
    for domain in entries(tree.top(top)):
        for rel, entry in walk_files(Path(domain.path)):
            yield domain.name, rel, entry


def walk_blobs(tree: Tree) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(digest, entry) of every regular file in the digest store whose name
    is a digest (blobs/<alg>/<hex>)."""
    for algorithm in entries(tree.top(BLOBS)):
        for entry in entries(Path(algorithm.path)):
            digest = blob_digest(algorithm.name, entry.name)
            if digest is not None and entry.is_file(follow_symlinks=False):
                yield digest, entry


def walk_private_marks(tree: Tree) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(digest, entry) of every private mark (private/<alg>/<hex>; made
    when first needed, so not one of TOP_DIRS)."""
    for algorithm in entries(tree.root / PRIVATE_BLOBS):
        for entry in entries(Path(algorithm.path)):
            digest = blob_digest(algorithm.name, entry.name)
            if digest is not None:
                yield digest, entry


def private_repositories(tree: Tree) -> Iterator[tuple[str, str]]:
    """(domain, name) of every repository marked private
    (lists/<domain>/<name>/_private); names the fetcher never makes are
    left out (made by hand)."""
    for domain, rel, _ in walk_names(tree, LISTS):
        name, _, mark = rel.rpartition("/")
        if mark == PRIVATE_MARK and is_name(name) and is_canonical_domain(domain):
            yield domain, name


def is_canonical_domain(name: str) -> bool:
    try:
        return check_domain(name) == name
    except BadRequest:
        return False


def named_blobs(tree: Tree, domain: str, name: str) -> Iterator[str]:
    """Digests named under a repository in the digest store:
    content/<domain>/v2/<name>/blobs/<digest>, and its manifests by digest
    (manifests/<digest>: a manifest is a stored digest too)."""
    for kind in (Kind.BLOB, Kind.MANIFEST):
        for entry in entries(tree.content(domain, f"v2/{name}/{kind.value}")):
            if is_digest(entry.name) and entry.is_file(follow_symlinks=False):
                yield entry.name


def lstat(entry: os.DirEntry[str]) -> os.stat_result | None:
    try:
        # A real stat, not d_ino: overlayfs may report other inode numbers there.
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None


def scan_blobs(tree: Tree) -> dict[str, BlobFile]:
    found = {}
    for digest, entry in walk_blobs(tree):
        st = lstat(entry)
        if st is not None:
            found[digest] = BlobFile(digest, Path(entry.path), st.st_ino, st.st_size,
                                     st.st_nlink, st.st_atime, st.st_mtime)
    return found


def scan_content(tree: Tree) -> Iterator[Link]:
    for domain, path, entry in walk_names(tree):
        st = lstat(entry)
        if st is not None:
            yield Link(domain, path, st.st_ino, st.st_size)


def scan_redirects(tree: Tree) -> Iterator[Redirect]:
    for domain, path, entry in walk_names(tree, Sidecar.REDIRECT):
        try:
            text = Path(entry.path).read_text(errors="replace")
        except FileNotFoundError:
            continue
        yield Redirect(domain, path, redirect_target(text))


def redirect_target(record: str) -> tuple[str, str] | None:
    """`<status> <url>` -> (host, path) as the fetcher links the target
    (host[:port] without a default port; path without its query)."""
    try:
        _, host, target = split_url(record.strip().partition(" ")[2])
        return check_domain(host), check_path(target.partition("?")[0])
    except (BadRequest, ValueError):  # not a URL the fetcher wrote
        return None


# --- reading without disturbing access times ------------------------------------


class Reader:
    """Opens files with O_NOATIME when allowed, so that an inventory never
    looks like a pull. `atime_trusted` turns False the first time it is not
    allowed (files owned by someone else): our own reads then bump atimes."""

    __slots__ = ("atime_trusted",)

    def __init__(self) -> None:
        self.atime_trusted = True

    def __repr__(self) -> str:
        return f"<Reader atime_trusted={self.atime_trusted}>"

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
