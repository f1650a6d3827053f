"""Modules by reference over HTTP (issue 15, items 1, 2 and 7): OCI
artifacts with Wasm media types pushed to the real test registry, fetched
from `/artifacts/...` on the mirror port of a real `cr-proxy serve` by curl
and by a Python client that resumes with Range after a cut, online and with
the upstream stopped. Bad references get a registry-style 4xx and store
nothing.

The private case (item 6) is a repository of the test registry that only
one user may pull, beside public ones: that user's login is only
cr-proxy's (its `registries:` entry), never the HTTP client's."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy
from testbed.oci_layout import (
    MT_LAYER_TAR,
    MT_WASM_LAYER,
    build_artifact,
    build_artifact_index,
    wasm_module,
)
from testbed.registry import REGISTRY_NAME, Upstream
from tests.conftest import proxy_endpoints

SMALL = wasm_module()
BIG = wasm_module(5 << 20, seed=15)
WARMED = wasm_module(4096, seed=7)


@dataclass
class Edge:
    cr: CrProxy
    index_digest: str
    generic_layers: list[bytes]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def edge(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    work = tmp_path_factory.mktemp("edge")
    lay = work / "layout"
    build_artifact(lay, [(MT_WASM_LAYER, SMALL)], tag="small")
    upstream.push(lay, "small", "wasm/hello", "v1")
    build_artifact(lay, [(MT_WASM_LAYER, BIG)], tag="big")
    upstream.push(lay, "big", "wasm/big", "v1")
    build_artifact(lay, [(MT_WASM_LAYER, WARMED)], tag="warmed")
    upstream.push(lay, "warmed", "wasm/warmed", "v1")
    # Any artifact: two plain layers, the largest is the module.
    generic = [b"a small layer\n" * 10, b"the larger layer\n" * 1000]
    build_artifact(lay, [(MT_LAYER_TAR, g) for g in generic], tag="generic",
                   config_media_type="application/vnd.example.config.v1+json")
    upstream.push(lay, "generic", "any/thing", "v1")
    # An index: a wasi/wasm module beside a linux/amd64 one.
    wasi = build_artifact(lay, [(MT_WASM_LAYER, SMALL)], tag="wasi", platform=("wasi", "wasm"))
    native = build_artifact(lay, [(MT_LAYER_TAR, b"native\n" * 100)], tag="native",
                            platform=("linux", "amd64"))
    index_digest = build_artifact_index(lay, [wasi, native], "index")
    upstream.push(lay, "index", "wasm/multi", "v1")
    # tag_ttl 0: every tag is asked upstream again, so the offline case
    # shows the stale copy served, not merely a fresh one.
    with CrProxy(work / "crproxy", proxy_endpoints(upstream), tag_ttl=0) as cr:
        yield Edge(cr, index_digest, generic)


def curl(cr: CrProxy, path: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """curl's status, headers (last response, lower-case names) and body."""
    result = subprocess.run(
        ["curl", "-sS", "-D", "-", "--path-as-is", *args, f"http://{cr.http}{path}"],
        capture_output=True, timeout=60, check=True,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def test_a_wasm_module_by_tag_is_served_by_nginx(edge: Edge) -> None:
    status, headers, body = curl(edge.cr, f"/artifacts/{REGISTRY_NAME}/wasm/hello:v1")
    assert status == 200, body
    assert body == SMALL
    assert headers["content-type"] == "application/wasm"
    assert headers["etag"] == f'"{sha(SMALL)}"'
    assert headers["docker-content-digest"] == sha(SMALL)
    assert headers["content-length"] == str(len(SMALL))
    # The bytes came from nginx's internal location, not the fetcher.
    assert headers["x-cr-request-type"] == "artifact"
    assert headers["x-cache"] == "HIT"
    # Logged as a hit of the module's file (the usage feed: LRU eviction).
    edge.cr.access_lines(re.compile(r'"GET /artifacts/registry\.test/wasm/hello:v1 HTTP/1\.1" '
                                    rf'200 {len(SMALL)} \S+ type=artifact cache=HIT'), 1)


def test_head_range_and_if_none_match(edge: Edge) -> None:
    path = f"/artifacts/{REGISTRY_NAME}/wasm/big:v1"
    status, headers, _ = curl(edge.cr, path, "-I")  # -I: curl prints the head twice
    assert status == 200
    assert headers["content-length"] == str(len(BIG))
    assert headers["accept-ranges"] == "bytes"
    status, headers, body = curl(edge.cr, path, "-r", "1000-1999")
    assert status == 206
    assert headers["content-range"] == f"bytes 1000-1999/{len(BIG)}"
    assert body == BIG[1000:2000]
    status, headers, body = curl(edge.cr, path, "-H", f'If-None-Match: "{sha(BIG)}"')
    assert (status, body) == (304, b"")
    assert headers["etag"] == f'"{sha(BIG)}"'
    status, _, body = curl(edge.cr, path, "-H", 'If-None-Match: "sha256:00"')
    assert status == 200 and body == BIG


def test_a_client_resumes_with_range_after_a_cut(edge: Edge) -> None:
    """A device on a bad link: the connection drops part-way, the client
    asks for the rest only (the HTTP form of "resend one chunk")."""
    host, port = edge.cr.http.rsplit(":", 1)
    path = f"/artifacts/{REGISTRY_NAME}/wasm/big:v1"
    first = http.client.HTTPConnection(host, int(port), timeout=30)
    first.request("GET", path)
    response = first.getresponse()
    assert response.status == 200
    got = response.read(1 << 20)
    first.close()  # cut: the rest never read
    again = http.client.HTTPConnection(host, int(port), timeout=30)
    again.request("GET", path, headers={"Range": f"bytes={len(got)}-",
                                        "If-Range": response.getheader("ETag") or ""})
    rest = again.getresponse()
    assert rest.status == 206
    got += rest.read()
    again.close()
    assert sha(got) == sha(BIG)


def test_an_index_platform_and_any_artifact(edge: Edge) -> None:
    base = f"/artifacts/{REGISTRY_NAME}"
    # The index's only wasm entry, with or without ?platform=.
    for query in ("", "?platform=wasi/wasm"):
        status, headers, body = curl(edge.cr, f"{base}/wasm/multi:v1{query}")
        assert (status, body) == (200, SMALL), body
    status, _, body = curl(edge.cr, f"{base}/wasm/multi@{edge.index_digest}")
    assert (status, body) == (200, SMALL), body
    status, headers, body = curl(edge.cr, f"{base}/wasm/multi:v1?platform=linux/amd64")
    assert (status, body) == (200, b"native\n" * 100)
    assert headers["content-type"] == "application/octet-stream"
    status, _, body = curl(edge.cr, f"{base}/wasm/multi:v1?platform=linux/s390x")
    assert status == 404
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN" and "wasi/wasm" in error["message"]
    # Not Wasm at all: the largest layer, as bytes.
    status, headers, body = curl(edge.cr, f"{base}/any/thing:v1")
    assert (status, body) == (200, edge.generic_layers[1])
    assert headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("path", [
    "/artifacts/registry.test/Wasm/UPPER:v1",  # not a repository name
    "/artifacts/registry.test/wasm/hello:v1:v2",
    "/artifacts/registry.test/wasm/hello@sha256:1234",
    "/artifacts/" + "a" * 3000 + ":v1",  # huge
    "/artifacts/registry.test/wasm/%2e%2e/%2e%2e/etc:v1",
    "/artifacts/registry.test/wasm/../../etc/passwd",
    "/artifacts/s/abc.def",  # a signed URL, with artifacts.signed_urls off
])
def test_bad_references_get_a_4xx_and_store_nothing(edge: Edge, path: str) -> None:
    before = sorted(p.relative_to(edge.cr.cache) for p in edge.cr.cache.rglob("*"))
    status, _, body = curl(edge.cr, path)
    assert 400 <= status < 500, body
    if body.startswith(b"{"):
        assert json.loads(body)["errors"][0]["code"]
    after = sorted(p.relative_to(edge.cr.cache) for p in edge.cr.cache.rglob("*"))
    assert before == after


def test_artifact_url_prints_the_url_and_sha256(edge: Edge) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cr_proxy", "artifact-url", "--config", str(edge.cr.config_path),
         "--json", f"{REGISTRY_NAME}/wasm/hello:v1"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    printed = json.loads(result.stdout)
    assert printed["sha256"] == hashlib.sha256(SMALL).hexdigest()
    assert printed["url"] == f"http://{edge.cr.http}/artifacts/{REGISTRY_NAME}/wasm/hello:v1"
    status, _, body = curl(edge.cr, printed["url"].split(edge.cr.http, 1)[1])
    assert (status, body) == (200, SMALL)


@pytest.fixture
def warmed(edge: Edge) -> None:
    """`cr-proxy warm` of a module nothing fetched before (serve's fetcher)."""
    result = subprocess.run(
        [sys.executable, "-m", "cr_proxy", "warm", "--config", str(edge.cr.config_path),
         f"{REGISTRY_NAME}/wasm/warmed:v1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 ok" in result.stdout


def test_warm_then_offline_serves_every_module_from_the_cache(
    edge: Edge, warmed: None, upstream_down: Upstream
) -> None:
    """Item 7: `cr-proxy warm` takes artifact references; then, with the
    upstream stopped, the warmed module and those fetched before are still
    served, by tag (stale: tag_ttl 0), by digest and by platform."""
    base = f"/artifacts/{REGISTRY_NAME}"
    status, headers, body = curl(edge.cr, f"{base}/wasm/warmed:v1")
    assert (status, body) == (200, WARMED), body
    assert headers["content-type"] == "application/wasm"
    status, _, body = curl(edge.cr, f"{base}/wasm/big:v1", "-r", "0-7")
    assert (status, body) == (206, BIG[:8])
    status, _, body = curl(edge.cr, f"{base}/wasm/multi:v1?platform=wasi/wasm")
    assert (status, body) == (200, SMALL)
    status, _, body = curl(edge.cr, f"{base}/wasm/multi@{edge.index_digest}")
    assert (status, body) == (200, SMALL)
    # Never fetched: a registry error saying it is not cached.
    status, _, body = curl(edge.cr, f"{base}/wasm/never:v1")
    assert status == 404
    assert "not in the cache" in json.loads(body)["errors"][0]["message"]


def test_a_private_repository_through_the_registries_credentials(tmp_path: Path) -> None:
    """A repository only `edge` may pull, beside a public one of the same
    registry: the device holds no credential, cr-proxy's `registries:` do."""
    user, secret = "edge", "S3cr3t-" + os.urandom(8).hex()
    module = wasm_module(1000, seed=41)
    with Upstream(tmp_path / "private", users={user: secret, "other": "other-pw"},
                  private={"wasm/private": {user}}) as up:
        build_artifact(tmp_path / "layout", [(MT_WASM_LAYER, module)], tag="v1")
        up.push(tmp_path / "layout", "v1", "wasm/private", "v1", user=user)
        up.push(tmp_path / "layout", "v1", "wasm/public", "v1", user=user)
        # The upstream refuses the repository to anyone but `edge`.
        assert all(up.refuses("wasm/private", "v1", tmp_path / f"direct-{who}", who)
                   for who in (None, "other"))
        with CrProxy(tmp_path / "crproxy", proxy_endpoints(up),
                     registries={REGISTRY_NAME: {"username": user, "password": secret}}) as cr:
            for repo in ("wasm/private", "wasm/public"):
                status, headers, body = curl(cr, f"/artifacts/{REGISTRY_NAME}/{repo}:v1")
                assert (status, body) == (200, module), body
                assert headers["content-type"] == "application/wasm"
        assert any(t.user == user and t.status == 200 for t in up.token_log)
        assert secret.encode() not in cr.log_text().encode()
