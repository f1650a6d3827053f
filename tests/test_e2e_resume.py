"""Resume end to end: a blob download whose upstream connection breaks goes
on where it got to (cr_proxy/fetch/resume.py), through the real
`cr-proxy serve`, against a registry on a flaky link (tests/flaky.py).

Blobs are 24 MiB (the issue names 100 MiB; a quarter of it keeps the suite
fast and is still 24 write batches, so every cut falls mid-download). Two
clients wait on every download: the first starts it, the second joins it
(the coalesced counter says so) before the first cut, gated, happens. Each
case ends with the right bytes for both and the blob stored, or, once the
bounds are spent, both responses cut short and nothing stored; the
upstream's byte count shows what the resumes cost.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy
from tests.faulty import Answer, http, wait_until
from tests.flaky import FlakyRegistry
from tests.test_e2e_metrics import scrape, value

MIB = 1 << 20
SIZE = 24 * MIB
GONE = "gone.test"  # a second FlakyRegistry, stopped mid-download by its test
# Misses streamed (download.hold 0): the resumes happen while the clients
# already receive, which is what these tests watch.
STREAMED = {"hold": 0}


@pytest.fixture(scope="module")
def flaky() -> Iterator[FlakyRegistry]:
    with FlakyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def gone() -> Iterator[FlakyRegistry]:
    with FlakyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def cr(flaky: FlakyRegistry, gone: FlakyRegistry,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    with CrProxy(
        tmp_path_factory.mktemp("resume"), {**flaky.endpoints, GONE: gone.url},
        timeouts={"connect": 2, "read": 30, "down_host": 30}, download=STREAMED,
    ) as running:
        yield running


def url(cr: CrProxy, repo: str, digest: str, registry: str = FlakyRegistry.name) -> str:
    return f"http://{cr.http}/v2/{registry}/{repo}/blobs/{digest}"


def temp_bytes(cr: CrProxy) -> int:
    return sum(p.stat().st_size for p in (cr.cache / "temp").iterdir() if p.exists())


def coalesced(cr: CrProxy) -> float:
    return value(scrape(cr), "crproxy_coalesced_total")


def resumes(cr: CrProxy, how: str) -> float:
    return value(scrape(cr), "crproxy_blob_resumes_total", how=how)


def two_clients(cr: CrProxy, registry: FlakyRegistry, repo: str, digest: str,
                registry_name: str = FlakyRegistry.name) -> list[Answer]:
    """Two clients on one download: the first starts it; once its bytes are
    in temp/, the second joins it; then the first (gated) cut happens."""
    joined = coalesced(cr)
    with ThreadPoolExecutor(2) as pool:
        answers: list[Future[Answer]] = []
        try:
            answers.append(pool.submit(http, url(cr, repo, digest, registry_name)))
            wait_until(lambda: temp_bytes(cr) >= MIB, 30, "the download to be under way")
            answers.append(pool.submit(http, url(cr, repo, digest, registry_name)))
            wait_until(lambda: coalesced(cr) > joined, 30, "the second client to join")
        finally:
            registry.release()
        return [answer.result(120) for answer in answers]


def add_blob(registry: FlakyRegistry, repo: str) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    (digest,) = registry.add_image(repo, "v1", [data]).layer_digests
    return digest, data


def assert_served_and_stored(cr: CrProxy, answers: list[Answer], repo: str, digest: str,
                             data: bytes, registry: str = FlakyRegistry.name) -> None:
    for answer in answers:
        assert answer.status == 200, answer.status
        assert answer.complete, answer.error
        assert answer.body == data
    (stored,) = cr.wait_committed(registry, repo, digest)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest.split(":", 1)[1]
    wait_until(lambda: temp_bytes(cr) == 0 and not list((cr.cache / "temp").iterdir()), 10,
               "temp/ to be empty")


def assert_cut_and_not_stored(cr: CrProxy, answers: list[Answer], digest: str) -> None:
    for answer in answers:
        assert answer.status == 200 and not answer.complete, answer
        assert len(answer.body) < SIZE
    wait_until(lambda: not list((cr.cache / "temp").iterdir()), 10, "temp/ to be empty")
    hex_part = digest.split(":", 1)[1]
    assert not (cr.cache / "blobs/sha256" / hex_part).exists()
    assert [p for p in (cr.cache / "content").rglob("*") if hex_part in p.name] == []


# --- one cut, resumed -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("fraction", [0.10, 0.50, 0.99], ids=["10%", "50%", "99%"])
def test_a_cut_blob_is_resumed_for_every_waiting_client(
    fraction: float, how: str, cr: CrProxy, flaky: FlakyRegistry
) -> None:
    """Cut once at 10%, 50%, 99% (a clean close short of the length, or a
    reset): one Range request from the byte it got to; the upstream sends
    the blob once, plus what the break threw away in the buffers."""
    repo = f"once-{how}-{int(fraction * 100)}"
    digest, data = add_blob(flaky, repo)
    cut = int(SIZE * fraction)
    before = resumes(cr, "range")
    flaky.flake(digest, [cut], how=how, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_served_and_stored(cr, answers, repo, digest, data)
    first, resumed = flaky.ranges[digest]
    assert first is None and resumed is not None
    # Bytes in aiohttp's buffer when the break is seen are lost with it
    # (and asked again): only those are sent twice.
    assert 0 < resumed <= cut
    assert flaky.sent[digest] == SIZE + (cut - resumed)
    assert resumes(cr, "range") == before + 1


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_blob_cut_again_and_again_is_resumed_each_time(
    how: str, cr: CrProxy, flaky: FlakyRegistry
) -> None:
    """Cut at 10%, 50% and 99% of one download: three resumes, each asking
    from where the last answer ended, never from the start again."""
    repo = f"again-{how}"
    digest, data = add_blob(flaky, repo)
    cuts = [int(SIZE * f) for f in (0.10, 0.50, 0.99)]
    flaky.flake(digest, cuts, how=how, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_served_and_stored(cr, answers, repo, digest, data)
    ranges = flaky.ranges[digest]
    assert ranges[0] is None and len(ranges) == 4
    starts = [r for r in ranges[1:] if r is not None]
    assert len(starts) == 3
    for start, cut, previous in zip(starts, cuts, [0, *cuts[:-1]], strict=True):
        assert previous < start <= cut
    assert flaky.sent[digest] == SIZE + sum(c - s for c, s in zip(cuts, starts, strict=True))


def test_a_silent_upstream_is_resumed_after_timeouts_read(
    flaky: FlakyRegistry, tmp_path: Path
) -> None:
    """Silence at the cut (the connection held open): timeouts.read (2 s
    here, its own serve) ends the read and the download is resumed."""
    repo = "silent"
    digest, data = add_blob(flaky, repo)
    cut = SIZE // 2
    flaky.flake(digest, [cut], how="stall")
    with CrProxy(tmp_path / "silent", flaky.endpoints,
                 timeouts={"connect": 2, "read": 2, "down_host": 30},
                 download=STREAMED) as silent:
        answer = http(url(silent, repo, digest))
        assert_served_and_stored(silent, [answer], repo, digest, data)
    first, resumed = flaky.ranges[digest]
    assert first is None and resumed is not None and 0 < resumed <= cut
    assert flaky.sent[digest] == SIZE + (cut - resumed)


# --- the CDN URL expires ---------------------------------------------------------------


def test_an_expired_cdn_url_is_asked_of_the_registry_again(
    cr: CrProxy, flaky: FlakyRegistry
) -> None:
    """The registry redirects to a signed URL good for one GET: the resume
    tries it (403), asks the registry, follows the new redirect with Range."""
    repo = "cdn-expires"
    digest, data = add_blob(flaky, repo)
    cut = SIZE // 2
    flaky.flake(digest, [cut], cdn=True, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_served_and_stored(cr, answers, repo, digest, data)
    assert flaky.expired[digest] == 1
    assert flaky.blob_gets(repo, digest) == 2  # the first redirect and the new one
    assert flaky.ranges[digest] == [None, cut]
    assert flaky.sent[digest] == SIZE


# --- the upstream ignores Range --------------------------------------------------------


def test_an_upstream_ignoring_range_is_read_again_from_the_start_once(
    cr: CrProxy, flaky: FlakyRegistry
) -> None:
    """A 200 to a Range request: the whole blob again, its first bytes
    skipped (the clients have them): one blob's worth extra at most."""
    repo = "no-range"
    digest, data = add_blob(flaky, repo)
    cut = SIZE // 2
    before = resumes(cr, "restart")
    flaky.flake(digest, [cut], ignore_range=True, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_served_and_stored(cr, answers, repo, digest, data)
    assert flaky.ranges[digest] == [None, cut]
    assert flaky.sent[digest] == SIZE + cut
    assert resumes(cr, "restart") == before + 1


def test_an_upstream_ignoring_range_twice_fails_the_download(
    cr: CrProxy, flaky: FlakyRegistry
) -> None:
    """Starting over is bounded: a second 200 to a Range request ends the
    download; the clients' responses are cut, nothing is stored, and the
    next pull (the link well again) succeeds."""
    repo = "no-range-twice"
    digest, data = add_blob(flaky, repo)
    cuts = [SIZE // 4, SIZE // 2]
    flaky.flake(digest, cuts, ignore_range=True, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_cut_and_not_stored(cr, answers, digest)
    assert len(flaky.ranges[digest]) == 3  # the first GET, one restart, the refused one
    assert flaky.sent[digest] <= SIZE // 4 + SIZE // 2 + SIZE
    answer = http(url(cr, repo, digest))
    assert (answer.status, answer.complete, answer.body == data) == (200, True, True)


# --- the bounds ------------------------------------------------------------------------


def test_a_download_cut_more_often_than_download_retries_fails_cleanly(
    cr: CrProxy, flaky: FlakyRegistry
) -> None:
    """download.retries (5 by default) resumes, then the download fails:
    both clients' responses cut short, nothing stored; the upstream was
    asked six times in all, each time from where the last answer ended."""
    repo = "too-flaky"
    digest, data = add_blob(flaky, repo)
    cuts = [SIZE * i // 8 for i in range(1, 7)]
    flaky.flake(digest, cuts, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_cut_and_not_stored(cr, answers, digest)
    assert flaky.ranges[digest] == [None, *cuts[:5]]
    assert flaky.sent[digest] == cuts[-1]
    answer = http(url(cr, repo, digest))
    assert (answer.status, answer.complete, answer.body == data) == (200, True, True)


def test_a_registry_found_down_stops_the_resumes_at_once(
    cr: CrProxy, gone: FlakyRegistry
) -> None:
    """The registry stops listening at the cut: the resume's connect is
    refused, the registry is down (health.py), and no other attempt is
    made: one resume logged, the clients' responses cut."""
    repo = "gone"
    digest, _ = add_blob(gone, repo)
    gone.flake(digest, [SIZE // 2], gated=True)
    joined = coalesced(cr)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(http, url(cr, repo, digest, GONE))
        wait_until(lambda: temp_bytes(cr) >= MIB, 30, "the download to be under way")
        second = pool.submit(http, url(cr, repo, digest, GONE))
        wait_until(lambda: coalesced(cr) > joined, 30, "the second client to join")
        gone.stop()  # ends the connection held at the cut, and listens no more
        answers = [first.result(120), second.result(120)]
    assert_cut_and_not_stored(cr, answers, digest)
    resumed = [line for line in cr.output if "resuming" in line and digest in line]
    assert len(resumed) == 1 and "attempt 1 of 5" in resumed[0], resumed


# --- the digest still decides ----------------------------------------------------------


def test_wrong_bytes_after_a_resume_are_refused_by_the_digest_check(
    cr: CrProxy, flaky: FlakyRegistry
) -> None:
    repo = "wrong-resume"
    digest, data = add_blob(flaky, repo)
    flaky.flake(digest, [SIZE // 2], wrong_after_resume=True, gated=True)
    answers = two_clients(cr, flaky, repo, digest)
    assert_cut_and_not_stored(cr, answers, digest)
    wait_until(lambda: any("wrong bytes" in line and digest in line and "after 1 resumes"
                           in line for line in cr.output), 10, "the digest mismatch logged")
    answer = http(url(cr, repo, digest))
    assert (answer.status, answer.complete, answer.body == data) == (200, True, True)


def test_the_metrics_page_counts_resumes(cr: CrProxy) -> None:
    """Run last in this module: the cases above resumed by Range and by
    starting over, and had attempts that brought nothing."""
    samples = scrape(cr)
    assert value(samples, "crproxy_blob_resumes_total", how="range") >= 1
    assert value(samples, "crproxy_blob_resumes_total", how="restart") >= 1
