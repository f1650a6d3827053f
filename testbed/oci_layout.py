"""Deterministic OCI image-layout builder for tests (no docker, no network).

Everything here is a pure function of its arguments: the same layers, platform and
tag always give the same digests, so tests can hard-wire expectations and several
images can share a layer (same bytes, same digest) to exercise cross-repository
deduplication.

A layout directory may hold several images: each `build_image` / `build_index`
call adds (or replaces) one entry in `index.json`, named by the
`org.opencontainers.image.ref.name` annotation, which is what
`skopeo copy oci:DIR:REF ...` selects on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_LAYOUT_VERSION = "1.0.0"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# A fixed timestamp keeps config blobs (and so manifest digests) reproducible.
_CREATED = "2024-01-01T00:00:00Z"


@dataclass
class ImageInfo:
    """What a test needs to know about an image it built.

    For an index, `manifest_digest`/`config_digest`/`layer_digests` describe the first
    platform; `platforms` has every platform's own ImageInfo and `sizes` covers all of
    them plus the index itself.
    """

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    sizes: dict[str, int]
    index_digest: str | None = None
    media_type: str = MT_MANIFEST
    platform: tuple[str, str] | None = None
    platforms: dict[tuple[str, str], ImageInfo] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The digest the tag points at (the index for a multi-platform image)."""
        return self.index_digest or self.manifest_digest

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.layout, digest)

    def blob_bytes(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, hex_part = digest.split(":", 1)
    return layout / "blobs" / algorithm / hex_part


def canonical_json(obj: object) -> bytes:
    # Sorted keys and no whitespace: the bytes (hence the digest) never depend on
    # dict ordering in the calling test.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def tar_layer(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding `files` (path -> content), byte-for-byte reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            content = files[name]
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def big_file_layer(size_bytes: int, seed: int) -> bytes:
    """A tar layer holding one file of `size_bytes` pseudo-random bytes.

    Random content defeats any compression or dedup that would make a "big" test
    layer cheap by accident; `randbytes` does ~250 MB/s, so 100 MB costs well under 1 s.
    """
    payload = random.Random(seed).randbytes(size_bytes)
    return tar_layer({f"big-{seed}.bin": payload})


def gzip_layer(tar_bytes: bytes) -> bytes:
    # mtime=0 and no file name in the header: gzip output is reproducible too.
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0)


def write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return digest


def _descriptor(media_type: str, digest: str, size: int, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _init_layout(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))


def _add_to_index_json(dest: Path, descriptor: dict[str, object], tag: str) -> None:
    """Point `tag` at `descriptor` in the layout's index.json, keeping other tags."""
    index_file = dest / "index.json"
    index = (
        json.loads(index_file.read_text())
        if index_file.exists()
        else {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    index["manifests"].append({**descriptor, "annotations": {REF_NAME_ANNOTATION: tag}})
    index_file.write_text(json.dumps(index, indent=2))


def _config_json(layers_uncompressed: list[bytes], platform: tuple[str, str]) -> bytes:
    os_name, arch = platform
    return canonical_json(
        {
            "created": _CREATED,
            "architecture": arch,
            "os": os_name,
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [sha256_digest(layer) for layer in layers_uncompressed],
            },
            "history": [{"created": _CREATED, "created_by": "testbed/oci_layout.py"}]
            * len(layers_uncompressed),
        }
    )


def _write_image_blobs(
    dest: Path, layers: list[bytes], platform: tuple[str, str], compress: bool
) -> tuple[dict[str, object], ImageInfo]:
    """Write config, layers and manifest blobs; return the manifest descriptor and info."""
    sizes: dict[str, int] = {}
    layer_descs = []
    for layer in layers:
        blob = gzip_layer(layer) if compress else layer
        digest = write_blob(dest, blob)
        sizes[digest] = len(blob)
        layer_descs.append(
            _descriptor(MT_LAYER_TAR_GZIP if compress else MT_LAYER_TAR, digest, len(blob))
        )
    config = _config_json(layers, platform)
    config_digest = write_blob(dest, config)
    sizes[config_digest] = len(config)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": _descriptor(MT_CONFIG, config_digest, len(config)),
            "layers": layer_descs,
        }
    )
    manifest_digest = write_blob(dest, manifest)
    sizes[manifest_digest] = len(manifest)
    info = ImageInfo(
        layout=dest,
        tag="",
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=[str(d["digest"]) for d in layer_descs],
        sizes=sizes,
        platform=platform,
    )
    return _descriptor(MT_MANIFEST, manifest_digest, len(manifest)), info


def build_image(
    dest: Path,
    *,
    layers: list[bytes],
    platform: tuple[str, str] = ("linux", "amd64"),
    tag: str = "latest",
    compress: bool = False,
) -> ImageInfo:
    """Add a single-platform image tagged `tag` to the OCI layout at `dest`.

    `layers` are uncompressed tars (see `tar_layer`); `compress=True` stores them as
    gzip (`...tar+gzip`), which Docker-schema-2 conversions need to keep digests.
    """
    _init_layout(dest)
    descriptor, info = _write_image_blobs(dest, layers, platform, compress)
    os_name, arch = platform
    _add_to_index_json(dest, {**descriptor, "platform": {"os": os_name, "architecture": arch}}, tag)
    info.tag = tag
    return info


def build_index(
    dest: Path,
    platforms: list[tuple[str, str, list[bytes]]],
    tag: str = "latest",
    *,
    compress: bool = False,
) -> ImageInfo:
    """Add a multi-platform image (an OCI image index) tagged `tag` to the layout at `dest`.

    `platforms` is a list of `(os, architecture, layers)`.
    """
    _init_layout(dest)
    entries = []
    per_platform: dict[tuple[str, str], ImageInfo] = {}
    sizes: dict[str, int] = {}
    for os_name, arch, layers in platforms:
        descriptor, info = _write_image_blobs(dest, layers, (os_name, arch), compress)
        info.tag = tag
        per_platform[(os_name, arch)] = info
        sizes.update(info.sizes)
        entries.append({**descriptor, "platform": {"os": os_name, "architecture": arch}})
    index = canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries})
    index_digest = write_blob(dest, index)
    sizes[index_digest] = len(index)
    _add_to_index_json(dest, _descriptor(MT_INDEX, index_digest, len(index)), tag)
    first = next(iter(per_platform.values()))
    return ImageInfo(
        layout=dest,
        tag=tag,
        manifest_digest=first.manifest_digest,
        config_digest=first.config_digest,
        layer_digests=first.layer_digests,
        sizes=sizes,
        index_digest=index_digest,
        media_type=MT_INDEX,
        platform=first.platform,
        platforms=per_platform,
    )


def ref_descriptor(layout: Path, ref_name: str) -> dict[str, object]:
    """The index.json entry that `ref_name` names (what `oci:DIR:REF` resolves to)."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) == ref_name:
            return entry
    raise KeyError(f"{ref_name!r} not in {layout}/index.json")


MT_WASM_CONFIG = "application/vnd.wasm.config.v1+json"
MT_WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"


def wasm_module(payload_size: int = 0, seed: int = 0) -> bytes:
    """A valid WebAssembly module: the header (`\\0asm`, version 1), then,
    when `payload_size` asks for bulk, one custom section (id 0, which
    runtimes skip) of pseudo-random bytes, so the file is exactly that much
    larger."""
    header = b"\0asm\x01\0\0\0"
    if not payload_size:
        return header
    name = b"bulk"
    body_len = payload_size - 1 - 5  # section id, then a 5-byte LEB128 length
    leb = bytearray()
    for shift in range(5):  # fixed width: 5 bytes whatever the value
        byte = (body_len >> (7 * shift)) & 0x7F
        leb.append(byte | (0x80 if shift < 4 else 0))
    content = bytes([len(name)]) + name
    content += random.Random(seed).randbytes(body_len - len(content))
    return header + b"\x00" + bytes(leb) + content


def build_artifact(
    dest: Path,
    layers: list[tuple[str, bytes]],
    *,
    tag: str = "latest",
    config_media_type: str = MT_WASM_CONFIG,
    config: bytes = b"{}",
    platform: tuple[str, str] | None = None,
) -> ImageInfo:
    """Add an OCI artifact (an image manifest with a config and layers of
    any media type, as `oras push` and wasm-to-oci make) tagged `tag`;
    `layers` are (media type, bytes). `platform` goes into the layout's
    index entry (for an index of artifacts, built with build_artifact_index)."""
    _init_layout(dest)
    sizes: dict[str, int] = {}
    descs = []
    for media_type, data in layers:
        digest = write_blob(dest, data)
        sizes[digest] = len(data)
        descs.append(_descriptor(media_type, digest, len(data)))
    config_digest = write_blob(dest, config)
    sizes[config_digest] = len(config)
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": _descriptor(config_media_type, config_digest, len(config)),
        "layers": descs,
    })
    manifest_digest = write_blob(dest, manifest)
    sizes[manifest_digest] = len(manifest)
    descriptor = _descriptor(MT_MANIFEST, manifest_digest, len(manifest))
    if platform is not None:
        descriptor["platform"] = {"os": platform[0], "architecture": platform[1]}
    _add_to_index_json(dest, descriptor, tag)
    return ImageInfo(
        layout=dest, tag=tag, manifest_digest=manifest_digest, config_digest=config_digest,
        layer_digests=[str(d["digest"]) for d in descs], sizes=sizes, platform=platform,
    )


def build_artifact_index(dest: Path, artifacts: list[ImageInfo], tag: str) -> str:
    """An index over artifacts already in the layout (each built with a
    platform), tagged `tag`; returns its digest."""
    entries = []
    for info in artifacts:
        assert info.platform is not None
        size = info.sizes[info.manifest_digest]
        entries.append({**_descriptor(MT_MANIFEST, info.manifest_digest, size),
                        "platform": {"os": info.platform[0], "architecture": info.platform[1]}})
    index = canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries})
    digest = write_blob(dest, index)
    _add_to_index_json(dest, _descriptor(MT_INDEX, digest, len(index)), tag)
    return digest
