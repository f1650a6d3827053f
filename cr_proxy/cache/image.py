"""An image as the cache holds it: what `ls` lists and `rm` and the evictor
remove (inventory.py finds them in the tree).

Policy:
- An *image* is a tag, `content/<domain>/v2/<name>/manifests/<tag>`, or a
  manifest cached by digest only (`.../manifests/<digest>`) that no tag and
  no index of the same repository points at (shown as `name@digest`). Its
  key is `<domain>/<name>:<tag>` or `<domain>/<name>@<digest>`; its shown
  name uses the registry instead of the domain (registry-1.docker.io is
  shown as docker.io).
- Last used (`Image.last_used`, computed by the `last_used` function given
  to Inventory, by default `file_times`): the newest of the tag's
  docker-content-digest sidecar mtime (the fetcher stored or revalidated the
  tag for a client), the manifest blob's mtime (first stored), and its atime
  (nginx reading it for a pull; at most a day late under relatime, frozen
  under noatime). The atime is trusted only when the inventory reads without
  touching it (O_NOATIME, allowed to the files' owner: `serve`'s user);
  otherwise it is left out. A feed of real use (nginx's access log, usage.py)
  plugs in as another `last_used` function (evict.last_use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cr_proxy.cache.layout import Key


@dataclass(frozen=True, slots=True)
class Image:
    domain: str  # the cache's <domain>: the host that serves it
    registry: str  # the registry name shown (docker.io for registry-1.docker.io)
    repository: str
    tag: str | None  # None: a manifest cached by digest only
    digest: str  # what the tag points at: a manifest or an index
    media_type: str  # "" when not known
    platforms: tuple[str, ...]
    digests: frozenset[str]  # everything it uses: manifests, configs, layers
    manifests: frozenset[str]  # the manifests among them (an index and its platforms)
    missing: frozenset[str]  # used but not in blobs/, platforms never pulled included
    size: int  # bytes of the used digests in blobs/, each once
    validated_at: float | None  # mtime of the tag's docker-content-digest sidecar
    stored_at: float  # mtime of the manifest's blobs/ file
    read_at: float | None  # its atime; None when not trusted
    last_used: float = 0.0
    unpulled: frozenset[str] = frozenset()  # index entries never pulled: missing, not lost
    cached_platforms: tuple[str, ...] = ()  # the platforms pulled (all of a plain manifest's)
    missing_bytes: int | None = 0  # sizes the manifests state for `lost`; None: not all known
    private: bool = False  # its repository is marked private (fetch/private.py)

    @property
    def lost(self) -> frozenset[str]:
        """What is missing of what was pulled: manifests of pulled platforms,
        configs, layers (inventory.py's docstring)."""
        return self.missing - self.unpulled

    @property
    def complete(self) -> bool:
        return not self.lost

    @property
    def ref(self) -> str:
        return self.tag if self.tag is not None else self.digest

    @property
    def key(self) -> str:
        return f"{self.domain}/{self._repo_ref}"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self._repo_ref}"

    @property
    def location(self) -> Key:
        """Where its manifest (the tag, or the digest-only manifest) is."""
        return self.manifest(self.ref)

    @property
    def path(self) -> str:
        """Its manifest's path under content/<domain>/ (as usage.py keys it)."""
        return self.location.path

    def manifest(self, reference: str) -> Key:
        """Where a manifest of its repository (a tag or a digest) is."""
        return Key.manifest(self.domain, self.repository, reference)

    def blob(self, digest: str) -> Key:
        """Where a blob of its repository is."""
        return Key.blob(self.domain, self.repository, digest)

    @property
    def _repo_ref(self) -> str:
        sep = ":" if self.tag is not None else "@"
        return f"{self.repository}{sep}{self.ref}"


LastUsed = Callable[[Image], float]


def file_times(image: Image) -> float:
    """The default `last_used`: the newest time the tree can vouch for (see
    the module docstring)."""
    times = [image.stored_at, image.validated_at or 0.0, image.read_at or 0.0]
    return max(times)
