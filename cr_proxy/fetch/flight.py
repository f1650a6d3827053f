"""Work in progress merged by key: the one mechanism that keeps a second
caller from starting what a first already runs (aiohttp's `_resolve_host`:
a dict filled before any await, the work detached from every caller).

- InFlight: the mechanism itself, a value per key while its work runs;
- Shared: awaited results (a manifest fetch, a tag revalidation): every
  caller of one key gets the one result or error, or, past its budget,
  leaves the work to finish in the background;
- Flights: one upstream download per key (the fetcher's: a source and a
  digest), however many clients ask at once, described below.

The first miss for a key starts a Flight: a task, detached from any
client, that writes the upstream body into a temp file (store.BlobWriter)
and commits it. Every client, the first included, is a reader that tails
that temp file through its own file descriptor at its own pace, so a slow
client never slows the download or the others, and a client that hangs up
does not cancel the download (the cache write outlives it).

A reader is never given the last byte before the download is verified: a
digest mismatch or a truncated upstream body therefore always reaches the
client as an incomplete response, never as a complete wrong one.

A reader that joins a download under way may hold (download.hold): if the
download is verified within the hold, the reader does not tail it at all:
the verified file gets a name of its own in held/ (`held`), and nginx
sends it (sendfile) on the fetcher's word, as it sends a hit. Relaying a
miss through the fetcher's socket costs nginx a copy of every byte for
every reader; the reader that started the download streams it (its bytes
arrive as soon as they can), the ones that joined mostly need not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger("cr_proxy.flight")

READ_CHUNK = 1 << 20
T = TypeVar("T")
V = TypeVar("V")


class InFlight(Generic[V]):
    """A value per key while its work runs. join() fills the table before
    any await, so two callers of one key can never both start the work; the
    key is forgotten the moment the work's future is done (a done callback,
    added first, so it runs before any waiter resumes), and a later join
    starts afresh."""

    __slots__ = ("_running", "joined")

    def __init__(self) -> None:
        self._running: dict[Hashable, tuple[V, asyncio.Future[Any]]] = {}
        self.joined = 0  # callers that found the work running

    def __repr__(self) -> str:
        return f"<InFlight {len(self._running)} running, {self.joined} joined>"

    def __len__(self) -> int:
        return len(self._running)

    def values(self) -> list[V]:
        return [value for value, _ in self._running.values()]

    def join(self, key: Hashable, start: Callable[[], tuple[V, asyncio.Future[Any]]]) -> V:
        """The running value of `key`, or start() -> (value, its future)."""
        running = self._running.get(key)
        if running is not None:
            self.joined += 1
            return running[0]
        value, future = start()
        self._running[key] = (value, future)
        future.add_done_callback(lambda _: self._running.pop(key, None))
        return value


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class StillRunning(Exception):
    """Shared.run's budget ran out; the work goes on without this caller."""


class Shared:
    """Concurrent calls for one key merged into one awaited coroutine; the
    work is shielded so a caller that goes away (a client's disconnect, a
    budget that ran out) does not cancel it: it finishes for the others, or
    for nobody, in the background."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: InFlight[asyncio.Future[Any]] = InFlight()

    def __repr__(self) -> str:
        return f"<Shared {self._running!r}>"

    async def run(
        self, key: Hashable, work: Callable[[], Awaitable[T]], within: float | None = None
    ) -> T:
        """The work's result (or error); StillRunning after `within`
        seconds, if given, with the work left running."""
        def start() -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
            future = asyncio.ensure_future(work())
            # The error of work every caller left is nobody's to hear (and
            # its cause is counted where it happened): not "never retrieved".
            future.add_done_callback(_retrieved)
            return future, future

        shielded = asyncio.shield(self._running.join(key, start))
        if within is None:
            return await shielded
        try:
            return await asyncio.wait_for(shielded, within)
        except TimeoutError:
            if shielded.cancelled():  # wait_for's own timeout, not the work's error
                raise StillRunning from None
            raise


class Flight:
    """The state of one download, shared by its readers.

    States: running (bytes arriving; readers get all but the last byte),
    verified (the whole content hashed to its digest: readers get it all,
    while the store fsyncs and renames it), finished (committed, or failed).
    """

    __slots__ = (
        "_changed", "_read_fd", "_started_at", "committed_path", "error", "finished",
        "headers_ready", "held", "key", "size", "task", "verified", "written",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        # Open on the temp file while the download runs; readers dup it, which
        # stays valid when the commit renames or an abort unlinks the file.
        self._read_fd = -1
        self._started_at = 0.0  # time.monotonic() when the upstream answered
        self.size: int | None = None  # Content-Length from upstream, if any
        self.written = 0
        self.verified = False
        self.finished = False
        self.error: BaseException | None = None
        self.committed_path: Path | None = None
        # temp/'s name for the verified file that nginx may send (Store.hold):
        # set before readers learn the download is verified.
        self.held: str | None = None
        self.headers_ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = ("failed" if self.error else "done" if self.finished
                 else "verified" if self.verified else "running")
        return f"<Flight {self.key} {state} {self.written}/{self.size}>"

    # --- the writer's side ----------------------------------------------------

    def started(self, temp_path: Path, size: int | None) -> None:
        self._read_fd = os.open(temp_path, os.O_RDONLY)
        self._started_at = time.monotonic()
        self.size = size
        self.headers_ready.set()

    async def progress(self, written: int) -> None:
        self.written = written
        await self._notify()

    async def verified_whole(self) -> None:
        """Every byte is written and hashes to the digest: readers may have
        the last byte now, before the fsync and rename of the commit."""
        self.verified = True
        await self._notify()

    async def finish(self, committed: Path | None, error: BaseException | None) -> None:
        self.committed_path = committed
        self.error = error  # after verification, only later readers see it
        # Only verified content is ever committed.
        self.verified = self.verified or (committed is not None and error is None)
        self.finished = True
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        self.headers_ready.set()
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- a reader's side ------------------------------------------------------

    async def wait_started(self) -> None:
        """Until the upstream answered (or the download failed before)."""
        await self.headers_ready.wait()
        if self.error:
            raise self.error

    async def held_within(self, seconds: float) -> str | None:
        """The held name of the verified file when the download is verified
        within `seconds`, else None (still running, failed, or verified
        without a held name): the reader then tails the file as usual. Its
        bytes are on disk by then, so it catches up at local speed and ends
        when the download does: the hold costs a joiner of a long download
        its first byte's time, not its last's.

        Holding pays when the download is quicker than the local delivery
        (the CPU is the limit: nginx's sendfile instead of a relay); on a
        slow link, streaming overlaps the delivery with the download and
        holding only queues it after (16 clients at ~1 Gbit/s: 1.43x one
        client's time streamed, 1.85x held). So once a quarter of the hold
        has passed since the upstream answered (the first MiB come slowly,
        TCP's slow start), a download that at its average rate would end
        after the hold is streamed at once; and at the end of the hold, one
        that will be done within another is waited for once more (joiners
        giving up just before the end would be relayed it all at once)."""
        deadline = time.monotonic() + seconds

        def over() -> bool:
            return self.verified or self.finished

        def decided() -> bool:
            return over() or self._late(deadline, seconds / 4)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(decided), seconds)
            except TimeoutError:
                left = self.time_left()
                if left is not None and left <= seconds:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait_for(over), seconds)
        return self.held if self.verified else None

    def _late(self, deadline: float, observed: float) -> bool:
        """After `observed` seconds of the download, its average rate says
        it ends after `deadline`."""
        now = time.monotonic()
        left = self.time_left()
        return now - self._started_at >= observed and left is not None and now + left > deadline

    def time_left(self) -> float | None:
        """Seconds until the last byte, at the download's average rate so
        far; None while that cannot be told (no size, nothing written)."""
        if self.size is None or self.written <= 0:
            return None
        elapsed = time.monotonic() - self._started_at
        return elapsed * max(self.size - self.written, 0) / self.written

    def _open(self) -> int:
        if self._read_fd >= 0:
            return os.dup(self._read_fd)
        if self.committed_path is None:
            raise self.error or OSError(f"{self.key}: nothing to read")
        return os.open(self.committed_path, os.O_RDONLY)

    async def ranges(self) -> AsyncIterator[tuple[int, int, int]]:
        """(fd, offset, count) of content a reader may send, in order, as it
        becomes available; raises the download's error if it fails before it
        is verified. The fd is this reader's own and is closed at the end."""
        await self.wait_started()
        fd = self._open()
        offset = 0
        try:
            while True:
                if self.error and not self.verified:
                    raise self.error
                # Hold back the last byte until the content is verified.
                limit = self.written if self.verified else self.written - 1
                if offset < limit:
                    yield fd, offset, limit - offset
                    offset = limit
                    continue
                if self.verified or self.finished:
                    if self.verified:
                        return
                    raise self.error or OSError(f"{self.key}: download ended unverified")
                async with self._changed:
                    await self._changed.wait_for(
                        lambda sent=offset: self.verified or self.finished
                        or self.written - 1 > sent
                    )
        finally:
            os.close(fd)

    async def read(self) -> AsyncIterator[bytes]:
        """The same content as bytes (READ_CHUNK at most at a time)."""
        loop = asyncio.get_running_loop()
        async for fd, offset, count in self.ranges():
            end = offset + count
            while offset < end:
                chunk = await loop.run_in_executor(
                    None, os.pread, fd, min(READ_CHUNK, end - offset), offset
                )
                if not chunk:
                    raise OSError(f"{self.key}: temp file shorter than recorded")
                offset += len(chunk)
                yield chunk


Download = Callable[[Flight], Awaitable[None]]


class Flights:
    """Flights in progress, by key (an InFlight of them: two misses for one
    key can never both start a download)."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: InFlight[Flight] = InFlight()

    def __repr__(self) -> str:
        return f"<Flights {self._flights.values()!r}>"

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def coalesced(self) -> int:
        """Readers that joined a running flight."""
        return self._flights.joined

    def written(self) -> int:
        """Bytes the downloads in progress have written to temp/ so far (a
        verified one is about to be counted as stored: left out)."""
        return sum(f.written for f in self._flights.values() if not f.verified)

    def join(self, key: str, download: Download) -> Flight:
        def start() -> tuple[Flight, asyncio.Task[None]]:
            flight = Flight(key)
            flight.task = asyncio.create_task(self._run(flight, download), name=f"flight {key}")
            return flight, flight.task

        return self._flights.join(key, start)

    @staticmethod
    async def _run(flight: Flight, download: Download) -> None:
        try:
            await download(flight)
        except Exception as err:  # reported to every reader, logged once here
            log.error("download of %s failed: %s", flight.key, err)
            if not flight.finished:
                await flight.finish(None, err)
        finally:
            if not flight.finished:
                await flight.finish(None, ConnectionAbortedError("download cancelled"))

    async def close(self, grace: float = 10.0) -> None:
        """Let downloads in flight finish (their clients may have their last
        byte already, with the commit still to come), then cancel the rest."""
        tasks = [f.task for f in self._flights.values() if f.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
