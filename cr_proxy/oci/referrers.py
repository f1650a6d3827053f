"""Referrers (OCI distribution 1.1), pure: the answer of
`GET /v2/<name>/referrers/<digest>[?artifactType=<type>]`, an image index
of the manifests whose `subject` is that digest; the tag that holds the
same index on a registry without the API (the "referrers tag schema",
`<alg>-<hex>`); and the `artifactType` filter.

An index is stored and served only as checked here: JSON, `mediaType` the
OCI index, at most MAX_REFERRERS bytes, every descriptor well formed (a
media type, a digest, a size; an `artifactType` a media type, annotations
strings). What is served is rebuilt from those checked fields alone. An
answer in pages (`Link: <...>; rel="next"`) is followed for at most
MAX_PAGES pages of this very path, and kept whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from cr_proxy.errors import BadRequest, UpstreamError
from cr_proxy.oci.manifest import MAX_MANIFEST
from cr_proxy.oci.reference import check_digest, is_digest
from cr_proxy.oci.tags import LINK_RE

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MAX_REFERRERS = MAX_MANIFEST  # the index is a manifest on registries without the API
FILTER_HEADER = "OCI-Filters-Applied"
# RFC 6838 type "/" subtype, restricted-name each (what a media type may be).
MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")

# `cr-proxy warm --referrers` and `check --referrers`: the referrers of an
# image's manifests are followed this many levels deep (1: the image's
# signatures and attestations; 2: their own signatures, ...), and at most
# this many referrer artifacts per image, so a subject with a flood of
# referrers cannot fill the cache (the same walk, walk_referrers, in both).
MAX_REFERRER_DEPTH = 3
MAX_REFERRER_ARTIFACTS = 64
LEGACY_SUFFIXES = (".sig", ".att", ".sbom")  # cosign's tags before OCI 1.1

# The pages of one answer followed at most (each at most MAX_REFERRERS).
MAX_PAGES = 16
# A next page's query as we send it on: what registries put there (n, last,
# opaque tokens), nothing that could end the request line or a header.
QUERY_RE = re.compile(r"[A-Za-z0-9._~%=&+:-]{1,1024}")

Descriptor = dict[str, Any]


def is_media_type(value: object) -> bool:
    return isinstance(value, str) and MEDIA_TYPE_RE.fullmatch(value) is not None


def check_artifact_type(value: str | None) -> str | None:
    """A client's `artifactType` filter: None, or a media type (else 400)."""
    if value is not None and not is_media_type(value):
        raise BadRequest("UNSUPPORTED", f"artifactType is not a media type: {value[:140]!r}")
    return value


def tag_schema_tag(subject: str) -> str:
    """The tag holding a subject's referrers index on a registry without the
    API: `<alg>-<hex>`, the algorithm cut to 32 characters and the hex to 64
    (the spec's "referrers tag schema"; a tag has at most 128)."""
    algorithm, hexpart = check_digest(subject).split(":", 1)
    return f"{algorithm[:32]}-{hexpart[:64]}"


def legacy_tags(subject: str) -> list[str]:
    """cosign's tags from before OCI 1.1 for a subject: its signature,
    attestations and SBOM as plain tags, `sha256-<hex>.sig` and so on."""
    return [f"{tag_schema_tag(subject)}{suffix}" for suffix in LEGACY_SUFFIXES]


def stored_name(subject: str) -> str:
    """The stored answer's file name (cache/layout.py's Tree.listing), and
    the key its fetches share: `<alg>-<hex>`, the whole digest. The tag
    schema's cut (64 hex) would give every sha512 subject sharing its
    first half another's answer."""
    algorithm, hexpart = check_digest(subject).split(":", 1)
    return f"{algorithm}-{hexpart}"


def parse_referrers(body: bytes, what: str) -> list[Descriptor]:
    """The descriptors of a referrers index (`what` names it in errors),
    each rebuilt from its checked fields; UpstreamError when it is not one."""
    if len(body) > MAX_REFERRERS:
        raise UpstreamError(message=f"{what}: larger than {MAX_REFERRERS} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # nested past the stack
        raise UpstreamError(message=f"{what}: not JSON") from err
    if not isinstance(doc, dict) or doc.get("mediaType") != INDEX_TYPE \
            or doc.get("schemaVersion") != 2:
        raise UpstreamError(message=f"{what}: not an OCI image index")
    manifests = doc.get("manifests")
    manifests = [] if manifests is None else manifests  # "", {}, false are no list
    if not isinstance(manifests, list):
        raise UpstreamError(message=f"{what}: its manifests are not a list")
    return [_descriptor(entry, what) for entry in manifests]


def _descriptor(entry: object, what: str) -> Descriptor:
    if not isinstance(entry, dict):
        raise UpstreamError(message=f"{what}: a descriptor is not an object")
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    if not is_media_type(media_type) or not isinstance(digest, str) or not is_digest(digest) \
            or type(size) is not int or not 0 <= size <= MAX_MANIFEST:
        raise UpstreamError(message=f"{what}: a descriptor without a valid mediaType, "
                            "digest and size")
    out: Descriptor = {"mediaType": media_type, "digest": digest, "size": size}
    artifact_type = entry.get("artifactType")
    if artifact_type is not None:
        if not is_media_type(artifact_type):
            raise UpstreamError(message=f"{what}: an artifactType is not a media type")
        out["artifactType"] = artifact_type
    annotations = entry.get("annotations")
    if annotations is not None:
        if not _strings(annotations):
            raise UpstreamError(message=f"{what}: annotations are not strings")
        out["annotations"] = dict(annotations)
    return out


def _strings(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def next_query(link: str | None, path: str) -> str | None:
    """The query of the next page an upstream's `Link` names, when it is
    this very referrers path (`path`, with its leading slash) and a plain
    query string; None otherwise (no more pages are asked for)."""
    match = LINK_RE.fullmatch(link or "")
    if match is None:
        return None
    url = urlsplit(match.group(1))
    if url.path != path or not QUERY_RE.fullmatch(url.query):
        return None
    return url.query


def referrers_body(descriptors: list[Descriptor], artifact_type: str | None = None) -> bytes:
    """The index a client gets: the descriptors, only those of
    `artifact_type` when given (the caller then says OCI-Filters-Applied)."""
    kept = [d for d in descriptors
            if artifact_type is None or d.get("artifactType") == artifact_type]
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": kept}).encode()


def next_artifacts(answers: list[list[Descriptor]], seen: set[str],
                   budget: int) -> tuple[list[str], bool]:
    """One level of the referrers walk (MAX_REFERRER_DEPTH): the artifact
    digests the answers name that are not in `seen` yet, in order, each
    once, at most `budget` of them (added to `seen`); and whether some were
    left out for the budget. warm and check walk alike through this."""
    found: list[str] = []
    for descriptors in answers:
        for entry in descriptors:
            digest = entry["digest"]
            if digest in seen:
                continue
            if len(found) >= budget:
                return found, True
            seen.add(digest)
            found.append(digest)
    return found, False
