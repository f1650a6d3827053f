"""A body hashed and written into the cache beside the event loop: what a
blob download (blobs.py) and a pushed upload (push.py) share.

Policy: the pieces are gathered (not copied) into batches of WRITE_BATCH
bytes and each batch is hashed and written (one writev) in a thread
(hashlib and os.writev let go of the GIL) while the loop reads the next one,
with one write in flight at a time, so the bytes stay in order and at most
two batches are held. Awaiting each
write before reading on made a download half as fast; hashing and writing
every small piece on the loop made a push hold up its own relay.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from cr_proxy.cache.store import BlobWriter

WRITE_BATCH = 1 << 20  # bytes gathered before one executor hop to the disk
WRITE_THREADS = 4  # bodies hashed and written at once


class PipedWrites:
    """One body's batches into `writer`, one write in flight at a time.
    `on_written`, if given, is told the bytes in the file as soon as each
    batch is written, not when the next batch fills: readers tailing the
    file (a download's) would otherwise miss a stalled upstream's last MiB."""

    __slots__ = ("_batch", "_batched", "_closed", "_executor", "_on_written", "_reports",
                 "_writing", "writer")

    def __init__(self, executor: Executor, writer: BlobWriter,
                 on_written: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.writer = writer
        self._executor = executor
        self._on_written = on_written
        self._reports: set[asyncio.Future[None]] = set()
        self._batch: list[bytes] = []
        self._batched = 0  # bytes in _batch
        self._writing: concurrent.futures.Future[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<PipedWrites {self.writer!r} batch={self._batched}>"

    async def add(self, chunk: bytes) -> None:
        """Gather a chunk; once a batch is full, hand it to a thread (after
        the write before it is done). Progress goes to `on_written`."""
        if self._closed:
            return
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched < WRITE_BATCH:
            return
        if self._writing is not None:
            await asyncio.wrap_future(self._writing)
        if self._closed:  # closed while it waited: the file is the closer's now
            return
        self._writing = self._submit()

    def _submit(self) -> concurrent.futures.Future[None]:
        writing = self._executor.submit(self.writer.write_all, self._take())
        if self._on_written is not None:
            report = asyncio.ensure_future(self._report(writing))
            self._reports.add(report)
            report.add_done_callback(self._reports.discard)
        return writing

    async def _report(self, writing: concurrent.futures.Future[None]) -> None:
        try:
            await asyncio.wrap_future(writing)
        except Exception:  # the write's error reaches the caller from add or flush
            return
        if not self._closed and self._on_written is not None:
            await self._on_written(self.writer.size)

    def _take(self) -> list[bytes]:
        """The batch, for a thread; a new one for what comes next."""
        batch, self._batch, self._batched = self._batch, [], 0
        return batch

    async def flush(self) -> None:
        """The write in flight, then the last batch: the file is up to date."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await asyncio.wrap_future(writing)
        if self._batch and not self._closed:
            self._writing = self._submit()
            await asyncio.wrap_future(self._writing)
            self._writing = None

    def close(self) -> None:
        """No more writes; wait for the one in flight (one batch, blocking),
        so that the caller may close or abort the file next: a thread still
        writing to a closed descriptor could write into a file opened since
        under its number."""
        self._closed = True
        self._take()
        if self._writing is not None and not self._writing.done():
            concurrent.futures.wait([self._writing])
        self._writing = None
        for report in self._reports:
            report.cancel()
