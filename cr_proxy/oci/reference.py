"""Image references, digests and media types: pure functions, no I/O.

The grammar is the one in distribution's `reference/regexp.go` and the OCI
distribution spec (section "Pulling manifests"):

    name      := component ('/' component)*
    component := [a-z0-9]+ ((\\.|_|__|-+) [a-z0-9]+)*
    tag       := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest    := algorithm ':' encoded      (we accept sha256 and sha512 only)

Docker's rules for short names: the default registry is `docker.io`, a
one-component name on it gets `library/`, and the default tag is `latest`.
A first component names a registry when it holds a dot or a colon, or is
`localhost`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass

from cr_proxy.errors import BadRequest, ManifestInvalid

COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SHA256_DIGEST = r"sha256:[a-f0-9]{64}"
DIGEST_RE = re.compile(rf"({SHA256_DIGEST}|sha512:[a-f0-9]{{128}})")
# A registry host: DNS labels (lower case, as we store them), optional port.
# IPv6 literals are accepted in brackets, as in a URL.
PLAIN_HOST = (
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])"
)
HOST_RE = re.compile(rf"{PLAIN_HOST}(?::[0-9]{{1,5}})?")
MAX_NAME_LEN = 255  # distribution's NameTotalLengthMax

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_MEDIA_TYPES = frozenset(MANIFEST_MEDIA_TYPES[0::2])
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


def is_digest(ref: str) -> bool:
    return DIGEST_RE.fullmatch(ref) is not None


def is_tag(ref: str) -> bool:
    return TAG_RE.fullmatch(ref) is not None


def is_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LEN and NAME_RE.fullmatch(name) is not None


def is_host(host: str) -> bool:
    if len(host) > 253 or HOST_RE.fullmatch(host) is None:
        return False
    if host.startswith("["):  # the grammar only shapes it: ask ipaddress
        literal, _, port = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return not port or 0 < int(port[1:]) < 65536
    port = host.rpartition(":")[2] if ":" in host else ""
    return not port or 0 < int(port) < 65536


def names_registry(component: str) -> bool:
    """Docker's rule: does this first path component name a registry?"""
    return "." in component or ":" in component or component == "localhost"


def check_digest(digest: str) -> str:
    if not is_digest(digest):
        raise BadRequest("DIGEST_INVALID", f"invalid digest {digest!r}")
    return digest


def hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object for the digest's algorithm."""
    return hashlib.new(check_digest(digest).split(":", 1)[0])


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


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
    if media_type in INDEX_MEDIA_TYPES:
        whole = isinstance(doc.get("manifests"), list)
    else:
        whole = isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list)
    if not whole:
        raise ManifestInvalid(message=f"not a whole {media_type}")
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
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested deep
        doc = None
    if not isinstance(doc, dict):
        raise ManifestInvalid(message="the manifest is not a JSON object")
    return doc


def _schema1() -> ManifestInvalid:
    return ManifestInvalid(message="Docker schema 1 manifests are not supported "
                           "(distribution 3 and Docker's pullers dropped them too)")


def _shown(value: object) -> str:
    """A value from the wire, quoted and cut short, for a message or a log
    line (repr escapes CR, LF and every other control character)."""
    return repr(value)[:80]


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully qualified image reference: registry/name plus a tag or digest."""

    registry: str
    name: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = f"{self.registry}/{self.name}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str, default_registry: str = DEFAULT_REGISTRY) -> Reference:
    """Parse `[registry/]name[:tag][@digest]` by Docker's rules."""
    rest = text.strip()
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        check_digest(digest)
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not is_tag(tag):
            raise BadRequest("TAG_INVALID", f"invalid tag {tag!r} in {text!r}")
    first, sep, remainder = rest.partition("/")
    if sep and names_registry(first):
        registry, name = first, remainder
    else:
        registry, name = default_registry, rest
    if not is_host(registry):
        raise BadRequest("NAME_INVALID", f"invalid registry {registry!r} in {text!r}")
    if registry == "index.docker.io":  # Docker Hub's legacy name
        registry = "docker.io"
    if registry == DEFAULT_REGISTRY and "/" not in name:
        name = f"library/{name}"
    if not is_name(name):
        raise BadRequest("NAME_INVALID", f"invalid repository name {name!r} in {text!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, name, tag, digest)
