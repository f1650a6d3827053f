"""The push path's bookkeeping against a scripted upstream (push.py,
held.py, upstream/uploads.py): what a hostile or failing registry, or a
client's overlapping requests, leave behind. Pushes.handle runs in a
real aiohttp server (errors wrapped as Fetcher.answer does), over a real
Store; the upstream is a script. Each case was a review finding of
session 13 (docs/reliability.md, bug 27); end to end through nginx and
skopeo: test_e2e_push.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from cr_proxy import config as cfg
from cr_proxy.cache.layout import Kind, RegistryPath
from cr_proxy.cache.store import Store
from cr_proxy.errors import CrProxyError, UpstreamError, UpstreamUnreachable
from cr_proxy.fetch import held as held_module
from cr_proxy.fetch import push as push_module
from cr_proxy.fetch.context import error_response
from cr_proxy.fetch.private import Privacy
from cr_proxy.fetch.push import Pushes, client_location, push_target
from cr_proxy.upstream.uploads import PushAuth

REG = "registry.test"
XFF = {"X-Forwarded-For": "127.0.0.1"}
LOC = "/v2/app/blobs/uploads/u1?_state=s"
CHALLENGE = 'Bearer realm="https://auth.registry.test/token",service="registry.test"'


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Answer:
    """An upstream answer as Pushes reads it (aiohttp.ClientResponse's parts)."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status = status
        values = CIMultiDict(headers or {})
        values.setdefault("Content-Length", "0")
        self.headers = CIMultiDictProxy(values)
        self.content_length = 0
        self.content = SimpleNamespace(iter_any=self._nothing)

    @staticmethod
    async def _nothing() -> AsyncIterator[bytes]:
        return
        yield b""

    def release(self) -> None:
        pass

    async def __aenter__(self) -> Answer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


Script = Callable[[str, str, str, dict[str, str], bytes | None], Awaitable[Answer]]


class ScriptedUpstream:
    """send() reads a streamed body as aiohttp would, then asks the script;
    /v2/ is open unless `pings` is set."""

    def __init__(self, config: cfg.Config, script: Script) -> None:
        self.config, self.script = config, script
        self.parent = None
        self.pings = False
        self.calls: list[tuple[str, str, str, dict[str, str]]] = []

    async def send(self, method: str, host: str, path: str, headers: Any,
                   scheme: str = "https", data: Any = None, registry: str | None = None
                   ) -> Answer:
        self.calls.append((method, host, path, dict(headers)))
        if path == "/v2/" and not self.pings:
            return Answer(200)
        body = data if data is None or isinstance(data, bytes) else b"".join(
            [chunk async for chunk in data])
        return await self.script(method, host, path, dict(headers), body)

    async def open(self, method: str, target: Any, client_auth: str | None = None
                   ) -> SimpleNamespace:
        """A registry request of a pull (a push probe's HEAD), no redirects."""
        path = "/" + target.rpath.path
        self.calls.append((method, target.domain, path, {}))
        return SimpleNamespace(response=await self.script(method, target.domain, path, {}, None),
                               hops=[])

    async def token(self, *_args: object) -> str:
        return "tok"

    def is_down(self, _host: str) -> bool:
        return False


def pushes_of(tmp_path: Path, script: Script, privacy: bool = False
              ) -> tuple[Pushes, ScriptedUpstream, Store]:
    data = cfg.default_data()
    data.update(cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"),
                certs_dir=str(tmp_path / "certs"))
    data["push"].update({"enabled": True})
    config = cfg.build(data, environ={})
    store = Store(tmp_path / "cache")
    store.prepare()
    upstream = ScriptedUpstream(config, script)
    ctx = SimpleNamespace(config=config, store=store, upstream=upstream,
                          fill=SimpleNamespace(grew=lambda _n: None), metrics=None)
    pushes = Pushes(ctx, ThreadPoolExecutor(2),  # type: ignore[arg-type]
                    Privacy(ctx) if privacy else None)  # type: ignore[arg-type]
    return pushes, upstream, store


def app_of(pushes: Pushes) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await pushes.handle(request)
        except aiohttp.ClientError as err:
            return error_response(UpstreamError(message=str(err)))
        except CrProxyError as err:
            return error_response(err)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def temp_files(store: Store) -> list[Path]:
    return sorted(store.tree.temp.iterdir())


# --- Locations and headers from the upstream ---------------------------------------


@pytest.mark.parametrize("location", [
    "/v2/app/../../other.example/app/blobs/uploads/u9?_state=s",
    "/v2/app/blobs/uploads/../../../other.example/app/blobs/uploads/u9",
    "/v2/app/blobs/uploads/./u9",
    "/v2/app/blobs/uploads/%2e%2e",
    "/v2/app/tags/list",
    "/v2/app/blobs/uploads/u9?_state=a\x01b",
])
def test_a_location_that_leaves_the_upload_blob_or_manifest_is_refused(location: str) -> None:
    """Clients resolve dot segments in a Location (RFC 3986): a hostile
    registry's `..` would send the pusher's layer to another registry, with
    cr-proxy's login for it."""
    target = push_target(f"/v2/{REG}/app/blobs/uploads/", "", {})
    with pytest.raises(UpstreamError, match="not an upload, blob or manifest"):
        client_location(location, target)


@pytest.mark.parametrize("location", [
    "/v2/app/blobs/uploads/2cf83a52-a608-4c2b?_state=AGNj%3D%3D",
    "https://registry.test/v2/app/blobs/uploads/u1",
    "/v2/app/blobs/sha256:" + "a" * 64,
    "/v2/app/manifests/v1.2_x-y",
    "/v2/app/manifests/sha256:" + "b" * 64,
])
def test_a_registrys_own_locations_become_ours(location: str) -> None:
    target = push_target(f"/v2/{REG}/app/blobs/uploads/", "", {})
    assert client_location(location, target).startswith(f"/v2/{REG}/app/")


async def test_a_control_byte_in_a_relayed_header_is_dropped_not_the_connection(
    tmp_path: Path,
) -> None:
    async def script(*_args: object) -> Answer:
        return Answer(202, {"Location": LOC, "Docker-Upload-UUID": "u1\x01"})

    pushes, _, _ = pushes_of(tmp_path, script)
    async with TestClient(TestServer(app_of(pushes))) as client:
        response = await client.post(f"/v2/{REG}/app/blobs/uploads/", headers=XFF)
        assert response.status == 202
        assert "Docker-Upload-UUID" not in response.headers
        assert response.headers["Location"] == f"/v2/{REG}/app/blobs/uploads/u1?_state=s"
    pushes.close()


# --- temp files: nothing left behind ----------------------------------------------


async def test_a_login_that_fails_mid_upload_leaves_no_temp_file(tmp_path: Path) -> None:
    async def script(method: str, _host: str, path: str, _headers: object,
                     body: bytes | None) -> Answer:
        if path == "/v2/":
            return Answer(401, {"WWW-Authenticate": CHALLENGE})
        if method == "POST":
            return Answer(202, {"Location": LOC})
        assert method == "PATCH" and body is not None
        return Answer(202, {"Location": LOC, "Range": f"0-{len(body) - 1}"})

    pushes, upstream, store = pushes_of(tmp_path, script)
    upstream.pings = True
    tokens = ["tok", "tok"]

    async def token(*_args: object) -> str:
        if not tokens:
            raise UpstreamError(message="token server auth.registry.test answered 503")
        return tokens.pop()

    upstream.token = token  # type: ignore[method-assign]
    async with TestClient(TestServer(app_of(pushes))) as client:
        response = await client.post(f"/v2/{REG}/app/blobs/uploads/", headers=XFF)
        response = await client.patch(response.headers["Location"], data=b"a" * 2000,
                                      headers={**XFF, "Content-Range": "0-1999"})
        assert response.status == 202 and temp_files(store)  # our copy so far
        response = await client.patch(response.headers["Location"], data=b"b" * 2000,
                                      headers={**XFF, "Content-Range": "2000-3999"})
        assert response.status == 502
        assert pushes.uploads == {} and temp_files(store) == []
        # No DELETE upstream: nothing was sent, the session is the client's still.
        assert [c[0] for c in upstream.calls if c[2] != "/v2/"] == ["POST", "PATCH"]
    pushes.close()


async def test_two_requests_of_one_session_at_once_leave_no_temp_file(tmp_path: Path) -> None:
    patch_go, in_patch, in_get = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def script(method: str, _host: str, _path: str, _headers: object,
                     body: bytes | None) -> Answer:
        if method == "POST":
            return Answer(202, {"Location": LOC})
        if method == "PATCH":
            in_patch.set()
            await patch_go.wait()
            return Answer(202, {"Location": LOC, "Range": "0-2999"})
        in_get.set()  # the status GET: answered while the PATCH waits
        return Answer(204, {"Location": LOC, "Range": "0-2999"})

    pushes, _, store = pushes_of(tmp_path, script)
    async with TestClient(TestServer(app_of(pushes))) as client:
        response = await client.post(f"/v2/{REG}/app/blobs/uploads/", headers=XFF)
        location = response.headers["Location"]
        patch = asyncio.ensure_future(client.patch(
            location, data=b"y" * 3000, headers={**XFF, "Content-Range": "0-2999"}))
        await in_patch.wait()
        assert (await client.get(location, headers=XFF)).status == 204
        assert in_get.is_set()
        patch_go.set()
        assert (await patch).status == 202
        # One session followed (broken: both requests' copies let go), no file.
        assert len(pushes.uploads) == 1
        assert all(upload.broken for upload in pushes.uploads.values())
        assert temp_files(store) == []
    pushes.close()


async def test_a_commit_whose_privacy_check_breaks_leaves_no_temp_file(tmp_path: Path) -> None:
    data = b"z" * 4000

    async def script(method: str, *_args: object) -> Answer:
        if method == "POST":
            return Answer(201, {"Location": f"/v2/app/blobs/{sha(data)}"})
        # The anonymous check of Privacy.learn gets a malformed answer.
        raise aiohttp.ClientResponseError(None, (), status=400,  # type: ignore[arg-type]
                                          message="Invalid constant string")

    pushes, _, store = pushes_of(tmp_path, script, privacy=True)
    async with TestClient(TestServer(app_of(pushes))) as client:
        response = await client.post(f"/v2/{REG}/app/blobs/uploads/?digest={sha(data)}",
                                     data=data, headers=XFF)
        assert response.status == 201
        await pushes.finish_commits()
    assert not store.has_blob(sha(data))  # not stored: the cache's loss alone
    assert temp_files(store) == []
    pushes.close()


# --- memory that must not grow ----------------------------------------------------


async def test_probes_that_never_upload_leave_a_bounded_set_of_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each 404 probe claims its digest; a pusher that never uploads (a
    cancelled job) is abandoned after CLAIM_IDLE (0 here), and the next
    claim clears it."""
    monkeypatch.setattr(held_module, "CLAIM_IDLE", 0.0)

    async def script(*_args: object) -> Answer:
        return Answer(404)

    pushes, _, _ = pushes_of(tmp_path, script)
    async with TestClient(TestServer(app_of(pushes))) as client:
        for i in range(50):
            digest = sha(str(i).encode())
            response = await client.head(f"/v2/{REG}/app{i}/blobs/{digest}", headers=XFF)
            assert response.status == 404
    held = pushes.held
    assert len(held._claims) <= 1 and len(held._activity) <= 1
    pushes.close()


def test_digests_touched_longer_ago_than_upload_timeout_are_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without cache.max_size nothing asks pending(): _touch itself lets
    go of what push.upload_timeout has passed, oldest first."""
    pushes, _, _ = pushes_of(tmp_path, Answer)  # type: ignore[arg-type]
    now = [1000.0]
    monkeypatch.setattr(push_module.time, "monotonic", lambda: now[0])
    timeout = pushes.ctx.config.push.upload_timeout
    for i in range(50):
        pushes._touch(f"sha256:{i:064x}")
        now[0] += timeout / 10
    assert 10 <= len(pushes.touched) <= 11
    pushes._touch(f"sha256:{0:064x}")  # used again: the newest
    assert list(pushes.touched)[-1] == f"sha256:{0:064x}"
    pushes.close()


# --- the login of a push ----------------------------------------------------------


async def test_a_ping_answered_5xx_is_asked_again_not_taken_for_no_login(
    tmp_path: Path,
) -> None:
    answers = [Answer(503), Answer(401, {"WWW-Authenticate": CHALLENGE})]

    async def script(*_args: object) -> Answer:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    _, upstream, _ = pushes_of(tmp_path, script)
    upstream.pings = True
    auth = PushAuth(upstream)  # type: ignore[arg-type]
    assert await auth.header(REG, REG, "app") is None  # down: no challenge this time
    assert await auth.header(REG, REG, "app") == "Bearer tok"  # back: it logs in
    assert await auth.header(REG, REG, "app") == "Bearer tok"  # kept now
    assert sum(1 for c in upstream.calls if c[2] == "/v2/") == 2


# --- the offline probe ------------------------------------------------------------


async def test_offline_a_probe_tells_no_other_repository_of_a_private_blob(
    tmp_path: Path,
) -> None:
    """While the registry cannot be asked, a push probe is answered from
    the cache for a blob it holds; a private repository's blob only to that
    repository: to another, its digest and size are not ours to tell."""
    async def script(_method: str, host: str, *_args: object) -> Answer:
        raise UpstreamUnreachable(message=f"{host} is unreachable")

    pushes, _, store = pushes_of(tmp_path, script)
    data = b"a private repository's layer"
    digest = sha(data)
    store.mark_private(REG, "secret", True)
    writer = store.blob_writer(digest)
    writer.write(data)
    writer.verify(len(data))
    store.commit_blob(writer, REG, RegistryPath(Kind.BLOB, "secret", digest).path)
    async with TestClient(TestServer(app_of(pushes))) as client:
        elsewhere = await client.head(f"/v2/{REG}/app/blobs/{digest}", headers=XFF)
        own = await client.head(f"/v2/{REG}/secret/blobs/{digest}", headers=XFF)
    pushes.close()
    assert elsewhere.status == 503
    assert (own.status, own.headers["Content-Length"]) == (200, str(len(data)))


async def test_a_mount_from_a_private_repository_is_an_upload_instead(tmp_path: Path) -> None:
    """A client's `POST ?mount=&from=<a private repository>`: asked with
    cr-proxy's login, the mount would copy what the pusher may not read;
    the upload starts as without a source."""
    async def script(method: str, _host: str, path: str, *_args: object) -> Answer:
        return Answer(202, {"Location": LOC})

    pushes, upstream, store = pushes_of(tmp_path, script)
    store.mark_private(REG, "secret", True)
    digest = sha(b"layer")
    async with TestClient(TestServer(app_of(pushes))) as client:
        response = await client.post(
            f"/v2/{REG}/app/blobs/uploads/?mount={digest}&from={REG}/secret", headers=XFF)
        public = await client.post(
            f"/v2/{REG}/app/blobs/uploads/?mount={digest}&from={REG}/open", headers=XFF)
    pushes.close()
    assert (response.status, public.status) == (202, 202)
    posts = [path for method, _, path, _ in upstream.calls if method == "POST"]
    assert posts == ["/v2/app/blobs/uploads/",
                     f"/v2/app/blobs/uploads/?mount={digest.replace(':', '%3A')}&from=open"]
