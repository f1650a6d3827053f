"""What a node takes from its peers, its parent and the registries that
name hosts, against scripted servers and fetchers run in-process
(make_app): a name only its upstream confirmed, a registry read back as
the one it is, and one registry's outage never another's. Each case was
a review finding of session 13 (docs/reliability.md, bug 33); end to end
through nginx: test_e2e_parent.py, test_e2e_cluster.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from cr_proxy.cache.layout import Kind, RegistryPath, Target
from cr_proxy.config import load
from cr_proxy.errors import UpstreamUnreachable
from cr_proxy.fetch.app import make_app
from cr_proxy.metrics import Metrics
from cr_proxy.upstream.client import Upstream
from cr_proxy.upstream.peers import Peers
from tests.inprocess import config_at, scripted

DOMAIN = "up.test"


async def test_a_parent_that_cannot_ask_its_registry_makes_no_name_on_its_site(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """The parent's registry answers 503: the parent serves a digest it
    holds under a name that never held it, unnamed (X-Cache: UNNAMED), as
    a node does for its own clients. The site stores the bytes and not the
    name: once the registry answers again and says 404, the site says so
    too (it linked the name for good and served it)."""
    data = b"layer bytes " * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    down = [False]

    async def registry(request: web.Request) -> web.StreamResponse:
        if down[0]:
            return web.Response(status=503)
        if request.path == f"/v2/team/a/blobs/{digest}":
            return web.Response(body=data if request.method == "GET" else None,
                                headers={"Content-Length": str(len(data)),
                                         "Docker-Content-Digest": digest})
        if request.path == "/v2/":
            return web.json_response({})
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)

    port = (await scripted(aiohttp_server, registry)).port
    parent = await aiohttp_client(make_app(config_at(
        tmp_path / "parent", endpoints={DOMAIN: f"http://127.0.0.1:{port}"})))
    answer = await parent.get(f"/v2/{DOMAIN}/team/a/blobs/{digest}")
    assert answer.status == 200 and await answer.read() == data
    site_app = make_app(config_at(tmp_path / "site",
                                 parent_mirror=f"http://127.0.0.1:{parent.server.port}"))
    site = await aiohttp_client(site_app)
    site_ctx = site_app["fetcher"].ctx
    invented = f"/v2/{DOMAIN}/someone/else/blobs/{digest}"
    down[0] = True
    answer = await site.get(invented)
    assert answer.status == 200 and await answer.read() == data
    await site_ctx.flights.close(grace=60)  # the commit follows the last byte
    assert site_ctx.store.has_blob(digest)
    assert site_ctx.store.linked(digest, DOMAIN, f"v2/someone/else/blobs/{digest}") is None
    down[0] = False
    assert (await parent.get(invented)).status == 404
    assert (await site.get(invented)).status == 404


async def test_a_registry_that_redirects_to_another_cannot_take_it_down(
    aiohttp_server,
) -> None:
    """evil.test (a registry any client may name) redirects to victim.test's
    own host, then goes dark: its outage was victim.test's too, every
    request to it failing at once ("remembered") while it answered."""
    victim = (await scripted(aiohttp_server, lambda _request: _json({}))).port

    async def evil(_request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "http://victim.test/v2/"})

    evil_app = web.Application()
    evil_app.router.add_route("*", "/{tail:.*}", evil)
    evil_server = await aiohttp_server(evil_app)
    conf = load(None, environ={"CR_PROXY_ENDPOINTS": (
        f"{{evil.test: 'http://127.0.0.1:{evil_server.port}', "
        f"victim.test: 'http://127.0.0.1:{victim}'}}")})
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    try:
        async with await upstream.send("GET", "victim.test", "/v2/", {}) as answer:
            assert answer.status == 200  # victim.test, a registry of its own
        target = Target("evil.test", "evil.test", RegistryPath(Kind.MANIFEST, "x", "latest"))
        (await upstream.open("GET", target)).response.release()
        await evil_server.close()
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("GET", "evil.test", "/v2/", {})
        assert upstream.is_down("evil.test") and not upstream.is_down("victim.test")
        async with await upstream.send("GET", "victim.test", "/v2/", {}) as answer:
            assert answer.status == 200
    finally:
        await upstream.close()
        await session.close()


async def _json(body: object) -> web.Response:
    return web.json_response(body)


async def test_a_one_label_registry_is_asked_of_its_owner_as_that_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`?ns=intranet` on a non-owner: the owner was asked /v2/intranet/...,
    which Docker's rule reads as Docker Hub's repository intranet/...; the
    owner is asked /v2/intranet:443/... (its default port, dropped again)."""
    conf = config_at(tmp_path / "node", cluster={"peers": ["10.0.0.1:5000", "10.0.0.2:5000"],
                                               "self": "10.0.0.1:5000"})
    peers = Peers(conf, Metrics())
    asked: list[str] = []

    async def request(_method: str, url: str, **_kwargs: object) -> SimpleNamespace:
        asked.append(url)
        raise aiohttp.ClientConnectionError("not here")

    monkeypatch.setattr(peers._session, "request", request)
    target = Target("intranet", "intranet", RegistryPath(Kind.MANIFEST, "team/app", "v1"))
    try:
        assert await peers.open(target) is None
    finally:
        await peers.close()
    assert asked == ["http://cr-peers/v2/intranet:443/team/app/manifests/v1"]


async def test_with_a_parent_a_slow_answer_probes_no_registry(tmp_path: Path) -> None:
    """A site that reaches only its parent: a revalidation that outran its
    budget probed the registry itself, failed, and the registry stayed
    down (every tag stale, the healthy parent never asked)."""
    conf = config_at(tmp_path / "site", parent_mirror="http://127.0.0.1:1",
                    parent_fallback="fail")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    try:
        upstream.suspect("reg.test")
        assert not upstream.health._suspects and not upstream.is_down("reg.test")
    finally:
        await upstream.close()
        await session.close()
