"""Requests to paths in the cache tree, and back. Pure: no I/O.

This is the only module that turns a name from the wire (a Host header, a
`ns` parameter, a URL path) into a filesystem path. Every name is checked
against a grammar first (reference.py); what fails gets BadRequest, and
what passes is a plain relative path with no `.`, `..` or empty segment, so
joining it under the cache root can never leave the root.

Where one cached answer lives is a `Key` (domain, repository, kind,
reference); `Tree.at(key)` is its payload and `Tree.at(key, sidecar)` each
of its headers, and `key_of` / `Tree.key_at` the way back (ls, du, rm,
verify). Callers with a URL path rather than a key use `Tree.content` and
`Tree.sidecar`, which check it first.

The tree (seed 001, plus a digest store for one copy per digest):

    cache/
      content/<domain>/<path>                payload; a hard link into blobs/
      content-type/<domain>/<path>           Content-Type of that payload
      docker-content-digest/<domain>/<path>  Docker-Content-Digest; for a tag, its
                                             mtime is when it was last validated
      www-authenticate/<domain>/<path>       the upstream's 401 challenge; for /v2/
                                             (v2/_index) what /v2/ answered: the
                                             challenge, or empty for a 200
      redirect/<domain>/<path>               "<status> <Location>" of a registry's
                                             blob redirect whose last hop's path
                                             carries the digest, written once that
                                             target is cached
      blobs/<algorithm>/<hex>                the digest store: one file per digest
      lists/<domain>/<name>/_tags/<query>    a tag list page as the upstream last sent
                                             it (`list`, `list,n=<n>,last=<tag>`);
                                             its mtime is when it was fetched
      lists/<domain>/<name>/_referrers/<alg>-<hex>
                                             the referrers of a subject (an OCI index,
                                             unfiltered; mtime as for tags); a
                                             repository's go with its last image
      lists/<domain>/<name>/_private         present when the repository is private:
                                             the upstream refused it to an anonymous
                                             client (fetch/private.py); nginx sends
                                             its hits to the fetcher, which checks
                                             the client's credential first
      private/<algorithm>/<hex>              present when the digest was stored for a
                                             private repository (any blob named under
                                             a marked one); made before the blob is
                                             stored, removed after it: the fetcher
                                             serves it under no name it was not
                                             stored for (fetch/blobs.py)
      temp/                                  downloads in progress, and links and
                                             small files about to be renamed
                                             (link.*); emptied at start-up
      held/<hex>                             second names of downloads just verified,
                                             which nginx sends to the clients that
                                             waited for them (fetch/flight.py); each
                                             removed a minute on, all at start-up
      quarantine/<algorithm>-<hex>           blobs `verify` found corrupt, kept for
                                             a post-mortem; nothing serves them
      usage.json                             last use per (domain, path), saved by
                                             `serve` from nginx's access log
      pins.json                              images `cr-proxy pin` pinned (pins.py)
      serve.lock                             the running serve's pid, under flock:
                                             one serve per cache (serve.py)

`<domain>` is the host that really serves the path (registry-1.docker.io,
not docker.io; a CDN host for redirect targets), `<path>` the URL path
without its leading slash and without the query string:
`v2/<repository>/manifests/<tag or digest>` and `v2/<repository>/blobs/<digest>`
for registry answers (the keys of kind MANIFEST and BLOB), any other checked
path as it is (kind OTHER: `v2/_index` for the `/v2/` challenge, CDN paths).
A redirect target is stored only when it is the last hop and its path names
the digest (digest_url_path); the hops before it never are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path, PurePosixPath

from cr_proxy.errors import BadRequest
from cr_proxy.oci.reference import check_digest, is_digest, is_host, is_name, is_tag, names_registry


class Sidecar(StrEnum):
    """The header trees beside content/, each named after the header it
    holds (nginx replays them by these names, cr.js and proxy-server.conf)."""

    CONTENT_TYPE = "content-type"
    DOCKER_CONTENT_DIGEST = "docker-content-digest"
    WWW_AUTHENTICATE = "www-authenticate"
    REDIRECT = "redirect"


SIDECARS = tuple(kind.value for kind in Sidecar)
CONTENT = "content"
BLOBS = "blobs"
TEMP = "temp"
HELD = "held"
QUARANTINE = "quarantine"
PRIVATE_BLOBS = "private"  # private/<alg>/<hex> (Tree.private_blob), made when needed
LISTS = "lists"
USES_FILE = "usage.json"
LOCK_FILE = "serve.lock"
PINS_FILE = "pins.json"
# Made by Store.prepare; quarantine/ and private/ when needed.
TOP_DIRS = (CONTENT, BLOBS, TEMP, HELD, LISTS, *SIDECARS)
# A generic URL path segment we are willing to store (CDN paths, auth paths):
# RFC 3986 unreserved characters plus ':' '@' '+' '=' ',' — nothing that a
# shell, nginx or a filesystem treats specially.
SEGMENT_RE = re.compile(r"[A-Za-z0-9._~:@+=,-]{1,255}")
MAX_PATH_LEN = 2048
# A stored listing's file name (Tree.listing): begins with a word character
# (never '.' or '..'), then what a tag, a digest's hex and "n=<int>" need.
LISTING_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=-]{0,200}")
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io"})
INDEX_FILE = "_index"
PRIVATE_MARK = "_private"  # lists/<domain>/<name>/_private (Tree.private_marker)
# How long nginx's blob location keeps what it found on disk
# (open_file_cache_valid): a blob's open file, and with mirror_auth that a
# repository's private mark is missing. A repository newly marked private
# has nothing of it named before this has passed (fetch/private.py).
OPEN_FILE_CACHE_VALID = 5


class Kind(Enum):
    PING = "ping"  # /v2/
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"  # /v2/<name>/tags/list
    REFERRERS = "referrers"  # /v2/<name>/referrers/<digest> (OCI 1.1)
    OTHER = "other"  # _catalog, uploads, anything else under /v2/


NAMED_KINDS = frozenset({Kind.MANIFEST, Kind.BLOB, Kind.TAGS, Kind.REFERRERS})
KEY_KINDS = frozenset({Kind.MANIFEST, Kind.BLOB, Kind.OTHER})  # what the cache stores
LISTING_KINDS = (Kind.TAGS, Kind.REFERRERS)  # stored in lists/ (Tree.listing)


def v2_path(name: str, kind: Kind, ref: str) -> str:
    """`v2/<name>/<manifests|blobs>/<ref>`: the one place that spells it."""
    return f"v2/{name}/{kind.value}/{ref}"


@dataclass(frozen=True, slots=True)
class RegistryPath:
    """A parsed /v2/ path: repository name, kind and reference."""

    kind: Kind
    name: str = ""
    ref: str = ""

    @property
    def by_digest(self) -> bool:
        return is_digest(self.ref)

    @property
    def path(self) -> str:
        """The URL path without its leading slash (the key under <domain>/)."""
        if self.kind is Kind.PING:
            return "v2/"
        if self.kind is Kind.OTHER:
            return f"v2/{self.name}"
        if self.kind is Kind.TAGS:
            return f"v2/{self.name}/tags/list"
        if self.kind is Kind.REFERRERS:
            return f"v2/{self.name}/referrers/{self.ref}"
        return v2_path(self.name, self.kind, self.ref)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the registry it names, the host that serves it
    (the cache's <domain>), and the parsed path."""

    registry: str
    domain: str
    rpath: RegistryPath


@dataclass(frozen=True, slots=True)
class Key:
    """Where one cached answer lives: a manifest (by tag or digest) or a blob
    of a repository, or (OTHER) any other checked path under a domain, its
    `reference` being that path. Checked when made, and canonical: one key
    per stored name, so key -> path -> key is the identity."""

    domain: str
    repository: str
    kind: Kind
    reference: str

    def __post_init__(self) -> None:
        if self.kind not in KEY_KINDS:
            raise ValueError(f"not a stored kind: {self.kind}")
        if check_domain(self.domain) != self.domain:
            raise BadRequest("NAME_INVALID", f"not a canonical host {self.domain[:100]!r}")
        if self.kind is Kind.OTHER:
            if self.repository or check_path(self.reference) != self.reference \
                    or registry_key_parts(self.reference) is not None:
                raise BadRequest("NAME_INVALID", f"not a plain path {self.reference[:100]!r}")
            return
        check_name(self.repository)
        valid = is_digest if self.kind is Kind.BLOB else (lambda r: is_tag(r) or is_digest(r))
        if not valid(self.reference):
            raise BadRequest("TAG_INVALID", f"invalid reference {self.reference[:140]!r}")

    @classmethod
    def manifest(cls, domain: str, repository: str, reference: str) -> Key:
        return cls(domain, repository, Kind.MANIFEST, reference)

    @classmethod
    def blob(cls, domain: str, repository: str, digest: str) -> Key:
        return cls(domain, repository, Kind.BLOB, digest)

    @property
    def path(self) -> str:
        """The path under content/<domain>/ (and under each sidecar tree's)."""
        if self.kind is Kind.OTHER:
            return self.reference
        return v2_path(self.repository, self.kind, self.reference)

    @property
    def by_digest(self) -> bool:
        return is_digest(self.reference)


def registry_key_parts(path: str) -> tuple[Kind, str, str] | None:
    """(kind, repository, reference) of a checked path naming a manifest or a
    blob of a repository, else None."""
    if not path.startswith("v2/"):
        return None
    try:
        rpath = parse_v2_path("/" + path)
    except BadRequest:
        return None
    if rpath.kind in (Kind.MANIFEST, Kind.BLOB) and is_name(rpath.name) and rpath.path == path:
        return rpath.kind, rpath.name, rpath.ref
    return None


def key_of(domain: str, path: str) -> Key:
    """The way back: a domain and a path under it (with or without the
    leading slash) -> its key. BadRequest when the tree cannot hold it."""
    domain, checked = check_domain(domain), check_path(path)
    parts = registry_key_parts(checked)
    if parts is None:
        return Key(domain, "", Kind.OTHER, checked)
    kind, repository, reference = parts
    return Key(domain, repository, kind, reference)


def blob_digest(algorithm: str, name: str) -> str | None:
    """The way back from blobs/<algorithm>/<name>: its digest, or None for a
    name no digest has."""
    digest = f"{algorithm}:{name}"
    return digest if is_digest(digest) else None


def check_domain(host: str) -> str:
    """A Host header or registry name, lower-cased; a default port dropped.
    Non-ASCII is refused before lower-casing: str.lower() and strip() would
    fold look-alikes (KELVIN SIGN -> 'k', ideographic space) into another,
    valid host."""
    if not host.isascii():
        raise BadRequest("NAME_INVALID", f"invalid host {host[:100]!r}")
    host = host.strip(" \t").lower()
    if host.endswith(":443") or host.endswith(":80"):
        host = host.rsplit(":", 1)[0]
    if not is_host(host):
        raise BadRequest("NAME_INVALID", f"invalid host {host[:100]!r}")
    return host


def check_path(path: str) -> str:
    """A generic URL path (no query) made safe to store: segments from
    SEGMENT_RE only, no '.', '..' or empty segments. Returns it without the
    leading slash; a directory path (trailing slash, like /v2/) is stored as
    its `_index` file, a name no repository component can have."""
    if len(path) > MAX_PATH_LEN or not path:
        raise BadRequest("NAME_INVALID", "path empty or too long")
    stripped = path[1:] if path.startswith("/") else path
    if not stripped or stripped.endswith("/"):
        stripped += INDEX_FILE
    segments = stripped.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not SEGMENT_RE.fullmatch(segment):
            raise BadRequest("NAME_INVALID", f"path segment {segment[:64]!r} not allowed")
    return stripped


def digest_url_path(path: str, digest: str) -> str | None:
    """A redirect target's URL path (no query) as it may be stored under its
    host, or None. Only a content-addressed URL qualifies: one whose path
    has a segment that is the digest or its hex, as Docker Hub's CDN's
    `.../blobs/sha256/<2 hex>/<hex>/data`, so that the stored bytes (which
    hash to that digest) can answer no other URL of that host. nginx serves
    such paths from disk and nothing else outside /v2/ (proxy-server.conf)."""
    hexpart = check_digest(digest).split(":", 1)[1]
    try:
        checked = check_path(path)
    except BadRequest:
        return None
    segments = checked.split("/")
    return checked if hexpart in segments or digest in segments else None


def parse_v2_path(path: str) -> RegistryPath:
    """Parse `/v2/<name>/(manifests|blobs)/<ref>` (the name may still carry a
    registry prefix; see split_prefix)."""
    if path in ("/v2", "/v2/"):
        return RegistryPath(Kind.PING)
    if not path.startswith("/v2/"):
        raise BadRequest("NAME_INVALID", "not a /v2/ path")
    if len(path) > MAX_PATH_LEN:
        raise BadRequest("NAME_INVALID", "path too long")
    head, _, ref = path[4:].rpartition("/")
    name, _, kind = head.rpartition("/")
    if kind == "manifests":
        if not (is_tag(ref) or is_digest(ref)):
            raise BadRequest("TAG_INVALID", f"invalid reference {ref[:140]!r}")
        return RegistryPath(Kind.MANIFEST, name, ref)
    if kind == "blobs":
        return RegistryPath(Kind.BLOB, name, check_digest(ref))
    if kind == "tags" and ref == "list":
        return RegistryPath(Kind.TAGS, name)
    if kind == "referrers":
        return RegistryPath(Kind.REFERRERS, name, check_digest(ref))
    return RegistryPath(Kind.OTHER, path[4:])


def check_name(name: str) -> str:
    if not is_name(name):
        raise BadRequest("NAME_INVALID", f"invalid repository name {name[:100]!r}")
    return name


def split_prefix(name: str) -> tuple[str | None, str]:
    """`registry.host/repo/...` -> ("registry.host", "repo/..."); Docker's rule
    for a first component naming a registry."""
    first, sep, rest = name.partition("/")
    if sep and names_registry(first):
        return first, rest
    return None, name


def mirror_prefix(registry: str) -> str:
    """A registry as the first component of a mirror path that another
    cr-proxy (a peer, a parent) reads back as that registry: a name Docker's
    rule would take for a repository (one label: `intranet`) gets its
    default port, which check_domain drops again. In ?ns= instead, a
    repository whose first component has a dot (`team.x/app`) would be
    read as a registry."""
    return registry if names_registry(registry) else f"{registry}:443"


def resolve_domain(registry: str, registry_hosts: dict[str, str]) -> str:
    """The host that serves a registry name (docker.io -> registry-1.docker.io)."""
    registry = check_domain(registry)
    return registry_hosts.get(registry, registry)


def mirror_target(
    path: str, ns: str | None, default_registry: str, registry_hosts: dict[str, str]
) -> Target:
    """Map a mirror-mode request to its target.

    Three ways to name the registry, in order: a path prefix
    (`/v2/ghcr.io/org/app/...`), containerd's `?ns=ghcr.io`, or none, which
    means the default registry (Docker's `registry-mirrors`)."""
    rpath = parse_v2_path(path)
    registry = ns or default_registry
    if rpath.kind is Kind.OTHER:
        check_path(path)  # forwarded as is: no dot segments, nothing encoded
    if rpath.kind in NAMED_KINDS:
        prefix, name = split_prefix(rpath.name)
        if prefix is not None:
            registry = prefix
        registry = normalise_registry(registry)
        if registry == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"  # Docker's rule for official images
        rpath = RegistryPath(rpath.kind, check_name(name), rpath.ref)
    else:
        registry = normalise_registry(registry)
    return Target(registry, resolve_domain(registry, registry_hosts), rpath)


def nginx_arg(query_string: str, name: str) -> str | None:
    """The value nginx's `$arg_<name>` holds for this query: the first
    `name=` argument, its name in any case, its value as sent (not
    decoded); None when there is none. The fetcher must read `?ns=` as
    nginx does: mirror_auth's verdict is nginx's, for the registry nginx
    read, and `?NS=docker.io&ns=ghcr.io` or `?n%73=ghcr.io` read another
    way would carry one registry's grant to another's repository."""
    for argument in query_string.split("&"):
        key, equals, value = argument.partition("=")
        if equals and key.lower() == name:
            return value
    return None


def ns_registry(raw: str) -> str:
    """A raw `ns` value as nginx's map reads it (nginx.py, $cr_ns_registry):
    containerd escapes the colon of host:port (Go's url.Values.Encode);
    nothing else is decoded (what still holds a `%` is no host, refused)."""
    host, colon, port = raw.partition("%3A") if "%3A" in raw else raw.partition("%3a")
    if colon and "%" not in host and port.isascii() and port.isdigit():
        return f"{host}:{port}"
    return raw


def mirror_ns(raw_query: str) -> str | None:
    """The registry a mirror request's `?ns=` names, read as nginx reads it
    (nginx_arg, then ns_registry); None when it names none."""
    return ns_registry(nginx_arg(raw_query, "ns") or "") or None


def normalise_registry(registry: str) -> str:
    """Lower case, default port dropped, Docker Hub's legacy name folded."""
    registry = check_domain(registry)
    return DOCKER_HUB if registry in DOCKER_HUB_ALIASES else registry


def proxy_target(host: str, path: str) -> tuple[str, RegistryPath | None]:
    """Map an https_proxy-mode request (Host + path) to (domain, rpath);
    rpath is None for paths outside /v2/ (token endpoints, CDN paths)."""
    domain = check_domain(host)
    if path.startswith("/v2/") or path == "/v2":
        rpath = parse_v2_path(path)
        if rpath.kind in NAMED_KINDS:
            check_name(rpath.name)
        elif rpath.kind is Kind.OTHER:
            check_path(path)
        return domain, rpath
    check_path(path)
    return domain, None


class Tree:
    """Paths under one cache root. Every method takes checked names only
    (from this module's parsers) and asserts the result stays in the root."""

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"Tree({str(self.root)!r})"

    def _under(self, *parts: str) -> Path:
        rel = PurePosixPath(*parts)
        # Defence in depth: the parsers already refuse these.
        if rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts):
            raise BadRequest("NAME_INVALID", f"unsafe path {str(rel)[:100]!r}")
        return self.root.joinpath(rel)

    def at(self, key: Key, sidecar: Sidecar | None = None) -> Path:
        """Where a key's payload is, or (given a sidecar kind) that header."""
        top = CONTENT if sidecar is None else Sidecar(sidecar).value
        return self._under(top, key.domain, key.path)

    def key_at(self, path: Path) -> Key:
        """Inverse of at() for payloads: a file under content/ -> its key."""
        return key_of(*self.parse_content(path))

    def domain_dir(self, domain: str) -> Path:
        """content/<domain>: where a host's cached answers are."""
        return self._under(CONTENT, check_domain(domain))

    def content(self, domain: str, path: str) -> Path:
        """at() for a URL path (checked here) rather than a key."""
        return self._under(CONTENT, check_domain(domain), check_path(path))

    def sidecar(self, kind: Sidecar | str, domain: str, path: str) -> Path:
        """at(key, kind) for a URL path (checked here) rather than a key."""
        if kind not in SIDECARS:
            raise ValueError(kind)
        return self._under(str(kind), check_domain(domain), check_path(path))

    def blob(self, digest: str) -> Path:
        algorithm, hexpart = check_digest(digest).split(":", 1)
        return self._under(BLOBS, algorithm, hexpart)

    def quarantined(self, digest: str) -> Path:
        """quarantine/<alg>-<hex>: where `verify` moves a corrupt blob."""
        return self._under(QUARANTINE, check_digest(digest).replace(":", "-"))

    def listing(self, domain: str, name: str, kind: Kind, query: str) -> Path:
        """lists/<domain>/<name>/_<kind>/<query>: one stored answer of a
        listing (a tag list page, a subject's referrers). `_<kind>` can be
        no repository component (they begin with [a-z0-9]), so no name
        shadows another's; `query` is a file name the caller made from
        checked parts (LISTING_FILE_RE)."""
        if not LISTING_FILE_RE.fullmatch(query):
            raise BadRequest("NAME_INVALID", f"not a listing file {query[:100]!r}")
        return self.listings(domain, name, kind) / query

    def listings(self, domain: str, name: str, kind: Kind) -> Path:
        """lists/<domain>/<name>/_<kind>: a repository's stored listings of
        one kind."""
        if kind not in LISTING_KINDS:
            raise BadRequest("NAME_INVALID", f"not a listing kind {kind}")
        return self._under(LISTS, check_domain(domain), check_name(name), f"_{kind.value}")

    def private_marker(self, domain: str, name: str) -> Path:
        """lists/<domain>/<name>/_private: the mark of a private repository
        (nginx tests it by this path: nginx/locations.conf)."""
        return self._under(LISTS, check_domain(domain), check_name(name), PRIVATE_MARK)

    def private_blob(self, digest: str) -> Path:
        """private/<alg>/<hex>: the mark of a digest stored for a private
        repository."""
        algorithm, hexpart = check_digest(digest).split(":", 1)
        return self._under(PRIVATE_BLOBS, algorithm, hexpart)

    def top(self, name: str) -> Path:
        """One of the top directories (TOP_DIRS), to walk it (scan.py)."""
        if name not in TOP_DIRS:
            raise ValueError(name)
        return self.root / name

    @property
    def temp(self) -> Path:
        return self.root / TEMP

    @property
    def held(self) -> Path:
        return self.root / HELD

    @property
    def uses_file(self) -> Path:
        return self.root / USES_FILE

    @property
    def pins_file(self) -> Path:
        return self.root / PINS_FILE

    def parse_content(self, path: Path) -> tuple[str, str]:
        """Inverse of content(): a file under content/ -> (domain, path)."""
        rel = path.relative_to(self.root / CONTENT)
        domain, *rest = rel.parts
        return domain, "/".join(rest)
