"""Real clients through the https_proxy: dockerd and podman pull with image
names unchanged, then again with the upstream, its token server and its CDN
stopped; a never-cached image then fails with a clear message."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.clients import Containerd, Dockerd, available, podman
from tests.conftest import Images, proxy_endpoints
from tests.test_e2e_proxy import ca_dir, https_proxy  # noqa: F401 - the fixture

# What a never-cached image offline says, as each client prints it.
NEVER_REASON = "never-cached:v1 is not in the cache, and registry.test is unreachable"


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
            assert NEVER_REASON in never.stderr, never.stderr
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

    def pull_and_check() -> None:
        """A pull, and the image it made: the config's digest is its id."""
        pulled = podman(work, url, trust, "pull", image)
        assert pulled.returncode == 0, pulled.stderr
        image_id = podman(work, url, trust, "image", "inspect", "--format", "{{.Id}}", image)
        assert f"sha256:{image_id.stdout.strip()}" == images.other.config_digest, image_id

    pull_and_check()
    assert podman(work, url, trust, "rmi", image).returncode == 0

    stop_upstream(upstream)
    try:
        pull_and_check()
        never = podman(work, url, trust, "pull", "registry.test/never-cached:v1")
        assert never.returncode != 0
        assert NEVER_REASON in never.stderr, never.stderr
    finally:
        start_upstream(upstream)
        podman(work, url, trust, "system", "reset", "--force")
        shutil.rmtree(os.readlink(work / "runroot"), ignore_errors=True)




def test_containerd_mirror_via_hosts_toml_uses_ns_and_works_offline(
    images: Images, upstream: Upstream, tmp_path: Path
) -> None:
    """containerd's hosts.toml mirror adds ?ns=<registry> to each request;
    cr-proxy maps docker.io to registry-1.docker.io (an endpoint override
    here) and takes any other registry from ns= as it is."""
    assert available("containerd"), "containerd is missing: make test installs docker.io"
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as proxy:
        containerd_round_trip(proxy, images, upstream, tmp_path)


# (image containerd pulls, the tree its manifest must land in): docker.io,
# and a registry other than the default, whose name only ?ns= carries (the
# same upstream serves other/app as registry-1.docker.io too, so a mirror
# that ignored ns= would fetch it from there, and file it there).
CONTAINERD_PULLS = [
    ("docker.io/library/small:v1", "registry-1.docker.io/v2/library/small/manifests/v1"),
    ("registry.test/other/app:v1", "registry.test/v2/other/app/manifests/v1"),
]


def containerd_round_trip(
    proxy: CrProxy, images: Images, upstream: Upstream, tmp_path: Path
) -> None:
    hosts_dir = tmp_path / "certs.d"
    for registry in ("docker.io", "registry.test"):
        hosts = hosts_dir / registry
        hosts.mkdir(parents=True)
        # server: where containerd falls back if the mirror fails; a closed
        # local port, so a failing mirror fails the test rather than sending
        # it off this machine.
        (hosts / "hosts.toml").write_text(
            'server = "http://127.0.0.1:9"\n'
            f'[host."http://{proxy.http}"]\n  capabilities = ["pull", "resolve"]\n'
        )
    digests = {"docker.io/library/small:v1": images.small.manifest_digest,
               "registry.test/other/app:v1": images.other.manifest_digest}
    with Containerd(tmp_path / "containerd") as daemon:
        for image, stored in CONTAINERD_PULLS:
            result = daemon.ctr("images", "pull", "--hosts-dir", str(hosts_dir), image)
            assert result.returncode == 0, result.stderr
            assert (proxy.cache / "content" / stored).is_file()
        assert not (proxy.cache / "content/registry-1.docker.io/v2/other").exists()
        listed = daemon.ctr("images", "ls", "-q").stdout.split()
        assert {image for image, _ in CONTAINERD_PULLS} <= set(listed)
        assert_complete(daemon, digests)
        # What reached nginx: containerd's own requests, the tag's and the
        # blobs', ns= in each.
        for registry, repo in (("docker.io", "library/small"), ("registry.test", "other/app")):
            ns = re.escape(f"?ns={registry} ")
            proxy.access_lines(re.compile(rf'"(HEAD|GET) /v2/{repo}/manifests/v1{ns}'), 1)
            proxy.access_lines(re.compile(rf'"GET /v2/{repo}/blobs/sha256:[0-9a-f]{{64}}{ns}'), 1)
        # --sync: containerd's garbage collection done before it returns (a
        # `content prune` after a plain rm raced it), so the offline pull
        # below must fetch every blob again.
        for image, _ in CONTAINERD_PULLS:
            assert daemon.ctr("images", "rm", "--sync", image).returncode == 0
        assert daemon.ctr("content", "ls", "-q").stdout.split() == []

        stop_upstream(upstream)
        try:
            # Stale the tags so the fetcher, not nginx, answers them.
            for digest_file in (proxy.cache / "docker-content-digest").rglob("*"):
                if digest_file.is_file():
                    os.utime(digest_file, (1, 1))
            for image, _ in CONTAINERD_PULLS:
                result = daemon.ctr("images", "pull", "--hosts-dir", str(hosts_dir), image)
                assert result.returncode == 0, result.stderr
            assert_complete(daemon, digests)
        finally:
            start_upstream(upstream)


def assert_complete(daemon: Containerd, digests: dict[str, str]) -> None:
    """`ctr images check`: each image at its digest, with all its content."""
    check = daemon.ctr("images", "check").stdout
    for image, digest in digests.items():
        line = next((line for line in check.splitlines() if line.startswith(image + " ")), "")
        assert digest in line and "complete" in line, check
