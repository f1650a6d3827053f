"""cr_proxy.cache.store: the fetcher's commits, one call per kind (verify,
move, link, sidecars), as the fetcher makes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cr_proxy.cache.layout import Kind, RegistryPath
from cr_proxy.cache.store import Redirected, Store
from cr_proxy.oci.reference import digest_of

DATA = b"layer bytes " * 1000
DIGEST = digest_of(DATA)
HEX = DIGEST.split(":", 1)[1]
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = digest_of(MANIFEST)
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
HUB = "registry-1.docker.io"
CDN = "cdn.example.test"
BLOB_PATH = f"v2/library/alpine/blobs/{DIGEST}"
CHALLENGE = 'Bearer realm="https://auth.test/token",scope="repository:library/alpine:pull"'


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


def verified_writer(store: Store):
    writer = store.blob_writer(DIGEST)
    writer.write(DATA)
    writer.verify(len(DATA))
    return writer


def test_commit_blob_stores_once_and_names_the_path_and_its_challenge(store):
    committed = store.commit_blob(verified_writer(store), HUB, BLOB_PATH, None, CHALLENGE)
    assert committed == store.tree.blob(DIGEST)
    assert os.path.samefile(store.tree.content(HUB, BLOB_PATH), committed)
    assert store.read_sidecar("www-authenticate", HUB, BLOB_PATH) == CHALLENGE
    assert store.read_sidecar("redirect", HUB, BLOB_PATH) is None
    assert list(store.tree.temp.iterdir()) == []


def test_commit_blob_names_a_content_addressed_redirect_target_and_records_it(store):
    location = f"https://{CDN}/blobs/sha256/{HEX[:2]}/{HEX}/data?sig=x"
    redirected = Redirected(307, location, CDN, f"/blobs/sha256/{HEX[:2]}/{HEX}/data")
    store.commit_blob(verified_writer(store), HUB, BLOB_PATH, redirected)
    cdn_name = store.tree.content(CDN, f"blobs/sha256/{HEX[:2]}/{HEX}/data")
    assert os.path.samefile(cdn_name, store.tree.blob(DIGEST))
    assert store.read_sidecar("redirect", HUB, BLOB_PATH) == f"307 {location}"
    assert store.read_sidecar("www-authenticate", HUB, BLOB_PATH) is None


def test_commit_blob_never_names_a_redirect_target_that_does_not_name_the_digest(store):
    redirected = Redirected(302, f"https://{CDN}/download?id=1", CDN, "/download")
    store.commit_blob(verified_writer(store), HUB, BLOB_PATH, redirected)
    assert not (store.root / "content" / CDN).exists()
    assert store.read_sidecar("redirect", HUB, BLOB_PATH) is None
    assert store.tree.content(HUB, BLOB_PATH).is_file()


def test_commit_manifest_by_tag_names_digest_and_tag(store):
    rpath = RegistryPath(Kind.MANIFEST, "library/alpine", "latest")
    store.commit_manifest(HUB, rpath, MANIFEST, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0, CHALLENGE)
    by_digest = RegistryPath(Kind.MANIFEST, "library/alpine", MANIFEST_DIGEST).path
    for path in (rpath.path, by_digest):
        stored = store.read_manifest(HUB, path)
        assert stored is not None
        assert (stored.body, stored.digest, stored.content_type) == (
            MANIFEST, MANIFEST_DIGEST, MANIFEST_TYPE)
    assert store.read_manifest(HUB, rpath.path).validated_at == 1000.0
    assert store.read_sidecar("www-authenticate", HUB, rpath.path) == CHALLENGE
    assert store.read_sidecar("www-authenticate", HUB, by_digest) is None


def test_commit_manifest_by_digest_names_only_the_digest(store):
    rpath = RegistryPath(Kind.MANIFEST, "library/alpine", MANIFEST_DIGEST)
    store.commit_manifest(HUB, rpath, MANIFEST, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    assert store.read_manifest(HUB, rpath.path) is not None
    tags = store.root / "content" / HUB / "v2/library/alpine/manifests"
    assert [p.name for p in tags.iterdir()] == [MANIFEST_DIGEST]


def test_a_challenge_name_the_tree_cannot_hold_is_skipped_the_blob_stored(
    store: Store,
) -> None:
    """Tag `t` of org/app (with its challenge) is a file where repository
    org/app/manifests/t needs a directory: the blob of that repository is
    stored, its name and its challenge skipped (a review finding, session
    13: the challenge raised NotADirectoryError and the download failed)."""
    media_type = "application/vnd.oci.image.manifest.v1+json"
    body = b'{"schemaVersion": 2, "mediaType": "%s", "layers": []}' % media_type.encode()
    challenge = 'Bearer realm="https://auth.test/token"'
    store.commit_manifest("registry.test", RegistryPath(Kind.MANIFEST, "org/app", "t"), body,
                          digest_of(body), media_type, 1000.0, challenge=challenge)
    data = b"layer" * 100
    writer = store.blob_writer(digest_of(data))
    writer.write(data)
    writer.verify(len(data))
    store.commit_blob(writer, "registry.test", f"v2/org/app/manifests/t/blobs/{digest_of(data)}",
                      challenge=challenge)
    assert store.has_blob(digest_of(data))


class Crash(BaseException):
    """serve killed, as a test raises it."""


def test_a_crash_while_a_tag_moves_never_pairs_its_old_body_with_new_headers(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tag moving from a manifest to an index, serve killed after the
    new sidecars and before the new link: what is left is no tag (the next
    pull fetches it), never the old body under the new digest and type (a
    review finding, session 13)."""
    index = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}'
    index_type = "application/vnd.oci.image.index.v1+json"
    tag = RegistryPath(Kind.MANIFEST, "org/app", "latest")
    store.commit_manifest(HUB, tag, MANIFEST, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    real_link = Store.link

    def link(self: Store, digest: str, domain: str, path: str) -> None:
        if path == tag.path:
            raise Crash
        real_link(self, digest, domain, path)

    monkeypatch.setattr(Store, "link", link)
    with pytest.raises(Crash):
        store.commit_manifest(HUB, tag, index, digest_of(index), index_type, 2000.0)
    payload = store.tree.content(HUB, tag.path)
    if payload.exists():
        assert digest_of(payload.read_bytes()) == store.read_sidecar(
            "docker-content-digest", HUB, tag.path)
    assert store.read_manifest(HUB, tag.path) is None


def test_a_manifest_evicted_between_its_store_and_its_name_is_stored_again(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manifest no image uses yet, taken by the evictor between its
    blobs/ file and its name (seen in test_e2e_evict's race with
    min_age 0): its commit failed, the client got a 500. It is stored
    again from the bytes in hand."""
    real_put = Store.put_bytes
    puts = [0]

    def put_then_evicted(self: Store, body: bytes, digest: str, private: bool = False) -> None:
        real_put(self, body, digest, private)
        puts[0] += 1
        if puts[0] == 1:
            self.tree.blob(digest).unlink()  # the evictor, at that moment

    monkeypatch.setattr(Store, "put_bytes", put_then_evicted)
    tag = RegistryPath(Kind.MANIFEST, "org/app", "v1")
    store.commit_manifest(HUB, tag, MANIFEST, MANIFEST_DIGEST, MANIFEST_TYPE, 1000.0)
    assert puts[0] == 2
    stored = store.read_manifest(HUB, tag.path)
    assert stored is not None and stored.body == MANIFEST
