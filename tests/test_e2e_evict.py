"""The disk limit while serving: pulling past cache.max_size evicts the
least recently used image, where a hit served by nginx alone counts as a
use, and keeps the blobs it shares with an image that stays."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from cr_proxy.config import load as load_config
from cr_proxy.inventory import Inventory
from tests.conftest import proxy_endpoints
from tests.crproxy import CrProxy, skopeo_pull
from tests.oci_layout import build_image, tar_layer
from tests.test_e2e_metrics import scrape, value
from tests.upstream import Upstream

FEED_DEADLINE = 10.0


def cached_keys(proxy: CrProxy) -> set[str]:
    conf = load_config(proxy.config_path, environ={})
    return {image.key for image in Inventory.from_config(conf).images() if image.tag}


def test_third_image_evicts_the_least_recently_used(upstream: Upstream, tmp_path: Path) -> None:
    shared = tar_layer({"base.txt": b"shared base layer\n" * 2000})
    a = build_image(tmp_path / "a", layers=[shared, tar_layer({"a": os.urandom(50_000)})])
    b = build_image(tmp_path / "b", layers=[shared, tar_layer({"b": os.urandom(200_000)})])
    c = build_image(tmp_path / "c", layers=[tar_layer({"c": os.urandom(200_000)})])
    for name, image in (("lru-a", a), ("lru-b", b), ("lru-c", c)):
        upstream.push(image.layout, "latest", name, "v1")

    proxy = CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream))
    with proxy:
        for name in ("lru-a", "lru-b"):
            assert skopeo_pull(f"{proxy.http}/registry.test/{name}:v1",
                               tmp_path / f"pulled-{name}").returncode == 0
    size_ab = sum(f.stat().st_size for f in (proxy.cache / "blobs/sha256").iterdir())
    c_size = sum(c.sizes.values())

    # Room for A and B and half of C: pulling C must evict something.
    proxy.config["cache"] = {"max_size": size_ab + c_size // 2, "low_water": 1.0,
                             "min_age": 0, "check_interval": 3600}
    with proxy:
        # A is used again, served by nginx alone: B is now the least recent.
        blob = a.layer_digests[1]
        with urllib.request.urlopen(
            f"http://{proxy.http}/v2/registry.test/lru-a/blobs/{blob}", timeout=30
        ) as resp:
            assert resp.headers["X-CR-Request-Type"] == "blob"  # a nginx hit
        deadline = time.monotonic() + FEED_DEADLINE
        while value(scrape(proxy), "crproxy_hits_total", kind="blob") < 1:
            assert time.monotonic() < deadline, "nginx's hit never reached the usage feed"

        pulled = skopeo_pull(f"{proxy.http}/registry.test/lru-c:v1", tmp_path / "pulled-c")
        assert pulled.returncode == 0
        proxy.wait_for_output("evicted", 30)

        assert cached_keys(proxy) == {"registry.test/lru-a:v1", "registry.test/lru-c:v1"}
        store = proxy.cache / "blobs/sha256"
        assert (store / shared_digest(a)).is_file(), "a blob A still uses was removed"
        assert not (store / b.layer_digests[1].split(":")[1]).exists()
        assert value(scrape(proxy), "crproxy_evictions_total") == 1
        # What stays still pulls.
        assert skopeo_pull(f"{proxy.http}/registry.test/lru-a:v1",
                           tmp_path / "pulled-a-again").returncode == 0


def shared_digest(image) -> str:
    return image.layer_digests[0].split(":")[1]
