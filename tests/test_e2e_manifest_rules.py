"""One reading of manifests for warm and ls (oci/manifest.py), end to end:
`cr-proxy serve` in front of tests/faulty.py's registry, `cr-proxy warm`
through serve's fetcher, then `cr-proxy ls --json` on the cache it filled.
Each test is one of issue 11's disagreements: what warm fetches, ls finds
complete."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.crproxy import CrProxy, clean_env
from tests.faulty import MT_MANIFEST, FaultyRegistry, sha256

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
AMD64 = {"os": "linux", "architecture": "amd64"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def cr(fake: FaultyRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    with CrProxy(tmp_path_factory.mktemp("manifest-rules"), fake.endpoints) as running:
        yield running


def cr_proxy(cr: CrProxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cr_proxy", *args, "--config", str(cr.config_path), "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=300,
    )


def warmed(cr: CrProxy, image: str) -> dict[str, Any]:
    result = cr_proxy(cr, "warm", image)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["started_fetcher"] is False  # serve's fetcher: the real way of a miss
    return done


def listed(cr: CrProxy, key: str) -> dict[str, Any]:
    result = cr_proxy(cr, "ls")
    assert result.returncode == 0, result.stderr
    return {image["key"]: image for image in json.loads(result.stdout)["images"]}[key]


def add_manifest(fake: FaultyRegistry, repo: str, tag: str, doc: dict[str, Any]) -> str:
    media_type = doc["mediaType"]
    digest = fake.add_blob(json.dumps(doc, sort_keys=True).encode(), media_type)
    fake.manifests[(repo, tag)] = fake.manifests[(repo, digest)] = digest
    return digest


def test_an_image_with_a_foreign_layer_is_complete_in_ls(
    cr: CrProxy, fake: FaultyRegistry
) -> None:
    """A Windows base layer (`urls`) is not in the registry: warm does not
    fetch it, and ls neither counts nor misses it."""
    image = fake.add_image("foreign", "base", [b"app layer\n" * 100])
    doc = json.loads(image.manifest)
    base = b"the windows base layer, on mcr.microsoft.com"
    doc["layers"].insert(0, {"mediaType": MT_FOREIGN, "digest": sha256(base), "size": len(base),
                             "urls": ["https://mcr.microsoft.com/blobs/base"]})
    digest = add_manifest(fake, "foreign", "v1", doc)

    done = warmed(cr, f"{fake.name}/foreign:v1")
    assert (done["images_ok"], done["blobs_fetched"]) == (1, 2)  # config and the app layer
    found = listed(cr, f"{fake.name}/foreign:v1")
    assert found["digest"] == digest
    assert found["missing"] == []
    assert set(found["blobs"]) == {digest, image.config_digest, *image.layer_digests}
    assert found["platforms"] == ["linux/amd64"]


def test_an_index_nested_three_deep_is_warmed_and_listed_alike(
    cr: CrProxy, fake: FaultyRegistry
) -> None:
    """index -> index -> index -> manifest (OCI allows indexes of indexes):
    warm fetches every level, ls reads every level; a fourth is too deep for
    both."""
    image = fake.add_image("nested", "leaf", [b"nested layer\n" * 100])
    digest, chain = image.manifest_digest, [image.manifest_digest]
    for level in range(4):
        tag = "v1" if level == 2 else f"level{level}"
        digest = add_manifest(fake, "nested", tag, {
            "schemaVersion": 2, "mediaType": MT_INDEX,
            "manifests": [{"mediaType": MT_MANIFEST if level == 0 else MT_INDEX,
                           "digest": digest, "size": 1, "platform": AMD64}]})
        chain.append(digest)

    done = warmed(cr, f"{fake.name}/nested:v1")
    assert (done["images_ok"], done["blobs_fetched"]) == (1, 2)
    found = listed(cr, f"{fake.name}/nested:v1")
    assert found["missing"] == []
    assert set(found["blobs"]) == {*chain[:4], image.config_digest, *image.layer_digests}

    too_deep = cr_proxy(cr, "warm", f"{fake.name}/nested:level3")
    assert too_deep.returncode == 1
    assert "nested too deep" in json.loads(too_deep.stdout)["failures"][0]["error"]
