"""cache/scrub.py: the start-up pass that takes a manifest whose stored
headers nginx must not replay off the hit path, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from cr_proxy.cache.layout import Sidecar
from cr_proxy.cache.scrub import scrub_manifest_sidecars
from cr_proxy.cache.store import Store

MT = "application/vnd.oci.image.manifest.v1+json"
DIGEST = "sha256:" + "ab" * 32
PATH = "v2/library/app/manifests/v1"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "cache")
    store.prepare()
    return store


def put(store: Store, path: str, content_type: str, digest: str) -> None:
    for kind, value in ((Sidecar.CONTENT_TYPE, content_type),
                        (Sidecar.DOCKER_CONTENT_DIGEST, digest)):
        file = store.tree.top(kind) / "registry.test" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(value + "\n")


def sidecars(store: Store, path: str) -> list[bool]:
    return [(store.tree.top(kind) / "registry.test" / path).exists()
            for kind in (Sidecar.CONTENT_TYPE, Sidecar.DOCKER_CONTENT_DIGEST)]


def test_safe_headers_stay(store: Store) -> None:
    put(store, PATH, MT, DIGEST)
    assert scrub_manifest_sidecars(store.tree) == 0
    assert sidecars(store, PATH) == [True, True]
    assert store.read_sidecar(Sidecar.CONTENT_TYPE, "registry.test", PATH) == MT


@pytest.mark.parametrize(("content_type", "digest"), [
    (MT + "\r\nSet-Cookie: x=y", DIGEST),       # an injected header
    ("text/html", DIGEST),                      # a type outside the closed list
    (MT + "|x", DIGEST),                        # would split cr.js's "1|type|digest"
    (MT, "sha256:short"),                       # a digest off the grammar
    (MT, DIGEST + "\r\nSet-Cookie: x=y"),
], ids=["crlf-type", "html", "pipe", "bad-digest", "crlf-digest"])
def test_unsafe_headers_go(store: Store, content_type: str, digest: str) -> None:
    put(store, PATH, content_type, digest)
    put(store, "v2/library/app/manifests/v2", MT, DIGEST)
    assert scrub_manifest_sidecars(store.tree) == 1
    assert sidecars(store, PATH) == [False, False]
    assert sidecars(store, "v2/library/app/manifests/v2") == [True, True]


def test_a_missing_content_type_takes_the_manifest_off_the_hit_path(store: Store) -> None:
    put(store, PATH, MT, DIGEST)
    (store.tree.top(Sidecar.CONTENT_TYPE) / "registry.test" / PATH).unlink()
    assert scrub_manifest_sidecars(store.tree) == 1
    assert sidecars(store, PATH) == [False, False]


def test_other_paths_are_not_touched(store: Store) -> None:
    """Only manifests are replayed from sidecars; a blob's or a CDN path's
    digest record is not this pass's business."""
    put(store, "v2/library/app/blobs/" + DIGEST, "text/html", "junk")
    assert scrub_manifest_sidecars(store.tree) == 0
    assert sidecars(store, "v2/library/app/blobs/" + DIGEST) == [True, True]
