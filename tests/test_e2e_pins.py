"""Pins (issue 13, item 5) through the real `cr-proxy serve`: a tag pinned
with `cr-proxy pin` while serve runs is followed by the background refresh
whatever its tag; the configuration's pins are warmed at start and cannot
be unpinned by hand; `ls --pinned` lists them. (Pinned images are never
evicted: tests/test_evict.py, on a real tree.)"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from testbed.crproxy import CrProxy
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints

DEADLINE = 60.0  # seconds for a 1 s refresh, or a warm of one small image
SMALL = "registry.test/small:v1"


def cr_proxy(proxy: CrProxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cr_proxy", *args, "--config", str(proxy.config_path)],
        capture_output=True, text=True, timeout=120,
    )


def listed(proxy: CrProxy, *args: str) -> dict[str, dict[str, object]]:
    result = cr_proxy(proxy, "ls", "--json", *args)
    assert result.returncode == 0, result.stderr
    return {image["key"]: image for image in json.loads(result.stdout)["images"]}


def test_a_pinned_tag_is_refreshed_whatever_its_tag(upstream: Upstream, tmp_path: Path) -> None:
    first = build_image(tmp_path / "a", layers=[tar_layer({"v": b"first"})], tag="t")
    for tag in ("v1", "v2"):
        upstream.push(tmp_path / "a", "t", "pinrefresh", tag)
    settings = {"refresh": {"interval": 1, "tags": ["latest"]}, "tag_ttl": 3600}
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream), **settings) as proxy:
        for tag in ("v1", "v2"):
            url = f"http://{proxy.http}/v2/registry.test/pinrefresh/manifests/{tag}"
            with urllib.request.urlopen(url, timeout=30) as resp:
                assert resp.headers["Docker-Content-Digest"] == first.manifest_digest
        pinned = cr_proxy(proxy, "pin", "registry.test/pinrefresh:v1")
        assert (pinned.returncode, pinned.stdout) == (0, "pinned registry.test/pinrefresh:v1\n")
        v2_asked = upstream.registry_requests("/v2/pinrefresh/manifests/v2")
        second = build_image(tmp_path / "b", layers=[tar_layer({"v": b"second"})], tag="t")
        for tag in ("v1", "v2"):
            upstream.push(tmp_path / "b", "t", "pinrefresh", tag)

        proxy.wait_for_output("pinrefresh:v1 moved upstream", DEADLINE)
        sidecar = proxy.cache / "docker-content-digest/registry.test/v2/pinrefresh/manifests"
        assert (sidecar / "v1").read_text().strip() == second.manifest_digest
        # v2 is neither pinned nor a refresh pattern: never asked for, still the first.
        assert (sidecar / "v2").read_text().strip() == first.manifest_digest
        assert upstream.registry_requests("/v2/pinrefresh/manifests/v2") == v2_asked

        assert list(listed(proxy, "--pinned")) == ["registry.test/pinrefresh:v1"]
        assert listed(proxy)["registry.test/pinrefresh:v2"]["pinned"] is False
        unpinned = cr_proxy(proxy, "unpin", "registry.test/pinrefresh:v1")
        assert (unpinned.returncode, unpinned.stdout) == (
            0, "unpinned registry.test/pinrefresh:v1\n")
        assert listed(proxy, "--pinned") == {}


def test_the_configurations_pins_are_warmed_at_start(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream),
                 cache={"pins": [SMALL]}) as proxy:
        proxy.wait_for_output("every pinned image of the configuration is warm", DEADLINE)
        image = listed(proxy)["registry.test/small:v1"]
        assert (image["complete"], image["pinned"]) == (True, True)
        assert set(image["blobs"]) >= set(images.small.sizes)
        assert cr_proxy(proxy, "check", SMALL).returncode == 0
        refused = cr_proxy(proxy, "unpin", SMALL)
        assert refused.returncode == 1
        assert refused.stdout == (f"still pinned {SMALL}: cache.pins in the configuration "
                                  "names it\n")
        table = cr_proxy(proxy, "ls", "--pinned").stdout
        assert "complete, pinned" in table.splitlines()[1], table
