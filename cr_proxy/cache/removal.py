"""Removal of images with reference counting (`cr-proxy rm`, the evictor).

Policy: an image's tag link and sidecars go first; then its repository's
by-digest manifests (the index and its platforms) unless another image of
the repository still uses them, so that no `name@digest` image is left
behind; then every digest the image used and no remaining image uses is
freed: each content/ name with its inode, under every domain (CDN redirect
targets included), then the `redirect/` records pointing at those names,
then the blobs/ file. Each name goes payload first, then its sidecars (the
reverse of the commit order); in a redirect chain the name that redirects
goes before its target; blobs/ last. Blob names of a shared blob in the
removed image's repository stay: they still serve the right bytes. A blob
named again since the scan (a pull racing the removal) keeps its blobs/
file, so its bytes stay counted and freeable.
When the last image of a repository goes, so do its stored listings (tag
list pages, referrers answers in lists/): nothing of it is left to list or
to refer to; `cr-proxy du` counts them meanwhile.

Only unlinks (Store), so nginx and the fetcher see a name whole or not at
all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from cr_proxy.cache.image import Image
from cr_proxy.cache.layout import Kind, Sidecar, key_of
from cr_proxy.cache.scan import BlobFile, Link, Redirect, Scan, scan_redirects
from cr_proxy.cache.store import Store
from cr_proxy.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Removed:
    images: tuple[str, ...]  # keys
    blobs: tuple[str, ...]  # digests whose blobs/ file was removed
    files: int  # payloads, sidecars, listings and blobs/ files unlinked
    bytes: int  # freed: the sizes of those blobs


def remove_images(
    store: Store, scan: Scan, current: Sequence[Image], images: Iterable[Image],
    keep: Collection[str] = frozenset(),
) -> Removed:
    """Remove images (by key, among `current`: every image of `scan`) and
    whatever only they used, but never a digest in `keep` (what a push in
    progress uploaded or relies on: no image uses it yet)."""
    keys = {image.key for image in images}
    gone = [image for image in current if image.key in keys]
    remaining = [image for image in current if image.key not in keys]
    still_used = set().union(*(image.digests for image in remaining), keep)
    files = 0
    for image in gone:
        files += _remove_names(store, image, remaining)
    left = {(i.domain, i.repository) for i in remaining}
    for domain, repository in sorted({(i.domain, i.repository) for i in gone} - left):
        files += store.remove_listings(domain, repository)
    freed = sorted((set().union(*(i.digests for i in gone)) - still_used) & scan.blobs.keys())
    redirects = list(scan_redirects(store.tree)) if freed else []
    freed_bytes = 0
    for digest in freed:
        removed, blob_gone = _free(store, scan.blobs[digest], scan, redirects)
        files += removed + blob_gone
        freed_bytes += scan.blobs[digest].size if blob_gone else 0
    return Removed(tuple(i.key for i in gone), tuple(freed), files, freed_bytes)


def remove_blobs(
    store: Store, scan: Scan, digests: Iterable[str], keep: Collection[str] = frozenset(),
) -> Removed:
    """Free blobs no image uses (the evictor's: a blob filled for a cluster
    peer, a pushed layer whose manifest never came), each as an image's
    last blob is freed: its names, the records pointing at them, then
    blobs/; never a digest in `keep`."""
    freed = sorted((set(digests) - set(keep)) & scan.blobs.keys())
    redirects = list(scan_redirects(store.tree)) if freed else []
    files = freed_bytes = 0
    for digest in freed:
        removed, blob_gone = _free(store, scan.blobs[digest], scan, redirects)
        files += removed + blob_gone
        freed_bytes += scan.blobs[digest].size if blob_gone else 0
    return Removed((), tuple(freed), files, freed_bytes)


def _remove_names(store: Store, image: Image, remaining: list[Image]) -> int:
    """The image's own names: its tag, then its repository's by-digest
    manifests that no other image of the repository uses."""
    kept = set().union(*(
        i.manifests for i in remaining if (i.domain, i.repository) == (image.domain,
                                                                       image.repository)
    ))
    keys = [image.location] if image.tag is not None else []
    keys += [image.manifest(d) for d in sorted(image.manifests - kept)]
    return sum(_remove_path(store, key.domain, key.path) for key in keys)


def _free(
    store: Store, blob: BlobFile, scan: Scan, redirects: list[Redirect]
) -> tuple[int, int]:
    """Every name of a blob, the records pointing at them, then the blob."""
    links = scan.names.get(blob.inode, ())
    targets = {link.where for link in links}
    records = [r for r in redirects
               if r.target in targets or names_blob(r.domain, r.path, blob.digest)]
    removed = 0
    for link in chain_order(links, records):
        removed += _remove_path(store, link.domain, link.path, link.inode)
    for record in records:
        removed += store.remove_sidecar(Sidecar.REDIRECT, record.domain, record.path)
    if store.names_left(blob.digest, blob.inode):
        # Named since the scan (a pull of another repository confirmed the
        # digest there): the blob stays, counted, for a later pass to free
        # with its names; gone, its name would hold bytes nothing counts.
        return removed, 0
    return removed, int(store.remove_blob(blob.digest, blob.inode))


def names_blob(domain: str, path: str, digest: str) -> bool:
    """Whether a stored name is `v2/<any repository>/blobs/<digest>`."""
    try:
        key = key_of(domain, path)
    except BadRequest:
        return False
    return key.kind is Kind.BLOB and key.reference == digest


def _remove_path(store: Store, domain: str, path: str, inode: int | None = None) -> int:
    """Payload first, then its sidecars: the reverse of the commit order,
    so nginx never finds a payload without its headers."""
    removed = int(store.unlink_content(domain, path, inode))
    return removed + store.remove_sidecars(domain, path)


def chain_order(links: Iterable[Link], records: Iterable[Redirect]) -> list[Link]:
    """Links ordered so that a name that redirects goes before its target
    (nginx or a client following a stored redirect never lands on a name
    already gone while the record is still there)."""
    sources: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        if record.target is not None:
            sources[record.target].append((record.domain, record.path))

    def depth(where: tuple[str, str], seen: frozenset[tuple[str, str]]) -> int:
        before = [s for s in sources.get(where, []) if s not in seen]
        return 1 + max((depth(s, seen | {where}) for s in before), default=-1)

    return sorted(links, key=lambda link: (depth(link.where, frozenset()), link.where))

