"""The fetcher in-process (cr_proxy.fetch.app.make_app) in front of a
scripted upstream (an aiohttp handler answering every path): for tests of
what the fetcher does with an upstream's answers, without nginx. The
pytest-aiohttp fixtures `aiohttp_server` and `aiohttp_client` are passed in."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cr_proxy.config import Config, load
from cr_proxy.fetch.app import make_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IMAGE = "application/vnd.oci.image.manifest.v1+json"


def image_manifest(**extra: object) -> bytes:
    """A small OCI image manifest (a config and a layer whose digests are
    made up), with `extra` top-level keys."""
    made_up = "sha256:" + "a" * 64
    return json.dumps({
        "schemaVersion": 2, "mediaType": IMAGE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": made_up, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": made_up, "size": 3}],
        **extra}).encode()


async def scripted(aiohttp_server: Any, handler: Handler) -> TestServer:
    """A server answering every path with `handler`."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


def config_at(base: Path, **settings: Any) -> Config:
    """A configuration whose cache, run and certs directories are under
    `base`, with `settings` on top, loaded from a file as serve loads it."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.yml").write_text(yaml.safe_dump({
        "cache_dir": str(base / "cache"), "run_dir": str(base / "run"),
        "certs_dir": str(base / "certs"), **settings}))
    return load(base / "config.yml", environ={})


async def fetcher(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, handler: Handler,
                  hosts: Iterable[str] = ("up.test",), **settings: Any) -> TestClient:
    """A client of the fetcher (its start-up run), `hosts` being `handler`."""
    server = await scripted(aiohttp_server, handler)
    endpoints = {host: f"http://127.0.0.1:{server.port}" for host in hosts}
    return await aiohttp_client(make_app(config_at(tmp_path, endpoints=endpoints, **settings)))
