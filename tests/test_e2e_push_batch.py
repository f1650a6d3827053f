"""A kolla-like push batch through the mirror, end to end: 20 images in 20
repositories sharing two base layers, pushed by skopeo with 4 pushers at
once through cr-proxy to the real test registry, behind a relay counting
the bytes the registry receives: each distinct layer crosses once (the
probes of the others wait for its upload and mount it). Then all 20 pull
from the cache with the registry stopped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.counting import CountingRelay
from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from testbed.pushbatch import Batch, build_batch, push_batch
from testbed.registry import REGISTRY_NAME, Upstream
from tests.conftest import proxy_endpoints

IMAGES = 20
PUSHERS = 4
BASE_SIZE = 3 << 20  # each base layer: big enough that one more crossing shows


@dataclass
class Pushed:
    batch: Batch
    cr: CrProxy
    sent: int  # bytes the registry received during the batch


@pytest.fixture(scope="module")
def pushed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    work = tmp_path_factory.mktemp("push-batch")
    batch = build_batch(work / "layout", IMAGES, BASE_SIZE)
    host, port = upstream.registry_url.removeprefix("http://").rsplit(":", 1)
    push = {"enabled": True, "allow_clients": ["127.0.0.1/32"]}
    with CountingRelay(host, int(port)) as relay, \
            CrProxy(work / "cr", {**proxy_endpoints(upstream), REGISTRY_NAME: relay.url},
                    push=push) as cr:
        before = relay.sent
        try:
            push_batch(batch, lambda i: f"{cr.http}/{REGISTRY_NAME}/batch-{i}:v1", PUSHERS)
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{cr.log_text()[-3000:]}") from None
        yield Pushed(batch, cr, relay.sent - before)


def test_each_distinct_layer_crosses_once(pushed: Pushed, upstream: Upstream,
                                          tmp_path: Path) -> None:
    batch = pushed.batch
    # At least every distinct blob and manifest; less than one base layer
    # more (request heads and tokens are a few hundred KiB): no base layer
    # was uploaded twice. Pushing each image whole would send 20 of each.
    assert batch.distinct_bytes <= pushed.sent < batch.distinct_bytes + BASE_SIZE, (
        pushed.sent, batch.distinct_bytes)
    assert batch.repeated_bytes > batch.distinct_bytes + 30 * BASE_SIZE
    # The registry has every image whole (the last one pushed, checked byte
    # for byte; every tag's manifest digest).
    last = batch.images[-1]
    direct = upstream.pull_direct(f"batch-{IMAGES - 1}", "v1", tmp_path / "direct")
    assert set(last.sizes) <= set(layout_blobs(direct)) | {last.manifest_digest}
    content = pushed.cr.cache / f"content/{REGISTRY_NAME}/v2"
    for i, image in enumerate(batch.images):
        assert (content / f"batch-{i}/manifests/v1").read_bytes() == image.blob_bytes(
            image.manifest_digest)


def test_the_batch_pulls_with_the_upstream_stopped(
    pushed: Pushed, upstream_down: Upstream, tmp_path: Path
) -> None:
    def pull(i: int) -> str:
        out = tmp_path / f"out{i}"
        result = skopeo_pull(f"{pushed.cr.http}/{REGISTRY_NAME}/batch-{i}:v1", out)
        assert result.returncode == 0, result.stderr
        image = pushed.batch.images[i]
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == image.manifest_digest
        assert set(image.sizes) - {image.manifest_digest} <= set(layout_blobs(out))
        return image.manifest_digest

    with ThreadPoolExecutor(PUSHERS) as pool:
        assert len(set(pool.map(pull, range(IMAGES)))) == IMAGES
