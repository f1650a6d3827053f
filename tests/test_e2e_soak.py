"""The chaos soak (tests/soak.py): pulls by 16 concurrent clients, raw HTTP
and skopeo, mirror and https_proxy mode, through the real `cr-proxy serve`
in front of the real test upstream behind a fault injector
(testbed/chaos.py), with serve SIGKILLed and restarted along the way.

100 pulls here (`make test`); `make soak` runs 1,000
(SOAK_PULLS). The seed is printed, and SOAK_SEED
replays it. The checks: no client got a complete body with wrong bytes,
every failure a registry error (JSON errors) or a cut connection, no temp
file left after a restart, `cr-proxy verify` clean and every file of the
tree named by a digest holding those bytes.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from testbed.chaos import Chaos
from testbed.crproxy import CrProxy
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.faulty import http
from tests.soak import (
    DEFAULT_SEED,
    REGISTRY,
    Image,
    Supervisor,
    digest_named_files,
    make_image,
    push,
    run,
    soak_seed,
    table,
    verify,
)
from tests.test_e2e_proxy import proxy_request


def test_chaos_soak(upstream: Upstream, tmp_path: Path) -> None:
    seed = soak_seed()
    pulls = int(os.environ.get("SOAK_PULLS") or 100)
    print(f"chaos soak: seed {seed} (replay: SOAK_SEED={seed})", flush=True)
    (proxy_port,) = free_ports(1)
    with Chaos(upstream, seed) as chaos:
        cr = CrProxy(
            tmp_path / "crproxy", chaos.endpoints, listen_proxy=f"127.0.0.1:{proxy_port}",
            # read 2 s: the longer stalls (testbed/chaos.py STALL) break a
            # read and are resumed; tags revalidated every 3 s, through chaos.
            timeouts={"connect": 2, "read": 2, "down_host": 1},
            tag_ttl=3,
        )
        supervisor = Supervisor(cr, tmp_path)
        cr.start()
        try:
            tally = asyncio.run(run(supervisor, upstream, chaos.flipped, pulls, seed, tmp_path))
            # One last crash with no client about, then the temp/ check.
            supervisor.restart()
        finally:
            exit_code = cr.stop()
            print(f"serve's output: {supervisor.save_log().parent}/serve-*.log")
        report = table(tally, supervisor, chaos, seed, pulls)
    print(report)
    replay = f"(seed {seed}: SOAK_SEED={seed} replays it)\n{report}\n{tally.samples}"
    # serve's own faults: it stops cleanly, and logged no unhandled exception.
    assert exit_code == 0, replay
    tracebacks = [path.name for path in sorted(tmp_path.glob("serve-*.log"))
                  if "Traceback" in path.read_text(errors="replace")]
    assert tracebacks == [], replay
    assert sum(tally.outcomes.values()) == pulls, replay
    assert tally.outcomes["wrong"] == 0, replay
    assert tally.outcomes["unclean"] == 0, replay
    assert tally.outcomes["ok"] > 0, replay
    assert supervisor.strays == [], replay
    assert supervisor.crashes == [] and supervisor.errors == [], replay
    checked = verify(cr)
    print(f"cr-proxy verify: {checked.stdout.strip()}")
    assert checked.returncode == 0, f"{checked.stdout}\n{checked.stderr}\n{replay}"
    assert digest_named_files(cr.cache) == [], replay


# --- what the soak found, each on its own --------------------------------------------------


@pytest.fixture(scope="module")
def calm(upstream: Upstream) -> Iterator[Chaos]:
    """The fault injector with no fault on: a case turns on the one it needs."""
    with Chaos(upstream, DEFAULT_SEED, rates={"registry": {}, "auth": {}, "cdn": {}}) as chaos:
        yield chaos


def pushed(upstream: Upstream, repo: str) -> Image:
    image = make_image(random.Random(repo), repo, random.Random(0).randbytes(1024))

    async def go() -> None:
        async with aiohttp.ClientSession(trust_env=False) as session:
            await push(session, upstream, image)

    asyncio.run(go())
    return image


def test_a_cached_token_the_registry_refuses_is_fetched_anew(
    upstream: Upstream, calm: Chaos, tmp_path: Path
) -> None:
    """The registry refuses a token cr-proxy has cached and used before (it
    expired early): cr-proxy fetches a new one and asks again, once, and
    the client gets its blob, not `502 registry.test answered 401`."""
    image = pushed(upstream, "soak/token")
    config, *layers = image.blobs
    with CrProxy(tmp_path / "crproxy", calm.endpoints) as cr:
        first = http(f"http://{cr.http}/v2/{REGISTRY}/{image.repo}/blobs/{config}")
        assert (first.status, first.body) == (200, image.blobs[config])
        calm.rates = {"registry": {"token": 1.0}, "auth": {}, "cdn": {}}
        try:
            answer = http(f"http://{cr.http}/v2/{REGISTRY}/{image.repo}/blobs/{layers[-1]}")
        finally:
            calm.rates = {"registry": {}, "auth": {}, "cdn": {}}
    assert (answer.status, answer.complete) == (200, True), answer.body[:300]
    assert calm.counts["token"] == 1, "\n".join(map(str, calm.recent))
    assert answer.body == image.blobs[layers[-1]]


def test_a_miss_with_no_fetcher_to_answer_is_a_registry_error(
    upstream: Upstream, tmp_path: Path
) -> None:
    """nginx with no fetcher behind it (serve SIGKILLed: nginx outlives it
    for a moment; or being restarted) answers a miss, blob or manifest, with
    a registry's JSON error, not its HTML 502 page. The fetcher's socket is
    moved away for the requests (nginx dials it by path), then back."""
    image = pushed(upstream, "soak/no-fetcher")
    config = next(iter(image.blobs))
    with CrProxy(tmp_path / "crproxy", upstream.endpoints) as cr:
        base = f"http://{cr.http}/v2/{REGISTRY}/{image.repo}"
        # The blob by try_files, the manifest by its location's `return 418`:
        # the two ways a miss reaches @fetch.
        urls = [f"{base}/blobs/{config}", f"{base}/manifests/{image.tag}"]
        socket_path = cr.run_dir / "fetcher.sock"
        away = socket_path.with_name("fetcher.sock.away")
        socket_path.rename(away)
        try:
            answers = [http(url) for url in urls]
        finally:
            away.rename(socket_path)
        again = [http(url) for url in urls]
    for answer in answers:
        assert answer.status == 502, answer
        assert answer.header("Content-Type") == "application/json", answer
        assert answer.header("X-Content-Type-Options") == "nosniff", answer
        assert answer.json_errors()[0]["code"] == "UNAVAILABLE"
    assert [(a.status, a.body) for a in again] == [(200, image.blobs[config]),
                                                    (200, image.manifest)]


def test_a_relay_broken_mid_body_is_cut_not_left_hanging(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A pass-through answer (a token request through the https_proxy)
    whose upstream goes silent mid-body past timeouts.read: the client's
    connection is cut at once. It was left open, its body short of its
    length, until the client gave up (nginx waits 600 s)."""
    stalled = {"registry": {}, "auth": {"stall_body": 1.0}, "cdn": {}}
    (proxy_port,) = free_ports(1)
    with Chaos(upstream, DEFAULT_SEED, rates=stalled, stall=(4.0, 4.0)) as chaos, CrProxy(
        tmp_path / "crproxy", chaos.endpoints, listen_proxy=f"127.0.0.1:{proxy_port}",
        timeouts={"connect": 2, "read": 1, "down_host": 1},
    ) as cr:
        # Read until the server closes; a connection left open fails here
        # with the socket's timeout instead.
        raw = proxy_request(
            proxy_port,
            f"GET {upstream.realm}?service={upstream.service}&scope=repository:x:pull "
            f"HTTP/1.1\r\nHost: {upstream.auth_name}\r\nConnection: close\r\n\r\n")
        assert chaos.counts["stall"] == 1
        # The warning may reach serve's output just after the cut reached
        # the client: wait for it (the reader thread wakes us), then count.
        cr.wait_for_output("relay cut short", 10)
        cut = [line for line in cr.output if "relay cut short" in line]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    assert len(body) < length
    assert len(cut) == 1, cr.log_text()[-2000:]
