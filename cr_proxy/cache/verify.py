"""Verification of the digest store (`cr-proxy verify`).

Policy: every blobs/ file is hashed (streaming, without touching its
atime) against its name. A failing one is first moved to
`quarantine/<alg>-<hex>` (so the fetcher stops linking it), then every
content/ name with its inode is removed with its sidecars (so nginx stops
serving it); the next pull fetches it again. A blob removed meanwhile (rm,
the evictor) is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cr_proxy.cache.scan import BlobFile, Reader, Scan
from cr_proxy.cache.store import Store


@dataclass(frozen=True, slots=True)
class Failure:
    digest: str
    actual: str | None  # what the bytes hash to; None if unreadable
    quarantined: Path | None
    removed: tuple[str, ...]  # "<domain>/<path>" of the content/ names removed


@dataclass(frozen=True, slots=True)
class Verification:
    checked: int
    bytes: int
    failures: tuple[Failure, ...]


def verify(store: Store) -> Verification:
    """Hash every blobs/ file; quarantine those that fail."""
    scan = Scan.of(store.tree)
    reader = Reader()
    failures, checked, size = [], 0, 0
    for digest, blob in sorted(scan.blobs.items()):
        actual = reader.hash(blob.path, digest.split(":", 1)[0])
        if actual is None:
            continue  # removed meanwhile (rm, an evictor): nothing to check
        checked, size = checked + 1, size + blob.size
        if actual != digest:
            failures.append(quarantine(store, blob, actual, scan))
    return Verification(checked, size, tuple(failures))


def quarantine(store: Store, blob: BlobFile, actual: str, scan: Scan) -> Failure:
    # The blobs/ file goes first: while it is there the fetcher links it
    # to every new name asked for, which a scan made before would miss.
    quarantined = store.quarantine(blob.digest, blob.inode)
    removed = []
    for link in scan.names.get(blob.inode, ()):
        if store.unlink_content(link.domain, link.path, blob.inode):
            store.remove_sidecars(link.domain, link.path)
            removed.append(f"{link.domain}/{link.path}")
    return Failure(blob.digest, actual, quarantined, tuple(removed))
