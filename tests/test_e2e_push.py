"""Pushes through the mirror (push.enabled), end to end: skopeo and plain
HTTP clients -> nginx -> the fetcher (fetch/push.py) -> the real test
registry with token auth, cr-proxy logging in with a push-scoped token of
its own; what the registry accepted is in the cache at once, and pulls
with the registry stopped."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, clean_env, layout_blobs, skopeo_pull
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from testbed.pagecache import resident_bytes
from testbed.ports import free_ports
from testbed.registry import REGISTRY_NAME, Upstream
from tests.clients import Dockerd, available, podman
from tests.conftest import proxy_endpoints
from tests.faulty import wait_until
from tests.test_e2e_inventory import cr_proxy_json
from tests.test_e2e_proxy import ca_dir, proxied_env

PREFIX = f"/v2/{REGISTRY_NAME}"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def pusher(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    """A cr-proxy taking pushes from 127.0.0.1 only (the other loopback
    addresses are clients off push.allow_clients); a push naming no
    registry goes to registry.test."""
    push = {"enabled": True, "allow_clients": ["127.0.0.1/32"], "default_target": REGISTRY_NAME}
    (front,) = free_ports(1)  # the https_proxy front too
    with CrProxy(tmp_path_factory.mktemp("pusher"), proxy_endpoints(upstream),
                 push=push, listen_proxy=f"127.0.0.1:{front}") as running:
        yield running


@dataclass
class Call:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def error_code(self) -> str:
        return json.loads(self.body)["errors"][0]["code"]


def call(cr: CrProxy, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
         headers: dict[str, str] | None = None, source: str = "127.0.0.1") -> Call:
    conn = http.client.HTTPConnection(cr.address, cr.http_port, timeout=60,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return Call(answer.status, answer.headers, answer.read())
    finally:
        conn.close()


def stored_blob(cr: CrProxy, digest: str) -> Path:
    return cr.cache / "blobs/sha256" / digest.split(":", 1)[1]


def committed(path: Path) -> Path:
    """A pushed blob's file, once its commit is done: the final PUT's 201
    goes to the client before the fsync and rename (push.py _finish)."""
    wait_until(path.is_file, 30, f"{path} committed")
    return path


def leftover_uploads(cr: CrProxy) -> list[str]:
    """Upload temp files in the cache's temp/ (named by the unnamed digest)."""
    return [p.name for p in (cr.cache / "temp").iterdir() if p.name.startswith("sha256-0000")]


# --- skopeo: a whole image, then pulled with the registry stopped ------------------


@pytest.fixture(scope="module")
def pushed(pusher: CrProxy, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    """skopeo copy of a fresh image (random bytes: no registry has its
    layers) to <mirror>/registry.test/pushed:v1."""
    work = tmp_path_factory.mktemp("push-layout")
    image = build_image(work / "layout", layers=[
        tar_layer({"base.bin": os.urandom(3 << 20)}),
        tar_layer({"app.txt": os.urandom(4096)}),
    ], tag="v1")
    result = subprocess.run(
        ["skopeo", "copy", "--preserve-digests", "--retry-times", "0",
         "--dest-tls-verify=false", f"oci:{work / 'layout'}:v1",
         f"docker://{pusher.http}/{REGISTRY_NAME}/pushed:v1"],
        capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 0, result.stderr + pusher.log_text()[-3000:]
    return image


def test_skopeo_push_reaches_the_upstream(
    pushed: ImageInfo, pusher: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    direct = upstream.pull_direct("pushed", "v1", tmp_path / "direct")
    index = json.loads((direct / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.manifest_digest
    assert {pushed.config_digest, *pushed.layer_digests} <= set(layout_blobs(direct))
    # Written through: every blob and the manifest, by digest and by tag.
    for digest in (pushed.config_digest, *pushed.layer_digests):
        assert stored_blob(pusher, digest).is_file(), digest
        assert (pusher.cache / f"content/{REGISTRY_NAME}/v2/pushed/blobs/{digest}").is_file()
    content = pusher.cache / f"content/{REGISTRY_NAME}/v2/pushed/manifests"
    assert (content / "v1").read_bytes() == pushed.blob_bytes(pushed.manifest_digest)
    assert (content / pushed.manifest_digest).is_file()
    assert leftover_uploads(pusher) == []


def test_pushed_image_pulls_with_the_upstream_stopped(
    pushed: ImageInfo, pusher: CrProxy, upstream_down: Upstream, tmp_path: Path
) -> None:
    result = skopeo_pull(f"{pusher.http}/{REGISTRY_NAME}/pushed:v1", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.manifest_digest
    assert {pushed.config_digest, *pushed.layer_digests} <= set(layout_blobs(tmp_path / "out"))


def test_a_probe_while_the_upstream_is_down_is_the_caches_answer(
    pushed: ImageInfo, pusher: CrProxy, upstream: Upstream
) -> None:
    """A HEAD from a client that may push, for a blob the cache holds
    (under another repository: not an nginx hit), while the registry is
    down: answered from the cache, as a puller's is."""
    layer = pushed.layer_digests[0]
    with registry_down(pusher, upstream):
        answer = probe(pusher, "offline-probe", layer)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Length"] == str(pushed.sizes[layer])


def test_ls_lists_the_pushed_image_as_a_pulled_one(pushed: ImageInfo, pusher: CrProxy) -> None:
    key = f"{REGISTRY_NAME}/pushed:v1"
    listed = {image["key"]: image for image in cr_proxy_json(pusher, "ls")["images"]}
    image = listed[key]
    assert (image["name"], image["digest"]) == (key, pushed.manifest_digest)
    assert image["platforms"] == ["linux/amd64"]
    assert image["size"] == sum(pushed.sizes.values())
    assert image["missing"] == []
    assert set(image["blobs"]) >= {pushed.config_digest, *pushed.layer_digests}


# --- the upload forms, by hand ---------------------------------------------------------


def start_upload(cr: CrProxy, repo: str, query: str = "") -> Call:
    started = call(cr, "POST", f"{PREFIX}/{repo}/blobs/uploads/{query}",
                   headers={"Content-Length": "0"})
    return started


def our_location(answer: Call, repo: str, what: str = "blobs/uploads/") -> str:
    """The Location the mirror gave: its own path for the repository, never
    the upstream's host or port."""
    location = answer.headers["Location"]
    assert location.startswith(f"{PREFIX}/{repo}/{what}"), location
    assert "://" not in location
    return location


def with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + f"digest={digest}"


def test_chunked_upload_with_status_is_stored(pusher: CrProxy) -> None:
    data = os.urandom(300_000)
    first, second = data[:100_000], data[100_000:]
    started = start_upload(pusher, "chunked")
    assert started.status == 202, started.body
    location = our_location(started, "chunked")
    patched = call(pusher, "PATCH", location, first, {
        "Content-Type": "application/octet-stream", "Content-Range": f"0-{len(first) - 1}"})
    assert patched.status == 202, patched.body
    status = call(pusher, "GET", our_location(patched, "chunked"))
    assert status.status == 204, status.body
    assert status.headers["Range"] == f"0-{len(first) - 1}"
    location = our_location(status, "chunked")
    patched = call(pusher, "PATCH", location, second, {
        "Content-Type": "application/octet-stream",
        "Content-Range": f"{len(first)}-{len(data) - 1}"})
    assert patched.status == 202, patched.body
    done = call(pusher, "PUT", with_digest(our_location(patched, "chunked"), sha256(data)),
                headers={"Content-Length": "0"})
    assert done.status == 201, done.body
    assert our_location(done, "chunked", "blobs/") == f"{PREFIX}/chunked/blobs/{sha256(data)}"
    assert committed(stored_blob(pusher, sha256(data))).read_bytes() == data
    # A cross-repository mount of it: the upstream mounts, our copy is named too.
    mounted = start_upload(pusher, "mounted",
                           f"?mount={sha256(data)}&from={REGISTRY_NAME}/chunked")
    assert mounted.status == 201, mounted.body
    assert our_location(mounted, "mounted", "blobs/") == f"{PREFIX}/mounted/blobs/{sha256(data)}"
    assert (pusher.cache / f"content/{REGISTRY_NAME}/v2/mounted/blobs/{sha256(data)}").is_file()


def upload(cr: CrProxy, repo: str, data: bytes) -> None:
    """A monolithic upload (POST, then PUT with the bytes)."""
    started = start_upload(cr, repo)
    assert started.status == 202, started.body
    done = call(cr, "PUT", with_digest(our_location(started, repo), sha256(data)), data,
                {"Content-Type": "application/octet-stream"})
    assert done.status == 201, done.body


def test_monolithic_upload_is_stored(pusher: CrProxy) -> None:
    data = os.urandom(50_000)
    upload(pusher, "mono", data)
    assert committed(stored_blob(pusher, sha256(data))).read_bytes() == data


def uneven(part: bytes) -> Iterator[bytes]:
    """`part` in pieces of sizes from 1 byte to about 200 KB, none alike:
    sent chunked (no Content-Length), each a chunk of its own."""
    at, size = 0, 1
    while at < len(part):
        yield part[at:at + size]
        at += size
        size = size * 7 % 200_003 + 1


def test_layer_in_uneven_pieces_over_three_requests_is_stored_whole(
    pusher: CrProxy, upstream: Upstream
) -> None:
    """Several MiB (many of the fetcher's write batches, writes.py), in
    uneven chunked pieces, over two PATCHes and the final PUT's own body:
    the registry and the cache hold the client's bytes, in order, and the
    digest check passes on them."""
    mib = 1 << 20
    data = os.urandom(5 * mib + 12_345)
    parts = [data[:2 * mib + 7], data[2 * mib + 7:4 * mib + 100], data[4 * mib + 100:]]
    location = our_location(start_upload(pusher, "pieces"), "pieces")
    at = 0
    for part in parts[:2]:
        patched = call(pusher, "PATCH", location, uneven(part), {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{at}-{at + len(part) - 1}"})
        assert patched.status == 202, patched.body
        at += len(part)
        assert patched.headers["Range"] == f"0-{at - 1}"
        location = our_location(patched, "pieces")
    done = call(pusher, "PUT", with_digest(location, sha256(data)),
                uneven(parts[2]), {"Content-Type": "application/octet-stream"})
    assert done.status == 201, done.body
    assert upstream.blob_data_path(sha256(data)).read_bytes() == data
    stored = committed(stored_blob(pusher, sha256(data)))
    # Its whole MiBs went to the disk around the page cache (cache/direct.py):
    # only the tail's pages are in memory, until it is read.
    assert resident_bytes(stored) < mib
    assert stored.read_bytes() == data
    assert committed(pusher.cache / f"content/{REGISTRY_NAME}/v2/pieces/blobs/{sha256(data)}")
    assert leftover_uploads(pusher) == []


# --- one upload per layer across images --------------------------------------------


def mounts(upstream: Upstream, repo: str, digest: str) -> int:
    """Cross-repository mounts into `repo` the registry was asked for."""
    pattern = re.compile(r"http\.request\.id=(\S+) http\.request\.method=POST .*"
                         rf"http\.request\.uri=\"?/v2/{re.escape(repo)}/blobs/uploads/\?mount="
                         rf"sha256(?::|%3A){digest.split(':')[1]}&")
    log = upstream.registry_log.read_text(errors="replace")
    return len({match[1] for line in log.splitlines() if (match := pattern.search(line))})


def probe(cr: CrProxy, repo: str, digest: str) -> Call:
    return call(cr, "HEAD", f"{PREFIX}/{repo}/blobs/{digest}")


def test_a_probe_costs_the_registry_one_head(pusher: CrProxy, upstream: Upstream) -> None:
    """A pusher's HEAD of a layer the registry lacks goes upstream with
    cr-proxy's push login: one HEAD there, not a 401 first and then the
    HEAD again with a pull token (skopeo probes every layer twice)."""
    digest = sha256(os.urandom(20_000))
    for count in (1, 2):
        answer = probe(pusher, "one-head", digest)
        assert answer.status == 404, answer.body
        assert upstream.registry_requests(f"/v2/one-head/blobs/{digest}") == count


def test_probe_of_a_layer_held_in_another_repository_mounts_it(
    pusher: CrProxy, upstream: Upstream
) -> None:
    """A pusher's HEAD for a layer the registry holds in another repository
    is a mount upstream and a 200: the pusher skips the upload."""
    data = os.urandom(40_000)
    digest = sha256(data)
    upload(pusher, "dedup-a", data)
    answer = probe(pusher, "dedup-b", digest)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Length"] == str(len(data))
    assert answer.headers["Docker-Content-Digest"] == digest
    assert mounts(upstream, "dedup-b", digest) >= 1
    assert held_upstream(upstream, "dedup-b", digest)
    # The same repository again: from what we know, no upstream request.
    before = upstream.registry_requests(f"/v2/dedup-b/blobs/{digest}")
    assert probe(pusher, "dedup-b", digest).status == 200
    assert upstream.registry_requests(f"/v2/dedup-b/blobs/{digest}") == before


def test_a_client_mount_of_a_blob_not_cached_is_fetched_so_the_image_is_whole(
    pusher: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """A client's own cross-repository mount (skopeo mounts layers it saw
    elsewhere) of a layer cr-proxy never had: the mount is relayed, then the
    layer fetched in the background, so the pushed image pulls offline."""
    image = build_image(tmp_path / "layout", layers=[tar_layer({"m": os.urandom(30_000)})],
                        tag="v1")
    upstream.push(tmp_path / "layout", "v1", "mount-src", "v1")  # not through cr-proxy
    digest = image.layer_digests[0]
    mounted = call(pusher, "POST", f"{PREFIX}/mount-dst/blobs/uploads/?mount={digest}"
                   f"&from={REGISTRY_NAME}/mount-src")
    assert mounted.status == 201, mounted.body
    named = pusher.cache / f"content/{REGISTRY_NAME}/v2/mount-dst/blobs/{digest}"
    wait_until(named.is_file, 60, "the mounted layer in the cache")
    with upstream.stopped():
        got = call(pusher, "GET", f"{PREFIX}/mount-dst/blobs/{digest}")
    assert got.status == 200 and sha256(got.body) == digest


def test_probe_after_a_restart_still_mounts(pusher: CrProxy, upstream: Upstream) -> None:
    """What the upstream holds survives a restart: the tree's blob names."""
    data = os.urandom(30_000)
    digest = sha256(data)
    upload(pusher, "restart-a", data)
    pusher.stop()
    pusher.start()
    answer = probe(pusher, "restart-b", digest)
    assert answer.status == 200, answer.body
    assert mounts(upstream, "restart-b", digest) == 1
    assert held_upstream(upstream, "restart-b", digest)


def test_probe_of_a_layer_being_uploaded_waits_for_the_upload(
    pusher: CrProxy, upstream: Upstream
) -> None:
    """Two pushers of one new layer: the second one's probe waits for the
    first one's upload, then is a mount; the layer crosses once."""
    data = os.urandom(60_000)
    digest = sha256(data)
    assert probe(pusher, "wait-a", digest).status == 404  # wait-a will upload it
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(probe, pusher, "wait-b", digest)
        pusher.wait_for_output(f"push probe of {digest} in {REGISTRY_NAME}/wait-b waits", 30)
        assert not second.done()
        upload(pusher, "wait-a", data)
        answer = second.result(timeout=60)
    assert answer.status == 200, answer.body
    assert mounts(upstream, "wait-b", digest) == 1
    assert held_upstream(upstream, "wait-b", digest)


def held_upstream(upstream: Upstream, repo: str, digest: str) -> bool:
    """The registry's own answer: does `repo` hold the blob? (200, or its
    307 to the CDN.)"""
    token = upstream.issue_token([f"repository:{repo}:pull"])
    host, port = upstream.registry_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("HEAD", f"/v2/{repo}/blobs/{digest}",
                     headers={"Authorization": f"Bearer {token}"})
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status in (200, 307, 404), status
    return status != 404


def test_push_without_registry_goes_to_default_target(pusher: CrProxy, upstream: Upstream) -> None:
    data = os.urandom(10_000)
    started = call(pusher, "POST", "/v2/plain/app/blobs/uploads/",
                   headers={"Content-Length": "0"})
    assert started.status == 202, started.body
    assert started.headers["Location"].startswith("/v2/plain/app/blobs/uploads/")
    done = call(pusher, "PUT", with_digest(started.headers["Location"], sha256(data)), data,
                {"Content-Type": "application/octet-stream"})
    assert done.status == 201, done.body
    assert done.headers["Location"] == f"/v2/plain/app/blobs/{sha256(data)}"
    assert committed(pusher.cache / f"content/{REGISTRY_NAME}/v2/plain/app/blobs/{sha256(data)}"
                     ).read_bytes() == data
    assert "/v2/plain/app/blobs/uploads/" in upstream.registry_log.read_text(errors="replace")


def test_cancelled_upload_leaves_nothing(pusher: CrProxy) -> None:
    data = os.urandom(20_000)
    started = start_upload(pusher, "cancelled")
    patched = call(pusher, "PATCH", our_location(started, "cancelled"), data,
                   {"Content-Type": "application/octet-stream"})
    assert patched.status == 202, patched.body
    cancelled = call(pusher, "DELETE", our_location(patched, "cancelled"))
    assert cancelled.status == 204, cancelled.body
    assert not stored_blob(pusher, sha256(data)).exists()
    assert leftover_uploads(pusher) == []


# --- faults ------------------------------------------------------------------------------


def test_digest_mismatch_is_the_upstreams_400_and_nothing_is_stored(pusher: CrProxy) -> None:
    data, claimed = os.urandom(30_000), sha256(b"something else")
    started = start_upload(pusher, "mismatch")
    done = call(pusher, "PUT", with_digest(our_location(started, "mismatch"), claimed), data,
                {"Content-Type": "application/octet-stream"})
    assert done.status == 400, done.body
    assert done.error_code() == "DIGEST_INVALID"
    assert not stored_blob(pusher, sha256(data)).exists()
    assert not stored_blob(pusher, claimed).exists()
    assert leftover_uploads(pusher) == []


def test_a_blob_the_cache_cannot_store_is_pushed_all_the_same(
    pusher: CrProxy, upstream: Upstream
) -> None:
    """The upstream took the blob (201) but the cache cannot keep it (its
    digest store's sha256 directory is a file): the client gets the
    upstream's 201, the push goes on; the cache logs it and keeps nothing."""
    digests = pusher.cache / "blobs/sha256"
    aside = pusher.cache / "blobs/sha256-aside"
    digests.mkdir(parents=True, exist_ok=True)  # none yet when this test runs alone
    digests.rename(aside)
    digests.write_text("not a directory\n")
    try:
        data = os.urandom(30_000)
        started = start_upload(pusher, "unstorable")
        done = call(pusher, "PUT", with_digest(our_location(started, "unstorable"), sha256(data)),
                    data, {"Content-Type": "application/octet-stream"})
        assert done.status == 201, done.body
        assert held_upstream(upstream, "unstorable", sha256(data))
        pusher.wait_for_output(f"pushed blob {sha256(data)} of {REGISTRY_NAME}/unstorable "
                               "not stored", 30)
        assert leftover_uploads(pusher) == []
    finally:
        digests.unlink()
        aside.rename(digests)
    assert not stored_blob(pusher, sha256(data)).exists()


def test_manifest_the_upstream_refuses_reaches_the_client_and_is_not_stored(
    pusher: CrProxy
) -> None:
    missing = sha256(b"a blob no one pushed")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": missing, "size": 20},
        "layers": [],
    }).encode()
    answer = call(pusher, "PUT", f"{PREFIX}/refused/manifests/v1", manifest,
                  {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert answer.status == 400, answer.body
    assert answer.error_code() == "MANIFEST_BLOB_UNKNOWN"
    content = pusher.cache / f"content/{REGISTRY_NAME}/v2/refused/manifests"
    assert not (content / "v1").exists()
    assert not stored_blob(pusher, sha256(manifest)).exists()


def test_client_off_push_allow_clients_is_refused_before_the_upstream(
    pusher: CrProxy, upstream: Upstream
) -> None:
    answer = call(pusher, "POST", f"{PREFIX}/denied-repo/blobs/uploads/", b"x" * 1000,
                  source="127.0.0.2")
    assert answer.status == 403, answer.body
    assert answer.error_code() == "DENIED"
    assert b"push.allow_clients" in answer.body
    # The request never reached the fetcher, let alone the registry.
    assert "denied-repo" not in upstream.registry_log.read_text(errors="replace")
    # Pulls from there are still the mirror's to answer (mirror_allow_clients).
    assert call(pusher, "GET", "/v2/", source="127.0.0.2").status == 200


@contextmanager
def registry_down(cr: CrProxy, upstream: Upstream) -> Iterator[None]:
    """The registry, token server and CDN stopped, then started again, and
    (not upstream_down) waited for until cr-proxy's probe finds the
    registry answering: it is remembered down meanwhile, and the next push
    here must not meet that."""
    def comebacks() -> int:
        return sum(f"upstream {REGISTRY_NAME} reachable again" in line for line in cr.output)

    before = comebacks()
    with upstream.stopped():
        yield
    wait_until(lambda: comebacks() > before, 30, "the probe finding the registry back")


def test_upstream_unreachable_is_a_clear_503(pusher: CrProxy, upstream: Upstream) -> None:
    with registry_down(pusher, upstream):
        answer = start_upload(pusher, "unreachable")
        assert answer.status == 503, answer.body
        assert answer.error_code() == "UPSTREAM_UNREACHABLE"


@pytest.mark.parametrize("tool", ["podman", "buildah"])
def test_libpod_push_is_relayed_and_stored(
    tool: str, pusher: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """podman and buildah push an image from their own storage (layers
    compressed anew: a new manifest) through the mirror; the upstream's tag
    and our cached one are the same manifest."""
    assert available(tool), f"{tool} is missing: make test installs it"
    build_image(tmp_path / "layout", layers=[tar_layer({"p.txt": os.urandom(2048)})], tag="v1")
    work = tmp_path / tool
    repo = f"{tool}-pushed"
    try:
        loaded = podman(work, None, tmp_path, "pull", f"oci:{tmp_path / 'layout'}:v1",
                        tool=tool)
        assert loaded.returncode == 0, loaded.stderr
        image_id = loaded.stdout.strip().splitlines()[-1]
        dest = f"docker://{pusher.http}/{REGISTRY_NAME}/{repo}:v1"
        pushed = podman(work, None, tmp_path, "push", "--tls-verify=false", image_id, dest,
                        tool=tool)
        assert pushed.returncode == 0, pushed.stderr + pusher.log_text()[-3000:]
    finally:
        if tool == "podman":
            podman(work, None, tmp_path, "system", "reset", "--force")
        else:
            podman(work, None, tmp_path, "rmi", "--all", "--force", tool=tool)
        shutil.rmtree(os.readlink(work / "runroot"), ignore_errors=True)
    assert_pushed_and_stored(pusher, upstream, repo, tmp_path)


def assert_pushed_and_stored(cr: CrProxy, upstream: Upstream, repo: str, tmp_path: Path) -> None:
    """The registry's tag and our cached one are the same manifest, and
    each of its blobs is in the cache."""
    direct = upstream.pull_direct(repo, "v1", tmp_path / "direct", transport="dir")
    tag = cr.cache / f"content/{REGISTRY_NAME}/v2/{repo}/manifests/v1"
    manifest = (direct / "manifest.json").read_bytes()
    assert tag.read_bytes() == manifest
    parsed = json.loads(manifest)
    for blob in (parsed["config"], *parsed["layers"]):
        assert stored_blob(cr, blob["digest"]).is_file(), blob


def test_https_proxy_push_is_written_through(
    pusher: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """skopeo pushing to the registry's own name through the https_proxy
    front, logged in as itself: relayed, and written through under the
    registry's host, as a mirror push is."""
    image = build_image(tmp_path / "layout", layers=[tar_layer({"x.bin": os.urandom(200_000)})],
                        tag="v1")
    creds = ["--dest-creds", ":".join(upstream.credentials)] if upstream.credentials else []
    result = subprocess.run(
        ["skopeo", "copy", "--preserve-digests", "--retry-times", "0", "--dest-cert-dir",
         str(ca_dir(pusher, tmp_path)), *creds, f"oci:{tmp_path / 'layout'}:v1",
         f"docker://{REGISTRY_NAME}/proxied-push:v1"],
        capture_output=True, text=True, env=proxied_env(pusher), timeout=300)
    assert result.returncode == 0, result.stderr + pusher.log_text()[-3000:]
    assert_pushed_and_stored(pusher, upstream, "proxied-push", tmp_path)
    for digest in (image.config_digest, *image.layer_digests):
        assert (pusher.cache / f"content/{REGISTRY_NAME}/v2/proxied-push/blobs/{digest}"
                ).is_file(), digest
    assert leftover_uploads(pusher) == []


def test_docker_push_is_relayed_and_stored(
    pusher: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """dockerd pushes an image it loaded (a docker-archive skopeo made)
    through the mirror's HTTP port (127.0.0.0/8: insecure by default)."""
    assert available("dockerd"), "dockerd is missing: make test installs it"
    build_image(tmp_path / "layout", layers=[tar_layer({"d.txt": os.urandom(2048)})], tag="v1")
    archive = tmp_path / "image.tar"
    made = subprocess.run(["skopeo", "copy", f"oci:{tmp_path / 'layout'}:v1",
                           f"docker-archive:{archive}:local/app:v1"],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert made.returncode == 0, made.stderr
    dest = f"{pusher.http}/{REGISTRY_NAME}/docker-pushed:v1"
    with Dockerd(tmp_path / "docker", None, None) as daemon:
        loaded = daemon.docker("load", "-i", str(archive))
        assert loaded.returncode == 0, loaded.stderr
        assert daemon.docker("tag", "local/app:v1", dest).returncode == 0
        pushed = daemon.docker("push", dest)
        assert pushed.returncode == 0, (pushed.stdout + pushed.stderr
                                        + pusher.log_text()[-3000:])
    assert_pushed_and_stored(pusher, upstream, "docker-pushed", tmp_path)


@pytest.mark.parametrize(("repo", "sent_size", "announced"), [
    ("aborted", 200_000, 1_000_000),
    # Past several write batches (writes.py): one may be in flight when the
    # client goes.
    ("aborted-big", 3_500_000, 8_000_000),
])
def test_client_gone_mid_chunk_cancels_the_upload_upstream(
    pusher: CrProxy, upstream: Upstream, repo: str, sent_size: int, announced: int
) -> None:
    started = start_upload(pusher, repo)
    location = our_location(started, repo)
    sent = os.urandom(sent_size)
    with socket.create_connection((pusher.address, pusher.http_port), timeout=30) as sock:
        sock.sendall(f"PATCH {location} HTTP/1.1\r\nHost: {pusher.http}\r\n"
                     "Content-Type: application/octet-stream\r\n"
                     f"Content-Length: {announced}\r\n\r\n".encode() + sent)
    # Gone with the rest still to come: the upstream's upload is cancelled
    # (a DELETE in the registry's log), nothing is kept.
    session = location.split("?")[0].rsplit("/", 1)[1]

    def cancelled() -> bool:
        log = upstream.registry_log.read_text(errors="replace")
        return any("http.request.method=DELETE" in line and session in line
                   for line in log.splitlines())

    wait_until(cancelled, 30, "the upstream upload cancelled")
    wait_until(lambda: leftover_uploads(pusher) == [], 30, "the upload's temp file removed")
    assert not stored_blob(pusher, sha256(sent)).exists()
