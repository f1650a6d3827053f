"""A parent tier: `cr-proxy serve`s on loopback, sites whose misses go to a
parent, through its mirror port (parent_mirror) or its https_proxy
(upstream_proxy, with its CA), the parent in front of the real test
upstream. The site pulls through the parent (the upstream sees one
fetch per blob, the parent's cache fills); with the parent's upstream
stopped the site still pulls what the parent holds; with the parent
stopped, parent_fallback: direct goes to the upstream and fail answers at
once, as when the registry is unreachable."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints
from tests.test_e2e_clients import start_upstream, stop_upstream


@dataclass
class Tier:
    mode: str  # mirror | proxy
    parent_url: str  # as the sites name it
    parent: CrProxy
    direct: CrProxy  # parent_fallback: direct
    fail: CrProxy  # parent_fallback: fail
    images: dict[str, ImageInfo]


@pytest.fixture(scope="module", params=["mirror", "proxy"])
def tier(request: pytest.FixtureRequest, upstream: Upstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    mode = request.param
    work = tmp_path_factory.mktemp(f"parent-tier-{mode}")
    images = {}
    for name in ("through", "held", "direct"):  # one fresh image per case
        image = build_image(work / name, layers=[tar_layer({name: os.urandom(40_000)})])
        upstream.push(image.layout, "latest", f"tier-{mode}/{name}", "v1")
        images[name] = image
    # The sites keep the upstream's endpoints: parent_fallback direct uses them.
    endpoints = proxy_endpoints(upstream)
    (proxy_port,) = free_ports(1)
    with CrProxy(work / "parent", endpoints, listen_proxy=f"127.0.0.1:{proxy_port}") as parent:
        if mode == "mirror":
            url = f"http://{parent.http}"
            settings = {"parent_mirror": url}
        else:
            url = f"http://127.0.0.1:{proxy_port}"
            settings = {"upstream_proxy": url, "upstream_proxy_ca": str(parent.ca_cert)}
        with CrProxy(work / "direct", endpoints, parent_fallback="direct", **settings) as direct, \
                CrProxy(work / "fail", endpoints, parent_fallback="fail", **settings) as fail:
            yield Tier(mode, url, parent, direct, fail, images)


def blobs(image: ImageInfo) -> list[str]:
    return [image.config_digest, *image.layer_digests]


def pull(tier: Tier, node: CrProxy, name: str, dest: Path) -> dict[str, int]:
    """skopeo pulls tier-<mode>/<name>:v1 through node's mirror; the blobs it
    got, each checked against its digest."""
    result = skopeo_pull(f"{node.http}/registry.test/tier-{tier.mode}/{name}:v1", dest)
    assert result.returncode == 0, result.stderr
    return layout_blobs(dest)


def test_site_pulls_through_the_parent_which_fetches_once(
    tier: Tier, upstream: Upstream, tmp_path: Path
) -> None:
    image = tier.images["through"]
    repo = f"tier-{tier.mode}/through"
    got = pull(tier, tier.direct, "through", tmp_path / "site")
    assert set(blobs(image)) <= set(got)
    # A second site misses too and is served by the parent's cache.
    assert set(blobs(image)) <= set(pull(tier, tier.fail, "through", tmp_path / "other-site"))
    for digest in blobs(image):
        assert upstream.cdn_blob_gets_settled(digest) == 1, digest
    tier.parent.wait_committed("registry.test", repo, *blobs(image))
    tier.direct.wait_committed("registry.test", repo, *blobs(image))
    # The sites asked the parent (its mirror: the registry as the path's
    # first component, as a client names it).
    prefix = "registry.test/" if tier.mode == "mirror" else ""
    tier.parent.access_lines(re.compile(rf'"GET /v2/{prefix}{repo}/manifests/v1 HTTP/'), 2)
    tier.parent.access_lines(re.compile(rf'"GET /v2/{prefix}{repo}/blobs/sha256:\w+ HTTP/'), 2)


def test_site_pulls_what_the_parent_holds_while_the_parents_upstream_is_down(
    tier: Tier, upstream: Upstream, tmp_path: Path
) -> None:
    image = tier.images["held"]
    assert set(blobs(image)) <= set(pull(tier, tier.parent, "held", tmp_path / "parent"))
    tier.parent.wait_committed("registry.test", f"tier-{tier.mode}/held", *blobs(image))
    stop_upstream(upstream)
    try:
        assert set(blobs(image)) <= set(pull(tier, tier.direct, "held", tmp_path / "site"))
    finally:
        start_upstream(upstream)


def test_parent_down_direct_goes_to_the_upstream_and_fail_answers_at_once(
    tier: Tier, upstream: Upstream, tmp_path: Path
) -> None:
    image = tier.images["direct"]
    tier.parent.stop()
    got = pull(tier, tier.direct, "direct", tmp_path / "site")
    assert set(blobs(image)) <= set(got)
    for digest in blobs(image):
        assert upstream.cdn_blob_gets_settled(digest) == 1, digest
    # fail: the misses answered at once, nothing asked of the upstream, as
    # any never-cached content offline (404, the reason in the message, which
    # clients print); the parent named in the log.
    repo = f"tier-{tier.mode}/direct"
    path = f"/v2/{repo}/manifests/v1"
    before = upstream.registry_requests(path)
    for what in ("manifests/v1", f"blobs/{image.layer_digests[0]}"):
        code, body = get(tier.fail, f"/v2/registry.test/{repo}/{what}")
        assert code == 404 and "registry.test is unreachable" in body, body
    assert upstream.registry_requests(path) == before
    tier.fail.wait_for_output(f"the parent {tier.parent_url} is unreachable", 30)


def get(node: CrProxy, path: str) -> tuple[int, str]:
    """A GET on node's HTTP mirror: (status, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        f"http://{node.http}{path}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_parent_proxy_not_trusted_is_an_error_not_a_fallback(
    upstream: Upstream, tmp_path: Path
) -> None:
    """upstream_proxy without the parent's CA: TLS to the parent fails, and
    parent_fallback: direct must not take that for an outage (a site would
    silently bypass its parent, or a man in the middle would decide where it
    goes)."""
    image = build_image(tmp_path / "img", layers=[tar_layer({"untrusted": os.urandom(40_000)})])
    upstream.push(image.layout, "latest", "tier-untrusted/app", "v1")
    endpoints = proxy_endpoints(upstream)
    (proxy_port,) = free_ports(1)
    with CrProxy(tmp_path / "parent", endpoints,
                 listen_proxy=f"127.0.0.1:{proxy_port}") as parent, \
            CrProxy(tmp_path / "site", endpoints, parent_fallback="direct",
                    upstream_proxy=f"http://127.0.0.1:{proxy_port}") as site:
        # The parent settled first: its nginx reloaded with registry.test's
        # own server (a host's first request starts that), so nothing but
        # the site's certificate check can fail the site's request.
        subprocess.run(["curl", "-sk", "-o", "/dev/null", "--max-time", "30", "--proxy",
                        f"http://127.0.0.1:{proxy_port}", "https://registry.test/v2/"],
                       check=False, env={**os.environ, "NO_PROXY": ""})
        parent.wait_for_output("a server of its own for registry.test", 30)
        code, body = get(site, "/v2/registry.test/tier-untrusted/app/manifests/v1")
        assert code >= 500, body
        site.wait_for_output(f"the parent http://127.0.0.1:{proxy_port}'s TLS", 30)
        assert upstream.registry_requests("/v2/tier-untrusted/app/manifests/v1") == 0
