"""Found by the chaos soak (tests/soak.py, testbed/chaos.py), each on its own."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from testbed.chaos import Chaos
from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.faulty import http
from tests.soak import DEFAULT_SEED, REGISTRY, Image, make_image, push


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
        assert answer.json_errors()[0]["code"] == "UNAVAILABLE"
    assert [(a.status, a.body) for a in again] == [(200, image.blobs[config]),
                                                    (200, image.manifest)]
