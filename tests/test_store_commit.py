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
