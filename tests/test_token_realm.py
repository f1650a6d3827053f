"""https_proxy mode, token realms under /v2/ on the registry's own host
(gcr.io and Artifact Registry: `/v2/token`; quay.io: `/v2/auth`), in-process
(make_app) against a scripted registry. Such a realm parses as a registry
path (Kind.OTHER) and was relayed as one: offline no dummy token (503), so
a cached image did not pull; online a token got with a Basic credential
was not bound to it, so `private.offline: verified` had nothing to go on.
A realm at `/token` (Docker Hub, ghcr.io) is the control. Only the exact
realm path of the host's own /v2/ challenge is a token request: no other
/v2/ path becomes a dummy-token answer. Found by the review of session 14
(docs/reliability.md, bug 38)."""

from __future__ import annotations

import base64
import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cr_proxy.fetch.app import make_app
from cr_proxy.oci.reference import digest_of
from tests.inprocess import IMAGE, config_at, image_manifest, scripted

HOST = "up.test"
PROXY = {"Host": HOST, "X-CR-Mode": "https_proxy", "X-CR-Port": "443", "X-CR-Scheme": "https"}
BODY = image_manifest()
DIGEST = digest_of(BODY)
SECRET_LAYER = b"the private repository's layer"
SECRET_DIGEST = "sha256:" + hashlib.sha256(SECRET_LAYER).hexdigest()
BASIC = "Basic " + base64.b64encode(b"user:pw").decode()
SCOPE = "?scope=repository:lib/app:pull&service=up.test"


class Registry:
    """A registry whose challenge names `realm`, served at the path
    `realm_path` on its own host: a Basic user:pw gets the token "good",
    anyone else "anon". lib/app is public (any of its tokens), lib/secret
    private ("good" only)."""

    def __init__(self, realm_path: str, realm: str | None = None) -> None:
        self.realm_path = realm_path
        realm = realm or f"https://{HOST}{realm_path}"
        self.challenge = f'Bearer realm="{realm}",service="{HOST}"'
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        auth = request.headers.get("Authorization")
        if request.path == self.realm_path:
            return web.json_response({"token": "good" if auth == BASIC else "anon"})
        if auth not in ("Bearer good", "Bearer anon") or (
                request.path.startswith("/v2/lib/secret/") and auth != "Bearer good"):
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                     headers={"WWW-Authenticate": self.challenge})
        if request.path == "/v2/lib/app/manifests/v1":
            return web.Response(body=BODY if request.method == "GET" else None,
                                headers={"Content-Type": IMAGE, "Docker-Content-Digest": DIGEST,
                                         "Content-Length": str(len(BODY))})
        if request.path == f"/v2/lib/secret/blobs/{SECRET_DIGEST}":
            return web.Response(body=SECRET_LAYER if request.method == "GET" else None,
                                headers={"Content-Length": str(len(SECRET_LAYER)),
                                         "Docker-Content-Digest": SECRET_DIGEST})
        return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)


async def start(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, registry: Registry,
                **settings: Any) -> tuple[TestServer, TestClient]:
    server = await scripted(aiohttp_server, registry.handle)
    endpoints = {HOST: f"http://127.0.0.1:{server.port}"}
    client = await aiohttp_client(make_app(config_at(tmp_path, endpoints=endpoints,
                                                     tag_ttl=0, **settings)))
    return server, client


def closed_port() -> int:
    """A loopback port nothing listens on (the upstream, down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def token(client: TestClient, path_qs: str, authorization: str | None = None) -> str:
    headers = {**PROXY, **({"Authorization": authorization} if authorization else {})}
    answer = await client.get(path_qs, headers=headers)
    assert answer.status == 200, f"{path_qs}: {answer.status} {await answer.text()}"
    return str((await answer.json())["token"])


async def pull(client: TestClient, realm_path: str) -> None:
    """What a client does: ping, a token from the realm the 401 names, the manifest."""
    ping = await client.get("/v2/", headers=PROXY)
    assert ping.status == 401  # the client is told to get a token
    bearer = await token(client, realm_path + SCOPE)
    manifest = await client.get("/v2/lib/app/manifests/v1",
                                headers={**PROXY, "Authorization": f"Bearer {bearer}"})
    assert manifest.status == 200 and await manifest.read() == BODY


@pytest.mark.parametrize("realm_path", ["/token", "/v2/token", "/v2/auth"])
async def test_a_pull_through_the_https_proxy_gets_its_token_offline(
    aiohttp_server, aiohttp_client, tmp_path: Path, realm_path: str,
) -> None:
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, Registry(realm_path))
    await pull(client, realm_path)  # online: fills the cache, keeps the /v2/ challenge
    await server.close()
    await pull(client, realm_path)  # offline: the stored 401, a dummy token, the cache


async def test_a_realm_under_v2_gets_its_dummy_after_a_restart_offline(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """Restarted with the upstream down: no challenge in memory, the stored
    /v2/ record names the realm."""
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, Registry("/v2/token"))
    await pull(client, "/v2/token")
    await server.close()
    restarted = await aiohttp_client(make_app(config_at(
        tmp_path / "again", endpoints={HOST: f"http://127.0.0.1:{closed_port()}"},
        cache_dir=str(tmp_path / "cache"), tag_ttl=0)))
    await pull(restarted, "/v2/token")


@pytest.mark.parametrize("path_qs", [
    "/v2/tokens" + SCOPE,
    "/v2/token/x" + SCOPE,
    "/v2/auth" + SCOPE,
    "/v2/lib/app/token" + SCOPE,
    "/v2/_catalog" + SCOPE,
])
async def test_no_other_v2_path_gets_a_dummy_token_offline(
    aiohttp_server, aiohttp_client, tmp_path: Path, path_qs: str,
) -> None:
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, Registry("/v2/token"))
    await pull(client, "/v2/token")
    await server.close()
    answer = await client.get(path_qs, headers=PROXY)
    assert answer.status == 503, f"{path_qs}: {answer.status} {await answer.text()}"


@pytest.mark.parametrize("realm", [
    "https://auth.up.test/v2/token",  # another host's
    "https://up.test:8443/v2/token",  # another port's
    "http://up.test/v2/token",  # another scheme's
])
async def test_a_realm_elsewhere_makes_no_v2_path_a_token_request(
    aiohttp_server, aiohttp_client, tmp_path: Path, realm: str,
) -> None:
    """The challenge's realm is /v2/token, but not on the host asked: that
    host's /v2/token is a registry path like any other."""
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path,
                                 Registry("/v2/token", realm))
    assert (await client.get("/v2/", headers=PROXY)).status == 401
    await server.close()
    answer = await client.get("/v2/token" + SCOPE, headers=PROXY)
    assert answer.status == 503, f"{answer.status} {await answer.text()}"


@pytest.mark.parametrize("realm_path", ["/token", "/v2/token"])
async def test_a_token_got_online_with_a_basic_credential_is_bound_to_it(
    aiohttp_server, aiohttp_client, tmp_path: Path, realm_path: str,
) -> None:
    """private.offline: verified. Online the client's Basic credential gets
    a token and the private blob with it (a yes for the token, and for the
    credential only if the token was bound to it). Offline the same
    credential gets a dummy token (bound to it): the credential's yes
    serves the blob."""
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, Registry(realm_path))

    async def pull_secret(online: bool) -> None:
        assert (await client.get("/v2/", headers=PROXY)).status == 401
        bearer = await token(client, realm_path + SCOPE.replace("app", "secret"), BASIC)
        assert (bearer == "good") is online
        answer = await client.get(f"/v2/lib/secret/blobs/{SECRET_DIGEST}",
                                  headers={**PROXY, "Authorization": f"Bearer {bearer}"})
        assert answer.status == 200, f"online={online}: {answer.status} {await answer.text()}"
        assert await answer.read() == SECRET_LAYER
        assert answer.headers.get("X-CR-User") == "user"  # the token's credential's user
        # The client has its last byte before the commit: wait for it.
        await client.server.app["fetcher"].ctx.flights.close(grace=60)

    await pull_secret(online=True)
    await server.close()
    await pull_secret(online=False)
