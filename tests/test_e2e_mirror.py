"""Mirror mode end to end: skopeo -> nginx -> fetcher -> a Docker-Hub-like
upstream (token auth, blob redirects to a CDN host), and back from the
cache with the upstream gone."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testbed.crproxy import COMMIT_TIMEOUT, CrProxy, layout_blobs, skopeo_pull
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import wait_until

# OpenSSL's verify code for a chain that ends at a root the client does not
# trust: the mirror sends its CA in the chain, and no system store holds it.
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19


def request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, context=None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def expected_digests(image) -> set[str]:
    return {image.manifest_digest, image.config_digest, *image.layer_digests}


def assert_pulled(result, layout: Path, digests: set[str]) -> dict[str, int]:
    assert result.returncode == 0, result.stderr
    blobs = layout_blobs(layout)  # hashes every blob against its name
    assert digests <= set(blobs), f"missing {digests - set(blobs)}"
    return blobs


# --- online pulls, each addressing form --------------------------------------------


def test_pull_with_registry_path_prefix(proxy: CrProxy, images: Images, tmp_path: Path) -> None:
    result = skopeo_pull(f"{proxy.http}/registry.test/small:v1", tmp_path / "out")
    assert_pulled(result, tmp_path / "out", expected_digests(images.small))


def test_pull_from_default_registry_applies_docker_rules(
    proxy: CrProxy, images: Images, tmp_path: Path
) -> None:
    # No registry named: docker.io, whose host is registry-1.docker.io, and
    # a one-component name is library/small.
    result = skopeo_pull(f"{proxy.http}/small:v1", tmp_path / "out")
    assert_pulled(result, tmp_path / "out", expected_digests(images.small))
    stored = proxy.cache / "content/registry-1.docker.io/v2/library/small/manifests/v1"
    assert stored.read_bytes() == images.small.blob_bytes(images.small.manifest_digest)


def test_pull_with_containerd_ns_parameter(proxy: CrProxy, images: Images) -> None:
    base = f"http://{proxy.http}/v2/other/app"
    status, headers, body = request(f"{base}/manifests/v1?ns=registry.test")
    assert status == 200
    assert headers["Docker-Content-Digest"] == images.other.manifest_digest
    assert hashlib.sha256(body).hexdigest() == images.other.manifest_digest.split(":")[1]
    for digest in [images.other.config_digest, *images.other.layer_digests]:
        status, headers, body = request(f"{base}/blobs/{digest}?ns=registry.test")
        assert status == 200
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
    assert (proxy.cache / "content/registry.test/v2/other/app/manifests/v1").is_file()


def test_https_mirror_pulls_two_platform_index(
    proxy: CrProxy, images: Images, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(proxy.ca_cert.read_bytes())
    result = skopeo_pull(
        f"{proxy.https}/registry.test/multi:latest", tmp_path / "out",
        all_platforms=True, cert_dir=certs,
    )
    wanted = {images.multi.index_digest}
    for info in images.multi.platforms.values():
        wanted |= expected_digests(info)
    assert_pulled(result, tmp_path / "out", wanted)


def test_pull_of_100_mib_layer(proxy: CrProxy, images: Images, tmp_path: Path) -> None:
    result = skopeo_pull(f"{proxy.http}/registry.test/big:v1", tmp_path / "out")
    blobs = assert_pulled(result, tmp_path / "out", expected_digests(images.big))
    big_digest = images.big.layer_digests[0]
    assert blobs[big_digest] == images.big.sizes[big_digest] >= 100 * 1024 * 1024
    (stored,) = proxy.wait_committed("registry.test", "big", big_digest)
    with stored.open("rb") as f:
        assert f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}" == big_digest


# --- the hit path is nginx's --------------------------------------------------------


def test_blob_hit_is_served_by_nginx_with_range(proxy: CrProxy, images: Images) -> None:
    digest = images.small.layer_digests[1]
    url = f"http://{proxy.http}/v2/registry.test/small/blobs/{digest}"
    request(url)  # fill
    data = images.small.blob_bytes(digest)
    status, headers, body = request(url)
    assert (status, body) == (200, data)
    assert headers["X-CR-Request-Type"] == "blob"  # not "blob-fetch": the fetcher was not asked
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Docker-Content-Digest"] == digest
    assert headers["Content-Length"] == str(len(data))
    status, headers, body = request(url, headers={"Range": "bytes=100-199"})
    assert (status, body) == (206, data[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    status, headers, body = request(url, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(data)))


def test_manifest_hit_carries_stored_headers(proxy: CrProxy, images: Images) -> None:
    url = f"http://{proxy.http}/v2/registry.test/small/manifests/v1"
    first = request(url)
    assert first[0] == 200
    for method in ("GET", "HEAD"):
        status, headers, body = request(url, method=method)
        assert status == 200
        assert headers["X-CR-Request-Type"] == "manifest"
        assert headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
        assert headers["Docker-Content-Digest"] == images.small.manifest_digest
        assert headers["Content-Length"] == str(len(first[2]))
        assert body == (first[2] if method == "GET" else b"")


# --- the tree -------------------------------------------------------------------------


def test_tree_holds_sidecars_redirects_and_one_copy_per_blob(
    proxy: CrProxy, images: Images, tmp_path: Path
) -> None:
    for ref in ("registry.test/small:v1", "registry.test/other/app:v1"):
        assert skopeo_pull(f"{proxy.http}/{ref}", tmp_path / ref.replace("/", "_")).returncode == 0
    for repo, image in (("small", images.small), ("other/app", images.other)):
        proxy.wait_committed("registry.test", repo, image.config_digest, *image.layer_digests)
    cache = proxy.cache
    shared = images.shared_layer
    store_file = cache / "blobs/sha256" / shared.split(":")[1]
    links = [
        cache / f"content/registry.test/v2/{repo}/blobs/{shared}" for repo in ("small", "other/app")
    ]
    inodes = {os.stat(p).st_ino for p in [store_file, *links]}
    assert len(inodes) == 1, "a shared layer must be on disk once"
    assert len(list((cache / "blobs/sha256").glob(shared.split(":")[1] + "*"))) == 1

    tag = "registry.test/v2/small/manifests/v1"
    assert (cache / "content-type" / tag).read_text().strip() == (
        "application/vnd.oci.image.manifest.v1+json"
    )
    assert (cache / "docker-content-digest" / tag).read_text().strip() == (
        images.small.manifest_digest
    )
    challenge = (cache / "www-authenticate/registry.test/v2/_index").read_text()
    assert 'realm="http://auth.test/token"' in challenge
    redirect = (cache / f"redirect/registry.test/v2/small/blobs/{shared}").read_text().split()
    hex_part = shared.split(":")[1]
    cdn_path = f"docker/registry/v2/blobs/sha256/{hex_part[:2]}/{hex_part}/data"
    assert redirect[0] == "307"
    assert redirect[1].startswith(f"http://cdn.test/{cdn_path}")
    assert os.stat(cache / "content/cdn.test" / cdn_path).st_ino == os.stat(store_file).st_ino
    # Links and sidecars go through temp/ too: polled, bounded.
    wait_until(lambda: list((cache / "temp").iterdir()) == [], COMMIT_TIMEOUT, "temp/ to be empty")


# --- offline --------------------------------------------------------------------------


@pytest.fixture
def own_proxy(upstream: Upstream, tmp_path: Path):
    """A cr-proxy of this test's own: stopping the upstream then leaves no
    down-host memory behind in the shared one."""
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as running:
        yield running


def test_offline_pull_by_tag_and_digest_gives_identical_bytes(
    own_proxy: CrProxy, images: Images, upstream: Upstream, tmp_path: Path
) -> None:
    sources = {
        "tag": f"{own_proxy.http}/registry.test/small:v1",
        "digest": f"{own_proxy.http}/registry.test/small@{images.small.manifest_digest}",
        "default": f"{own_proxy.http}/small:v1",
    }
    online = {}
    for name, source in sources.items():
        result = skopeo_pull(source, tmp_path / f"online-{name}")
        online[name] = assert_pulled(result, tmp_path / f"online-{name}",
                                     expected_digests(images.small))
    multi = f"{own_proxy.http}/registry.test/multi:latest"
    assert skopeo_pull(multi, tmp_path / "online-multi", all_platforms=True).returncode == 0

    with upstream.stopped():
        # Make every cached tag stale, so the fetcher must try the upstream,
        # fail, and serve the stale copy.
        for digest_file in (own_proxy.cache / "docker-content-digest").rglob("*"):
            if digest_file.is_file():
                os.utime(digest_file, (1, 1))
        for name, source in sources.items():
            result = skopeo_pull(source, tmp_path / f"offline-{name}")
            offline = assert_pulled(result, tmp_path / f"offline-{name}",
                                    expected_digests(images.small))
            assert offline == online[name]
        result = skopeo_pull(multi, tmp_path / "offline-multi", all_platforms=True)
        assert result.returncode == 0, result.stderr
        assert layout_blobs(tmp_path / "offline-multi") == layout_blobs(tmp_path / "online-multi")

        # Never cached: a clear registry-style error, not a hang; a 404 with
        # the reason, as distribution's proxy answers (clients print it).
        status, _, body = request(f"http://{own_proxy.http}/v2/registry.test/never/manifests/v1")
        assert status == 404
        error = json.loads(body)["errors"][0]
        assert error == {"code": "MANIFEST_UNKNOWN", "message": (
            "never:v1 is not in the cache, and registry.test is unreachable")}


def test_stale_tag_is_revalidated_and_follows_upstream(
    own_proxy: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    first = build_image(tmp_path / "l1", layers=[tar_layer({"v": b"one"})], tag="t")
    upstream.push(tmp_path / "l1", "t", "moving", "t")
    url = f"http://{own_proxy.http}/v2/registry.test/moving/manifests/t"
    assert request(url)[1]["Docker-Content-Digest"] == first.manifest_digest
    second = build_image(tmp_path / "l2", layers=[tar_layer({"v": b"two"})], tag="t")
    upstream.push(tmp_path / "l2", "t", "moving", "t")
    # Still fresh: nginx answers from disk with the old digest.
    status, headers, _ = request(url)
    assert (headers["Docker-Content-Digest"], headers["X-CR-Request-Type"]) == (
        first.manifest_digest, "manifest"
    )
    os.utime(own_proxy.cache / "docker-content-digest/registry.test/v2/moving/manifests/t", (1, 1))
    status, headers, _ = request(url)
    assert (status, headers["Docker-Content-Digest"]) == (200, second.manifest_digest)
    assert headers["X-Cache"] == "REVALIDATED"


# --- bad upstream bytes never enter the cache ------------------------------------------


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_bad_upstream_blob_leaves_nothing_in_cache(
    damage: str, proxy: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    payload = os.urandom(300_000)
    image = build_image(tmp_path / "layout", layers=[tar_layer({"data.bin": payload})], tag="v1")
    repo = f"damaged-{damage}"
    upstream.push(tmp_path / "layout", "v1", repo, "v1")
    layer = image.layer_digests[0]
    data_file = upstream.blob_data_path(layer)
    good = data_file.read_bytes()
    if damage == "corrupt":
        data_file.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    else:
        data_file.write_bytes(good[: len(good) // 2])
    try:
        result = skopeo_pull(f"{proxy.http}/registry.test/{repo}:v1", tmp_path / "out")
        assert result.returncode != 0
        hex_part = layer.split(":")[1]
        # The failed download's temp file goes when its flight ends: after
        # that nothing of it can still appear (polled, bounded).
        wait_until(lambda: [p for p in (proxy.cache / "temp").iterdir() if hex_part in p.name]
                   == [], COMMIT_TIMEOUT, "the failed download to leave temp/")
        assert not (proxy.cache / "blobs/sha256" / hex_part).exists()
        assert not (proxy.cache / f"content/registry.test/v2/{repo}/blobs/{layer}").exists()
        assert not list((proxy.cache / "content/cdn.test").rglob(f"{hex_part}/data"))
        assert not (proxy.cache / f"redirect/registry.test/v2/{repo}/blobs/{layer}").exists()
    finally:
        data_file.write_bytes(good)
    # The upstream mended: the next pull fetches again and succeeds.
    result = skopeo_pull(f"{proxy.http}/registry.test/{repo}:v1", tmp_path / "again")
    assert_pulled(result, tmp_path / "again", {layer})


# --- what the mirror refuses ------------------------------------------------------------


def test_push_is_refused_with_registry_error(proxy: CrProxy) -> None:
    for method, path in [("PUT", "/v2/registry.test/small/manifests/v2"),
                         ("POST", "/v2/registry.test/small/blobs/uploads/")]:
        status, _, body = request(f"http://{proxy.http}{path}", method=method)
        assert status == 405
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/UPPER/case/manifests/v1", "NAME_INVALID"),
        ("/v2/registry.test/a..b/manifests/v1", "NAME_INVALID"),
        ("/v2/registry.test/small/blobs/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/registry.test/small/manifests/-bad-tag", "TAG_INVALID"),
        ("/v2/small/manifests/v1?ns=..%2f..%2fetc", "NAME_INVALID"),
    ],
)
def test_bad_names_get_400_and_touch_nothing(proxy: CrProxy, path: str, code: str) -> None:
    before = sorted(p for p in proxy.cache.rglob("*") if "temp" not in p.parts)
    status, _, body = request(f"http://{proxy.http}{path}")
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == code
    after = sorted(p for p in proxy.cache.rglob("*") if "temp" not in p.parts)
    assert after == before


# --- tokens and challenges when the auth server is gone ----------------------------------


def test_token_request_gets_dummy_token_when_auth_is_unreachable(
    own_proxy: CrProxy, upstream: Upstream
) -> None:
    import asyncio

    import aiohttp

    async def ask() -> dict:
        connector = aiohttp.UnixConnector(path=str(own_proxy.run_dir / "fetcher.sock"))
        url = "http://fetcher/token?service=registry.test&scope=repository:small:pull"
        headers = {"Host": "auth.test", "X-CR-Mode": "proxy", "X-CR-Port": "443"}
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url, headers=headers) as resp,
        ):
            assert resp.status == 200
            return await resp.json()

    upstream.stop_auth()
    try:
        answer = asyncio.run(ask())
    finally:
        upstream.start_auth()
    assert answer["token"] == answer["access_token"]
    assert answer["token"].startswith("cr-proxy-offline-")
    assert answer["expires_in"] > 0 and answer["issued_at"]


# --- serve itself -----------------------------------------------------------------------------


def test_serve_starts_without_upstream_and_fails_fast(tmp_path: Path) -> None:
    dead = {"registry.test": "http://127.0.0.1:9", "auth.test": "http://127.0.0.1:9"}
    with CrProxy(tmp_path / "crproxy", dead) as running:
        status, _, body = request(f"http://{running.http}/v2/registry.test/x/manifests/v1")
        assert status == 404  # never cached, upstream unreachable: said so
        assert json.loads(body)["errors"][0] == {"code": "MANIFEST_UNKNOWN", "message": (
            "x:v1 is not in the cache, and registry.test is unreachable")}


def test_serve_exits_non_zero_when_nginx_dies(tmp_path: Path) -> None:
    # (stop(), at the with's end, kills any nginx worker left behind.)
    with CrProxy(tmp_path / "crproxy", {}) as running:
        pid = int((running.run_dir / "nginx.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        assert running.proc is not None
        code = running.proc.wait(30)
    assert code == 1
    assert "nginx exited" in running.log_text()


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with CrProxy(tmp_path / "crproxy", {}) as running:
        master = int((running.run_dir / "nginx.pid").read_text())
        assert master in running.nginx_processes()
        # "ready" is nginx listening, which it does before forking workers.
        wait_until(lambda: len(running.nginx_processes()) >= 2, 10, "nginx's workers")
        assert running.stop() == 0
    # serve waited for nginx, workers included: nothing left for stop() to kill.
    assert running.strays == []
    with pytest.raises(ProcessLookupError):
        os.kill(master, 0)


def test_https_mirror_rejects_clients_without_the_ca(proxy: CrProxy) -> None:
    """Refused for the certificate, not for anything else (a refused
    connection or a protocol error is a URLError too): with the CA the same
    request is answered."""
    with pytest.raises(urllib.error.URLError) as refused:
        request(f"https://{proxy.https}/v2/", context=ssl.create_default_context())
    reason = refused.value.reason
    assert isinstance(reason, ssl.SSLCertVerificationError), repr(reason)
    assert reason.verify_code == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, reason
    trusting = ssl.create_default_context(cafile=str(proxy.ca_cert))
    status, _, _ = request(f"https://{proxy.https}/v2/", context=trusting)
    assert status in (200, 401)


# --- one upstream fetch however many clients miss at once ---------------------------------


def test_concurrent_misses_make_one_upstream_fetch(
    proxy: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    payload = os.urandom(8 * 1024 * 1024)
    image = build_image(tmp_path / "layout", layers=[tar_layer({"big.bin": payload})], tag="v1")
    upstream.push(tmp_path / "layout", "v1", "coalesce", "v1")
    layer = image.layer_digests[0]
    expected = image.blob_bytes(layer)
    url = f"http://{proxy.http}/v2/registry.test/coalesce/blobs/{layer}"
    before = upstream.cdn_blob_gets(layer)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: request(url), range(16)))
    assert all(status == 200 and body == expected for status, _, body in answers)
    # Counted once the CDN is idle: a second GET, under way or not yet
    # logged when the clients finished, would be seen.
    assert upstream.cdn_blob_gets_settled(layer) == before + 1


def test_a_second_serve_of_one_cache_refuses_and_leaves_the_first_whole(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    """`make serve` twice, an overlapping restart: the second serve says
    one is already running and stops before touching anything. It used to
    empty the first one's temp/ and held/ and replace its fetcher socket,
    usage feed and front stamp, then fail to bind: the first then answered
    every miss 502 (a review finding, session 13)."""
    with CrProxy(tmp_path / "first", proxy_endpoints(upstream)) as first:
        assert first.proc is not None
        socket_before = first.config_path.parent / "run" / "fetcher.sock"
        inode = socket_before.stat().st_ino
        second = subprocess.run(
            [sys.executable, "-m", "cr_proxy", "serve", "--config", str(first.config_path)],
            capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1
        assert f"another cr-proxy serve (pid {first.proc.pid})" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert socket_before.stat().st_ino == inode
        status, _, body = request(
            f"http://{first.http}/v2/registry.test/small/blobs/{images.small.layer_digests[0]}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == \
            images.small.layer_digests[0].split(":", 1)[1]
