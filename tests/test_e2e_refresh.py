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
MANIFESTS = "/v2/refreshed/manifests"


def get_manifest(proxy: CrProxy, tag: str) -> tuple[str, str]:
    """A tag through the mirror: its digest, and who answered (nginx's hit
    says "manifest"; the fetcher's answers say otherwise)."""
    url = f"http://{proxy.http}/v2/registry.test/refreshed/manifests/{tag}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.headers["Docker-Content-Digest"], resp.headers["X-CR-Request-Type"]


def tree_state(proxy: CrProxy, tag: str) -> dict[str, tuple[bytes, int, int]]:
    """Every file the cache holds for the tag (the manifest and its sidecars,
    the validation time among them): bytes, inode and mtime."""
    files = [tree / f"registry.test{MANIFESTS}/{tag}" for tree in proxy.cache.iterdir()]
    return {str(f.relative_to(proxy.cache)): (f.read_bytes(), f.stat().st_ino,
                                              f.stat().st_mtime_ns)
            for f in files if f.is_file()}


def test_matching_tags_follow_upstream_in_the_background(
    upstream: Upstream, tmp_path: Path
) -> None:
    first = build_image(tmp_path / "a", layers=[tar_layer({"v": b"first"})], tag="t")
    upstream.push(tmp_path / "a", "t", "refreshed", "tick")
    upstream.push(tmp_path / "a", "t", "refreshed", "pinned")
    settings = {"refresh": {"interval": 1, "tags": ["ti*"]}, "tag_ttl": 3600}
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream), **settings) as proxy:
        assert get_manifest(proxy, "tick")[0] == first.manifest_digest
        assert get_manifest(proxy, "pinned")[0] == first.manifest_digest
        pinned = tree_state(proxy, "pinned")
        assert f"content/registry.test{MANIFESTS}/pinned" in pinned
        pinned_asked = upstream.registry_requests(f"{MANIFESTS}/pinned")
        second = build_image(tmp_path / "b", layers=[tar_layer({"v": b"second"})], tag="t")
        upstream.push(tmp_path / "b", "t", "refreshed", "tick")
        upstream.push(tmp_path / "b", "t", "refreshed", "pinned")

        # The pass that follows tick checks one tag: pinned is not asked for.
        proxy.wait_for_output("refreshed:tick moved upstream", REFRESH_DEADLINE)
        proxy.wait_for_output("refresh: 1 tags checked, 1 changed, 0 failed", REFRESH_DEADLINE)
        sidecar = proxy.cache / f"docker-content-digest/registry.test{MANIFESTS}/tick"
        assert sidecar.read_text().strip() == second.manifest_digest
        # A client now gets the new image from nginx, with no upstream request of its own.
        tick_asked = upstream.registry_requests(f"{MANIFESTS}/tick")
        assert get_manifest(proxy, "tick") == (second.manifest_digest, "manifest")
        assert upstream.registry_requests(f"{MANIFESTS}/tick") == tick_asked
        # A tag outside the patterns is left alone through the whole cycle:
        # still fresh for tag_ttl, nginx answers it, no file of it rewritten
        # or touched, and the upstream never asked for it.
        assert get_manifest(proxy, "pinned") == (first.manifest_digest, "manifest")
        assert tree_state(proxy, "pinned") == pinned
        assert upstream.registry_requests(f"{MANIFESTS}/pinned") == pinned_asked
