"""Background tag refresh: a cached tag that moves upstream is followed
without any client asking, so an offline site has the newest it could."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from testbed.crproxy import CrProxy
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints

REFRESH_DEADLINE = 30.0  # seconds for a 1 s refresh interval to act


def manifest_digest(proxy: CrProxy, repo: str, tag: str) -> str:
    url = f"http://{proxy.http}/v2/registry.test/{repo}/manifests/{tag}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.headers["Docker-Content-Digest"]


def test_matching_tags_follow_upstream_in_the_background(
    upstream: Upstream, tmp_path: Path
) -> None:
    first = build_image(tmp_path / "a", layers=[tar_layer({"v": b"first"})], tag="t")
    upstream.push(tmp_path / "a", "t", "refreshed", "tick")
    upstream.push(tmp_path / "a", "t", "refreshed", "pinned")
    settings = {"refresh": {"interval": 1, "tags": ["ti*"]}, "tag_ttl": 3600}
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream), **settings) as proxy:
        assert manifest_digest(proxy, "refreshed", "tick") == first.manifest_digest
        assert manifest_digest(proxy, "refreshed", "pinned") == first.manifest_digest
        second = build_image(tmp_path / "b", layers=[tar_layer({"v": b"second"})], tag="t")
        upstream.push(tmp_path / "b", "t", "refreshed", "tick")
        upstream.push(tmp_path / "b", "t", "refreshed", "pinned")

        proxy.wait_for_output("refreshed:tick moved upstream", REFRESH_DEADLINE)
        sidecar = proxy.cache / "docker-content-digest/registry.test/v2/refreshed/manifests/tick"
        assert sidecar.read_text().strip() == second.manifest_digest
        # A client now gets the new image from nginx, with no upstream request of its own.
        assert manifest_digest(proxy, "refreshed", "tick") == second.manifest_digest
        # A tag outside the patterns is left alone (still fresh for tag_ttl).
        assert manifest_digest(proxy, "refreshed", "pinned") == first.manifest_digest
