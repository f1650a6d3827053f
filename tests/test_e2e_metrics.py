"""Metrics end to end: a scripted pull's misses (counted by the fetcher) and
hits (served by nginx alone, counted from its access log feed)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from testbed.crproxy import CrProxy, skopeo_pull
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints

FEED_DEADLINE = 10.0  # seconds for nginx's log datagrams to be read


def scrape(proxy: CrProxy) -> dict[tuple[str, tuple], float]:
    url = f"http://127.0.0.1:{proxy.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_misses_then_nginx_hits_of_a_pull(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as proxy:
        source = f"{proxy.http}/registry.test/small:v1"
        assert skopeo_pull(source, tmp_path / "first").returncode == 0
        fetched = sum(images.small.sizes[d]
                      for d in [images.small.config_digest, *images.small.layer_digests])
        # A blob's bytes count once it is committed, which follows the
        # client's last byte: on a busy machine a moment after skopeo is done.
        deadline = time.monotonic() + FEED_DEADLINE
        while True:
            samples = scrape(proxy)
            counted = value(samples, "crproxy_bytes_fetched_upstream_total")
            if counted >= fetched or time.monotonic() > deadline:
                break
        assert counted == fetched
        blobs = 1 + len(images.small.layer_digests)  # config + layers
        assert value(samples, "crproxy_misses_total", kind="blob") == blobs
        assert value(samples, "crproxy_misses_total", kind="manifest") == 1

        assert skopeo_pull(source, tmp_path / "second").returncode == 0
        deadline = time.monotonic() + FEED_DEADLINE
        while True:
            samples = scrape(proxy)
            hits = value(samples, "crproxy_hits_total", kind="blob")
            if hits >= blobs or time.monotonic() > deadline:
                break
        assert hits == blobs
        assert value(samples, "crproxy_hits_total", kind="manifest") == 1
        assert value(samples, "crproxy_misses_total", kind="blob") == blobs  # unchanged
        assert value(samples, "crproxy_cache_bytes") > 0

        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/", timeout=30) as r:
            page = r.read().decode()
        assert "hit ratio" in page
