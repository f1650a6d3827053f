"""https_proxy mode end to end: skopeo with HTTPS_PROXY -> the CONNECT front
-> nginx (TLS with a leaf from our CA, picked by SNI) -> fetcher -> a
Docker-Hub-like upstream with three host names; then the same pulls with
the upstream, its token server and its CDN all stopped."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, clean_env, layout_blobs
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.test_e2e_mirror import expected_digests


@pytest.fixture
def https_proxy(upstream: Upstream, tmp_path: Path):
    (port,) = free_ports(1)
    with CrProxy(
        tmp_path / "crproxy", proxy_endpoints(upstream), listen_proxy=f"127.0.0.1:{port}"
    ) as running:
        yield running


def proxied_env(proxy: CrProxy) -> dict[str, str]:
    url = f"http://127.0.0.1:{proxy.proxy_port}"
    return {**clean_env(), "HTTPS_PROXY": url, "HTTP_PROXY": url, "NO_PROXY": ""}


def skopeo_via_proxy(proxy: CrProxy, image: str, dest: Path, cert_dir: Path, *extra: str):
    args = ["skopeo", "copy", "--preserve-digests", "--retry-times", "0",
            "--src-cert-dir", str(cert_dir), *extra, f"docker://{image}", f"oci:{dest}:pulled"]
    return subprocess.run(args, capture_output=True, text=True, env=proxied_env(proxy),
                          timeout=300)


def ca_dir(proxy: CrProxy, tmp_path: Path) -> Path:
    certs = tmp_path / "trust"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(proxy.ca_cert.read_bytes())
    return certs


def proxy_request(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 200 Connection"):
                break
        return data


def test_pull_through_https_proxy_then_offline(
    https_proxy: CrProxy, images: Images, upstream: Upstream, tmp_path: Path
) -> None:
    trust = ca_dir(https_proxy, tmp_path)
    pulls = {
        "tag": ("registry.test/small:v1", ()),
        "digest": (f"registry.test/small@{images.small.manifest_digest}", ()),
        "index": ("registry.test/multi:latest", ("--all",)),
    }
    online = {}
    for name, (image, extra) in pulls.items():
        result = skopeo_via_proxy(https_proxy, image, tmp_path / f"on-{name}", trust, *extra)
        assert result.returncode == 0, result.stderr + https_proxy.log_text()[-3000:]
        online[name] = layout_blobs(tmp_path / f"on-{name}")
    assert expected_digests(images.small) <= set(online["tag"])
    assert images.multi.index_digest in online["index"]

    cache = https_proxy.cache
    # One leaf per intercepted host, made on first sight.
    assert (https_proxy.dir / "certs/hosts/registry.test.crt").is_file()
    assert (cache / "www-authenticate/registry.test/v2/_index").is_file()
    assert (cache / "content/registry.test/v2/small/manifests/v1").is_file()

    with upstream.stopped():
        for digest_file in (cache / "docker-content-digest").rglob("*"):
            if digest_file.is_file():
                os.utime(digest_file, (1, 1))  # stale: the fetcher must fall back
        for name, (image, extra) in pulls.items():
            result = skopeo_via_proxy(https_proxy, image, tmp_path / f"off-{name}", trust, *extra)
            assert result.returncode == 0, result.stderr
            assert layout_blobs(tmp_path / f"off-{name}") == online[name]
        # Never cached: fails, saying why.
        result = skopeo_via_proxy(https_proxy, "registry.test/never:v1", tmp_path / "x", trust)
        assert result.returncode != 0
        assert ("manifest unknown: never:v1 is not in the cache, and registry.test is "
                "unreachable") in result.stderr, result.stderr


def test_big_layer_through_the_front_miss_then_hit(
    https_proxy: CrProxy, images: Images, tmp_path: Path
) -> None:
    """A 100 MiB layer through the front twice: first a miss (the fetcher
    streams it), then an nginx hit. Either way the relay moves the download
    direction to a splice thread (relay.PROMOTE_AFTER), over the loopback
    TCP link to nginx (listen.front_tls); skopeo checks every digest."""
    trust = ca_dir(https_proxy, tmp_path)
    big = images.big.layer_digests[0]
    for run in ("miss", "hit"):
        dest = tmp_path / run
        result = skopeo_via_proxy(https_proxy, "registry.test/big:v1", dest, trust)
        assert result.returncode == 0, result.stderr + https_proxy.log_text()[-3000:]
        blobs = layout_blobs(dest)
        assert expected_digests(images.big) <= set(blobs)
        assert blobs[big] == images.big.sizes[big] >= 100 * 1024 * 1024
    big_lines = https_proxy.access_lines(f"/big/blobs/{big}", at_least=2)
    assert sorted(line.split("type=")[1].split()[0] for line in big_lines) == [
        "blob", "blob-fetch"]


def test_ca_is_served_on_the_proxy_port(https_proxy: CrProxy) -> None:
    answer = proxy_request(https_proxy.proxy_port, "GET /ca.crt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert https_proxy.ca_cert.read_bytes() in answer
    assert b"PRIVATE KEY" not in answer


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:443", "localhost:443", "10.1.2.3:443", "169.254.169.254:443", "[::1]:443",
     "registry.test:22"],
)
def test_connect_to_loopback_private_or_other_ports_is_refused(
    https_proxy: CrProxy, target: str
) -> None:
    answer = proxy_request(https_proxy.proxy_port, f"CONNECT {target} HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]


def test_client_outside_allowed_ranges_is_refused(upstream: Upstream, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with CrProxy(
        tmp_path / "crproxy", proxy_endpoints(upstream), listen_proxy=f"127.0.0.1:{port}",
        proxy={"allow_clients": ["10.0.0.0/8"]},
    ):
        answer = proxy_request(port, "CONNECT registry.test:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"not allowed to use this proxy" in answer


def test_sni_and_host_must_agree(https_proxy: CrProxy, images: Images) -> None:
    """TLS for registry.test asking for cdn.test's cache gets 421."""
    context = ssl.create_default_context(cafile=str(https_proxy.ca_cert))
    with socket.create_connection(("127.0.0.1", https_proxy.proxy_port), timeout=30) as raw:
        raw.sendall(b"CONNECT registry.test:443 HTTP/1.1\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname="registry.test") as tls:
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: cdn.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 421")


@pytest.mark.parametrize("sni", [None, "a_b.test", "UPPER_CASE.test"])
def test_odd_or_missing_sni_gets_the_fallback_certificate(
    https_proxy: CrProxy, sni: str | None
) -> None:
    """nginx does not sanitise $ssl_server_name: only plain host names pick a
    leaf file; anything else gets the fallback certificate."""
    context = ssl.create_default_context(cafile=str(https_proxy.ca_cert))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", https_proxy.proxy_port), timeout=30) as raw:
        raw.sendall(b"CONNECT registry.test:443 HTTP/1.1\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            cert = tls.getpeercert()
    assert [value for _, value in cert["subjectAltName"]] == ["cr-proxy.invalid"]


def test_token_request_through_proxy_is_dummy_when_auth_is_down(
    https_proxy: CrProxy, upstream: Upstream
) -> None:
    upstream.stop_auth()
    try:
        answer = proxy_request(
            https_proxy.proxy_port,
            "GET http://auth.test/token?service=registry.test&scope=repository:small:pull "
            "HTTP/1.1\r\nHost: auth.test\r\nConnection: close\r\n\r\n",
        )
    finally:
        upstream.start_auth()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    token = json.loads(body)
    assert token["token"].startswith("cr-proxy-offline-")


def test_a_host_seen_once_gets_a_server_of_its_own(https_proxy: CrProxy, images: Images) -> None:
    """After the first CONNECT to a host, nginx is reloaded with a server for
    it (a static leaf, loaded once); later requests are answered by it."""

    def get_manifest() -> bytes:
        context = ssl.create_default_context(cafile=str(https_proxy.ca_cert))
        with socket.create_connection(("127.0.0.1", https_proxy.proxy_port), timeout=30) as raw:
            raw.sendall(b"CONNECT registry.test:443 HTTP/1.1\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            with context.wrap_socket(raw, server_hostname="registry.test") as tls:
                tls.sendall(b"GET /v2/small/manifests/v1 HTTP/1.1\r\nHost: registry.test\r\n"
                            b"Connection: close\r\n\r\n")
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        return answer

    first = get_manifest()
    assert first.startswith(b"HTTP/1.1 200")
    https_proxy.wait_for_output("a server of its own for registry.test", 30)
    assert (https_proxy.run_dir / "hosts/registry.test.conf").is_file()
    # The reload is asynchronous in nginx: old workers may take the next
    # connections for a moment. Bounded: new workers answer within seconds.
    manifest_lines: list[str] = []
    for sent in range(2, 52):
        assert get_manifest().startswith(b"HTTP/1.1 200")
        manifest_lines = https_proxy.access_lines("/v2/small/manifests/v1", at_least=sent)
        if any(" server=registry.test " in line for line in manifest_lines):
            break
    assert any(" server=registry.test " in line for line in manifest_lines), (
        manifest_lines[-3:])
