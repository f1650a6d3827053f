"""Offline answers a client can act on, end to end through `cr-proxy serve`
with real clients, against tests/faulty.py's registry (whose /v2/ answers
200 anonymously, as many registries do), stopped to go offline:

- https_proxy mode replays what /v2/ answered online (here a 200): without
  it, containers/image clients (skopeo, podman, buildah) stop at their
  ping ("invalid status code from registry 503") before asking for
  anything cached;
- an image never cached gets a 404 MANIFEST_UNKNOWN (BLOB_UNKNOWN for a
  blob) saying it is not in the cache and the registry is unreachable, in
  both modes: the one answer every client prints (a 5xx's body reaches
  nobody).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from testbed.ports import free_ports
from tests.clients import available, podman
from tests.faulty import FakeImage, FaultyRegistry, http
from tests.test_e2e_proxy import ca_dir, skopeo_via_proxy

FAKE = FaultyRegistry.name
NEVER = f"{FAKE}/never:v1"
REASON = f"is not in the cache, and {FAKE} is unreachable"


@dataclass
class Offline:
    cr: CrProxy
    fake: FaultyRegistry
    image: FakeImage
    trust: Path  # a cert dir with our CA, for clients through the https_proxy
    online: dict[str, int]  # the image's blobs as skopeo pulled them online


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[Offline]:
    """One image pulled with skopeo through the https_proxy, then the
    registry stopped: every connect to it is refused."""
    (port,) = free_ports(1)
    with FaultyRegistry() as fake:
        image = fake.add_image("app", "v1", [os.urandom(3000), os.urandom(5000)])
        with CrProxy(tmp_path / "crproxy", fake.endpoints,
                     listen_proxy=f"127.0.0.1:{port}") as cr:
            trust = ca_dir(cr, tmp_path)
            result = skopeo_via_proxy(cr, f"{FAKE}/app:v1", tmp_path / "online", trust)
            assert result.returncode == 0, result.stderr + cr.log_text()[-3000:]
            online = layout_blobs(tmp_path / "online")
            assert {image.manifest_digest, image.config_digest, *image.layer_digests} <= set(
                online)
            # The /v2/ answer is on record: a 200, no challenge.
            record = cr.cache / "www-authenticate" / FAKE / "v2" / "_index"
            assert record.read_text() == "\n"
            fake.stop()
            yield Offline(cr, fake, image, trust, online)


def assert_says_why(stderr: str) -> None:
    assert "not in the cache" in stderr and FAKE in stderr and "unreachable" in stderr, stderr


def test_https_proxy_replays_an_anonymous_v2_offline(offline: Offline, tmp_path: Path) -> None:
    """The cached tag is fresh, so the only request that needs the upstream
    is skopeo's ping of /v2/: answered 200 from the record, the pull goes on
    from the cache, every digest checked by skopeo and by layout_blobs."""
    result = skopeo_via_proxy(offline.cr, f"{FAKE}/app:v1", tmp_path / "offline", offline.trust)
    assert result.returncode == 0, result.stderr + offline.cr.log_text()[-3000:]
    assert layout_blobs(tmp_path / "offline") == offline.online


def test_never_cached_offline_says_why_through_the_https_proxy(
    offline: Offline, tmp_path: Path
) -> None:
    result = skopeo_via_proxy(offline.cr, NEVER, tmp_path / "never", offline.trust)
    assert result.returncode != 0
    assert "manifest unknown" in result.stderr.lower(), result.stderr
    assert_says_why(result.stderr)
    assert f"never:v1 {REASON}" in result.stderr

    assert available("podman"), "podman is missing: make test installs it"
    work = tmp_path / "podman"
    url = f"http://127.0.0.1:{offline.cr.proxy_port}"
    try:
        pulled = podman(work, url, offline.trust, "pull", NEVER)
        assert pulled.returncode != 0
        assert_says_why(pulled.stderr)
    finally:
        podman(work, url, offline.trust, "system", "reset", "--force")
        shutil.rmtree(os.readlink(work / "runroot"), ignore_errors=True)


def test_never_cached_offline_says_why_in_mirror_mode(offline: Offline, tmp_path: Path) -> None:
    result = skopeo_pull(f"{offline.cr.http}/{NEVER}", tmp_path / "never")
    assert result.returncode != 0
    assert_says_why(result.stderr)
    assert f"never:v1 {REASON}" in result.stderr

    # The answers themselves: registry JSON, a 404 with the reason, for a
    # manifest by tag and by digest, and for a blob never cached.
    unknown = "sha256:" + "0" * 64
    for path, code, what in (
        ("never/manifests/v1", "MANIFEST_UNKNOWN", "never:v1"),
        (f"never/manifests/{unknown}", "MANIFEST_UNKNOWN", f"never@{unknown}"),
        (f"app/blobs/{unknown}", "BLOB_UNKNOWN", f"blob {unknown} of app"),
    ):
        answer = http(f"http://{offline.cr.http}/v2/{FAKE}/{path}")
        assert answer.status == 404, (path, answer)
        error = json.loads(answer.body)["errors"][0]
        assert error == {"code": code, "message": f"{what} {REASON}"}, path
