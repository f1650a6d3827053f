"""`cr-proxy warm` end to end: the real command, the real fetcher (its own
in-process one, or serve's), the Docker-Hub-like upstream; each test has a
cr-proxy configuration and cache of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from testbed.crproxy import CrProxy, clean_env, layout_blobs, skopeo_pull
from testbed.oci_layout import ImageInfo
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import wait_until
from tests.test_e2e_metrics import scrape, value

DEAD = "http://127.0.0.1:9"


def own_config(upstream: Upstream, tmp_path: Path) -> CrProxy:
    """A cr-proxy configuration of this test's own, written but not served."""
    proxy = CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream))
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    return proxy


def run_warm(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cr_proxy", "warm", "--config", str(config), "--json", *args],
        capture_output=True, text=True, env=clean_env(), timeout=300,
    )


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(result.stdout)


def image_digests(image: ImageInfo) -> set[str]:
    """Every digest a full pull of the image needs (all platforms of an index)."""
    infos = list(image.platforms.values()) or [image]
    out = {image.index_digest} if image.index_digest else set()
    for info in infos:
        out |= {info.manifest_digest, info.config_digest, *info.layer_digests}
    return out


def blob_digests(image: ImageInfo) -> list[str]:
    infos = list(image.platforms.values()) or [image]
    return [d for info in infos for d in (info.config_digest, *info.layer_digests)]


def missing(proxy: CrProxy, digests: set[str]) -> set[str]:
    return {d for d in digests if not (proxy.cache / "blobs/sha256" / d.split(":")[1]).is_file()}


def warm_sockets(proxy: CrProxy) -> list[Path]:
    return sorted(proxy.run_dir.glob("warm-*.sock")) if proxy.run_dir.exists() else []


def test_warm_without_serve_then_offline_pull_of_every_platform(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    proxy = own_config(upstream, tmp_path)
    result = run_warm(proxy.config_path, "registry.test/multi:latest")
    assert result.returncode == 0, result.stderr
    done = summary(result)
    assert done["started_fetcher"] is True
    assert Path(done["fetcher"]).name.startswith("warm-")
    assert warm_sockets(proxy) == []  # the private socket is gone afterwards
    assert (done["images_ok"], done["blobs_fetched"], done["blobs_cached"]) == (1, 4, 0)
    assert done["bytes_fetched"] == sum(images.multi.sizes[d] for d in blob_digests(images.multi))
    assert "index: 2 of 2 manifests" in result.stderr
    assert result.stderr.count(" fetched sha256:") == 4  # plain lines: stderr is no terminal
    assert missing(proxy, image_digests(images.multi)) == set()

    with upstream.stopped():
        with proxy:
            pulled = skopeo_pull(f"{proxy.http}/registry.test/multi:latest", tmp_path / "out",
                                 all_platforms=True)
        assert pulled.returncode == 0, pulled.stderr
        assert image_digests(images.multi) <= set(layout_blobs(tmp_path / "out"))


def test_second_warm_fetches_nothing(upstream: Upstream, images: Images, tmp_path: Path) -> None:
    proxy = own_config(upstream, tmp_path)
    blobs = blob_digests(images.small)
    before = {d: upstream.cdn_blob_gets(d) for d in blobs}
    first = run_warm(proxy.config_path, "registry.test/small:v1")
    assert first.returncode == 0, first.stderr
    assert (summary(first)["blobs_fetched"], summary(first)["blobs_cached"]) == (3, 0)
    # Counted once the CDN is idle (every GET begun is logged).
    after_first = {d: upstream.cdn_blob_gets_settled(d) for d in blobs}
    assert after_first == {d: n + 1 for d, n in before.items()}  # one download per blob

    second = run_warm(proxy.config_path, "registry.test/small:v1")
    assert second.returncode == 0, second.stderr
    again = summary(second)
    assert (again["blobs_fetched"], again["blobs_cached"], again["bytes_fetched"]) == (0, 3, 0)
    assert " fetched sha256:" not in second.stderr
    # No sleep: the second warm (which fetched nothing, by its own count)
    # has returned, and anything it began at the CDN is logged once idle.
    assert {d: upstream.cdn_blob_gets_settled(d) for d in blobs} == after_first


def test_failing_image_is_named_and_the_others_complete(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    proxy = own_config(upstream, tmp_path)
    listing = tmp_path / "images.txt"
    listing.write_text("# lab images\n\nregistry.test/does-not-exist:v1  # typo\n")
    # `small:v1` by Docker's rules: docker.io/library/small:v1.
    result = run_warm(proxy.config_path, "small:v1", "--from-file", str(listing))
    assert result.returncode == 1
    assert "registry.test/does-not-exist:v1: MANIFEST_UNKNOWN: " in result.stderr
    assert "Traceback" not in result.stderr
    done = summary(result)
    assert (done["images"], done["images_ok"], done["images_failed"]) == (2, 1, 1)
    assert done["failures"][0]["image"] == "registry.test/does-not-exist:v1"
    assert missing(proxy, image_digests(images.small)) == set()
    tag = proxy.cache / "content/registry-1.docker.io/v2/library/small/manifests/v1"
    assert tag.read_bytes() == images.small.blob_bytes(images.small.manifest_digest)


def test_platform_narrows_an_index(upstream: Upstream, images: Images, tmp_path: Path) -> None:
    proxy = own_config(upstream, tmp_path)
    result = run_warm(proxy.config_path, "--platform", "linux/arm64", "registry.test/multi")
    assert result.returncode == 0, result.stderr
    arm = images.multi.platforms[("linux", "arm64")]
    amd = images.multi.platforms[("linux", "amd64")]
    assert missing(proxy, image_digests(arm)) == set()
    assert missing(proxy, set(amd.layer_digests)) == set(amd.layer_digests)


def test_warm_uses_the_running_serve(upstream: Upstream, images: Images, tmp_path: Path) -> None:
    proxy = own_config(upstream, tmp_path)
    # The same cache and run dir, but every upstream unreachable: a fetcher
    # started by warm from this file could not fetch anything; serve's can.
    dead = dict(proxy.config, endpoints={h: DEAD for h in proxy.config["endpoints"]})
    dead_config = tmp_path / "dead.yml"
    dead_config.write_text(yaml.safe_dump(dead))
    with proxy:
        result = run_warm(dead_config, "registry.test/other/app:v1")
        assert warm_sockets(proxy) == []
    assert result.returncode == 0, result.stderr
    done = summary(result)
    assert (done["fetcher"], done["started_fetcher"]) == (str(proxy.run_dir / "fetcher.sock"),
                                                          False)
    assert done["blobs_fetched"] == 3
    assert missing(proxy, image_digests(images.other)) == set()

    # Serve gone, the same file: warm starts its own fetcher, which cannot
    # reach anything, and says so naming the image.
    result = run_warm(dead_config, "registry.test/multi:latest")
    assert result.returncode == 1
    assert summary(result)["started_fetcher"] is True
    assert ("registry.test/multi:latest: MANIFEST_UNKNOWN: multi:latest is not in the cache, "
            "and registry.test is unreachable") in result.stderr


def test_warm_beside_a_client_pull_costs_one_upstream_download(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    """`warm` and a skopeo pull of the same image through one serve, made to
    meet in flight: both start while the CDN is held still (SIGSTOP), so
    their blob downloads wait mid-request until the pull has joined one of
    warm's. The upstream sends each blob once, and both end with every byte
    verified."""
    proxy = CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream),
                    timeouts={"connect": 2, "read": 300, "down_host": 1})
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    blobs = blob_digests(images.big)
    before = {d: upstream.cdn_blob_gets(d) for d in blobs}
    with proxy, ThreadPoolExecutor(1) as pool:
        with upstream.cdn_paused():
            warm = subprocess.Popen(
                [sys.executable, "-m", "cr_proxy", "warm", "--config", str(proxy.config_path),
                 "--json", "registry.test/big:v1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
            )
            pulling = pool.submit(skopeo_pull, f"{proxy.http}/registry.test/big:v1",
                                  tmp_path / "pulled")
            wait_until(lambda: value(scrape(proxy), "crproxy_coalesced_total") >= 1, 120,
                       "the pull joining one of warm's downloads")
        try:
            pull = pulling.result(timeout=300)
            out, err = warm.communicate(timeout=300)
        finally:
            if warm.poll() is None:
                warm.kill()
                warm.wait(30)
    assert warm.returncode == 0, err
    assert json.loads(out)["fetcher"] == str(proxy.run_dir / "fetcher.sock")
    assert pull.returncode == 0, pull.stderr
    assert image_digests(images.big) <= set(layout_blobs(tmp_path / "pulled"))
    assert missing(proxy, image_digests(images.big)) == set()
    # Counted once the CDN is idle (every GET begun is logged).
    fetched = {d: upstream.cdn_blob_gets_settled(d) - before[d] for d in blobs}
    assert fetched == {d: 1 for d in blobs}

