"""The disk limit while serving: pulling past cache.max_size evicts the
least recently used image, where a hit served by nginx alone counts as a
use, and keeps the blobs it shares with an image that stays."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from cr_proxy.cache.inventory import Inventory
from cr_proxy.config import load as load_config
from testbed.crproxy import CrProxy, skopeo_pull
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints
from tests.test_e2e_metrics import scrape, value

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


def test_eviction_racing_pulls_never_serves_a_cut_or_missing_blob(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Eight clients pull four images over and over through a cache that
    holds about one and a half of them: evictions run between and during
    their requests, and every answer is still whole and verified."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    images = []
    for n in range(4):
        image = build_image(tmp_path / f"img{n}",
                            layers=[tar_layer({f"f{n}": os.urandom(300_000)})])
        upstream.push(image.layout, "latest", f"churn-{n}", "v1")
        images.append((f"churn-{n}", image))
    one = sum(images[0][1].sizes.values())
    settings = {"cache": {"max_size": one * 3 // 2, "low_water": 1.0, "min_age": 0,
                          "check_interval": 1}}
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream), **settings) as proxy:

        def pull(round_no: int) -> list[str]:
            repo, image = images[round_no % len(images)]
            problems = []
            base = f"http://{proxy.http}/v2/registry.test/{repo}"
            for digest in [image.manifest_digest, image.config_digest, *image.layer_digests]:
                kind = "manifests" if digest == image.manifest_digest else "blobs"
                with urllib.request.urlopen(f"{base}/{kind}/{digest}", timeout=60) as resp:
                    body = resp.read()
                    length = resp.headers.get("Content-Length")
                if f"sha256:{hashlib.sha256(body).hexdigest()}" != digest:
                    problems.append(f"{repo} {digest}: {len(body)} bytes, wrong digest")
                if length is not None and int(length) != len(body):
                    problems.append(f"{repo} {digest}: cut at {len(body)} of {length}")
            return problems

        with ThreadPoolExecutor(8) as pool:
            problems = [p for result in pool.map(pull, range(48)) for p in result]
        assert problems == []
        proxy.wait_for_output("evicted", 30)
        assert value(scrape(proxy), "crproxy_evictions_total") >= 1
