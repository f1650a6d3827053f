"""cr_proxy.store: verified writes, one inode per digest, headers before payloads."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.cache.layout import SIDECARS
from cr_proxy.cache.store import TOP_DIRS, BlobWriter, Store, StoredManifest, TooManyLinks
from cr_proxy.errors import BadRequest, DigestMismatch, ManifestInvalid, Truncated, UpstreamError
from cr_proxy.oci.reference import digest_of

DATA = b"layer bytes " * 1000
DIGEST = digest_of(DATA)
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = digest_of(MANIFEST)
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
TAG_PATH = "/v2/library/alpine/manifests/latest"
DIGEST_PATH = f"/v2/library/alpine/manifests/{MANIFEST_DIGEST}"
HUB = "registry-1.docker.io"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir())


# --- prepare ---------------------------------------------------------------------------


def test_prepare_makes_the_top_directories(tmp_path):
    store = Store(tmp_path / "new" / "cache")
    store.prepare()
    assert sorted(p.name for p in store.root.iterdir()) == sorted(TOP_DIRS)
    assert set(TOP_DIRS) == {"content", "blobs", "temp", "held", "lists", *SIDECARS}


def test_prepare_empties_temp(store):
    (store.tree.temp / "leftover").write_bytes(b"x")
    (store.tree.temp / "dir").mkdir()
    (store.tree.temp / "dir" / "deep").write_bytes(b"y")
    store.prepare()
    assert store.tree.temp.is_dir()
    assert list(store.tree.temp.iterdir()) == []


def test_prepare_without_clean_keeps_temp(store):
    (store.tree.temp / "leftover").write_bytes(b"x")
    store.prepare(clean_temp=False)
    assert (store.tree.temp / "leftover").read_bytes() == b"x"


def test_prepare_keeps_cached_content(store):
    store.put_bytes(DATA, DIGEST)
    store.link(DIGEST, HUB, f"/v2/a/blobs/{DIGEST}")
    store.prepare()
    assert store.has_blob(DIGEST)
    assert store.has_content(HUB, f"/v2/a/blobs/{DIGEST}")


def test_store_repr_and_root(tmp_path):
    store = Store(tmp_path)
    assert store.root == tmp_path
    assert repr(store) == f"Store({str(tmp_path)!r})"


# --- BlobWriter + commit -----------------------------------------------------------------


def test_blob_writer_writes_to_temp_and_counts(store):
    writer = store.blob_writer(DIGEST)
    assert writer.path.parent == store.tree.temp
    writer.write(DATA[:10])
    writer.write(memoryview(DATA)[10:])
    assert writer.size == len(DATA)
    writer.close()
    assert writer.path.read_bytes() == DATA
    writer.abort()


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, len(DATA)), max_size=40),
       short=st.lists(st.integers(1, 5000), max_size=6))
def test_blob_writer_write_all_is_write_of_each_chunk(tmp_path_factory, cuts, short):
    """Any split of the bytes (empty pieces too), and writev calls that take
    only part of what they were given (a full disk's, a signal's): the file,
    size and digest are the bytes in order."""
    store = Store(tmp_path_factory.mktemp("cache"))
    store.prepare()
    edges = [0, *sorted(cuts), len(DATA)]
    chunks = [DATA[a:b] for a, b in itertools.pairwise(edges)]
    real_writev, limits = os.writev, list(short)

    def writev(fd: int, buffers: list[memoryview]) -> int:
        if limits:  # take at most this many bytes of what is offered
            joined = b"".join(buffers)[:limits.pop(0)]
            return real_writev(fd, [joined])
        return real_writev(fd, buffers)

    writer = store.blob_writer(DIGEST)
    with mock.patch("cr_proxy.cache.store.os.writev", writev):
        writer.write_all(chunks[:len(chunks) // 2])
        writer.write_all(chunks[len(chunks) // 2:])
    assert writer.size == len(DATA)
    writer.verify(len(DATA))
    writer.close()
    assert writer.path.read_bytes() == DATA
    writer.abort()


def test_blob_writer_write_all_takes_more_pieces_than_one_writev_may(store):
    pieces = [DATA[i:i + 3] for i in range(0, len(DATA), 3)]  # 4,000 pieces
    writer = store.blob_writer(DIGEST)
    writer.write_all(pieces)
    writer.verify(len(DATA))
    writer.close()
    assert writer.path.read_bytes() == DATA
    writer.abort()


def test_blob_writer_rejects_an_invalid_digest(store):
    with pytest.raises(BadRequest):
        store.blob_writer("sha256:../../etc/passwd")
    assert list(store.tree.temp.iterdir()) == []


def test_two_writers_for_one_digest_use_different_temp_files(store):
    first, second = store.blob_writer(DIGEST), store.blob_writer(DIGEST)
    assert first.path != second.path
    first.abort()
    second.abort()
    assert list(store.tree.temp.iterdir()) == []


@pytest.mark.parametrize("size", [len(DATA), None])
def test_commit_moves_verified_content_into_the_digest_store(store, size):
    writer = store.blob_writer(DIGEST)
    writer.write(DATA)
    path = store.commit(writer, size)
    algorithm, hexpart = DIGEST.split(":")
    assert path == store.root / "blobs" / algorithm / hexpart
    assert path.read_bytes() == DATA
    assert store.has_blob(DIGEST)
    assert list(store.tree.temp.iterdir()) == []


def test_commit_of_sha512_content(store):
    digest = digest_of(DATA, "sha512")
    writer = store.blob_writer(digest)
    writer.write(DATA)
    assert store.commit(writer, len(DATA)) == store.tree.blob(digest)
    assert store.has_blob(digest)


@pytest.mark.parametrize(
    ("written", "size", "error"),
    [
        (b"X" + DATA[1:], len(DATA), DigestMismatch),  # right size, wrong bytes
        (b"X" + DATA[1:], None, DigestMismatch),
        (DATA + b"!", None, DigestMismatch),
        (DATA[:-1], len(DATA), Truncated),  # short
        (b"", len(DATA), Truncated),
        (DATA + b"!", len(DATA), Truncated),  # long: not what was announced either
    ],
)
def test_commit_refuses_bad_content_and_leaves_nothing(store, written, size, error):
    writer = store.blob_writer(DIGEST)
    writer.write(written)
    with pytest.raises(error):
        store.commit(writer, size)
    assert files_under(store.root / "blobs") == []
    assert not writer.path.exists()
    assert list(store.tree.temp.iterdir()) == []
    assert not store.has_blob(DIGEST)


def test_commit_error_names_the_digest(store):
    writer = store.blob_writer(DIGEST)
    writer.write(b"wrong")
    with pytest.raises(DigestMismatch) as info:
        store.commit(writer, None)
    assert DIGEST in info.value.message
    assert info.value.code == "DIGEST_INVALID"


def test_commit_of_a_digest_already_stored_keeps_the_first_copy(store):
    first = store.put_bytes(DATA, DIGEST)
    inode = first.stat().st_ino
    writer = store.blob_writer(DIGEST)
    writer.write(DATA)
    assert store.commit(writer, len(DATA)) == first
    assert first.stat().st_ino == inode
    assert list(store.tree.temp.iterdir()) == []


def test_put_bytes_twice_is_idempotent(store):
    first = store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    inode = first.stat().st_ino
    second = store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    assert second == first
    assert second.stat().st_ino == inode
    assert second.read_bytes() == MANIFEST
    assert files_under(store.root / "blobs") == [first]
    assert list(store.tree.temp.iterdir()) == []


def test_put_bytes_refuses_bytes_that_do_not_match(store):
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"not the manifest", MANIFEST_DIGEST)
    assert files_under(store.root / "blobs") == []
    assert list(store.tree.temp.iterdir()) == []


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    s = Store(tmp_path_factory.mktemp("shared") / "cache")
    s.prepare()
    return s


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=4096), algorithm=st.sampled_from(["sha256", "sha512"]))
def test_put_bytes_stores_exactly_the_bytes_under_their_digest(shared_store, data, algorithm):
    digest = digest_of(data, algorithm)
    # fsync is about durability, not content, and costs a disk flush per example.
    with mock.patch("os.fsync"):
        path = shared_store.put_bytes(data, digest)
    assert path == shared_store.tree.blob(digest)
    assert path.read_bytes() == data
    assert list(shared_store.tree.temp.iterdir()) == []


def test_blob_writer_abort_twice_is_harmless(store):
    writer = store.blob_writer(DIGEST)
    writer.abort()
    writer.abort()
    assert "open=False" in repr(writer)
    assert list(store.tree.temp.iterdir()) == []


def test_blob_writer_repr_shows_progress(store):
    writer = BlobWriter(store.tree.temp, DIGEST)
    writer.write(b"abc")
    assert repr(writer) == f"<BlobWriter {DIGEST[:19]} 3 bytes open=True>"
    writer.abort()


# --- links: one inode per digest ---------------------------------------------------------


def test_a_blob_linked_under_two_domains_is_one_inode(store):
    blob = store.put_bytes(DATA, DIGEST)
    store.link(DIGEST, HUB, f"/v2/library/alpine/blobs/{DIGEST}")
    store.link(DIGEST, "ghcr.io", f"/v2/org/app/blobs/{DIGEST}")
    a = store.tree.content(HUB, f"/v2/library/alpine/blobs/{DIGEST}")
    b = store.tree.content("ghcr.io", f"/v2/org/app/blobs/{DIGEST}")
    assert a.read_bytes() == b.read_bytes() == DATA
    assert a.stat().st_ino == b.stat().st_ino == blob.stat().st_ino
    assert blob.stat().st_nlink == 3


def test_linking_the_same_path_twice_adds_no_link(store):
    blob = store.put_bytes(DATA, DIGEST)
    store.link(DIGEST, HUB, f"/v2/a/blobs/{DIGEST}")
    store.link(DIGEST, HUB, f"/v2/a/blobs/{DIGEST}")
    assert blob.stat().st_nlink == 2
    assert list(store.tree.temp.iterdir()) == []


def test_link_replaces_what_a_path_pointed_at(store):
    old = store.put_bytes(b"old", digest_of(b"old"))
    new = store.put_bytes(b"new", digest_of(b"new"))
    store.link(digest_of(b"old"), HUB, TAG_PATH)
    store.link(digest_of(b"new"), HUB, TAG_PATH)
    assert store.tree.content(HUB, TAG_PATH).read_bytes() == b"new"
    assert (old.stat().st_nlink, new.stat().st_nlink) == (1, 2)
    assert list(store.tree.temp.iterdir()) == []


def test_link_of_a_missing_blob_raises_and_creates_no_content(store):
    with pytest.raises(FileNotFoundError):
        store.link(DIGEST, HUB, f"/v2/a/blobs/{DIGEST}")
    assert not store.has_content(HUB, f"/v2/a/blobs/{DIGEST}")
    assert list(store.tree.temp.iterdir()) == []


def emlink(*_: object) -> None:
    raise OSError(errno.EMLINK, os.strerror(errno.EMLINK))


def test_a_blob_at_the_link_limit_is_still_served_under_no_new_name(store, monkeypatch):
    """ext4 allows 65,000 names per inode: past that, a new name of the blob
    is served from the digest store itself, and nothing is left behind."""
    blob = store.put_bytes(DATA, DIGEST)
    path = f"/v2/one-more/blobs/{DIGEST}"
    monkeypatch.setattr(os, "link", emlink)
    served = store.link_if_stored(DIGEST, HUB, path)
    assert served == blob and served.read_bytes() == DATA
    store.link_quietly(DIGEST, HUB, path)  # logged, not raised
    with pytest.raises(TooManyLinks):
        store.link(DIGEST, HUB, path)
    assert not store.has_content(HUB, path)
    assert store.linked(DIGEST, HUB, path) is None
    assert list(store.tree.temp.iterdir()) == []


def test_other_link_errors_are_not_taken_for_the_link_limit(store, monkeypatch):
    store.put_bytes(DATA, DIGEST)

    def eperm(*_: object) -> None:
        raise PermissionError(errno.EPERM, "not permitted")

    monkeypatch.setattr(os, "link", eperm)
    with pytest.raises(PermissionError):
        store.link_if_stored(DIGEST, HUB, f"/v2/a/blobs/{DIGEST}")


def test_linked_names_only_a_link_of_the_stored_blob(store):
    path = f"/v2/a/blobs/{DIGEST}"
    assert store.linked(DIGEST, HUB, path) is None  # nothing stored
    store.put_bytes(DATA, DIGEST)
    assert store.linked(DIGEST, HUB, path) is None  # stored, not named here
    store.link(DIGEST, HUB, path)
    assert store.linked(DIGEST, HUB, path) == store.tree.content(HUB, path)
    store.tree.content(HUB, path).unlink()
    store.tree.content(HUB, path).write_bytes(DATA)  # a copy is not a name of the blob
    assert store.linked(DIGEST, HUB, path) is None


def test_temp_bytes_counts_downloads_in_progress_only(store):
    writer = store.blob_writer(DIGEST)
    writer.write(DATA[:1000])
    (store.tree.temp / "link.0123").write_bytes(b"x" * 50)  # a link about to be renamed
    assert store.temp_bytes() == 1000
    writer.abort()
    assert store.temp_bytes() == 0


@pytest.mark.parametrize(
    ("domain", "path"),
    [("../x", "/v2/a"), (HUB, "/v2/../../etc/passwd"), (HUB, "/a\x00b"), ("a/b", "/x")],
)
def test_link_refuses_unsafe_names(store, domain, path):
    store.put_bytes(DATA, DIGEST)
    with pytest.raises(BadRequest):
        store.link(DIGEST, domain, path)
    assert files_under(store.root / "content") == []


# --- sidecars and manifests ---------------------------------------------------------------


def test_write_and_read_sidecar(store):
    store.write_sidecar("content-type", HUB, TAG_PATH, MANIFEST_TYPE)
    assert store.tree.sidecar("content-type", HUB, TAG_PATH).read_text() == MANIFEST_TYPE + "\n"
    assert store.read_sidecar("content-type", HUB, TAG_PATH) == MANIFEST_TYPE


def test_write_sidecar_replaces_the_old_value(store):
    store.write_sidecar("www-authenticate", HUB, "/v2/", 'Bearer realm="a"')
    store.write_sidecar("www-authenticate", HUB, "/v2/", 'Bearer realm="b"')
    assert store.read_sidecar("www-authenticate", HUB, "/v2/") == 'Bearer realm="b"'
    assert list(store.tree.temp.iterdir()) == []


@pytest.mark.parametrize("path", [TAG_PATH, "/v2/library/alpine"])
def test_read_sidecar_of_nothing_is_none(store, path):
    assert store.read_sidecar("content-type", HUB, path) is None


def test_read_sidecar_below_a_file_is_none(store):
    store.write_sidecar("content-type", HUB, "/v2/a", "x")
    assert store.read_sidecar("content-type", HUB, "/v2/a/b") is None


def test_record_redirect(store):
    store.record_redirect(HUB, f"/v2/a/blobs/{DIGEST}", 307, "https://cdn.test/x?sig=1")
    assert store.read_sidecar("redirect", HUB, f"/v2/a/blobs/{DIGEST}") == (
        "307 https://cdn.test/x?sig=1"
    )


class OrderRecordingStore(Store):
    """Records every finished file as it is renamed into place."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.placed: list[Path] = []

    def _replace_with(self, target: Path, make) -> None:
        super()._replace_with(target, make)
        self.placed.append(target.relative_to(self.root))


def test_record_manifest_writes_sidecars_before_the_content_link(tmp_path):
    store = OrderRecordingStore(tmp_path)
    store.prepare()
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.record_manifest(HUB, TAG_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    rel = "registry-1.docker.io/v2/library/alpine/manifests/latest"
    assert store.placed == [
        Path("content-type", rel),
        Path("docker-content-digest", rel),
        Path("content", rel),
    ]


class CheckingStore(Store):
    """Asserts, at the moment the payload is linked, that its headers are there."""

    def link(self, digest: str, domain: str, path: str) -> None:
        assert self.read_sidecar("content-type", domain, path) == MANIFEST_TYPE
        assert self.read_sidecar("docker-content-digest", domain, path) == digest
        assert not self.has_content(domain, path)
        super().link(digest, domain, path)


def test_record_manifest_headers_are_in_place_when_the_payload_appears(tmp_path):
    store = CheckingStore(tmp_path)
    store.prepare()
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.record_manifest(HUB, DIGEST_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, None)
    assert store.has_content(HUB, DIGEST_PATH)


def test_record_manifest_then_read_manifest_round_trips(store):
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.record_manifest(HUB, TAG_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    assert store.read_manifest(HUB, TAG_PATH) == StoredManifest(
        MANIFEST, MANIFEST_TYPE, MANIFEST_DIGEST, 1000.0
    )


def test_record_manifest_links_the_payload_to_the_digest_store(store):
    blob = store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.record_manifest(HUB, TAG_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, None)
    store.record_manifest(HUB, DIGEST_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, None)
    assert store.tree.content(HUB, TAG_PATH).stat().st_ino == blob.stat().st_ino
    assert blob.stat().st_nlink == 3


def test_record_manifest_without_validated_at_keeps_the_write_time(store):
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.record_manifest(HUB, DIGEST_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, None)
    sidecar = store.tree.sidecar("docker-content-digest", HUB, DIGEST_PATH)
    stored = store.read_manifest(HUB, DIGEST_PATH)
    assert stored is not None
    assert stored.validated_at == sidecar.stat().st_mtime
    assert stored.validated_at != 1000.0


def test_record_manifest_moves_a_tag(store):
    other = b'{"schemaVersion":2}'
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.put_bytes(other, digest_of(other))
    store.record_manifest(HUB, TAG_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    store.record_manifest(HUB, TAG_PATH, digest_of(other), INDEX_TYPE, 2000.0)
    assert store.read_manifest(HUB, TAG_PATH) == StoredManifest(
        other, INDEX_TYPE, digest_of(other), 2000.0
    )


def test_read_manifest_of_nothing_is_none(store):
    assert store.read_manifest(HUB, TAG_PATH) is None


def test_read_manifest_without_its_digest_sidecar_is_none(store):
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.link(MANIFEST_DIGEST, HUB, TAG_PATH)
    assert store.read_manifest(HUB, TAG_PATH) is None


@pytest.mark.parametrize(("content_type", "digest"), [
    (None, MANIFEST_DIGEST),  # no content-type sidecar
    ("text/html", MANIFEST_DIGEST),
    (MANIFEST_TYPE + " x", MANIFEST_DIGEST),
    (MANIFEST_TYPE, "sha256:" + "A" * 64),
    (MANIFEST_TYPE, "md5:" + "0" * 32),
])
def test_read_manifest_with_unsafe_stored_headers_is_none(store, content_type, digest):
    """Sidecars an older cr-proxy wrote from the wire, or a hand edit: the
    fetcher fetches the manifest again instead of replaying them."""
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    if content_type is not None:
        store.write_sidecar("content-type", HUB, TAG_PATH, content_type)
    store.write_sidecar("docker-content-digest", HUB, TAG_PATH, digest)
    store.link(MANIFEST_DIGEST, HUB, TAG_PATH)
    assert store.read_manifest(HUB, TAG_PATH) is None


@pytest.mark.parametrize("value", [
    MANIFEST_TYPE + "\r\nSet-Cookie: x=y", "a\nb", "a\rb", "a\x00b", "a\tb", "a\x7fb", "a\x1bb",
])
@pytest.mark.parametrize("kind", SIDECARS)
def test_write_sidecar_refuses_control_characters(store, kind, value):
    """The last wall against header injection: whatever the caller checked."""
    with pytest.raises(UpstreamError, match="control characters"):
        store.write_sidecar(kind, HUB, TAG_PATH, value)
    assert files_under(store.root) == []


def test_record_manifest_refuses_a_media_type_off_the_list(store):
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    for content_type in ("text/html", "application/json", MANIFEST_TYPE.upper(), ""):
        with pytest.raises(ManifestInvalid):
            store.record_manifest(HUB, TAG_PATH, MANIFEST_DIGEST, content_type, None)
    with pytest.raises(BadRequest):
        store.record_manifest(HUB, TAG_PATH, "sha256:" + "g" * 64, MANIFEST_TYPE, None)
    assert files_under(store.root / "content") == []
    assert files_under(store.root / "content-type") == []


def test_touch_validated_changes_the_mtime(store):
    store.put_bytes(MANIFEST, MANIFEST_DIGEST)
    store.record_manifest(HUB, TAG_PATH, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    store.touch_validated(HUB, TAG_PATH)
    stored = store.read_manifest(HUB, TAG_PATH)
    assert stored is not None
    assert stored.validated_at > 1000.0
    assert stored.validated_at == (
        store.tree.sidecar("docker-content-digest", HUB, TAG_PATH).stat().st_mtime
    )


def test_touch_validated_of_an_unknown_tag_raises(store):
    with pytest.raises(FileNotFoundError):
        store.touch_validated(HUB, TAG_PATH)
