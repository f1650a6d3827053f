"""The README's quick start: `make serve` runs the installed `cr-proxy serve`
with no configuration file. On the embedded default it makes its CA and its
trees in the working directory and serves all three ways (mirror over HTTP,
mirror over TLS with a certificate from that CA, https_proxy). Only the
listeners (moved to free loopback ports) and the test upstream's endpoints
are set, through CR_PROXY_* variables."""

from __future__ import annotations

from pathlib import Path

from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.test_e2e_mirror import expected_digests
from tests.test_e2e_proxy import ca_dir, skopeo_via_proxy

IMAGE = "registry.test/small:v1"


def test_serve_on_the_embedded_default_pulls_every_way(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    (proxy_port,) = free_ports(1)
    with CrProxy(tmp_path / "here", proxy_endpoints(upstream), embedded_default=True,
                 listen_proxy=f"127.0.0.1:{proxy_port}") as serve:
        here = serve.dir
        assert not serve.config_path.exists()
        assert (here / "certs/ca.crt").is_file() and (here / "certs/ca.key").is_file()
        assert (here / "certs/ca.key").stat().st_mode & 0o077 == 0
        trust = ca_dir(serve, tmp_path)

        pulls = {
            "mirror over HTTP": skopeo_pull(f"{serve.http}/{IMAGE}", tmp_path / "http"),
            "mirror over TLS": skopeo_pull(f"{serve.https}/{IMAGE}", tmp_path / "https",
                                           cert_dir=trust),
            "https_proxy": skopeo_via_proxy(serve, IMAGE, tmp_path / "proxy", trust),
        }
        for way, result in pulls.items():
            assert result.returncode == 0, f"{way}: {result.stderr}\n{serve.log_text()[-2000:]}"
        for dest in ("http", "https", "proxy"):
            assert expected_digests(images.small) <= set(layout_blobs(tmp_path / dest))
        # The default trees are relative: they are in the working directory.
        assert (here / "cache/content/registry.test/v2/small/manifests/v1").is_file()
        assert (here / "run/nginx.conf").is_file()
