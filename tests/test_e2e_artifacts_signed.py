"""Signed module URLs (issue 15, item 3): with artifacts.signed_urls on,
only `/artifacts/s/<token>` is served by a real `cr-proxy serve`; a wrong,
expired or tampered token gets 403; a signed tag URL keeps serving the
digest it was signed for when the tag moves; offline too."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cr_proxy.edge import signing
from testbed.crproxy import CrProxy
from testbed.oci_layout import MT_WASM_LAYER, build_artifact, wasm_module
from testbed.registry import REGISTRY_NAME, Upstream
from tests.conftest import proxy_endpoints
from tests.test_e2e_artifacts import curl, sha

FIRST = wasm_module(2048, seed=31)
SECOND = wasm_module(2048, seed=32)
REF = f"{REGISTRY_NAME}/wasm/signed:v1"


@dataclass
class Signed:
    cr: CrProxy
    upstream: Upstream
    layout: Path


@pytest.fixture(scope="module")
def signed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    work = tmp_path_factory.mktemp("signed")
    build_artifact(work / "layout", [(MT_WASM_LAYER, FIRST)], tag="first")
    build_artifact(work / "layout", [(MT_WASM_LAYER, SECOND)], tag="second")
    upstream.push(work / "layout", "first", "wasm/signed", "v1")
    with CrProxy(work / "crproxy", proxy_endpoints(upstream), tag_ttl=0,
                 artifacts={"signed_urls": True, "url_ttl": 3600}) as cr:
        yield Signed(cr, upstream, work / "layout")


def artifact_url(cr: CrProxy, ref: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "cr_proxy", "artifact-url", "--config", str(cr.config_path),
         "--json", "--base", f"http://{cr.http}", ref],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def path_of(cr: CrProxy, url: str) -> str:
    return url.split(cr.http, 1)[1]


def test_only_signed_urls_are_served(signed: Signed) -> None:
    status, _, body = curl(signed.cr, f"/artifacts/{REF}")
    assert status == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    # A client cannot pass for artifact-url: nginx drops its header.
    status, _, _ = curl(signed.cr, f"/artifacts/{REF}", "-H", "X-CR-Artifact-Url: 1")
    assert status == 403
    printed = artifact_url(signed.cr, REF)
    assert printed["sha256"] == sha(FIRST).removeprefix("sha256:")
    path = path_of(signed.cr, printed["url"])
    assert path.startswith("/artifacts/s/")
    status, headers, body = curl(signed.cr, path)
    assert (status, body) == (200, FIRST)
    assert headers["content-type"] == "application/wasm"
    assert headers["etag"] == f'"{sha(FIRST)}"'
    status, headers, body = curl(signed.cr, path, "-r", "10-19")
    assert (status, body) == (206, FIRST[10:20])
    # The key: made at first start, only cr-proxy's user may read it.
    key = Path(signed.cr.config["certs_dir"]) / signing.KEY_FILE
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def flip(text: str, at: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    swapped = alphabet[(alphabet.index(text[at]) ^ 1) % len(alphabet)]
    return text[:at] + swapped + text[at + 1:]


def test_wrong_expired_and_tampered_tokens_get_403(signed: Signed) -> None:
    path = path_of(signed.cr, artifact_url(signed.cr, REF)["url"])
    token = path.removeprefix("/artifacts/s/")
    payload, mac = token.split(".")
    # Another digest in the payload (a URL turned into another module's).
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[1] = sha(SECOND)
    other = base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode())
    key = signing.ensure_key(Path(signed.cr.config["certs_dir"]) / signing.KEY_FILE)
    expired = signing.sign(key, signing.Grant(REF, sha(FIRST), True, int(time.time()) - 1))
    for bad in (flip(token, 5), flip(token, len(token) - 3), payload, f"{payload}.",
                f"{other.decode().rstrip('=')}.{mac}", expired, "x" * 5000, "a.b", "!.!"):
        status, _, body = curl(signed.cr, f"/artifacts/s/{bad}")
        assert status == 403, (bad, body)
    status, _, body = curl(signed.cr, path)
    assert (status, body) == (200, FIRST)


def test_a_signed_tag_url_keeps_its_digest_when_the_tag_moves(
    signed: Signed, upstream_down: Upstream
) -> None:
    """Signed before the move, the URL serves the bytes it was signed for
    (offline too: the upstream is down here); a URL signed after the move
    serves the new ones."""
    path = path_of(signed.cr, artifact_url(signed.cr, REF)["url"])
    upstream_down.start_registry()
    upstream_down.start_auth()
    upstream_down.start_cdn()
    signed.upstream.push(signed.layout, "second", "wasm/signed", "v1")
    # cr-proxy serves the stale tag until its probe finds the registry back
    # (timeouts.down_host): polled, bounded.
    deadline = time.monotonic() + 30
    while (printed := artifact_url(signed.cr, REF))["sha256"] != sha(SECOND)[7:]:
        assert time.monotonic() < deadline, "the moved tag was never seen"
    moved = path_of(signed.cr, printed["url"])
    upstream_down.stop_registry()
    upstream_down.stop_auth()
    upstream_down.stop_cdn()
    assert moved != path
    status, _, body = curl(signed.cr, path)
    assert (status, body) == (200, FIRST)
    status, _, body = curl(signed.cr, moved)
    assert (status, body) == (200, SECOND)
