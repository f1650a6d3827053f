"""Blobs.ensure (edge delivery, a push's fill) when it joins a flight a
client's GET started that does not keep its copy: in a cluster with
cluster.keep_local off, a blob its owner sent is streamed and dropped.
ensure() then fetches once more as a flight of its own, and gets the
stored file (a review finding, session 13). The fetcher runs in-process
(make_app), the owner node is a scripted aiohttp server."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from aiohttp import web

from cr_proxy.cache.layout import mirror_target
from cr_proxy.fetch.app import make_app
from cr_proxy.fetch.blobs import Blobs
from tests.inprocess import config_at, scripted

DOMAIN = "up.test"


async def test_ensure_that_joined_a_flight_not_kept_fetches_once_more(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    data = bytes((i * 7 + 3) % 251 for i in range(200_000))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    release = asyncio.Event()
    sent = 0

    async def owner(request: web.Request) -> web.StreamResponse:
        """The digest's owner: the first answer waits halfway for the test."""
        nonlocal sent
        sent += 1
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:100_000])
        if sent == 1:
            await release.wait()
        await response.write(data[100_000:])
        return response

    server = await scripted(aiohttp_server, owner)
    config = config_at(tmp_path, endpoints={DOMAIN: f"http://127.0.0.1:{server.port}"})
    fetcher_app = make_app(config)
    await aiohttp_client(fetcher_app)  # runs the app's start-up
    ctx = fetcher_app["fetcher"].ctx
    session = aiohttp.ClientSession(auto_decompress=False)

    class OwnerPeers:
        async def open(self, _target: object) -> SimpleNamespace:
            return SimpleNamespace(response=await session.get(f"{server.make_url('/blob')}"))

        def refused(self, *_args: object) -> None:
            raise AssertionError("the owner sent the right bytes")

    cluster = dataclasses.replace(config.cluster, keep_local=False)
    ctx = dataclasses.replace(ctx, peers=OwnerPeers(),
                              config=dataclasses.replace(config, cluster=cluster))
    blobs = Blobs(ctx)
    target = mirror_target(f"/v2/{DOMAIN}/lib/app/blobs/{digest}", None, DOMAIN, {})
    misses = ctx.metrics.misses.labels(kind="blob")
    try:
        # A client's GET starts the flight, as Blobs.get does: not kept.
        flight = ctx.flights.join(f"{target.domain} {digest}",
                                  functools.partial(blobs._download, target, None))
        await flight.wait_started()
        before = misses._value.get()
        ensured = asyncio.create_task(blobs.ensure(target))
        while misses._value.get() == before:  # ensure() counts its miss, then joins
            await asyncio.sleep(0)
        release.set()
        path = await ensured
        assert path.read_bytes() == data
        assert flight.committed_path is None  # the client's flight kept nothing
        assert sent == 2
    finally:
        await session.close()
        blobs.close()
