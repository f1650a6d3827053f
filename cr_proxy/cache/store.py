"""The only code that writes the cache tree (drawn in layout.py).

Policy: content addressed by a digest is immutable and local-first; it
enters the tree only verified. A download goes to `temp/`, is hashed as it
is written, and on success is fsynced and renamed into the digest store
`blobs/<alg>/<hex>`; the paths clients ask for are hard links to it, so a
layer shared by many repositories or registries is on disk once. Headers
(sidecars) are written before the payload link, so whenever nginx finds a
payload its headers are already there. Every write is a rename of a
finished file: a crash leaves at most garbage in `temp/`, which start-up
clears.

All methods block; async callers run them in an executor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cr_proxy.cache.layout import (
    LISTING_FILE_RE,
    LISTING_KINDS,
    LISTS,
    SIDECARS,
    TOP_DIRS,
    Kind,
    RegistryPath,
    Sidecar,
    Tree,
    digest_url_path,
    key_of,
)
from cr_proxy.cache.scan import (
    entries,
    lstat,
    named_blobs,
    private_repositories,
    walk_blobs,
    walk_files,
    walk_names,
    walk_private_marks,
)
from cr_proxy.errors import BadRequest, DigestMismatch, ManifestInvalid, Truncated, UpstreamError
from cr_proxy.oci.manifest import MANIFEST_MEDIA_TYPES
from cr_proxy.oci.reference import check_digest, digest_of, hasher, is_digest

log = logging.getLogger("cr_proxy.store")


class TooManyLinks(OSError):
    """The stored file has as many names as the filesystem allows (EMLINK:
    65,000 on ext4)."""


# Names the tree cannot hold: two valid names whose paths collide (tag <t>
# of repository R is a file where repository R/manifests/<t> needs a
# directory), or one name too many for the stored file. The content is
# still served, from the digest store, just not under that name.
SHAPE_CONFLICTS = (NotADirectoryError, IsADirectoryError, FileExistsError, TooManyLinks)
LINK_PREFIX = "link."  # temp/ names of links and small files about to be renamed
# nginx and the fetcher replay sidecars as header values: a CR or LF in one
# would end the header and start another (Set-Cookie, a second body...).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Redirected:
    """How the upstream redirected a blob download: the first hop's status,
    and the last hop's URL (as a client would follow it) with its host and
    URL path (no query), which served the bytes."""

    status: int
    location: str
    host: str
    path: str


@dataclass(frozen=True, slots=True)
class StoredManifest:
    body: bytes
    content_type: str
    digest: str
    validated_at: float  # when the upstream last confirmed it (tags)


IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev takes (1024 on Linux)
# The placeholder name of an upload's bytes until the client names them.
UNNAMED_UPLOAD = "sha256:" + "0" * 64


class BlobWriter:
    """A temp file that hashes what is written to it."""

    __slots__ = ("_fd", "_hash", "digest", "path", "size")

    def __init__(self, temp_dir: Path, digest: str) -> None:
        self.digest = check_digest(digest)
        self._hash = hasher(digest)
        self.path = temp_dir / f"{digest.replace(':', '-')}.{uuid.uuid4().hex}"
        # Not for other local users; nginx's workers read it through the
        # cache's group (privsep.py).
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.size = 0

    def __repr__(self) -> str:
        return f"<BlobWriter {self.digest[:19]} {self.size} bytes open={self._fd >= 0}>"

    def name(self, digest: str) -> None:
        """Name a pushed blob's bytes (Store.upload_writer) once the client
        says what they are, at the upload's end; verify() then checks them."""
        algorithm = check_digest(digest).split(":", 1)[0]
        if algorithm != self._hash.name:
            raise DigestMismatch(message=f"{digest[:80]}: uploads are hashed as {self._hash.name}")
        self.digest = digest

    def write(self, data: bytes | memoryview) -> None:
        self.write_all([data])

    def write_all(self, chunks: Sequence[bytes | memoryview]) -> None:
        """The chunks in turn, to the file and the hash."""
        self._put(chunks)
        for chunk in chunks:
            self._hash.update(chunk)
            self.size += len(chunk)

    def _put(self, chunks: Sequence[bytes | memoryview]) -> None:
        """The chunks to the file, in as few writev calls as the system
        takes: a batch of a body's pieces is never copied into one buffer
        first. (direct.py writes them otherwise.)"""
        views = [memoryview(chunk) for chunk in chunks if chunk]
        first = 0
        while first < len(views):
            written = os.writev(self._fd, views[first:first + IOV_MAX])
            while first < len(views) and written >= len(views[first]):
                written -= len(views[first])
                first += 1
            if written:  # a short write: the rest of that chunk next
                views[first] = views[first][written:]

    def verify(self, expected_size: int | None) -> None:
        """Raise unless the bytes written are the whole, right content."""
        if expected_size is not None and self.size != expected_size:
            raise Truncated(message=f"{self.digest}: got {self.size} of {expected_size} bytes")
        actual = f"{self.digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(message=f"expected {self.digest}, upstream sent {actual}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def sync_and_close(self) -> None:
        os.fsync(self._fd)
        self.close()

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Store:
    __slots__ = ("tree",)

    def __init__(self, root: Path) -> None:
        self.tree = Tree(root)

    def __repr__(self) -> str:
        return f"Store({str(self.tree.root)!r})"

    @property
    def root(self) -> Path:
        return self.tree.root

    def prepare(self, clean_temp: bool = True) -> None:
        """Create the top directories; drop leftovers of interrupted downloads."""
        for name in TOP_DIRS:
            self.tree.top(name).mkdir(parents=True, exist_ok=True)
        if clean_temp:
            for scratch in (self.tree.temp, self.tree.held):
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(exist_ok=True)

    # --- reading -------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return self.tree.blob(digest).is_file()

    def has_public_blob(self, digest: str) -> bool:
        """Whether the digest store holds the digest, stored for no private
        repository: a copy that may be served, or named, under a name it
        was not stored for. A private repository's blob is that only to
        its own name (and to a name whose upstream sends its bytes anew)."""
        return self.has_blob(digest) and not self.is_private_blob(digest)

    def is_private_blob(self, digest: str) -> bool:
        """Whether the digest was stored for a private repository (its mark,
        private/<alg>/<hex>; whole or empty, it marks)."""
        return self.tree.private_blob(digest).is_file()

    def has_content(self, domain: str, path: str) -> bool:
        return self.tree.content(domain, path).is_file()

    def linked(self, digest: str, domain: str, path: str) -> Path | None:
        """content/<domain>/<path> when it is already a name of the stored
        digest (made once its upstream confirmed it), else None."""
        name = self.tree.content(domain, path)
        try:
            return name if os.path.samefile(self.tree.blob(digest), name) else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_sidecar(self, kind: Sidecar | str, domain: str, path: str,
                     whole: bool = False) -> str | None:
        """A stored header value, or None. whole: None too for a record that
        does not end in the newline write_sidecar ends every one with: after
        a power loss, a file renamed into place may have none of its bytes
        (its data was never flushed), and an empty value can mean something
        (Challenges: "no login")."""
        try:
            raw = self.tree.sidecar(kind, domain, path).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if whole and not raw.endswith("\n") else raw.strip()

    def read_manifest(self, domain: str, path: str) -> StoredManifest | None:
        """A cached manifest with its headers, or None."""
        digest_file = self.tree.sidecar(Sidecar.DOCKER_CONTENT_DIGEST, domain, path)
        try:
            body = self.tree.content(domain, path).read_bytes()
            validated_at = digest_file.stat().st_mtime
            recorded = digest_file.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        content_type = self.read_sidecar(Sidecar.CONTENT_TYPE, domain, path) or ""
        if content_type not in MANIFEST_MEDIA_TYPES or not is_digest(recorded):
            # Written by an older cr-proxy that stored the wire's values (or
            # by hand): never replayed; the caller fetches it again.
            log.warning("not serving %s/%s: unsafe stored headers", domain, path)
            return None
        # The digest of the body we read, not the sidecar's: a tag updated
        # between the two reads must not pair one body with another digest.
        digest = digest_of(body, recorded.split(":", 1)[0])
        return StoredManifest(body, content_type, digest, validated_at)

    def read_listing(
        self, domain: str, name: str, kind: Kind, query: str
    ) -> tuple[bytes, float] | None:
        """A stored listing (Tree.listing) and when it was fetched, or None."""
        path = self.tree.listing(domain, name, kind, query)
        try:
            with path.open("rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listing_queries(self, domain: str, name: str, kind: Kind) -> list[str]:
        """The queries (file names) of a repository's stored listings of
        one kind, in no order; temp files and strays left out."""
        try:
            names = os.listdir(self.tree.listings(domain, name, kind))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if LISTING_FILE_RE.fullmatch(n)]

    def blob_bytes(self) -> int:
        """Bytes in the digest store (each blob once, whatever its names)."""
        sizes = (lstat(entry) for _, entry in walk_blobs(self.tree))
        return sum(st.st_size for st in sizes if st is not None)

    def temp_bytes(self) -> int:
        """Bytes written so far by the downloads in progress in temp/ (the
        short-lived link.* names there are links to stored files: left out)."""
        sizes = (lstat(e) for e in entries(self.tree.temp) if not e.name.startswith(LINK_PREFIX))
        return sum(st.st_size for st in sizes if st is not None)

    def hold(self, path: Path) -> str:
        """A second name in held/ for a verified file (a download's, or a
        stored blob's), which nginx or the fetcher sends while the first
        may go: a download's commit renames it, an eviction removes a
        stored one (fetch/flight.py, fetch/blobs.py); returns it. The
        caller removes it (drop_held) once it has had time to be opened;
        start-up empties held/. Raises FileNotFoundError if `path` is gone."""
        held = uuid.uuid4().hex
        os.link(path, self.tree.held / held)
        return held

    def drop_held(self, held: str) -> None:
        """Remove a held name (BlobWriter.hold); nginx keeps what it opened."""
        (self.tree.held / held).unlink(missing_ok=True)

    def cached_tags(self) -> list[tuple[str, str, str]]:
        """(domain, repository, tag) of every tag manifest in content/."""
        found = []
        for domain, path, _ in walk_names(self.tree):
            try:
                key = key_of(domain, path)
            except BadRequest:
                continue  # a name the fetcher never makes (made by hand)
            if key.kind is Kind.MANIFEST and not key.by_digest:
                found.append((key.domain, key.repository, key.reference))
        return sorted(found)

    def load_uses(self) -> dict[tuple[str, str], float]:
        """Last-use times saved by a previous serve (usage.json)."""
        try:
            saved = json.loads(self.tree.uses_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {tuple(k.split(" ", 1)): float(v) for k, v in saved.items() if " " in k}

    # --- writing -------------------------------------------------------------

    def save_uses(self, uses: dict[tuple[str, str], float]) -> None:
        data = json.dumps({f"{d} {p}": t for (d, p), t in uses.items()})
        self._replace_with(self.tree.uses_file, lambda tmp: write_synced(tmp, data.encode()))

    def save_pins(self, keys: Iterable[str]) -> None:
        data = json.dumps({"pins": sorted(keys)}, indent=1) + "\n"
        self._replace_with(self.tree.pins_file, lambda tmp: write_synced(tmp, data.encode()))

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self.tree.temp, digest)

    def upload_writer(self) -> BlobWriter:
        """A writer for a pushed blob, whose digest comes at the upload's end
        (BlobWriter.name): sha256, the one every client pushes with. Its
        whole MiBs go around the page cache (direct.py)."""
        from cr_proxy.cache.direct import DirectWriter  # direct.py builds on BlobWriter
        return DirectWriter(self.tree.temp, UNNAMED_UPLOAD)

    def commit(self, writer: BlobWriter, expected_size: int | None,
               private: bool = False) -> Path:
        """Verify, then move into the digest store (a no-op if it is there);
        `private` as for commit_verified."""
        try:
            writer.verify(expected_size)
        except BaseException:
            writer.abort()
            raise
        return self.commit_verified(writer, private)

    def commit_verified(self, writer: BlobWriter, private: bool = False) -> Path:
        """fsync and move a verified writer's file into the digest store;
        `private`: its digest marked so first (a crash leaves at worst a
        mark with no blob, dropped at the next start), and again after, in
        case a hand or an older cr-proxy took the first (removals keep
        marks: remove_blob)."""
        try:
            writer.sync_and_close()
            target = self.tree.blob(writer.digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            if private:
                self.mark_private_blob(writer.digest)
            if target.exists():
                writer.abort()
            else:
                os.replace(writer.path, target)
            if private:
                self.mark_private_blob(writer.digest)
            return target
        except BaseException:
            writer.abort()
            raise

    def put_bytes(self, data: bytes, digest: str, private: bool = False) -> Path:
        """Store small verified content (manifests) in the digest store;
        `private` as for commit_verified."""
        writer = self.blob_writer(digest)
        writer.write(data)
        return self.commit(writer, len(data), private)

    def link_if_stored(self, digest: str, domain: str, path: str) -> Path | None:
        """link() when the digest store has the blob, and the file to serve;
        None when it has not (or an eviction removed it a moment ago). A name
        the tree cannot hold (a file where a directory must be, or a blob
        at the filesystem's link limit) is served from the digest store
        itself. Call it only for a name its upstream confirmed. A private
        repository's blob is never named so (None): an upstream's word is
        no proof it holds those bytes (a registry any client names says
        yes to anything); only a commit of the bytes it sends names it."""
        if self.is_private_blob(digest):
            return None
        try:
            self.link(digest, domain, path)
        except FileNotFoundError:
            return None
        except SHAPE_CONFLICTS:
            blob = self.tree.blob(digest)
            return blob if blob.is_file() else None
        return self.tree.content(domain, path)

    def link_quietly(self, digest: str, domain: str, path: str) -> None:
        """link(), but a name the tree cannot hold is skipped: the content is
        stored and still served, just not under that name. So is the name of
        a blob the evictor took between its commit and its naming (a blob no
        image uses yet is a candidate): its clients have their bytes."""
        try:
            self.link(digest, domain, path)
        except SHAPE_CONFLICTS as err:
            log.warning("cannot cache %s/%s: %s", domain, path, err)
        except FileNotFoundError:
            log.info("%s evicted before it was named %s/%s", digest, domain, path)

    def link(self, digest: str, domain: str, path: str) -> None:
        """Point content/<domain>/<path> at the stored digest (atomically)."""
        target = self.tree.content(domain, path)
        source = self.tree.blob(digest)
        if target.exists() and os.path.samefile(source, target):
            return
        self._replace_with(target, lambda tmp: hard_link(source, tmp))

    def write_sidecar(self, kind: str, domain: str, path: str, value: str) -> None:
        """Store a header value; the last wall against header injection (the
        callers check values by their own grammar first)."""
        if CONTROL_RE.search(value):
            raise UpstreamError(message=f"refusing to store a {kind} header with control "
                                f"characters: {value[:80]!r}")
        target = self.tree.sidecar(kind, domain, path)
        self._replace_with(target, lambda tmp: tmp.write_text(value + "\n"))

    def touch_validated(self, domain: str, path: str) -> None:
        """Record that the upstream confirmed this tag just now."""
        os.utime(self.tree.sidecar(Sidecar.DOCKER_CONTENT_DIGEST, domain, path))

    def record_manifest(
        self, domain: str, path: str, digest: str, content_type: str, validated_at: float | None
    ) -> None:
        """Headers first, payload last: nginx serves content/ only when its
        sidecars are already in place. Both values are from closed grammars
        (cr.js checks them again on every hit)."""
        if content_type not in MANIFEST_MEDIA_TYPES:
            raise ManifestInvalid(message=f"not a manifest type: {content_type[:80]!r}")
        check_digest(digest)
        if self.read_sidecar(Sidecar.DOCKER_CONTENT_DIGEST, domain, path) not in (None, digest):
            # A tag moving to another digest: its old body goes first, so no
            # hit (nor a crash before the link) pairs it with the new headers.
            unlink_if(self.tree.content(domain, path))
        self.write_sidecar(Sidecar.CONTENT_TYPE, domain, path, content_type)
        self.write_sidecar(Sidecar.DOCKER_CONTENT_DIGEST, domain, path, digest)
        if validated_at is not None:
            validated = self.tree.sidecar(Sidecar.DOCKER_CONTENT_DIGEST, domain, path)
            os.utime(validated, (validated_at,) * 2)
        self.link(digest, domain, path)

    def write_listing(
        self, domain: str, name: str, kind: Kind, query: str, body: bytes, fetched_at: float
    ) -> None:
        """Replace a listing (the caller checked its body) with a fresh one;
        its mtime says when it was fetched (tag_ttl counts from there)."""
        def make(tmp: Path) -> None:
            tmp.write_bytes(body)
            os.utime(tmp, (fetched_at,) * 2)

        self._replace_with(self.tree.listing(domain, name, kind, query), make)

    def is_private(self, domain: str, name: str) -> bool:
        return self.private_since(domain, name) is not None

    def private_since(self, domain: str, name: str) -> float | None:
        """When the repository was marked private (its marker's mtime), or
        None if it is not."""
        try:
            marker = self.tree.private_marker(domain, name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return marker.st_mtime if stat.S_ISREG(marker.st_mode) else None

    def mark_private(self, domain: str, name: str, private: bool) -> None:
        """Mark a repository private (its marker made whole by a rename,
        before any of its content is named), and the blobs named under it
        already, or public again (its blobs' marks stay: one may have been
        pulled while it was private)."""
        marker = self.tree.private_marker(domain, name)
        if private:
            if not marker.is_file():
                self._replace_with(marker, lambda tmp: tmp.write_text("private\n"))
            self._mark_named_blobs(domain, name)
        else:
            marker.unlink(missing_ok=True)

    def mark_private_blob(self, digest: str) -> None:
        """Mark a digest as stored for a private repository."""
        marker = self.tree.private_blob(digest)
        if not marker.is_file():
            self._replace_with(marker, lambda tmp: tmp.write_text("private\n"))

    def mark_private_blobs(self) -> int:
        """At start-up, before any commit can run: drop the marks of blobs
        no longer stored (removals keep them: a removal racing a commit of
        the digest, then a crash, must never leave the blob stored with no
        mark), and mark every blob named under a private repository (a
        cache from before these marks had none). The count of
        repositories."""
        for digest, entry in walk_private_marks(self.tree):
            if not self.has_blob(digest):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        repositories = list(private_repositories(self.tree))
        for domain, name in repositories:
            self._mark_named_blobs(domain, name)
        return len(repositories)

    def _mark_named_blobs(self, domain: str, name: str) -> None:
        for digest in named_blobs(self.tree, domain, name):
            if self.has_blob(digest):
                self.mark_private_blob(digest)

    def _is_private_blob_path(self, domain: str, path: str) -> bool:
        """Whether `path` names a blob of a repository marked private."""
        try:
            key = key_of(domain, path)
        except BadRequest:
            return False
        return key.kind is Kind.BLOB and self.is_private(key.domain, key.repository)

    def record_redirect(self, domain: str, path: str, status: int, location: str) -> None:
        self.write_sidecar(Sidecar.REDIRECT, domain, path, f"{status} {location}")

    def _replace_with(self, target: Path, make) -> None:
        tmp = self.tree.temp / f"{LINK_PREFIX}{uuid.uuid4().hex}"
        target.parent.mkdir(parents=True, exist_ok=True)
        make(tmp)
        try:
            os.replace(tmp, target)
        finally:
            # rename(2) onto another link of the same inode succeeds and does
            # nothing (two racing links of one blob): tmp is then still there.
            tmp.unlink(missing_ok=True)

    # --- the fetcher's commits: one call per kind ------------------------------
    # Each puts one verified download in the tree with every name it earns,
    # in the commit order (validate, move, link, sidecars): the fetcher makes
    # no other write for it.

    def commit_blob(
        self,
        writer: BlobWriter,
        domain: str,
        path: str,
        redirected: Redirected | None = None,
        challenge: str | None = None,
        named: bool = True,
    ) -> Path:
        """Move a verified blob into the digest store (fsync first), marked
        when its repository is private, then name it: the redirect target
        that served it (when its URL names the digest), the registry path's
        redirect record, the requested path, and the challenge that
        protects it. A name the tree cannot hold is skipped (the blob is
        still served). `named` false: the bytes only (a peer's or parent's
        UNNAMED answer: the name waits for its upstream's yes), and no
        mark: a node answers UNNAMED only for a digest it holds for no
        private repository, and a mark here would keep these bytes from
        the very name they were fetched for. Returns the stored file."""
        if not named:
            return self.commit_verified(writer)
        private = self._is_private_blob_path(domain, path)
        committed = self.commit_verified(writer, private)
        digest = writer.digest
        if redirected is not None:
            self._name_redirect_target(digest, domain, path, redirected)
        self.link_quietly(digest, domain, path)
        if challenge:
            try:
                self.write_sidecar(Sidecar.WWW_AUTHENTICATE, domain, path, challenge)
            except SHAPE_CONFLICTS as err:  # as its name: skipped, the blob stored
                log.warning("cannot keep the challenge of %s/%s: %s", domain, path, err)
        return committed

    def _name_redirect_target(
        self, digest: str, domain: str, path: str, redirected: Redirected
    ) -> None:
        """Only the last hop served the bytes, so only it may be named, under
        the host that served them, and only when its URL path names the
        digest (layout.digest_url_path): then no other URL of that host can
        be answered with them. The hops before it (anyone's open redirect)
        are never stored. The registry path's redirect record, pointing at
        that target, is written once the target is in place."""
        stored_path = digest_url_path(redirected.path, digest)
        if stored_path is None:
            return
        self.link_quietly(digest, redirected.host, stored_path)
        self.record_redirect(domain, path, redirected.status, redirected.location)

    def commit_manifest(
        self,
        domain: str,
        rpath: RegistryPath,
        body: bytes,
        digest: str,
        content_type: str,
        validated_at: float,
        challenge: str | None = None,
    ) -> None:
        """Store a verified manifest body and name it: by digest always, by
        its tag too when `rpath` names one (validated at `validated_at`),
        then the challenge that protects the path asked for. Raises a
        SHAPE_CONFLICTS error when the tree cannot hold a name."""
        by_digest = RegistryPath(Kind.MANIFEST, rpath.name, digest).path
        # A private repository's manifest is a private digest too: asked
        # as a blob under another name, it must not be served (bug 39).
        private = self.is_private(domain, rpath.name)
        for attempt in range(2):
            self.put_bytes(body, digest, private)
            try:
                self.record_manifest(domain, by_digest, digest, content_type, None)
                if not rpath.by_digest:
                    self.record_manifest(domain, rpath.path, digest, content_type, validated_at)
                break
            except FileNotFoundError:
                # Evicted between its store and its name (no image used it
                # yet): stored again, from the bytes in hand.
                if attempt:
                    raise
        if challenge:
            self.write_sidecar(Sidecar.WWW_AUTHENTICATE, domain, rpath.path, challenge)

    # --- removing (inventory.py: rm, verify) -----------------------------------
    # Only unlinks and renames, so nginx and the fetcher see a name whole or
    # not at all. Directories stay: the fetcher makes a parent and then
    # renames into it, and an rmdir between the two would fail its commit.
    # An `inode` argument is the one the caller saw: a name made again since
    # (a new download of that path) is left alone.

    def unlink_content(self, domain: str, path: str, inode: int | None = None) -> bool:
        """Remove the payload content/<domain>/<path>; True if it was there."""
        return unlink_if(self.tree.content(domain, path), inode)

    def remove_sidecar(self, kind: Sidecar | str, domain: str, path: str) -> bool:
        return unlink_if(self.tree.sidecar(kind, domain, path))

    def remove_sidecars(self, domain: str, path: str) -> int:
        """Remove the sidecars of a path whose payload is gone (call after
        unlink_content: the reverse of the commit order). A payload back in
        place means a concurrent commit has just rewritten them: they stay."""
        if self.tree.content(domain, path).exists():
            return 0
        return sum(self.remove_sidecar(kind, domain, path) for kind in SIDECARS)

    def remove_listings(self, domain: str, name: str) -> int:
        """Remove a repository's stored listings (tag list pages, referrers
        answers: lists/<domain>/<name>/_<kind>/*), the files only; those of
        a repository below it (<name>/<more>) stay. The count removed."""
        removed = 0
        for kind in LISTING_KINDS:
            folder = self.tree.listings(domain, name, kind)
            removed += sum(unlink_if(folder / entry.name) for entry in entries(folder)
                           if entry.is_file(follow_symlinks=False))
        return removed

    def listing_bytes(self) -> dict[str, tuple[int, int]]:
        """Per domain, the (files, bytes) of its stored listings (lists/)."""
        out: dict[str, tuple[int, int]] = {}
        top = self.tree.top(LISTS)
        for domain in entries(top):
            sizes = [st.st_size for _, entry in walk_files(top / domain.name)
                     if (st := lstat(entry)) is not None]
            out[domain.name] = (len(sizes), sum(sizes))
        return out

    def names_left(self, digest: str, inode: int) -> bool:
        """Whether blobs/<alg>/<hex> (still `inode`) has a content/ name:
        a link besides itself and its held/ names (answers being sent)."""
        try:
            st = os.lstat(self.tree.blob(digest))
        except FileNotFoundError:
            return False
        if st.st_ino != inode or st.st_nlink <= 1:
            return False
        held = sum(1 for entry in entries(self.tree.held)
                   if entry.inode() == inode)
        return st.st_nlink > 1 + held

    def remove_blob(self, digest: str, inode: int | None = None) -> bool:
        """Remove blobs/<alg>/<hex>; call once no content/ name needs it.
        Its private mark stays until the next start (mark_private_blobs):
        a commit of the digest may be racing this one."""
        return unlink_if(self.tree.blob(digest), inode)

    def quarantine(self, digest: str, inode: int | None = None) -> Path | None:
        """Move blobs/<alg>/<hex> to quarantine/<alg>-<hex>: the fetcher no
        longer finds (and links) it, and it is kept for a post-mortem. None
        if it was gone, or is another file than `inode` by now."""
        source = self.tree.blob(digest)
        if inode is not None and not same_inode(source, inode):
            return None
        target = self.tree.quarantined(digest)
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return None
        return target


def write_synced(path: Path, data: bytes) -> None:
    """A new file with `data`, flushed to the disk: for a file that is
    renamed into place and that nothing could rebuild were a power loss to
    leave it empty (ext4 flushes a rename over an existing file, not one
    that makes a new name). Sidecars need none: the start-up scrub drops an
    empty one and the fetcher writes it again."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def hard_link(source: Path, name: Path) -> None:
    try:
        os.link(source, name)
    except OSError as err:
        if err.errno == errno.EMLINK:
            raise TooManyLinks(err.errno, f"{source.name}: {err.strerror}") from err
        raise


def same_inode(path: Path, inode: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == inode
    except (FileNotFoundError, NotADirectoryError):
        return False


def unlink_if(path: Path, inode: int | None = None) -> bool:
    """Unlink a file (only if it is still `inode`, when given)."""
    if inode is not None and not same_inode(path, inode):
        return False
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True
