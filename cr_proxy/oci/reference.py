"""Image references and digests: pure functions, no I/O. (Manifests and
their media types: manifest.py.)

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
import re
from dataclasses import dataclass

from cr_proxy.errors import BadRequest

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
