"""Found by the chaos soak (tests/soak.py, testbed/chaos.py), each on its own."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp

from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.faulty import http
from tests.soak import REGISTRY, Image, make_image, push


def pushed(upstream: Upstream, repo: str) -> Image:
    image = make_image(random.Random(repo), repo, random.Random(0).randbytes(1024))

    async def go() -> None:
        async with aiohttp.ClientSession(trust_env=False) as session:
            await push(session, upstream, image)

    asyncio.run(go())
    return image


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
