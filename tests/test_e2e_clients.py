"""Real clients through the https_proxy: dockerd and podman pull with image
names unchanged, then again with the upstream, its token server and its CDN
stopped; a never-cached image then fails with a clear message."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.clients import Dockerd, available, podman
from tests.conftest import Images
from tests.crproxy import CrProxy
from tests.test_e2e_proxy import ca_dir, https_proxy  # noqa: F401 - the fixture
from tests.upstream import Upstream


def proxy_url(proxy: CrProxy) -> str:
    return f"http://127.0.0.1:{proxy.proxy_port}"


def stop_upstream(upstream: Upstream) -> None:
    upstream.stop_registry()
    upstream.stop_auth()
    upstream.stop_cdn()


def start_upstream(upstream: Upstream) -> None:
    upstream.start_registry()
    upstream.start_auth()
    upstream.start_cdn()


def test_dockerd_pulls_through_proxy_then_offline(
    https_proxy: CrProxy,  # noqa: F811 - the fixture
    images: Images, upstream: Upstream, tmp_path: Path,
) -> None:
    assert available("dockerd"), "dockerd is missing: make test installs docker.io"
    image = "registry.test/small:v1"
    with Dockerd(tmp_path / "docker", proxy_url(https_proxy), https_proxy.ca_cert) as daemon:
        pulled = daemon.docker("pull", image)
        assert pulled.returncode == 0, pulled.stderr + daemon.log.read_text()[-2000:]
        info = json.loads(daemon.docker("image", "inspect", image).stdout)[0]
        assert info["Id"] == images.small.config_digest
        assert f"registry.test/small@{images.small.manifest_digest}" in info["RepoDigests"]
        assert daemon.docker("rmi", image).returncode == 0

        stop_upstream(upstream)
        try:
            pulled = daemon.docker("pull", image)
            assert pulled.returncode == 0, pulled.stderr
            info = json.loads(daemon.docker("image", "inspect", image).stdout)[0]
            assert info["Id"] == images.small.config_digest
            never = daemon.docker("pull", "registry.test/never-cached:v1")
            assert never.returncode != 0
            assert "unreachable" in never.stderr.lower() or "503" in never.stderr
        finally:
            start_upstream(upstream)


def test_podman_pulls_through_proxy_then_offline(
    https_proxy: CrProxy,  # noqa: F811 - the fixture
    images: Images, upstream: Upstream, tmp_path: Path,
) -> None:
    assert available("podman"), "podman is missing: make test installs it"
    trust = ca_dir(https_proxy, tmp_path)
    work = tmp_path / "podman"
    image = "registry.test/other/app:v1"
    url = proxy_url(https_proxy)
    pulled = podman(work, url, trust, "pull", image)
    assert pulled.returncode == 0, pulled.stderr
    image_id = podman(work, url, trust, "image", "inspect", "--format", "{{.Id}}", image)
    assert f"sha256:{image_id.stdout.strip()}" == images.other.config_digest
    assert podman(work, url, trust, "rmi", image).returncode == 0

    stop_upstream(upstream)
    try:
        pulled = podman(work, url, trust, "pull", image)
        assert pulled.returncode == 0, pulled.stderr
        never = podman(work, url, trust, "pull", "registry.test/never-cached:v1")
        assert never.returncode != 0
    finally:
        start_upstream(upstream)
        podman(work, url, trust, "system", "reset", "--force")
        shutil.rmtree(os.readlink(work / "runroot"), ignore_errors=True)


