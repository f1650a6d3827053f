"""A pushed upload's temp file, written around the page cache (O_DIRECT).

Why: a push's bytes go on to the registry; our copy is read only when an
image is later pulled through this cache. Written through the page cache,
every pushed layer takes page-cache memory it may never need, pushing
pulled layers (the hits) out, and costs a copy into it: on the VM this
project is measured on, whose host reclaims the guest's free memory, that
copy into fresh pages cost up to 1 CPU-second per 256 MiB pushed, more than
hashing it (docs/performance.md, "Session 10"). A direct write hands the
disk one reused, aligned buffer instead. The price: the first pull of a
pushed layer reads it from the disk, not from memory.

Policy: the bytes are copied into an aligned stage of STAGE bytes; a full
stage goes to the disk with O_DIRECT; at the end, the last partial stage is
written through the page cache (O_DIRECT off: a tail is rarely a whole
block). A filesystem that refuses O_DIRECT (the flag or a write) gets plain
writes from then on: the bytes and the hash are the same either way.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from cr_proxy.cache.store import BlobWriter

STAGE = 1 << 20  # bytes per direct write; a multiple of every disk's block size


class DirectWriter(BlobWriter):
    """A BlobWriter whose whole stages bypass the page cache."""

    __slots__ = ("_stage", "_staged")

    def __init__(self, temp_dir: Path, digest: str) -> None:
        super().__init__(temp_dir, digest)
        self._staged = 0  # bytes in _stage, not yet written
        # mmap: page-aligned memory, as O_DIRECT wants; None: plain writes.
        self._stage: mmap.mmap | None = mmap.mmap(-1, STAGE) if _set_direct(self._fd, True) \
            else None

    @property
    def direct(self) -> bool:
        return self._stage is not None

    def _put(self, chunks: Sequence[bytes | memoryview]) -> None:
        if self._stage is None:
            super()._put(chunks)
            return
        stage = self._stage
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                taken = min(STAGE - self._staged, len(view))
                stage[self._staged:self._staged + taken] = view[:taken]
                self._staged += taken
                view = view[taken:]
                if self._staged == STAGE:
                    self._write_stage()

    def _write_stage(self) -> None:
        """The stage's bytes to the disk (direct, unless the tail or a
        filesystem that refused it)."""
        assert self._stage is not None
        view = memoryview(self._stage)[:self._staged]
        try:
            while view:
                try:
                    written = os.write(self._fd, view)
                except OSError as err:
                    # EINVAL on a direct write: none here after all (the
                    # filesystem, or a short write left the rest unaligned);
                    # on a plain one it is the caller's.
                    if err.errno != errno.EINVAL or not _is_direct(self._fd) \
                            or not _set_direct(self._fd, False):
                        raise
                    continue
                view = view[written:]
        finally:
            view.release()  # the stage can be closed only once no view holds it
        self._staged = 0

    def sync_and_close(self) -> None:
        if self._staged:
            # The tail is rarely a whole block: through the page cache.
            _set_direct(self._fd, False)
            self._write_stage()
        super().sync_and_close()

    def close(self) -> None:
        super().close()
        if self._stage is not None:
            self._stage.close()
            self._stage = None


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _set_direct(fd: int, on: bool) -> bool:
    """O_DIRECT on or off for fd; False if the filesystem refuses it."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True
