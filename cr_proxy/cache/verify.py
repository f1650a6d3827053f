"""Verification of the digest store (`cr-proxy verify`).

Policy: every blobs/ file is hashed (streaming, without touching its
atime) against its name. A failing one is first moved to
`quarantine/<alg>-<hex>` (so the fetcher stops linking it), then every
content/ name with its inode is removed with its sidecars (so nginx stops
serving it), those made while the store was hashed too (the file's link
count tells); the next pull fetches it again. A blob removed meanwhile (rm,
the evictor) is not checked.
"""

from __future__ import annotations

import os
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
    removed = _unname(store, blob, scan)
    if quarantined is not None and _names_left(quarantined):
        # Named since the scan (a pull linked it while the store was being
        # hashed, which can take hours): those names go too.
        removed += _unname(store, blob, Scan.of(store.tree))
    return Failure(blob.digest, actual, quarantined, tuple(removed))


def _unname(store: Store, blob: BlobFile, scan: Scan) -> list[str]:
    removed = []
    for link in scan.names.get(blob.inode, ()):
        if store.unlink_content(link.domain, link.path, blob.inode):
            store.remove_sidecars(link.domain, link.path)
            removed.append(f"{link.domain}/{link.path}")
    return removed


def _names_left(quarantined: Path) -> bool:
    """Whether a name besides its quarantine/ one still links the file."""
    try:
        return os.lstat(quarantined).st_nlink > 1
    except FileNotFoundError:
        return False
