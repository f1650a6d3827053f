"""cr_proxy.upstream: where hosts are reached, and the down-registry memory
(its state machine alone: test_health.py)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from cr_proxy import config as config_mod
from cr_proxy.errors import BadRequest, UpstreamTimeout, UpstreamUnreachable
from cr_proxy.net.address import is_loopback, split_url
from cr_proxy.upstream.client import (
    MAX_ANSWERED_HOSTS,
    OTHER_REGISTRIES,
    RateGuard,
    Upstream,
)
from testbed.ports import free_ports


def make_config(**env: str) -> config_mod.Config:
    return config_mod.load(None, environ={f"CR_PROXY_{k}": v for k, v in env.items()})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("registry.example", ["http://10.0.0.5:5000"]),
        ("ghcr.io", ["https://ghcr.io"]),
        ("plain.example", ["http://plain.example"]),
        ("localhost:5000", ["https://localhost:5000", "http://localhost:5000"]),
        ("127.0.0.1:5000", ["https://127.0.0.1:5000", "http://127.0.0.1:5000"]),
    ],
)
async def test_base_urls_follow_endpoints_insecure_and_loopback_rules(
    host: str, expected: list[str]
) -> None:
    conf = make_config(ENDPOINTS="{registry.example: 'http://10.0.0.5:5000'}",
                       INSECURE="[plain.example]")
    session = Upstream.make_session(conf)
    try:
        assert Upstream(conf, session).base_urls(host) == expected
    finally:
        await session.close()


async def test_unreachable_host_is_remembered_and_skipped() -> None:
    (port,) = free_ports(1)  # nothing listens there
    conf = make_config(ENDPOINTS=f"{{dead.test: 'http://127.0.0.1:{port}'}}",
                       TIMEOUTS__DOWN_HOST="60")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    attempts = 0
    original = session._request

    async def counting(*args, **kwargs):
        nonlocal attempts
        attempts += 1
        return await original(*args, **kwargs)

    session._request = counting  # type: ignore[method-assign]
    try:
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("GET", "dead.test", "/v2/", {})
        assert upstream.is_down("dead.test")
        for _ in range(10):
            with pytest.raises(UpstreamUnreachable, match="remembered"):
                await upstream.send("GET", "dead.test", "/v2/", {})
        assert attempts == 1  # ten more requests, no more connection attempts
    finally:
        await upstream.close()
        await session.close()


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("https://cdn.example/a/b?sig=1", ("https", "cdn.example", "/a/b?sig=1")),
        ("http://cdn.test:8080/x", ("http", "cdn.test:8080", "/x")),
        ("https://cdn.example:443/x", ("https", "cdn.example", "/x")),
    ],
)
def test_split_url(url: str, parts: tuple[str, str, str]) -> None:
    assert split_url(url) == parts


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1:5000", True), ("[::1]:5000", True),
     ("10.0.0.1", False), ("registry.test", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- bounds on what clients can make the upstream side hold (issue 10) ------------------


async def test_registry_labels_are_configured_or_answered_names_else_other() -> None:
    conf = make_config(ENDPOINTS="{registry.example: 'http://10.0.0.5:5000'}",
                       REGISTRIES="{ghcr.io: {token: t}}")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    try:
        for configured in ("registry.example", "ghcr.io", "docker.io", "registry-1.docker.io"):
            assert upstream.registry_label(configured) == configured
        assert upstream.registry_label("invented.example") == OTHER_REGISTRIES
        upstream._answered_once("quay.io")
        assert upstream.registry_label("quay.io") == "quay.io"
        for i in range(MAX_ANSWERED_HOSTS + 10):
            upstream._answered_once(f"r{i}.example")
        labels = {upstream.registry_label(f"r{i}.example") for i in range(MAX_ANSWERED_HOSTS + 10)}
        assert len(labels) == MAX_ANSWERED_HOSTS  # the first ones learnt, and "other"
        assert OTHER_REGISTRIES in labels
    finally:
        await session.close()


def fed_reader() -> aiohttp.StreamReader:
    """A response body the test feeds by hand (a connected protocol, no socket)."""
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.Transport())
    return aiohttp.StreamReader(protocol, 1 << 16, loop=loop)


async def test_rate_guard_cuts_a_trickle_and_spares_a_body_fast_enough() -> None:
    """Both bodies get a piece every 20 ms for a second; the guard wants 500
    bytes in each half second: a byte a piece is cut, 1000 bytes are not
    (one piece in a window is enough: no race with the timer)."""
    slow, fast = fed_reader(), fed_reader()
    guards = [RateGuard(body, min_rate=1000, window=0.5) for body in (slow, fast)]
    try:
        async def feed() -> None:
            for _ in range(50):
                slow.feed_data(b"x")
                fast.feed_data(b"y" * 1000)
                await asyncio.sleep(0.02)
            fast.feed_eof()

        feeder = asyncio.create_task(feed())
        with pytest.raises(UpstreamTimeout, match=r"limits\.min_rate"):
            async for _ in slow.iter_any():
                pass
        await feeder
        assert len(await fast.read()) == 50 * 1000
    finally:
        for guard in guards:
            guard.cancel()


async def test_rate_guard_with_no_minimum_sets_no_timer() -> None:
    guard = RateGuard(fed_reader(), min_rate=0, window=0.01)
    assert guard._handle is None


async def test_a_full_pool_is_a_timeout_and_does_not_mark_the_host_down() -> None:
    """One connection per host: a second request waits timeouts.pool for it,
    then fails as UpstreamTimeout; the host is busy, not down."""
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await release.wait()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", held)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    (port,) = free_ports(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    conf = make_config(ENDPOINTS=f"{{held.test: 'http://127.0.0.1:{port}'}}",
                       LIMITS__UPSTREAM_CONNECTIONS_PER_HOST="1", TIMEOUTS__POOL="0.2")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    try:
        first = await upstream.send("GET", "held.test", "/v2/a", {})
        with pytest.raises(UpstreamTimeout, match=r"limits\.upstream_connections_per_host"):
            await upstream.send("GET", "held.test", "/v2/b", {})
        assert not upstream.is_down("held.test")
        release.set()
        await first.read()
        first.release()
        second = await upstream.send("GET", "held.test", "/v2/c", {})
        second.release()
    finally:
        release.set()
        await session.close()
        await runner.cleanup()


# --- names from the wire are checked where they enter (issue 11) -----------------------


@pytest.mark.parametrize("realm", ["https://bad_host!/token", "https://../token",
                                   "https://a b.test/token"])
async def test_a_token_realm_naming_no_host_is_refused_before_any_request(realm: str) -> None:
    conf = make_config()
    session = Upstream.make_session(conf)
    attempts = 0

    async def counting(*args, **kwargs):
        nonlocal attempts
        attempts += 1
        raise AssertionError("no request may be made")

    session._request = counting  # type: ignore[method-assign]
    try:
        with pytest.raises(BadRequest):
            await Upstream(conf, session).get_json(realm, {})
        assert attempts == 0
    finally:
        await session.close()


# --- one notion of down per registry (issue 12) ------------------------------------------


async def test_a_name_that_does_not_resolve_takes_its_registry_and_realm_down() -> None:
    """DNS failure counts as down (RFC 6761: .invalid never resolves), for
    the registry that named the host too: its next token request and its own
    requests fail at once, without a lookup or a connect."""
    conf = make_config(TIMEOUTS__DOWN_HOST="60")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    attempts = 0
    original = session._request

    async def counting(*args, **kwargs):
        nonlocal attempts
        attempts += 1
        return await original(*args, **kwargs)

    session._request = counting  # type: ignore[method-assign]
    try:
        with pytest.raises(UpstreamUnreachable):
            await upstream.get_json("https://auth.invalid/token", {}, registry="registry.invalid")
        assert attempts == 1
        for host in ("auth.invalid", "registry.invalid"):
            assert upstream.is_down(host), host
        with pytest.raises(UpstreamUnreachable, match="remembered"):
            await upstream.send("GET", "registry.invalid", "/v2/", {})
        assert attempts == 1
        assert upstream.metrics.registry.get_sample_value(
            "crproxy_upstream_skipped_total", {"registry": "other"}) == 1
    finally:
        await upstream.close()
        await session.close()


async def test_the_probe_answers_for_any_http_answer_and_fails_on_a_refused_connect() -> None:
    (port,) = free_ports(1)
    conf = make_config(ENDPOINTS=f"{{gone.test: 'http://127.0.0.1:{port}'}}")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    async def not_found(_: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", not_found)
    runner = web.AppRunner(app, access_log=None)
    try:
        assert isinstance(await upstream._probe("gone.test", "https"), aiohttp.ClientError)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        assert await upstream._probe("gone.test", "https") is None
    finally:
        await upstream.close()
        await session.close()
        await runner.cleanup()


async def test_a_request_hung_past_the_budget_is_given_up_when_its_registry_is_found_down(
) -> None:
    """A kept-alive connection into a cut cable: the server took the request
    and says nothing. Past timeouts.stale_budget the registry is suspect;
    its probe (a new connection: here a fake that cannot connect) marks it
    down, and the waiting request ends then, UpstreamUnreachable, not at
    timeouts.read (60 s here) as UpstreamTimeout."""
    hang = asyncio.Event()

    async def silent(_: web.Request) -> web.Response:
        await hang.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/{tail:.*}", silent)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    (port,) = free_ports(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    conf = make_config(ENDPOINTS=f"{{hung.test: 'http://127.0.0.1:{port}'}}",
                       TIMEOUTS__READ="60", TIMEOUTS__STALE_BUDGET="0.05")
    session = Upstream.make_session(conf)
    upstream = Upstream(conf, session)
    probed: list[str] = []

    async def cannot_connect(host: str, scheme: str) -> BaseException | None:
        probed.append(host)
        return ConnectionRefusedError("cut")

    upstream.health._probe = cannot_connect
    try:
        with pytest.raises(UpstreamUnreachable, match="went down while this request waited"):
            await upstream.send("GET", "hung.test", "/v2/a", {})
        assert probed[0] == "hung.test"
        assert upstream.is_down("hung.test")
    finally:
        hang.set()
        await upstream.close()
        await session.close()
        await runner.cleanup()
