"""cr_proxy.upstream: where hosts are reached, and the down-host memory."""

from __future__ import annotations

import pytest

from cr_proxy import config as config_mod
from cr_proxy.errors import UpstreamUnreachable
from cr_proxy.upstream import Upstream, is_loopback, split_url
from tests.upstream import free_ports


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
