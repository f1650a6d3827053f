"""bench.push_ab --floor's sides relay a push as cr-proxy's nginx would hand
it on: the real nginx (bench.procs.FrontNginx) in front of bench.passthrough
in its own process, bodies streamed whole to the target, answers (status,
Location, body) back unchanged, with and without the hash."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.procs import PushFloor

BODY = os.urandom(3 * (1 << 20) + 12345)  # several of nginx's and the hash's pieces


@pytest.mark.parametrize("hash_bodies", [False, True])
async def test_a_floor_side_relays_a_push_body_whole_and_its_answer_back(
    tmp_path: Path, hash_bodies: bool
) -> None:
    seen: list[tuple[str, str, str, bytes]] = []

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.path_qs, request.host, body))
        return web.Response(status=202, text='{"ok":true}', headers={
            "Location": f"http://{request.host}/v2/ab/x/blobs/uploads/u1?_state=s",
            "Docker-Upload-UUID": "u1"})

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", upload)
    async with TestServer(app, host="127.0.0.1") as target:
        floor = PushFloor(tmp_path / "floor", f"http://127.0.0.1:{target.port}", hash_bodies)
        await asyncio.to_thread(floor.start)
        try:
            async with aiohttp.ClientSession() as session, session.patch(
                f"http://{floor.http}/v2/ab/x/blobs/uploads/u1?_state=s", data=BODY,
                headers={"Content-Type": "application/octet-stream"},
            ) as answer:
                text = await answer.text()
                assert answer.status == 202
                assert text == '{"ok":true}'
                # The registry builds its Locations from the Host the client
                # used: the client keeps talking to the floor's nginx.
                assert answer.headers["Location"] == (
                    f"http://{floor.http}/v2/ab/x/blobs/uploads/u1?_state=s")
                assert answer.headers["Docker-Upload-UUID"] == "u1"
        finally:
            await asyncio.to_thread(floor.stop)
    [(method, path_qs, host, body)] = seen
    assert (method, path_qs, host) == ("PATCH", "/v2/ab/x/blobs/uploads/u1?_state=s", floor.http)
    assert hashlib.sha256(body).digest() == hashlib.sha256(BODY).digest()
    assert len(body) == len(BODY)
