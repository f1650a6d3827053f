"""A reference to a module: `registry/repository:tag` or `@digest` (Docker's
rules, reference.parse_reference) -> the manifest, the platform, the
module layer, and the layer's file in the cache.

Policy:

- The manifest comes through the fetcher's own manifest path
  (Manifests.lookup): a digest or a fresh tag from the cache, a stale tag
  revalidated (tag_ttl), the stale copy while the upstream is down, a miss
  fetched once and verified.
- An index: the entry of the platform asked for (`wasi/wasm`), else its
  only Wasm entry (architecture `wasm`), else its only entry; otherwise an
  error naming the platforms it has. Attestations never count.
- The layer: the one with a Wasm media type (WASM_TYPES), else the only
  layer, else the largest (what Propeller's proxy picks); layers of equal
  largest size, or none at all, are an error listing the layers.
- The blob comes through the fetcher's blob path (Blobs.ensure): stored
  once per digest, one upstream download however many ask, verified.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cr_proxy.cache.layout import Kind, RegistryPath, Target, resolve_domain
from cr_proxy.errors import BadRequest, NotFound
from cr_proxy.fetch.app import Fetcher
from cr_proxy.oci import manifest
from cr_proxy.oci.manifest import MAX_INDEX_DEPTH, Blob, Entry, Manifest, Platform
from cr_proxy.oci.reference import Reference, parse_reference

WASM_TYPES = frozenset({
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
    "application/wasm",
})
WASM_CONTENT_TYPE = "application/wasm"
OTHER_CONTENT_TYPE = "application/octet-stream"
# A reference longer than any valid one (registry 253 + name 255 + tag 128
# or a sha512 digest, and separators) is refused before it is parsed.
MAX_REFERENCE = 700
SHOWN_LAYERS = 20  # layers named in an error at most


@dataclass(frozen=True, slots=True)
class Module:
    """A resolved module layer, cached: what a client is sent."""

    reference: Reference  # as asked for, registry and repository in Docker's form
    manifest_digest: str  # the image manifest the layer is in
    digest: str  # the layer's
    size: int
    media_type: str  # the layer's, as its manifest states it
    domain: str  # the cache's <domain>: the host that serves the registry
    path: Path  # the stored file (the digest store's, or a name of it)

    @property
    def repository(self) -> str:
        return self.reference.name

    @property
    def is_wasm(self) -> bool:
        return self.media_type in WASM_TYPES

    @property
    def content_type(self) -> str:
        """What HTTP clients are told: Wasm as such, anything else as bytes."""
        return WASM_CONTENT_TYPE if self.is_wasm else OTHER_CONTENT_TYPE

    @property
    def sha256(self) -> str:
        """The hex Envoy's remote source takes (sha256 digests only)."""
        algorithm, _, hexpart = self.digest.partition(":")
        return hexpart if algorithm == "sha256" else ""

    def open(self) -> BinaryIO:
        """The cached bytes, for a reader that sends them in pieces (MQTT
        chunks): never the whole module in memory. The file is immutable
        while open, even if eviction removes its name meanwhile."""
        return self.path.open("rb")


def parse_module_reference(text: str, default_registry: str) -> Reference:
    """A module reference by Docker's rules; BadRequest for one too long."""
    if len(text) > MAX_REFERENCE:
        raise BadRequest("NAME_INVALID", f"reference of {len(text)} characters: "
                         f"at most {MAX_REFERENCE}")
    return parse_reference(text, default_registry)


def parse_platform(text: str | None) -> Platform | None:
    return Platform.parse(text) if text else None


def target_of(fetcher: Fetcher, ref: Reference, kind: Kind, what: str) -> Target:
    """The fetcher's Target for a manifest or blob of `ref`'s repository."""
    config = fetcher.ctx.config
    domain = resolve_domain(ref.registry, dict(config.registry_hosts))
    return Target(ref.registry, domain, RegistryPath(kind, ref.name, what))


async def resolve(fetcher: Fetcher, text: str, platform: str | None = None) -> Module:
    """The module `text` names, its blob cached (fetched once if not)."""
    ref = parse_module_reference(text, fetcher.ctx.config.default_registry)
    return await resolve_reference(fetcher, ref, parse_platform(platform))


async def resolve_reference(fetcher: Fetcher, ref: Reference,
                            platform: Platform | None = None) -> Module:
    await learn_privacy(fetcher, target_of(fetcher, ref, Kind.MANIFEST, ref.ref))
    digest, image = await _image_manifest(fetcher, ref, platform)
    layer = pick_layer(image, f"{ref}@{digest}")
    target = target_of(fetcher, ref, Kind.BLOB, layer.digest)
    path = await fetcher.blobs.ensure(target)
    # The verified file's size, never the manifest's claim: a lying size
    # would cut the module short or send devices a million empty chunks.
    size = (await asyncio.to_thread(path.stat)).st_size
    return Module(ref, digest, layer.digest, size, layer.media_type, target.domain, path)


async def learn_privacy(fetcher: Fetcher, target: Target) -> None:
    """Before a module of `target`'s repository is fetched, whether the
    repository is private, as for a pull (fetch/private.py): its manifest
    and layer are then stored marked, so that nginx and every other name
    serve them to the entitled only. The device itself is served (it holds
    no credential; the operator grants modules: signed URLs)."""
    await fetcher.privacy.learn(target, None)


async def _manifest(fetcher: Fetcher, ref: Reference, what: str) -> tuple[str, Manifest]:
    stored, _ = await fetcher.manifests.lookup(target_of(fetcher, ref, Kind.MANIFEST, what),
                                               None)
    return stored.digest, manifest.parse(stored.body, stored.content_type)


async def _image_manifest(fetcher: Fetcher, ref: Reference,
                          platform: Platform | None) -> tuple[str, Manifest]:
    """(digest, manifest) of the image manifest: the index's entries
    followed down to one (nested at most MAX_INDEX_DEPTH deep)."""
    where = str(ref)
    digest, found = await _manifest(fetcher, ref, ref.ref)
    for _ in range(MAX_INDEX_DEPTH):
        if not found.is_index:
            break
        entry = pick_entry(found, platform, where)
        where = f"{ref}@{entry.digest}"
        digest, found = await _manifest(fetcher, ref, entry.digest)
    if found.is_index:
        raise NotFound("MANIFEST_UNKNOWN", f"{where}: indexes nested too deep")
    if not found.layers:
        raise NotFound("BLOB_UNKNOWN", f"{where}: not an image manifest with layers "
                       f"({found.media_type or 'no media type'})")
    return digest, found


def is_wasm_platform(platform: Platform | None) -> bool:
    return platform is not None and platform.architecture == "wasm"


def pick_entry(index: Manifest, platform: Platform | None, where: str) -> Entry:
    """The index entry the module is in (the module docstring's rule)."""
    entries = index.select((platform,) if platform else ())
    if platform is None:
        wasm = [e for e in entries if is_wasm_platform(e.platform)]
        entries = wasm if len(wasm) == 1 else entries
    if len(entries) == 1:
        return entries[0]
    have = ", ".join(sorted({str(p) for p in index.platforms})) or "none"
    if platform is not None:
        raise NotFound("MANIFEST_UNKNOWN", f"{where}: no manifest for platform {platform} "
                       f"(the index has: {have})")
    raise NotFound("MANIFEST_UNKNOWN", f"{where}: the index has {len(entries)} manifests; "
                   f"name one with ?platform= (it has: {have})")


def pick_layer(image: Manifest, where: str) -> Blob:
    """The module layer (the module docstring's rule)."""
    layers = [b for b in image.layers if not b.foreign]
    wasm = [b for b in layers if b.media_type in WASM_TYPES]
    if len(wasm) == 1:
        return wasm[0]
    candidates = wasm or layers
    if len(candidates) == 1:
        return candidates[0]
    sized = sorted(candidates, key=lambda b: b.size or 0, reverse=True)
    if len(sized) >= 2 and (sized[0].size or 0) > (sized[1].size or 0):
        return sized[0]
    shown = ", ".join(f"{b.digest} ({b.media_type or 'no media type'}, {b.size} bytes)"
                      for b in layers[:SHOWN_LAYERS])
    raise NotFound("BLOB_UNKNOWN", f"{where}: no one module layer among {len(layers)} "
                   f"layers: {shown or 'none'}")
