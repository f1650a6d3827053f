"""A miss that joins a download under way waits for it to be verified
(download.hold) and is sent the verified file by nginx (fetch/flight.py,
the held location in nginx/locations.conf); the client that started the
download, and a joiner of one longer than the hold, are streamed to.

The clients are made to meet in flight without timing: the upstream is
held still (the CDN's worker stopped, or a gated fake registry) until the
joiners are counted (crproxy_coalesced_total). Each case pins the hold: a
long one (every download here ends within it) or a short one with an
upstream that stays held until the client has bytes."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, skopeo_pull
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import Answer, FaultyRegistry, http, wait_until
from tests.test_e2e_metrics import scrape, value
from tests.test_e2e_mirror import assert_pulled, expected_digests

MIB = 1 << 20
LONG_HOLD = 120  # seconds: longer than any download of these tests
SHORT_HOLD = 0.2
MEET_TIMEOUT = 60


@pytest.fixture(scope="module")
def holding(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    with CrProxy(tmp_path_factory.mktemp("held"), proxy_endpoints(upstream),
                 download={"hold": LONG_HOLD},
                 timeouts={"connect": 2, "read": 300, "down_host": 1}) as running:
        yield running


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def held_names(cr: CrProxy) -> set[str]:
    return {entry.name for entry in (cr.cache / "held").iterdir()}


def joined(cr: CrProxy) -> float:
    return value(scrape(cr), "crproxy_coalesced_total")


def fresh_layer(upstream: Upstream, work: Path, repo: str, size: int) -> tuple[str, bytes]:
    """A layer no test has pulled: (digest, bytes), pushed to `repo`."""
    image = build_image(work / repo, layers=[tar_layer({"data.bin": os.urandom(size)})],
                        tag="v1")
    upstream.push(work / repo, "v1", repo, "v1")
    digest = image.layer_digests[0]
    return digest, image.blob_bytes(digest)


def meet(cr: CrProxy, url: str, clients: int, still: Callable[[], AbstractContextManager],
         headers: dict[str, str] | None = None) -> list[Answer]:
    """`clients` GETs of one blob, all in flight on one download before the
    upstream may go on: one starts it, the others join it."""
    before = joined(cr)
    with ThreadPoolExecutor(clients) as pool:
        with still():
            pending = [pool.submit(http, url, headers=headers) for _ in range(clients)]
            wait_until(lambda: joined(cr) >= before + clients - 1, MEET_TIMEOUT,
                       f"{clients - 1} clients joining the download")
        return [p.result(MEET_TIMEOUT) for p in pending]


def kind(answer: Answer) -> str | None:
    return answer.header("X-CR-Request-Type")


def test_clients_joining_a_download_are_sent_the_verified_file_by_nginx(
    holding: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """One download (one CDN GET); the client that started it is streamed
    to, the 15 that joined it get nginx's answer from the verified file."""
    digest, data = fresh_layer(upstream, tmp_path, "held/sixteen", 8 * MIB)
    url = f"http://{holding.http}/v2/registry.test/held/sixteen/blobs/{digest}"
    before = upstream.cdn_blob_gets(digest)
    answers = meet(holding, url, 16, upstream.cdn_paused)
    assert all((a.status, a.body) == (200, data) for a in answers), [a.status for a in answers]
    assert sorted(kind(a) for a in answers) == ["blob-fetch"] + ["blob-held"] * 15
    held = [a for a in answers if kind(a) == "blob-held"]
    assert {(a.header("X-Cache"), a.header("Docker-Content-Digest")) for a in held} == {
        ("MISS", digest)}
    assert {a.header("Content-Type") for a in held} == {"application/octet-stream"}
    assert upstream.cdn_blob_gets_settled(digest) == before + 1
    # The held name is a second link of the stored file: the same bytes.
    (stored,) = holding.wait_committed("registry.test", "held/sixteen", digest)
    (name,) = held_names(holding)
    assert os.path.samefile(holding.cache / "held" / name, stored)


def test_a_joining_clients_range_is_answered_by_nginx(
    holding: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    digest, data = fresh_layer(upstream, tmp_path, "held/range", 2 * MIB)
    url = f"http://{holding.http}/v2/registry.test/held/range/blobs/{digest}"
    answers = meet(holding, url, 3, upstream.cdn_paused, headers={"Range": "bytes=1000-1999"})
    # The starter's miss is the whole blob, as before; the joiners get the part.
    by_status = sorted((a.status, kind(a)) for a in answers)
    assert by_status == [(200, "blob-fetch"), (206, "blob-held"), (206, "blob-held")]
    for answer in answers:
        expected = data if answer.status == 200 else data[1000:2000]
        assert answer.complete and answer.body == expected
    assert {a.header("Content-Range") for a in answers if a.status == 206} == {
        f"bytes 1000-1999/{len(data)}"}


def test_skopeo_pulls_meeting_in_flight_are_served_from_one_download(
    holding: CrProxy, upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    source = f"{holding.http}/registry.test/big:v1"
    before = joined(holding)
    with ThreadPoolExecutor(2) as pool:
        with upstream.cdn_paused():
            pulls = [pool.submit(skopeo_pull, source, tmp_path / f"out{i}") for i in range(2)]
            wait_until(lambda: joined(holding) >= before + 1, MEET_TIMEOUT,
                       "one pull joining the other's download")
        for i, pull in enumerate(pulls):
            assert_pulled(pull.result(300), tmp_path / f"out{i}", expected_digests(images.big))
    holding.access_lines(re.compile(r"/big/blobs/\S+ HTTP/1\.1\" 200 .*type=blob-held"), 1)


def test_the_held_location_is_nginx_internal(
    holding: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    digest, data = fresh_layer(upstream, tmp_path, "held/internal", 4096)
    url = f"http://{holding.http}/v2/registry.test/held/internal/blobs/{digest}"
    before = held_names(holding)
    meet(holding, url, 2, upstream.cdn_paused)
    names = held_names(holding) - before
    assert len(names) == 1
    for name in names:
        for base in (f"http://{holding.http}", f"http://{holding.http}/v2/registry.test"):
            answer = http(f"{base}/_cr/held/MISS/{digest}/{name}")
            assert answer.status is not None and answer.status >= 400, answer
            assert answer.body != data and kind(answer) != "blob-held"


def test_a_download_failing_within_the_hold_is_a_clean_error_to_the_joiners(
    fake: FaultyRegistry, tmp_path: Path
) -> None:
    """The starter's 200 went out with the first bytes: a failure can only
    cut its connection. A joiner still waiting gets the error itself."""
    data = os.urandom(3 * MIB)
    (digest,) = fake.add_image("failing", "v1", [data]).layer_digests
    # Cut after 2 MiB on every answer: faulty.test ignores Range, so the
    # resume breaks again and the download fails (test_e2e_faults.py).
    fake.set_fault(digest, "reset", cut_at=2 * MIB, gated=True)
    with CrProxy(tmp_path / "cr", fake.endpoints, download={"hold": LONG_HOLD}) as cr:
        url = f"http://{cr.http}/v2/{FaultyRegistry.name}/failing/blobs/{digest}"
        answers = meet(cr, url, 3, _released(fake))
        starter = [a for a in answers if a.status == 200]
        joiners = [a for a in answers if a.status != 200]
        assert len(starter) == 1 and not starter[0].complete
        assert len(joiners) == 2
        for answer in joiners:
            assert answer.status == 502 and answer.complete, answer
            assert [e["code"] for e in answer.json_errors()] == ["UPSTREAM_ERROR"], answer
        assert not (cr.cache / "blobs/sha256" / digest.split(":", 1)[1]).exists()
        assert held_names(cr) == set()


def test_a_download_longer_than_the_hold_is_streamed_to_the_joiners(
    fake: FaultyRegistry, tmp_path: Path
) -> None:
    """The upstream sends part of the blob and waits until the joiners have
    bytes: they were streamed to, not held."""
    data = os.urandom(4 * MIB)
    (digest,) = fake.add_image("slow", "v1", [data]).layer_digests
    fake.set_fault(digest, "hold", cut_at=2 * MIB, gated=True)
    with CrProxy(tmp_path / "cr", fake.endpoints, download={"hold": SHORT_HOLD},
                 timeouts={"connect": 2, "read": 60, "down_host": 1}) as cr:
        url = f"http://{cr.http}/v2/{FaultyRegistry.name}/slow/blobs/{digest}"
        answers = meet(cr, url, 3, _released(fake, after=lambda: _streaming(cr, 2)))
        assert all((a.status, a.body) == (200, data) for a in answers)
        assert {kind(a) for a in answers} == {"blob-fetch"}


def _streaming(cr: CrProxy, joiners: int) -> None:
    """Until `joiners` clients that joined are streamed to (the fetcher says
    so at debug level, once their hold is over)."""
    wait_until(lambda: cr.log_text().count("streamed to a client that joined") >= joiners,
               MEET_TIMEOUT, f"{joiners} joining clients streamed to")


class _released(AbstractContextManager):
    """The fake registry's gate, opened when the block ends (after `after`)."""

    def __init__(self, fake: FaultyRegistry, after: Callable[[], None] | None = None) -> None:
        self.fake, self.after = fake, after

    def __call__(self) -> _released:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.after is not None and exc[0] is None:
                self.after()
        finally:
            self.fake.release()


def test_a_digest_stored_under_another_name_is_sent_by_nginx_by_a_held_name(
    holding: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """The fetcher's own hits (here: a layer cached through one repository,
    asked for through another, which the upstream confirms) go out as
    nginx's answer from a held name of the stored file, which no eviction
    can take away meanwhile; the next request is an nginx hit by the link."""
    digest, data = fresh_layer(upstream, tmp_path, "held/first", 1 * MIB)
    upstream.push(tmp_path / "held/first", "v1", "held/second", "v1")
    first = f"http://{holding.http}/v2/registry.test/held/first/blobs/{digest}"
    second = f"http://{holding.http}/v2/registry.test/held/second/blobs/{digest}"
    assert http(first).body == data
    holding.wait_committed("registry.test", "held/first", digest)
    answer = http(second, headers={"Range": "bytes=10-19"})
    assert (answer.status, answer.body, kind(answer)) == (206, data[10:20], "blob-held")
    assert (answer.header("X-Cache"), answer.header("Docker-Content-Digest")) == ("HIT", digest)
    again = http(second)
    assert (again.status, again.body, kind(again)) == (200, data, "blob")


def test_held_answers_pass_mirror_auth(upstream: Upstream, tmp_path: Path) -> None:
    """With mirror_auth on (a rule makes it on; anonymous clients pull public
    content), nginx decides who may pull before the fetcher is asked; the
    internal redirect of a held answer is that same, already decided
    request, and is not refused as a request of its own."""
    digest, data = fresh_layer(upstream, tmp_path, "held/authed", 1 * MIB)
    rules = [{"users": ["*"], "repositories": ["registry.test/held/denied"], "allow": "deny"}]
    with CrProxy(tmp_path / "cr", proxy_endpoints(upstream), download={"hold": LONG_HOLD},
                 mirror_auth={"anonymous": "pull-public", "rules": rules},
                 timeouts={"connect": 2, "read": 300, "down_host": 1}) as cr:
        url = f"http://{cr.http}/v2/registry.test/held/authed/blobs/{digest}"
        answers = meet(cr, url, 3, upstream.cdn_paused)
        assert all((a.status, a.body) == (200, data) for a in answers)
        assert sorted(kind(a) for a in answers) == ["blob-fetch", "blob-held", "blob-held"]
