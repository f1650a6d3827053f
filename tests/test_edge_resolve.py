"""The module rules of cr_proxy/edge/resolve.py on parsed manifests: which
index entry, which layer (end to end: test_e2e_artifacts.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cr_proxy.config import build, default_data
from cr_proxy.edge.resolve import (
    MAX_REFERENCE,
    parse_module_reference,
    pick_entry,
    pick_layer,
    resolve,
)
from cr_proxy.errors import BadRequest, NotFound
from cr_proxy.oci import manifest
from cr_proxy.oci.manifest import Platform

WASM = "application/vnd.wasm.content.layer.v1+wasm"
TAR = "application/vnd.oci.image.layer.v1.tar"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def image(*layers: tuple[str, int]) -> manifest.Manifest:
    return manifest.parse(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.wasm.config.v1+json", "digest": digest(99),
                   "size": 2},
        "layers": [{"mediaType": t, "digest": digest(i), "size": s}
                   for i, (t, s) in enumerate(layers)],
    }).encode())


def index(*platforms: str) -> manifest.Manifest:
    return manifest.parse(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(i), "size": 1,
                       "platform": dict(zip(("os", "architecture"), p.split("/"), strict=True))}
                      for i, p in enumerate(platforms)],
    }).encode())


@pytest.mark.parametrize(("layers", "chosen"), [
    ([(TAR, 500), (WASM, 10)], 1),  # the Wasm type wins over size
    ([("application/wasm", 10)], 0),
    ([(TAR, 10)], 0),  # the only layer, whatever its type
    ([(TAR, 10), (TAR, 300), (TAR, 20)], 1),  # else the largest
])
def test_the_module_layer(layers: list[tuple[str, int]], chosen: int) -> None:
    assert pick_layer(image(*layers), "x").digest == digest(chosen)


@pytest.mark.parametrize("layers", [[(TAR, 10), (TAR, 10)], [(WASM, 1), (WASM, 1)]])
def test_no_one_layer_is_an_error_listing_them(layers: list[tuple[str, int]]) -> None:
    with pytest.raises(NotFound) as caught:
        pick_layer(image(*layers), "reg/x:v1")
    assert digest(0) in caught.value.message and digest(1) in caught.value.message


def test_the_index_entry() -> None:
    both = index("linux/amd64", "wasi/wasm")
    assert pick_entry(both, None, "x").digest == digest(1)  # the only wasm one
    assert pick_entry(both, Platform.parse("linux/amd64"), "x").digest == digest(0)
    assert pick_entry(index("linux/arm64"), None, "x").digest == digest(0)  # the only one
    with pytest.raises(NotFound, match="linux/amd64, wasi/wasm"):
        pick_entry(both, Platform.parse("linux/s390x"), "x")
    with pytest.raises(NotFound, match=r"\?platform="):
        pick_entry(index("linux/amd64", "linux/arm64"), None, "x")


def test_references() -> None:
    ref = parse_module_reference("registry.test/wasm/hello:v1", "docker.io")
    assert (ref.registry, ref.name, ref.tag) == ("registry.test", "wasm/hello", "v1")
    assert parse_module_reference("hello", "docker.io").name == "library/hello"
    with pytest.raises(BadRequest):
        parse_module_reference("a" * (MAX_REFERENCE + 1), "docker.io")
    with pytest.raises(BadRequest):
        parse_module_reference("registry.test/../etc:v1", "docker.io")


async def test_a_modules_size_is_its_verified_files_not_the_manifests_claim(
    tmp_path: Path,
) -> None:
    """A manifest claiming 10^12 bytes for an 8-byte layer: the module is
    the 8 bytes the digest verified (MQTT counts its chunks by it)."""
    data = b"\0asm\x01\0\0\0"
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(99),
                   "size": 2},
        "layers": [{"mediaType": "application/wasm",
                    "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": 10 ** 12}],
    }).encode()

    async def lookup(_target: object, _auth: object) -> tuple[SimpleNamespace, str]:
        return SimpleNamespace(digest=digest(1), body=body,
                               content_type="application/vnd.oci.image.manifest.v1+json"), "HIT"

    async def ensure(_target: object) -> Path:
        return blob  # what Blobs.ensure returns: the stored, verified file

    async def learn(_target: object, _auth: object) -> bool:
        return False  # a public repository

    fetcher = SimpleNamespace(ctx=SimpleNamespace(config=build(default_data(), {})),
                              manifests=SimpleNamespace(lookup=lookup),
                              blobs=SimpleNamespace(ensure=ensure),
                              privacy=SimpleNamespace(learn=learn))
    module = await resolve(fetcher, "ghcr.io/example/mod:v1")  # type: ignore[arg-type]
    assert module.size == len(data)
