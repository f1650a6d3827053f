"""A hostile or broken registry, token server or CDN, met by the fetcher's
upstream client: every odd answer is the upstream's error (a registry
error the client reads), never a Python exception that becomes a bare
500; and what one client's request earned (a cookie) never goes out with
another's. Each case here was a review finding (session 13)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from cr_proxy import config as config_mod
from cr_proxy.cache.layout import Target, proxy_target
from cr_proxy.cache.store import Store
from cr_proxy.errors import UpstreamError
from cr_proxy.fetch.private import Privacy
from cr_proxy.fetch.resume import CONTENT_RANGE
from cr_proxy.metrics import Metrics
from cr_proxy.upstream.auth import DEFAULT_TOKEN_LIFETIME, lifetime_of, token_of
from cr_proxy.upstream.challenges import Challenges
from cr_proxy.upstream.client import Upstream
from cr_proxy.upstream.entitlement import accepts, refused_anonymously

MANIFEST = "/v2/acme/app/manifests/latest"
BLOB = "/v2/acme/app/blobs/sha256:" + "a" * 64
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_config(**env: str) -> config_mod.Config:
    return config_mod.load(None, environ={f"CR_PROXY_{k}": v for k, v in env.items()})


def target(path: str) -> Target:
    domain, rpath = proxy_target("registry.test", path)
    assert rpath is not None
    return Target(domain, domain, rpath)


@contextlib.asynccontextmanager
async def fake_registry(handler: Handler, store: Store | None = None
                        ) -> AsyncIterator[Upstream]:
    """registry.test and auth.test: one server answering every path."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    conf = make_config(ENDPOINTS=f"{{registry.test: 'http://localhost:{port}', "
                                 f"auth.test: 'http://localhost:{port}'}}")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session, Challenges(store) if store else None)
    try:
        yield upstream
    finally:
        await upstream.close()
        await session.close()
        await runner.cleanup()


# --- one session for every client: no cookies ---------------------------------

SESSION = "alice-session"


async def registry_with_sessions(request: web.Request) -> web.Response:
    """Private; a good credential also opens a session (a cookie), as a
    registry behind a web SSO front does."""
    if request.headers.get("Authorization") == "Bearer alice-token":
        response = web.Response(status=200)
        response.set_cookie("session", SESSION, path="/")
        return response
    if request.cookies.get("session") == SESSION:
        return web.Response(status=200)
    return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="registry"'})


async def test_a_cookie_one_clients_request_earned_goes_out_with_no_other() -> None:
    async with fake_registry(registry_with_sessions) as upstream:
        tgt = target(MANIFEST)
        async with await upstream.registry("GET", tgt, client_auth="Bearer alice-token") as r:
            assert r.status == 200
            assert r.cookies["session"].value == SESSION  # the registry did set it
        # The anonymous check and another client's garbage token are each
        # asked as they are: refused.
        assert await refused_anonymously(upstream, tgt)
        assert await accepts(upstream, tgt, "Bearer mallory-garbage") is False


# --- token servers ---------------------------------------------------------------


def token_registry(token_answer: object, realm: str = "http://auth.test/token") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            return web.json_response(token_answer)
        if request.headers.get("Authorization", "").startswith("Bearer "):
            return web.Response(status=200)
        return web.Response(status=401, headers={
            "WWW-Authenticate": f'Bearer realm="{realm}",service="registry.test"'})
    return handler


@pytest.mark.parametrize("answer", [
    [], "a string", {"token": "t\r\nX-Injected: 1"}, {"token": 42}, {"token": "a b"},
], ids=["list", "string", "crlf-token", "number-token", "space-token"])
async def test_a_token_server_answer_that_is_no_token_is_the_upstreams_error(answer) -> None:
    async with fake_registry(token_registry(answer)) as upstream:
        with pytest.raises(UpstreamError):
            (await upstream.registry("GET", target(MANIFEST))).release()


@pytest.mark.parametrize("expires_in", ["soon", [60], None, -5, 0, float("nan"), True])
async def test_an_odd_expires_in_gets_the_specs_default_lifetime(expires_in) -> None:
    assert lifetime_of({"token": "t", "expires_in": expires_in}) == DEFAULT_TOKEN_LIFETIME
    answer = {"token": "t", "expires_in": expires_in}
    async with fake_registry(token_registry(answer)) as upstream:
        response = await upstream.registry("GET", target(MANIFEST))
        response.release()
        assert response.status == 200


def test_a_token_is_a_header_value_or_nothing() -> None:
    assert token_of({"token": "eyJhbGciOi.x-y_z~+/="}) == "eyJhbGciOi.x-y_z~+/="
    assert token_of({"access_token": "ya29.abc"}) == "ya29.abc"
    assert token_of({}) == "" and token_of([]) == ""
    assert lifetime_of({"expires_in": 10 ** 12}) == 24 * 3600  # kept a day at most


@pytest.mark.parametrize("realm", ["http://auth.test:99999/token", "http://auth.test:x/token",
                                   "http://[::1/token"])
async def test_a_realm_that_is_not_a_url_is_the_upstreams_error(realm) -> None:
    async with fake_registry(token_registry({"token": "t"}, realm=realm)) as upstream:
        with pytest.raises(UpstreamError, match="not a URL"):
            (await upstream.registry("GET", target(MANIFEST))).release()


# --- redirects and resumes ---------------------------------------------------------


@pytest.mark.parametrize("location", ["http://cdn.test:99999/blob", "http://cdn.test:x/blob",
                                      "http://[::1/blob"])
async def test_a_redirect_that_is_not_a_url_is_the_upstreams_error(location) -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": location})

    async with fake_registry(handler) as upstream:
        with pytest.raises(UpstreamError, match="not a URL"):
            (await upstream.open("GET", target(BLOB))).response.release()


def test_a_content_range_position_longer_than_an_int64_is_no_match() -> None:
    assert CONTENT_RANGE.fullmatch("bytes 10-99/100")
    assert not CONTENT_RANGE.fullmatch(f"bytes {'9' * 5000}-9/10")  # int() refuses it
    assert not CONTENT_RANGE.fullmatch(f"bytes 1-{'9' * 20}/10")


# --- challenges ---------------------------------------------------------------------


async def test_a_challenge_with_a_byte_that_is_not_ascii_is_not_kept(tmp_path: Path) -> None:
    head = (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
            b'WWW-Authenticate: Basic realm="r\xff"\r\n\r\n')

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conf = make_config(ENDPOINTS=f"{{registry.test: 'http://localhost:{port}'}}")
    store = Store(tmp_path / "cache")
    store.prepare()
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session, Challenges(store))
    try:
        async with await upstream.registry("GET", target(MANIFEST)) as response:
            assert response.status == 401  # the registry's answer, relayed as it is
        assert upstream.challenges.for_repository("registry.test", "acme/app") is None
    finally:
        await upstream.close()
        await session.close()
        server.close()


# --- is a repository private? ---------------------------------------------------


async def test_an_anonymous_check_answered_5xx_decides_nothing(tmp_path: Path) -> None:
    """Private, but the first anonymous check meets a node that is briefly
    overloaded: no public verdict (which would store what the credential
    fetches unmarked, for every client), nothing remembered."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        seen.append(auth or "-")
        if not auth and len(seen) == 1:
            return web.Response(status=503)
        if auth == "Bearer alice-token":
            return web.Response(status=200)
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    store = Store(tmp_path / "cache")
    store.prepare()
    async with fake_registry(handler) as upstream:
        ctx = SimpleNamespace(config=upstream.config, store=store, upstream=upstream,
                              metrics=Metrics())
        privacy = Privacy(ctx)  # type: ignore[arg-type]
        tgt = target(MANIFEST)
        with pytest.raises(UpstreamError, match=r"cannot tell whether .* is private"):
            await privacy.learn(tgt, "Bearer alice-token")
        assert store.private_since("registry.test", "acme/app") is None
        # Asked again, the registry answers: private, and marked so.
        assert await privacy.learn(tgt, "Bearer alice-token")
        assert store.private_since("registry.test", "acme/app") is not None
        assert seen == ["-", "-"]
