"""The lifecycle of pushes through the mirror, end to end (issue 16 item
5): eviction never removes what a push in progress uploaded, and an upload
the client abandoned between requests is cancelled upstream after
push.upload_timeout, its temp file removed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cr_proxy.cache.inventory import Inventory
from cr_proxy.config import load as load_config
from testbed.crproxy import CrProxy, skopeo_pull
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import REGISTRY_NAME, Upstream
from tests.conftest import proxy_endpoints
from tests.faulty import wait_until
from tests.test_e2e_push import (
    call,
    leftover_uploads,
    our_location,
    sha256,
    start_upload,
    stored_blob,
    upload,
)

SHARED = 1 << 20  # the layer an old pulled image and a push in progress share
LIMIT = SHARED + (512 << 10)  # cache.max_size: the old image fits, a 2 MiB push does not


@pytest.fixture(scope="module")
def keeper(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    push = {"enabled": True, "allow_clients": ["127.0.0.1/32"], "upload_timeout": 2}
    cache = {"max_size": LIMIT, "low_water": 1.0, "min_age": 0, "check_interval": 3600}
    with CrProxy(tmp_path_factory.mktemp("keeper"), proxy_endpoints(upstream), push=push,
                 cache=cache) as running:
        yield running


def cached_keys(cr: CrProxy) -> set[str]:
    conf = load_config(cr.config_path, environ={})
    return {image.key for image in Inventory.from_config(conf).images() if image.tag}


def test_eviction_keeps_what_a_push_in_progress_uploaded(
    keeper: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    shared = tar_layer({"shared.bin": os.urandom(SHARED)})
    old = build_image(tmp_path / "old", layers=[shared])
    upstream.push(old.layout, "latest", "keep-old", "v1")
    assert skopeo_pull(f"{keeper.http}/{REGISTRY_NAME}/keep-old:v1",
                       tmp_path / "pulled").returncode == 0
    assert cached_keys(keeper) == {f"{REGISTRY_NAME}/keep-old:v1"}
    # A push in progress (no manifest yet): the old image's layer, uploaded
    # into another repository, then a layer that takes the cache over its
    # limit. The old image is evicted; the layer it shared stays.
    layer, big = old.layer_digests[0], os.urandom(2 << 20)
    upload(keeper, "keep-new", shared)
    upload(keeper, "keep-new", big)
    keeper.wait_for_output("evicted", 30)
    assert cached_keys(keeper) == set()
    assert stored_blob(keeper, layer).read_bytes() == shared
    assert (keeper.cache / f"content/{REGISTRY_NAME}/v2/keep-new/blobs/{layer}").is_file()
    assert stored_blob(keeper, sha256(big)).is_file()
    # The old image's own blob (its config) went.
    assert not stored_blob(keeper, old.config_digest).exists()


def test_an_abandoned_upload_is_cancelled_upstream(keeper: CrProxy, upstream: Upstream) -> None:
    started = start_upload(keeper, "abandoned")
    patched = call(keeper, "PATCH", our_location(started, "abandoned"), os.urandom(20_000),
                   {"Content-Type": "application/octet-stream"})
    assert patched.status == 202, patched.body
    session = our_location(patched, "abandoned").split("?")[0].rsplit("/", 1)[1]

    # No request after that one: after push.upload_timeout (2 s) the upload
    # is cancelled upstream (a DELETE in the registry's log)...
    def cancelled() -> bool:
        log = upstream.registry_log.read_text(errors="replace")
        return any("http.request.method=DELETE" in line and session in line
                   for line in log.splitlines())

    wait_until(cancelled, 60, "the abandoned upload cancelled upstream")
    # ...and its temp file here is gone.
    wait_until(lambda: leftover_uploads(keeper) == [], 30, "the upload's temp file removed")
    # The session is dead: the client coming back is told so.
    late = call(keeper, "PATCH", our_location(patched, "abandoned"), b"late",
                {"Content-Type": "application/octet-stream"})
    assert late.status == 404, late.body
