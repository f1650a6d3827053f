"""Start-up pass over the manifest sidecars: a header value nginx must never
replay is removed before nginx serves anything.

A manifest hit is answered by nginx alone, with the Content-Type and
Docker-Content-Digest read from the sidecars (cr.js) and replayed as they
are. This cr-proxy writes only values from closed grammars there
(Store.record_manifest: the four manifest and index types, a digest by the
grammar; write_sidecar refuses control characters), and nothing else
writes the tree while it runs (privsep.py). An older cr-proxy stored the
wire's values, so a cache it filled may hold an injected header; checking
every hit in njs cost 12% of nginx's instructions per manifest hit
(docs/performance.md), so the check is made here, once per start.

Removing the digest sidecar is enough to take the manifest off the hit
path: cr.js answers "go to the fetcher" without it, and the fetcher
(Store.read_manifest) treats the manifest as not cached and fetches it
again, storing clean headers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cr_proxy.cache.layout import Kind, Sidecar, Tree, registry_key_parts
from cr_proxy.cache.scan import walk_names
from cr_proxy.oci.manifest import MANIFEST_MEDIA_TYPES
from cr_proxy.oci.reference import is_digest

log = logging.getLogger(__name__)

# Longer than any type or digest cr-proxy writes (a sha512 digest is 135).
READ_LIMIT = 256


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(READ_LIMIT).decode("utf-8", "replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def is_safe(content_type: str | None, digest: str | None) -> bool:
    """Both headers of a manifest are values nginx may replay as they are."""
    return content_type in MANIFEST_MEDIA_TYPES and digest is not None and is_digest(digest)


def scrub_manifest_sidecars(tree: Tree) -> int:
    """Take every manifest whose stored headers are unsafe off the hit path;
    the number of manifests so taken."""
    removed = 0
    for domain, path, entry in walk_names(tree, Sidecar.DOCKER_CONTENT_DIGEST):
        parts = registry_key_parts(path)
        if parts is None or parts[0] is not Kind.MANIFEST:
            continue
        content_type = _read(tree.top(Sidecar.CONTENT_TYPE) / domain / path)
        if is_safe(content_type, _read(Path(entry.path))):
            continue
        Path(entry.path).unlink(missing_ok=True)
        (tree.top(Sidecar.CONTENT_TYPE) / domain / path).unlink(missing_ok=True)
        removed += 1
    if removed:
        log.warning("took %d manifest(s) with unsafe stored headers (an older cr-proxy's) "
                    "off the hit path: each is fetched again at its next pull", removed)
    return removed
