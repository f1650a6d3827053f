"""The test upstream behaves like Docker Hub: token auth, CDN redirects, real pushes."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from testbed.oci_layout import (
    MT_INDEX,
    MT_MANIFEST,
    ImageInfo,
    big_file_layer,
    build_image,
    build_index,
    tar_layer,
)
from testbed.ports import port_open
from testbed.registry import TokenServer, Upstream, decode_jwt_claims, skopeo_available

pytestmark = pytest.mark.skipif(
    not skopeo_available(), reason="needs skopeo, docker-registry and nginx"
)

ACCEPT_MANIFESTS = ", ".join(
    [MT_MANIFEST, MT_INDEX, "application/vnd.docker.distribution.manifest.v2+json"]
)


@dataclass
class Pushed:
    up: Upstream
    small: ImageInfo  # library/small:v1, two layers
    multi: ImageInfo  # library/multi:latest, linux/amd64 + linux/arm64 index
    layout: Path


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    tmp = tmp_path_factory.mktemp("upstream")
    layout = tmp / "layout"
    shared = tar_layer({"etc/os-release": b"ID=test\n"})
    small = build_image(
        layout, layers=[shared, tar_layer({"app/hello.txt": b"hello\n"})], tag="small"
    )
    multi = build_index(
        layout,
        [
            ("linux", "amd64", [shared, tar_layer({"bin/app": b"amd64 binary"})]),
            ("linux", "arm64", [shared, tar_layer({"bin/app": b"arm64 binary"})]),
        ],
        tag="multi",
    )
    with Upstream(tmp) as up:
        assert up.push(layout, "small", "library/small", "v1") == small.manifest_digest
        assert up.push(layout, "multi", "library/multi", "latest") == multi.index_digest
        yield Pushed(up, small, multi, layout)


async def get_token(up: Upstream, *scopes: str, **params: str) -> str:
    query = [("service", up.service), *(("scope", s) for s in scopes), *params.items()]
    async with (
        aiohttp.ClientSession() as session,
        session.get(up.token_url, params=query) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return (await resp.json())["token"]


async def post_token(up: Upstream, form: dict[str, str]) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(up.token_url, data=form) as resp,
    ):
        return resp.status, await resp.json()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- via skopeo


def test_pull_back_small_image_preserves_digests(pushed: Pushed, tmp_path: Path) -> None:
    dest = pushed.up.pull_direct("library/small", "v1", tmp_path / "pulled")
    entry = json.loads((dest / "index.json").read_text())["manifests"][0]
    assert entry["digest"] == pushed.small.manifest_digest
    for digest in [pushed.small.config_digest, *pushed.small.layer_digests]:
        pulled = (dest / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        assert pulled == pushed.small.blob_bytes(digest)


def test_pull_back_index_by_digest(pushed: Pushed, tmp_path: Path) -> None:
    multi = pushed.multi
    assert multi.index_digest is not None
    dest = pushed.up.pull_direct(
        "library/multi", multi.index_digest, tmp_path / "pulled", all_platforms=True
    )
    entry = json.loads((dest / "index.json").read_text())["manifests"][0]
    assert (entry["digest"], entry["mediaType"]) == (multi.index_digest, MT_INDEX)
    for info in multi.platforms.values():
        assert (dest / "blobs" / "sha256" / info.manifest_digest.split(":")[1]).exists()


def test_shared_layer_is_stored_once(pushed: Pushed) -> None:
    shared = pushed.small.layer_digests[0]
    assert all(shared == p.layer_digests[0] for p in pushed.multi.platforms.values())
    assert pushed.up.blob_data_path(shared).read_bytes() == pushed.small.blob_bytes(shared)


def test_v2s2_push_converts_the_manifest(pushed: Pushed, tmp_path: Path) -> None:
    info = build_image(
        tmp_path / "gz", layers=[tar_layer({"f": b"docker"})], tag="gz", compress=True
    )
    digest = pushed.up.push(tmp_path / "gz", "gz", "library/docker", "v2s2", fmt="v2s2")
    assert digest != info.manifest_digest
    dest = pushed.up.pull_direct("library/docker", "v2s2", tmp_path / "dir", transport="dir")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert [layer["digest"] for layer in manifest["layers"]] == info.layer_digests


# --------------------------------------------------------------------------- raw HTTP


async def test_v2_challenges_with_bearer_realm_by_name(pushed: Pushed) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{pushed.up.registry_url}/v2/") as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer realm="http://auth.test/token",service="registry.test"'
        )


async def test_token_grants_manifest_read(pushed: Pushed) -> None:
    up = pushed.up
    before = up.token_requests
    token = await get_token(up, "repository:library/small:pull")
    assert up.token_requests == before + 1
    claims = decode_jwt_claims(token)
    assert claims["aud"] == "registry.test" and claims["iss"] == "test-token-issuer"
    assert claims["access"] == [
        {"type": "repository", "name": "library/small", "actions": ["pull"]}
    ]
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT_MANIFESTS}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{up.registry_url}/v2/library/small/manifests/v1", headers=headers) as resp,
    ):
        assert resp.status == 200
        body = await resp.read()
    assert resp.headers["Docker-Content-Digest"] == sha256(body) == pushed.small.manifest_digest


async def test_token_for_another_repository_is_refused(pushed: Pushed) -> None:
    """The registry really checks the grant, and names the scope it wants."""
    up = pushed.up
    token = await get_token(up, "repository:library/multi:pull")
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT_MANIFESTS}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{up.registry_url}/v2/library/small/manifests/v1", headers=headers) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer realm="http://auth.test/token",service="registry.test",'
            'scope="repository:library/small:pull",error="insufficient_scope"'
        )


async def test_several_scopes_and_offline_token(pushed: Pushed) -> None:
    up = pushed.up
    query = [
        ("service", up.service),
        ("scope", "repository:library/small:pull"),
        ("scope", "repository:library/multi:pull,push"),
        ("offline_token", "true"),
        ("client_id", "tests"),
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.get(up.token_url, params=query) as resp,
    ):
        body = await resp.json()
    assert {"token", "access_token", "expires_in", "issued_at", "refresh_token"} <= set(body)
    assert body["expires_in"] == 300
    granted = {a["name"]: a["actions"] for a in decode_jwt_claims(body["token"])["access"]}
    assert granted == {"library/small": ["pull"], "library/multi": ["pull", "push"]}


async def test_blob_get_and_head_redirect_to_cdn(pushed: Pushed) -> None:
    up = pushed.up
    digest = pushed.small.layer_digests[1]
    token = await get_token(up, "repository:library/small:pull")
    url = f"{up.registry_url}/v2/library/small/blobs/{digest}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for method in ("GET", "HEAD"):
            async with session.request(method, url, allow_redirects=False) as resp:
                assert resp.status == 307, method
                location = URL(resp.headers["Location"])
        assert (location.scheme, location.host, location.port) == ("http", "cdn.test", 80)
        assert location.path == up.cdn_blob_path(digest)
        assert location.path == f"/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"


async def test_cdn_serves_blob_bytes_and_ranges(pushed: Pushed) -> None:
    up = pushed.up
    digest = pushed.small.layer_digests[1]
    before = up.cdn_blob_gets(digest)
    url = up.cdn_url + up.cdn_blob_path(digest)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
            assert sha256(await resp.read()) == digest
        async with session.get(url, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206
            assert await resp.read() == pushed.small.blob_bytes(digest)[10:20]
    assert up.cdn_blob_gets_settled(digest) == before + 2


async def test_cdn_link_port_serves_the_same_blobs_rate_limited(pushed: Pushed) -> None:
    """The bench's "upstream over a 1 Gbit/s link": the same files, counted
    in the same access log (its rate is nginx's limit_rate, not timed here)."""
    up = pushed.up
    digest = pushed.small.layer_digests[1]
    before = up.cdn_blob_gets(digest)
    url = f"http://127.0.0.1:{up.cdn_link_port}{up.cdn_blob_path(digest)}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert sha256(await resp.read()) == digest
    assert "limit_rate" in (up.cdn_dir / "nginx.conf").read_text()
    assert up.cdn_blob_gets_settled(digest) == before + 1


async def test_registry_requests_counts_each_get_and_head_once(pushed: Pushed) -> None:
    """By tag and by digest (a value logrus quotes), answered or refused:
    each request counted once, and already when its answer arrives."""
    up = pushed.up
    digest = pushed.small.layer_digests[1]
    for path in ("/v2/library/small/manifests/v1", f"/v2/library/small/blobs/{digest}"):
        before = up.registry_requests(path)
        async with aiohttp.ClientSession() as session:
            for method in ("GET", "HEAD"):
                async with session.request(method, up.registry_url + path) as resp:
                    assert resp.status == 401  # no token: refused, still a request
        assert up.registry_requests(path) == before + 2, path


def test_cdn_counts_settle_only_once_no_request_is_under_way(pushed: Pushed) -> None:
    """A GET the CDN has begun but not finished is not in its log yet: a
    count taken then would miss it. cdn_blob_gets_settled waits for it (a
    half-sent request holds the CDN busy for as long as this test likes)."""
    up = pushed.up
    digest = pushed.small.layer_digests[1]
    before = up.cdn_blob_gets(digest)
    port = int(URL(up.cdn_url).port or 80)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {up.cdn_blob_path(digest)} HTTP/1.1\r\nHost: cdn.test\r\n".encode())
        assert up.cdn_blob_gets(digest) == before  # what an unsettled count says
        with pytest.raises(AssertionError, match="still busy"):
            up.cdn_settled(timeout=0.5)
        sock.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert up.cdn_blob_gets_settled(digest) == before + 1


async def test_password_and_refresh_token_grants(pushed: Pushed) -> None:
    up = pushed.up
    scope = "repository:library/small:pull"
    status, body = await post_token(
        up,
        {
            "grant_type": "password", "username": "anyone", "password": "x",
            "service": up.service, "scope": scope, "client_id": "tests",
            "access_type": "offline",
        },
    )
    assert status == 200 and decode_jwt_claims(str(body["access_token"]))["sub"] == "anyone"
    refresh = str(body["refresh_token"])
    status, body = await post_token(
        up,
        {
            "grant_type": "refresh_token", "refresh_token": refresh,
            "service": up.service, "scope": scope, "client_id": "tests",
        },
    )
    assert status == 200 and decode_jwt_claims(str(body["access_token"]))["sub"] == "anyone"
    assert body["refresh_token"] == refresh
    headers = {"Authorization": f"Bearer {body['access_token']}", "Accept": ACCEPT_MANIFESTS}
    async with (
        aiohttp.ClientSession() as session,
        session.head(f"{up.registry_url}/v2/library/small/manifests/v1", headers=headers) as resp,
    ):
        assert resp.status == 200
    status, _ = await post_token(up, {"grant_type": "refresh_token", "refresh_token": "bogus"})
    assert status == 401


async def test_auth_can_go_away_and_come_back(pushed: Pushed) -> None:
    up = pushed.up
    up.stop_auth()
    try:
        assert not port_open(up.auth_port)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{up.registry_url}/v2/") as resp,
        ):
            assert resp.status == 401  # the registry itself keeps running
    finally:
        up.start_auth()
    assert await get_token(up, "repository:library/small:pull")


def test_registry_and_cdn_restart_on_same_ports(pushed: Pushed) -> None:
    up = pushed.up
    up.stop_registry()
    up.stop_cdn()
    assert not port_open(up.registry_port) and not port_open(up.cdn_port)
    up.start_cdn()
    up.start_registry()
    assert dict(up.running()) == {"registry": True, "cdn": True, "auth": True}


# --------------------------------------------------------------------------- credentials


async def test_credentials_are_enforced(tmp_path: Path) -> None:
    info = build_image(tmp_path / "layout", layers=[tar_layer({"x": b"private"})])
    with Upstream(tmp_path, credentials=("alice", "s3cret")) as up:
        async with aiohttp.ClientSession() as session:
            params = {"service": up.service, "scope": "repository:private/x:pull"}
            async with session.get(up.token_url, params=params) as resp:
                assert resp.status == 401
            basic = base64.b64encode(b"alice:s3cret").decode()
            headers = {"Authorization": f"Basic {basic}"}
            async with session.get(up.token_url, params=params, headers=headers) as resp:
                assert resp.status == 200
        status, _ = await post_token(
            up, {"grant_type": "password", "username": "alice", "password": "wrong"}
        )
        assert status == 401
        assert up.push(tmp_path / "layout", "latest", "private/x", "1") == info.manifest_digest
        assert any(r.user == "alice" and r.status == 200 for r in up.token_log)


def test_big_layer_round_trip(tmp_path: Path) -> None:
    """A 100 MB layer pushes and pulls through the name proxy byte-exact."""
    info = build_image(tmp_path / "layout", layers=[big_file_layer(100 * 2**20, seed=1)])
    with Upstream(tmp_path) as up:
        up.push(tmp_path / "layout", "latest", "library/big", "1")
        digest = info.layer_digests[0]
        assert up.blob_data_path(digest).stat().st_size == info.sizes[digest]
        dest = up.pull_direct("library/big", "1", tmp_path / "pulled")
        pulled = dest / "blobs" / "sha256" / digest.split(":")[1]
        assert sha256(pulled.read_bytes()) == digest
        assert up.cdn_blob_gets_settled(digest) == 1


def test_a_private_repository_grants_only_its_users_and_revoke_takes_it_away() -> None:
    server = TokenServer("registry.test", users={"a": "pw-a", "b": "pw-b"},
                         private={"private/app": {"a"}})
    assert server._granted("a", "repository:private/app:pull") == "repository:private/app:pull"
    assert server._granted("b", "repository:private/app:pull") == "repository:private/app:"
    assert server._granted("", "repository:private/app:pull") == "repository:private/app:"
    assert server._granted("b", "repository:public/app:pull") == "repository:public/app:pull"
    assert server._check("a", "pw-a") and not server._check("a", "pw-b")
    assert server._check(None, None)  # anonymous may ask (and gets no private action)
    server.revoke("a")
    assert server._granted("a", "repository:private/app:pull") == "repository:private/app:"
