"""Manifests and indexes: their kinds, what they name, and the rules every
reader of them follows (the fetcher, `cr-proxy warm`, the inventory behind
`cr-proxy ls`). Pure: no I/O.

Policy (one rule each, after the OCI image spec and what Docker does):

- Kinds: OCI and Docker schema 2 image manifests and indexes
  (MANIFEST_MEDIA_TYPES). The fetcher stores and serves nothing else
  (`manifest_media_type`); Docker's schema 1 is refused, as distribution 3
  and Docker's pullers do.
- Size: a manifest is at most MAX_MANIFEST bytes (distribution's limit):
  the fetcher stores none bigger, so no reader reads more.
- Nesting: an index may name indexes (OCI allows it). At most
  MAX_INDEX_DEPTH indexes in a chain from the top one (index -> index ->
  index -> manifest); warm refuses a deeper one and the inventory reads no
  deeper.
- Attestation manifests (buildx's provenance and SBOM): an index entry
  whose platform is `unknown/unknown` or whose annotation
  `vnd.docker.reference.type` is `attestation-manifest` (buildx writes
  both; no runtime pulls either). They are no platform of the image and
  never chosen by a platform; they are still entries the index names.
- Foreign layers: a layer with `urls` (Windows base layers) lives outside
  the registry; no puller asks the registry for it. It is not one of the
  image's blobs (`Manifest.blobs`): warm does not fetch it and the
  inventory neither counts nor misses it.
- Reading (`parse`) is lenient, as a puller is: a descriptor without a
  valid digest names nothing; an unknown media type names nothing; only a
  body that is not a JSON object is an error (ManifestInvalid). The
  media type is the body's `mediaType`, else a known Content-Type, else
  the shape's (mediaType is optional in OCI).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cr_proxy.errors import BadRequest, ManifestInvalid
from cr_proxy.oci.reference import is_digest

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_MEDIA_TYPES = frozenset(MANIFEST_MEDIA_TYPES[0::2])
IMAGE_MEDIA_TYPES = frozenset(MANIFEST_MEDIA_TYPES[1::2])
# What we ask upstream for: everything, so the cache holds the canonical
# manifest whatever the first client's Accept header was.
MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
# Docker's schema 1 (signed JSON): distribution 3 dropped it, and Docker's
# and containerd's pullers refuse it; we neither store nor serve it.
SCHEMA1_MEDIA_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
# Content-Types that name no kind of manifest (some registries and static
# servers send them): the body's mediaType, or its shape, decides.
GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})

MAX_MANIFEST = 4 << 20  # distribution's manifest size limit
MAX_INDEX_DEPTH = 3  # indexes in a chain from the top one; then a manifest
ATTESTATION_PLATFORM = ("unknown", "unknown")
REFERENCE_TYPE = "vnd.docker.reference.type"  # buildx's annotation on attestation entries
ATTESTATION_TYPE = "attestation-manifest"


# --- platforms -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Platform:
    """`os/arch[/variant]`, as an index entry or a config blob states it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """A platform an operator names (`--platform`): lower-cased, like Docker's."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadRequest("PLATFORM_INVALID", f"platform {text!r}: expected os/arch[/variant]")
        return cls(*parts)

    @classmethod
    def of(cls, doc: object) -> Platform | None:
        """The platform object of an index entry or a config blob; None
        unless it names an os and an architecture."""
        if not isinstance(doc, Mapping):
            return None
        os_, arch, variant = doc.get("os"), doc.get("architecture"), doc.get("variant")
        if not (isinstance(os_, str) and os_ and isinstance(arch, str) and arch):
            return None
        return cls(os_, arch, variant if isinstance(variant, str) and variant else None)

    @property
    def is_unknown(self) -> bool:
        """unknown/unknown: where buildx puts attestation manifests."""
        return (self.os, self.architecture) == ATTESTATION_PLATFORM

    def matches(self, other: Platform | None) -> bool:
        """Does `other` (an entry's platform) satisfy this wanted one? Any
        variant when this one names none."""
        if other is None or (other.os, other.architecture) != (self.os, self.architecture):
            return False
        return self.variant is None or other.variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def config_platform(body: bytes) -> Platform | None:
    """The platform an image's config blob states; None if it states none
    (or is no JSON object), or states unknown/unknown."""
    try:
        platform = Platform.of(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return None if platform is None or platform.is_unknown else platform


# --- what a manifest names ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blob:
    """A config or layer descriptor."""

    digest: str
    size: int | None = None  # as the manifest states it; None if it does not
    foreign: bool = False  # has `urls`: lives outside the registry
    # The descriptor's mediaType ("" if none); not part of the blob's identity.
    media_type: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Entry:
    """One manifest an index names."""

    digest: str
    platform: Platform | None = None
    attestation: bool = False


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a manifest or index names. An unknown kind names nothing."""

    media_type: str
    entries: tuple[Entry, ...] = ()  # an index's manifests
    config: Blob | None = None
    layers: tuple[Blob, ...] = ()  # every layer, foreign ones too

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """The blobs an image's pull asks the registry for: config and
        layers, foreign layers left out."""
        config = (self.config,) if self.config else ()
        return config + tuple(b for b in self.layers if not b.foreign)

    @property
    def platforms(self) -> tuple[Platform, ...]:
        """An index's platforms, attestations left out."""
        return tuple(e.platform for e in self.entries if e.platform and not e.attestation)

    def select(self, wanted: Sequence[Platform] = ()) -> list[Entry]:
        """The entries a pull of these platforms needs: every one but the
        attestations, or those matching one of `wanted` when it is given."""
        entries = [e for e in self.entries if not e.attestation]
        if not wanted:
            return entries
        return [e for e in entries if any(w.matches(e.platform) for w in wanted)]


def parse(body: bytes, content_type: str = "") -> Manifest:
    """What a manifest names (the module docstring's reading rules).
    ManifestInvalid if the body is not a JSON object."""
    doc = _json_object(body)
    media_type = media_type_of(doc, content_type)
    if media_type in INDEX_MEDIA_TYPES:
        return Manifest(media_type, entries=tuple(
            Entry(d, Platform.of(e.get("platform")), is_attestation(e))
            for e in _objects(doc.get("manifests")) if (d := _digest(e))
        ))
    if media_type in IMAGE_MEDIA_TYPES:
        return Manifest(media_type, config=_blob(doc.get("config")), layers=tuple(
            b for b in map(_blob, _objects(doc.get("layers"))) if b
        ))
    return Manifest(media_type)


def media_type_of(doc: Mapping[str, Any], content_type: str) -> str:
    """The body's mediaType, else a known Content-Type, else a guess from
    the shape; else the Content-Type as given."""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if content_type in MANIFEST_MEDIA_TYPES:
        return content_type
    if isinstance(doc.get("manifests"), list):
        return MANIFEST_MEDIA_TYPES[0]
    if isinstance(doc.get("config"), dict):
        return MANIFEST_MEDIA_TYPES[1]
    return content_type


def is_attestation(entry: Mapping[str, Any]) -> bool:
    """An index entry for an attestation manifest (the module docstring)."""
    platform = Platform.of(entry.get("platform"))
    if platform is not None and platform.is_unknown:
        return True
    annotations = entry.get("annotations")
    return isinstance(annotations, Mapping) and annotations.get(REFERENCE_TYPE) == ATTESTATION_TYPE


def _objects(value: object) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _digest(descriptor: object) -> str:
    if isinstance(descriptor, Mapping):
        digest = descriptor.get("digest")
        if isinstance(digest, str) and is_digest(digest):
            return digest
    return ""


def _blob(descriptor: object) -> Blob | None:
    digest = _digest(descriptor)
    if not digest:
        return None
    assert isinstance(descriptor, Mapping)  # _digest found one
    size = descriptor.get("size")
    media_type = descriptor.get("mediaType")
    return Blob(digest, size if type(size) is int and size >= 0 else None,
                bool(descriptor.get("urls")), media_type if isinstance(media_type, str) else "")


# --- the kinds the fetcher stores -------------------------------------------------------


def manifest_media_type(body: bytes, content_type: str) -> str:
    """The media type an upstream manifest is stored and served with: always
    one of MANIFEST_MEDIA_TYPES, never the wire's value as such, since it
    becomes the Content-Type of every later hit. ManifestInvalid unless the
    body is a JSON schema 2 manifest or index of a type on that list (OCI
    artifact manifests are image manifests with an artifactType, so they
    pass; the withdrawn application/vnd.oci.artifact.manifest.v1+json, like
    distribution, does not). A known Content-Type must agree with the
    body's mediaType; a generic one leaves the choice to the body."""
    header = content_type.split(";", 1)[0].strip().lower()
    if header in SCHEMA1_MEDIA_TYPES:
        raise _schema1()
    if header not in GENERIC_TYPES and header not in MANIFEST_MEDIA_TYPES:
        raise ManifestInvalid(message=f"Content-Type {_shown(header)} is not a manifest type")
    doc = _json_object(body)
    version = doc.get("schemaVersion")
    if type(version) is int and version == 1:
        raise _schema1()
    if type(version) is not int or version != 2:
        raise ManifestInvalid(message=f"schemaVersion {_shown(version)} is not 2")
    media_type = _declared_type(doc, header)
    # Go's decoder matches field names in any case: keys are compared so.
    keys = {key.lower() for key in doc}
    if len(keys) != len(doc):
        raise ManifestInvalid(message="the manifest has keys that differ only in case")
    if media_type in INDEX_MEDIA_TYPES:
        whole = isinstance(doc.get("manifests"), list)
        other = keys & {"config", "layers"}
    else:
        whole = isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list)
        other = keys & {"manifests"}
    if not whole:
        raise ManifestInvalid(message=f"not a whole {media_type}")
    if other:
        # One document, two readings (CVE-2021-41190, which distribution
        # closed so): an index with layers, a manifest with manifests.
        raise ManifestInvalid(message=f"a {media_type} with {', '.join(sorted(other))}: "
                              "ambiguous")
    return media_type


def _declared_type(doc: dict, header: str) -> str:
    """The body's mediaType (optional in OCI: then the header's, or the shape's)."""
    declared = doc.get("mediaType")
    if declared is None:
        if header in MANIFEST_MEDIA_TYPES:
            return header
        return MANIFEST_MEDIA_TYPES[0 if isinstance(doc.get("manifests"), list) else 1]
    if not isinstance(declared, str) or declared not in MANIFEST_MEDIA_TYPES:
        raise ManifestInvalid(message=f"mediaType {_shown(declared)} is not a manifest type")
    if header in MANIFEST_MEDIA_TYPES and header != declared:
        raise ManifestInvalid(message=f"Content-Type {header} but mediaType {declared}")
    return declared


def _json_object(body: bytes) -> dict:
    """The body as one JSON object: UTF-8 without a BOM (json.loads would
    guess UTF-16 or 32 from bytes, and Go's clients read none of them),
    no key twice in an object (which one counts differs by reader)."""
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested deep
        doc = None
    if not isinstance(doc, dict):
        raise ManifestInvalid(message="the manifest is not a JSON object in UTF-8 with "
                              "each key once")
    return doc


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a key twice")
    return doc


def _schema1() -> ManifestInvalid:
    return ManifestInvalid(message="Docker schema 1 manifests are not supported "
                           "(distribution 3 and Docker's pullers dropped them too)")


def _shown(value: object) -> str:
    """A value from the wire, quoted and cut short, for a message or a log
    line (repr escapes CR, LF and every other control character)."""
    return repr(value)[:80]
