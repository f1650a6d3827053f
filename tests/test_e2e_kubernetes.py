"""deploy/kubernetes/'s node configuration for real: the DaemonSet's script
writes containerd's hosts.toml (and the CA) as it does on a node, and a real
containerd pulls through a real `cr-proxy serve` with them, over the HTTP
mirror and over the HTTPS one with the CA it installed. (Kubernetes itself is
not here; tests/test_deploy.py checks the manifests against its schemas.)"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.clients import Containerd, available
from tests.conftest import Images, proxy_endpoints
from tests.test_deploy import node_config, node_config_running, run_ca_init
from tests.test_e2e_clients import CONTAINERD_PULLS, assert_complete

# containerd's fallback when the mirror fails: a closed local port, so a
# failing mirror fails the test rather than sending a pull off this machine.
CLOSED = "http://127.0.0.1:9"


def test_node_config_hosts_toml_makes_containerd_pull_through_cr_proxy(
    images: Images, upstream: Upstream, tmp_path: Path
) -> None:
    assert available("containerd"), "containerd is missing: make test installs docker.io"
    _, env = node_config()
    registries = ("docker.io", "registry.test")
    digests = {"docker.io/library/small:v1": images.small.manifest_digest,
               "registry.test/other/app:v1": images.other.manifest_digest}
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as proxy, \
            Containerd(tmp_path / "containerd") as daemon:
        for scheme, port in (("http", proxy.http_port), ("https", proxy.https_port)):
            hosts = tmp_path / scheme / "certs.d"
            run_env = env | {
                "CONFIG_PATH": str(hosts), "CA_FILE": str(proxy.ca_cert),
                # The client Service's ClusterIP, as the cluster's DNS gives it.
                "MIRROR_SERVICE": proxy.address, "MIRROR_SCHEME": scheme,
                "MIRROR_PORT": str(port),
                "REGISTRIES": " ".join(f"{r}={CLOSED}" for r in registries),
            }
            with node_config_running(run_env, [hosts / r / "hosts.toml" for r in registries]):
                for image, stored in CONTAINERD_PULLS:
                    result = daemon.ctr("images", "pull", "--hosts-dir", str(hosts), image)
                    assert result.returncode == 0, f"{scheme}: {result.stderr}"
                    assert (proxy.cache / "content" / stored).is_file()
                assert_complete(daemon, digests)
                for image, _ in CONTAINERD_PULLS:
                    assert daemon.ctr("images", "rm", "--sync", image).returncode == 0
        # containerd's own requests reached cr-proxy, the registry in ns=.
        for registry, repo in (("docker.io", "library/small"), ("registry.test", "other/app")):
            ns = re.escape(f"?ns={registry} ")
            proxy.access_lines(re.compile(rf'"GET /v2/{repo}/blobs/sha256:[0-9a-f]{{64}}{ns}'), 1)


def test_the_ca_from_the_secret_is_the_one_serve_signs_with(
    upstream: Upstream, tmp_path: Path
) -> None:
    """README's recipe makes the CA (`cr-proxy ca` into a directory), the
    Secret holds it (read-only, 0440, as Kubernetes mounts it), the init
    container copies it into certs_dir, and serve uses it rather than
    making its own."""
    secret = tmp_path / "secret"
    made = subprocess.run([sys.executable, "-m", "cr_proxy", "ca"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "CR_PROXY_CERTS_DIR": str(secret)})
    assert made.returncode == 0, made.stderr
    for name in ("ca.crt", "ca.key"):
        (secret / name).chmod(0o440)
    secret.chmod(0o555)
    work = tmp_path / "crproxy"
    (work / "certs").mkdir(parents=True)  # the pod's emptyDir
    run_ca_init(secret, work / "certs")
    with CrProxy(work, proxy_endpoints(upstream)) as proxy:
        assert proxy.ca_cert.read_bytes() == (secret / "ca.crt").read_bytes()
        assert made.stdout == (secret / "ca.crt").read_text()
        # And its mirror's certificate chains to it.
        context = ssl.create_default_context(cafile=str(secret / "ca.crt"))
        with socket.create_connection((proxy.address, proxy.https_port), timeout=30) as sock, \
                context.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.version()
