"""cr_proxy.flight: one download per key, many readers, never a complete wrong body.

Also cr_proxy.fetch.flight.Shared, the same idea for awaited results."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.cache.store import Store
from cr_proxy.errors import DigestMismatch, NotFound, Truncated, UpstreamTimeout
from cr_proxy.fetch import flight as flight_mod
from cr_proxy.fetch.flight import Flight, Flights, Shared, StillRunning
from cr_proxy.oci.reference import digest_of

DATA = bytes(range(256)) * 64  # 16 KiB
DIGEST = digest_of(DATA)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


class FakeDownload:
    """A flight's download with a real BlobWriter: started, writes `body` in
    `chunks` with progress after each, waits at `gate`, then fails with
    `error` or commits (which verifies) and finishes."""

    def __init__(
        self,
        store: Store,
        body: bytes = DATA,
        digest: str = DIGEST,
        *,
        chunks: int = 4,
        size: int | None = None,
        error: BaseException | None = None,
        hold: bool = False,
    ) -> None:
        self.hold = hold  # give the verified file a held name, as _fill does
        self.store = store
        self.body = body
        self.digest = digest
        self.chunks = chunks
        self.size = len(body) if size is None else size
        self.error = error
        self.gate = asyncio.Event()
        self.calls = 0
        self.temp_paths: list[Path] = []

    async def __call__(self, flight: Flight) -> None:
        self.calls += 1
        writer = self.store.blob_writer(self.digest)
        self.temp_paths.append(writer.path)
        try:
            flight.started(writer.path, self.size)
            step = max(1, -(-len(self.body) // self.chunks))
            for start in range(0, len(self.body), step):
                writer.write(self.body[start : start + step])
                await flight.progress(writer.size)
            await self.gate.wait()
            if self.error is not None:
                raise self.error
            if self.hold:
                writer.verify(self.size)
                flight.held = self.store.hold(writer.path)
                await flight.verified_whole()
            committed = self.store.commit(writer, self.size)
        except BaseException:
            writer.abort()
            raise
        await flight.finish(committed, None)


async def drain(flight: Flight, got: bytearray, reached: asyncio.Event, at: int) -> None:
    """Read the whole flight into `got`; set `reached` once `at` bytes are in."""
    if at <= 0:
        reached.set()
    async for chunk in flight.read():
        got += chunk
        if len(got) >= at:
            reached.set()


async def until(event: asyncio.Event, task: asyncio.Task) -> None:
    """Wait for the event, or for the task to end first (so a bug fails, not hangs)."""
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def start_reader(flight: Flight, at: int) -> tuple[asyncio.Task, bytearray, asyncio.Event]:
    got, reached = bytearray(), asyncio.Event()
    return asyncio.ensure_future(drain(flight, got, reached, at)), got, reached


# --- coalescing -----------------------------------------------------------------------


async def test_join_twice_starts_one_download_and_both_readers_get_all_bytes(store, monkeypatch):
    monkeypatch.setattr(flight_mod, "READ_CHUNK", 1000)  # many reads per reader
    flights, download = Flights(), FakeDownload(store)
    first = flights.join(DIGEST, download)
    second = flights.join(DIGEST, download)
    assert first is second
    assert flights.coalesced == 1
    assert len(flights) == 1
    (r1, got1, at1), (r2, got2, at2) = start_reader(first, 1), start_reader(second, 1)
    await until(at1, r1)
    await until(at2, r2)
    download.gate.set()
    await asyncio.gather(r1, r2)
    assert download.calls == 1
    assert bytes(got1) == bytes(got2) == DATA
    assert len(flights) == 0
    assert store.tree.blob(DIGEST).read_bytes() == DATA
    assert list(store.tree.temp.iterdir()) == []


async def test_many_readers_share_one_download(store):
    flights, download = Flights(), FakeDownload(store)
    joined = [flights.join(DIGEST, download) for _ in range(10)]
    readers = [start_reader(f, len(DATA)) for f in joined]
    download.gate.set()
    await asyncio.gather(*(task for task, _, _ in readers))
    assert download.calls == 1
    assert flights.coalesced == 9
    assert all(bytes(got) == DATA for _, got, _ in readers)


async def test_different_keys_download_separately(store):
    other = b"other blob"
    flights = Flights()
    a, b = FakeDownload(store), FakeDownload(store, other, digest_of(other))
    fa, fb = flights.join(DIGEST, a), flights.join(digest_of(other), b)
    assert fa is not fb
    a.gate.set()
    b.gate.set()
    (ra, got_a, _), (rb, got_b, _) = start_reader(fa, 0), start_reader(fb, 0)
    await asyncio.gather(ra, rb)
    assert (a.calls, b.calls) == (1, 1)
    assert (bytes(got_a), bytes(got_b)) == (DATA, other)


async def test_one_digest_from_two_sources_downloads_twice_and_one_copy_is_kept(store):
    """The fetcher keys flights by source and digest: a second source's
    download of a digest does not wait on the first, and the first verified
    copy is the one stored."""
    flights = Flights()
    slow, fast = FakeDownload(store), FakeDownload(store)
    held = flights.join(f"slow.test {DIGEST}", slow)
    other = flights.join(f"legit.test {DIGEST}", fast)
    assert held is not other
    fast.gate.set()
    reader, got, _ = start_reader(other, 0)
    await reader
    assert bytes(got) == DATA and not held.finished
    slow.gate.set()
    reader, got, _ = start_reader(held, 0)
    await reader
    assert bytes(got) == DATA
    assert list(store.tree.temp.iterdir()) == []
    assert store.tree.blob(DIGEST).stat().st_nlink == 1


async def test_written_counts_downloads_until_they_are_verified(store):
    flights = Flights()
    download = FakeDownload(store, chunks=2)
    flight = flights.join(DIGEST, download)
    # All but the last byte reach a reader before the download is verified.
    reader, _, reached = start_reader(flight, len(DATA) - 1)
    await until(reached, reader)
    assert flights.written() == len(DATA)
    await flight.verified_whole()
    assert flights.written() == 0
    download.gate.set()
    await flight.task
    await reader


async def test_started_publishes_size(store):
    # The fetcher answers every blob as application/octet-stream: a flight
    # carries no type (the upstream's was never used).
    flights = Flights()
    download = FakeDownload(store)
    flight = flights.join(DIGEST, download)
    await flight.wait_started()
    assert flight.size == len(DATA)
    download.gate.set()
    await flight.task


# --- never a complete wrong body --------------------------------------------------------


async def test_the_last_byte_is_withheld_until_the_download_is_verified(store):
    flights, download = Flights(), FakeDownload(store, chunks=1)
    flight = flights.join(DIGEST, download)
    reader, got, reached = start_reader(flight, len(DATA) - 1)
    await until(reached, reader)
    for _ in range(20):  # give the reader every chance to read on
        await asyncio.sleep(0)
    assert len(got) == len(DATA) - 1
    assert not reader.done()
    download.gate.set()
    await reader
    assert bytes(got) == DATA


@pytest.mark.parametrize(
    ("body", "size", "error", "raised"),
    [
        # The upstream connection breaks after the whole body arrived.
        (DATA, None, ConnectionResetError("upstream went away"), ConnectionResetError),
        # Wrong bytes, right length: commit's verification fails.
        (b"X" + DATA[1:], None, None, DigestMismatch),
        # Fewer bytes than Content-Length: commit's size check fails.
        (DATA[:-100], len(DATA), None, Truncated),
        # A failure half way.
        (DATA[: len(DATA) // 2], len(DATA), NotFound("BLOB_UNKNOWN"), NotFound),
    ],
)
async def test_a_failing_download_fails_every_reader_who_never_sees_the_full_body(
    store, body, size, error, raised
):
    flights = Flights()
    download = FakeDownload(store, body, DIGEST, size=size or len(body), error=error)
    flight = flights.join(DIGEST, download)
    readers = [start_reader(flight, len(body) - 1) for _ in range(3)]
    for task, _, reached in readers:
        await until(reached, task)  # every reader has all it can get
    download.gate.set()
    for task, got, _ in readers:
        with pytest.raises(raised):
            await task
        assert len(got) == len(body) - 1
        assert len(got) < len(DATA)
        assert bytes(got) == body[:-1]
    assert download.calls == 1
    assert isinstance(flight.error, raised)
    assert flight.finished and flight.committed_path is None
    assert len(flights) == 0
    assert not store.has_blob(DIGEST)
    assert list(store.tree.temp.iterdir()) == []


async def test_a_reader_joining_a_failed_flight_gets_the_error(store):
    download = FakeDownload(store, error=ConnectionResetError("gone"))
    flight = Flights().join(DIGEST, download)
    download.gate.set()
    await flight.task
    with pytest.raises(ConnectionResetError):
        await flight.wait_started()
    got = bytearray()
    with pytest.raises(ConnectionResetError):
        async for chunk in flight.read():
            got += chunk
    assert got == b""


async def test_a_download_failing_before_the_upstream_answered_fails_every_reader(store):
    async def not_found(flight: Flight) -> None:
        raise NotFound("BLOB_UNKNOWN", "no such blob")

    flights = Flights()
    first = flights.join(DIGEST, not_found)
    second = flights.join(DIGEST, not_found)
    results = await asyncio.gather(
        first.wait_started(), second.wait_started(), return_exceptions=True
    )
    assert all(isinstance(r, NotFound) for r in results)
    assert len(flights) == 0


# --- after completion -------------------------------------------------------------------


async def test_a_reader_joining_after_completion_reads_the_committed_file(store):
    flights, download = Flights(), FakeDownload(store)
    flight = flights.join(DIGEST, download)
    download.gate.set()
    await flight.task
    assert flight.finished and flight.error is None
    assert flight.committed_path == store.tree.blob(DIGEST)
    assert not any(p.exists() for p in download.temp_paths)  # only the committed file is left
    reader, got, _ = start_reader(flight, 0)
    await reader
    assert bytes(got) == DATA
    assert download.calls == 1


async def test_a_finished_flight_is_forgotten_so_a_later_miss_starts_afresh(store):
    flights, download = Flights(), FakeDownload(store)
    download.gate.set()
    first = flights.join(DIGEST, download)
    await first.task
    second = flights.join(DIGEST, download)
    await second.task
    assert second is not first
    assert download.calls == 2
    assert flights.coalesced == 0


async def test_an_empty_blob(store):
    empty_digest = digest_of(b"")
    download = FakeDownload(store, b"", empty_digest)
    flight = Flights().join(empty_digest, download)
    reader, got, _ = start_reader(flight, 0)
    download.gate.set()
    await reader
    assert bytes(got) == b""
    assert store.tree.blob(empty_digest).read_bytes() == b""


# --- hang-ups and shutdown --------------------------------------------------------------


async def test_a_reader_hanging_up_does_not_cancel_the_download(store):
    flights, download = Flights(), FakeDownload(store)
    flight = flights.join(DIGEST, download)
    leaver, _, leaver_started = start_reader(flight, 1)
    stayer, got, _ = start_reader(flight, 0)
    await until(leaver_started, leaver)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    download.gate.set()
    await stayer
    assert bytes(got) == DATA
    assert store.tree.blob(DIGEST).read_bytes() == DATA


async def test_close_cancels_downloads_and_readers_see_an_abort(store):
    flights, download = Flights(), FakeDownload(store)
    flight = flights.join(DIGEST, download)
    reader, got, reached = start_reader(flight, 1)
    await until(reached, reader)
    await flights.close()
    with pytest.raises(ConnectionAbortedError):
        await reader
    assert len(got) < len(DATA)
    assert len(flights) == 0
    assert not store.has_blob(DIGEST)
    assert list(store.tree.temp.iterdir()) == []


def test_flight_repr_shows_state():
    flight = Flight("k")
    assert repr(flight) == "<Flight k running 0/None>"


# --- property: any chunking, any read size ----------------------------------------------


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    s = Store(tmp_path_factory.mktemp("flights") / "cache")
    s.prepare()
    return s


@settings(max_examples=40, deadline=None)
@given(
    body=st.binary(min_size=1, max_size=3000),
    chunks=st.integers(1, 12),
    read_chunk=st.integers(1, 4096),
    readers=st.integers(1, 3),
)
def test_readers_get_exactly_the_body_whatever_the_chunking(
    shared_store, body, chunks, read_chunk, readers
):
    async def scenario() -> list[bytes]:
        digest = digest_of(body)
        download = FakeDownload(shared_store, body, digest, chunks=chunks)
        download.gate.set()
        flights = Flights()
        joined = [flights.join(digest, download) for _ in range(readers)]
        tasks = [start_reader(f, 0) for f in joined]
        await asyncio.gather(*(t for t, _, _ in tasks))
        assert download.calls == 1
        return [bytes(got) for _, got, _ in tasks]

    with mock.patch.object(flight_mod, "READ_CHUNK", read_chunk), mock.patch("os.fsync"):
        results = asyncio.run(scenario())
    assert results == [body] * readers


# --- flight.Shared ---------------------------------------------------------------------


WAIT = 10.0  # seconds: a bound never reached when all is well


class Work:
    def __init__(self, result: object = "result", error: BaseException | None = None) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.result = result
        self.error = error

    async def __call__(self) -> object:
        self.calls += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_shared_coalesces_concurrent_calls_into_one():
    shared, work = Shared(), Work(result=object())
    callers = [asyncio.ensure_future(shared.run("key", work)) for _ in range(5)]
    await asyncio.sleep(0)
    work.gate.set()
    results = await asyncio.gather(*callers)
    assert work.calls == 1
    assert all(r is work.result for r in results)


async def test_shared_runs_different_keys_separately():
    shared, a, b = Shared(), Work("a"), Work("b")
    calls = [
        asyncio.ensure_future(shared.run(("manifest", "x"), a)),
        asyncio.ensure_future(shared.run(("manifest", "y"), b)),
    ]
    await asyncio.sleep(0)
    a.gate.set()
    b.gate.set()
    assert await asyncio.gather(*calls) == ["a", "b"]
    assert (a.calls, b.calls) == (1, 1)


async def test_shared_runs_again_after_completion():
    shared, work = Shared(), Work()
    work.gate.set()
    assert await shared.run("key", work) == "result"
    assert await shared.run("key", work) == "result"
    assert work.calls == 2


async def test_shared_gives_the_error_to_every_caller_and_forgets_it():
    shared, work = Shared(), Work(error=NotFound("MANIFEST_UNKNOWN"))
    callers = [asyncio.ensure_future(shared.run("key", work)) for _ in range(3)]
    await asyncio.sleep(0)
    work.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, NotFound) for r in results)
    assert work.calls == 1
    work.error = None
    assert await shared.run("key", work) == "result"
    assert work.calls == 2


async def test_shared_work_survives_a_caller_that_goes_away():
    shared, work = Shared(), Work()
    leaver = asyncio.ensure_future(shared.run("key", work))
    stayer = asyncio.ensure_future(shared.run("key", work))
    await asyncio.sleep(0)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    work.gate.set()
    assert await stayer == "result"
    assert work.calls == 1


async def test_shared_past_its_budget_leaves_the_work_running_for_the_next_caller():
    """Stale-while-revalidate: a caller whose budget runs out gets
    StillRunning (budget 0: at once), the work goes on; a caller meanwhile
    joins it (one revalidation per tag), and its result is the work's."""
    shared, work = Shared(), Work()
    with pytest.raises(StillRunning):
        await shared.run("key", work, within=0)
    with pytest.raises(StillRunning):
        await shared.run("key", work, within=0)
    joined = asyncio.ensure_future(shared.run("key", work, within=WAIT))
    await asyncio.sleep(0)
    work.gate.set()
    assert await joined == "result"
    assert work.calls == 1


async def test_shared_within_a_budget_gives_the_works_own_timeout_as_it_is():
    """An upstream timeout from the work is the work's error, not the budget's."""
    shared, work = Shared(), Work(error=UpstreamTimeout(message="slow"))
    work.gate.set()
    with pytest.raises(UpstreamTimeout):
        await shared.run("key", work, within=WAIT)


async def test_a_late_works_error_reaches_no_one_and_is_not_reported_as_unretrieved():
    shared, work = Shared(), Work(error=NotFound("MANIFEST_UNKNOWN"))
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        with pytest.raises(StillRunning):
            await shared.run("key", work, within=0)
        work.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        gc.collect()
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)


# --- held: the verified file by a name nginx sends -------------------------------------


async def test_a_reader_holding_gets_the_held_name_of_the_verified_file(store):
    flights, download = Flights(), FakeDownload(store, hold=True)
    flight = flights.join(DIGEST, download)
    waiting = asyncio.ensure_future(flight.held_within(3600))
    await flight.wait_started()
    assert not waiting.done()  # bytes written, not verified: no name yet
    download.gate.set()
    held = await waiting
    assert held is not None and held == flight.held
    await flight.task
    assert (store.tree.held / held).samefile(store.tree.blob(DIGEST))
    store.drop_held(held)
    assert list(store.tree.held.iterdir()) == []
    assert store.tree.blob(DIGEST).read_bytes() == DATA


async def test_a_download_outlasting_the_hold_leaves_the_reader_to_stream(store):
    flights, download = Flights(), FakeDownload(store, hold=True)
    flight = flights.join(DIGEST, download)
    assert await flight.held_within(0.01) is None  # the gate stays shut
    reader, got, _ = start_reader(flight, len(DATA))
    download.gate.set()
    await reader
    assert bytes(got) == DATA


async def test_a_download_failing_within_the_hold_gives_no_name(store):
    flights = Flights()
    download = FakeDownload(store, b"X" + DATA[1:], hold=True)
    flight = flights.join(DIGEST, download)
    waiting = asyncio.ensure_future(flight.held_within(3600))
    download.gate.set()
    assert await waiting is None
    assert isinstance(flight.error, DigestMismatch) and not flight.verified
    assert list(store.tree.held.iterdir()) == []


def test_start_up_empties_held(store):
    writer = store.blob_writer(DIGEST)
    writer.write(DATA)
    held = store.hold(writer.path)
    writer.abort()
    assert (store.tree.held / held).read_bytes() == DATA  # the held name keeps the bytes
    store.prepare()
    assert list(store.tree.held.iterdir()) == []



async def test_time_left_is_the_rest_at_the_average_rate_so_far(store):
    flights, download = Flights(), FakeDownload(store, hold=True)
    flight = flights.join(DIGEST, download)
    assert flight.time_left() is None  # no answer yet: no size
    await flight.wait_started()
    flight.written = len(DATA) // 4
    flight._started_at -= 100  # a quarter in (at least) 100 s: about 300 s left
    assert 300 <= flight.time_left() < 301
    flight.written = len(DATA)
    assert flight.time_left() == 0
    download.gate.set()
    await flight.task



async def test_a_download_too_slow_for_the_hold_is_streamed_at_once(store):
    """A quarter written in what counts as 100 s: the rest would take 300 s
    more, past a hold of 60, so the reader streams at once."""
    flights, download = Flights(), FakeDownload(store, hold=True)
    flight = flights.join(DIGEST, download)
    await flight.wait_started()
    flight.written = len(DATA) // 4
    flight._started_at -= 100
    assert await asyncio.wait_for(flight.held_within(60), 30) is None  # the gate stays shut
    download.gate.set()
    await flight.task
