"""Who may use the mirror ports (mirror_allow_clients), told apart by source
address on loopback: 127.0.0.2 is on the list, 127.0.0.1 is not. No client
logs in to a mirror, so this list is who may pull every cached image."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from hashlib import sha256

import pytest

from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints

ALLOWED, OTHER = "127.0.0.2", "127.0.0.1"
ACCEPT = ("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


@pytest.fixture
def narrow(upstream: Upstream, tmp_path) -> Iterator[CrProxy]:
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream),
                 mirror_allow_clients=[f"{ALLOWED}/32"]) as running:
        yield running


def get(cr: CrProxy, path: str, source: str, https: bool) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of one GET to a mirror port from `source`."""
    if https:
        host, port = cr.https.rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(cr.ca_cert))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, int(port), context=context, source_address=(source, 0), timeout=30)
    else:
        host, port = cr.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), source_address=(source, 0), timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": ACCEPT})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def paths(images: Images) -> list[str]:
    layer = images.small.layer_digests[0]
    return ["/v2/", "/v2/registry.test/small/manifests/v1",
            f"/v2/registry.test/small/blobs/{layer}", "/v2/registry.test/small/tags/list"]


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_client_off_the_list_gets_403_denied_and_nothing_is_fetched(
    narrow: CrProxy, images: Images, https: bool
) -> None:
    for path in paths(images):
        status, content_type, body = get(narrow, path, OTHER, https)
        assert (status, content_type) == (403, "application/json"), path
        assert json.loads(body)["errors"][0]["code"] == "DENIED", path
    # Refused before any location: the fetcher was never asked.
    assert [p for p in (narrow.cache / "content").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_client_on_the_list_is_served(narrow: CrProxy, images: Images, https: bool) -> None:
    layer = images.small.layer_digests[0]
    status, _, body = get(narrow, "/v2/registry.test/small/manifests/v1", ALLOWED, https)
    assert status == 200
    assert "sha256:" + sha256(body).hexdigest() == images.small.manifest_digest
    for _ in ("miss", "hit"):
        status, _, body = get(narrow, f"/v2/registry.test/small/blobs/{layer}", ALLOWED, https)
        assert status == 200
        assert "sha256:" + sha256(body).hexdigest() == layer
