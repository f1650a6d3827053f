"""A blob pulled through a private repository is served under no other
name: not unnamed while its registry cannot confirm the name (refused,
5xx), not to a reader of another repository who joins its download, not
named by a mere HEAD or mount; a public one still is, unnamed, offline.
In-process (make_app) against a scripted registry with one private and one
public repository. A review finding of session 14 (docs/reliability.md,
bug 39); the store's side (marks, removal, an older cache) below."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cr_proxy.cache import store as store_module
from cr_proxy.cache.removal import remove_blobs
from cr_proxy.cache.scan import Scan
from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.fetch.app import make_app
from tests.inprocess import config_at, scripted

DOMAIN = "up.test"
SECRET_LAYER = b"the private repository's layer: secret bytes"
SECRET_DIGEST = "sha256:" + hashlib.sha256(SECRET_LAYER).hexdigest()
PUBLIC_LAYER = b"a public layer"
PUBLIC_DIGEST = "sha256:" + hashlib.sha256(PUBLIC_LAYER).hexdigest()
CHALLENGE = f'Bearer realm="https://{DOMAIN}/token",service="{DOMAIN}"'
BASIC = "Basic " + base64.b64encode(b"user:pw").decode()
LOGIN = {DOMAIN: {"username": "user", "password": "pw"}}  # registries: cr-proxy's own
# An https_proxy client with no credential.
PROXY = {"X-CR-Mode": "https_proxy", "X-CR-Port": "443", "X-CR-Scheme": "https",
         "Host": DOMAIN}


class Registry:
    """lib/secret: only the Bearer token "good" (a Basic user:pw exchanged
    for it) reads it; lib/public: anyone; every other name: 404."""

    def __init__(self) -> None:
        self.status: int | None = None  # answer everything with this status
        self.gate: asyncio.Event | None = None  # the secret layer's body waits for it
        self.secret_asked = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.status is not None:
            return web.Response(status=self.status)
        path = request.path
        if path == "/token":
            token = "good" if request.headers.get("Authorization") == BASIC else "anon"
            return web.json_response({"token": token})
        if path in ("/v2/", "/v2"):
            return web.Response(status=401, headers={"WWW-Authenticate": CHALLENGE})
        if path.startswith("/v2/lib/secret/"):
            if request.headers.get("Authorization") != "Bearer good":
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                         headers={"WWW-Authenticate": CHALLENGE})
            if path == f"/v2/lib/secret/blobs/{SECRET_DIGEST}":
                return await self._layer(request, SECRET_LAYER, SECRET_DIGEST)
        if path == f"/v2/lib/public/blobs/{PUBLIC_DIGEST}":
            return await self._layer(request, PUBLIC_LAYER, PUBLIC_DIGEST)
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)

    async def _layer(self, request: web.Request, body: bytes, digest: str
                     ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(body)),
                                               "Docker-Content-Digest": digest})
        await response.prepare(request)
        if request.method == "GET":
            await response.write(body[:10])
            if body == SECRET_LAYER:
                self.secret_asked.set()
                if self.gate is not None:
                    await self.gate.wait()
            await response.write(body[10:])
        return response


async def start(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, registry: Registry,
                app_of: Callable[[Config], web.Application] = make_app, **settings: Any,
                ) -> tuple[TestServer, TestClient]:
    """`registry` served, and a client of `app_of` (the fetcher, or the edge
    app) with cr-proxy's login for it and `settings`."""
    server = await scripted(aiohttp_server, registry.handle)
    client = await aiohttp_client(app_of(config_at(
        tmp_path, endpoints={DOMAIN: f"http://127.0.0.1:{server.port}"}, registries=LOGIN,
        **settings)))
    return server, client


async def pull(client: TestClient, name: str, digest: str) -> bytes:
    """A mirror client's pull (cr-proxy's login), once it is committed:
    the client has its last byte before the commit."""
    pulled = await client.get(f"/v2/{DOMAIN}/{name}/blobs/{digest}")
    assert pulled.status == 200
    body = await pulled.read()
    await client.server.app["fetcher"].ctx.flights.close(grace=60)
    return body


async def pull_secret(client: TestClient, tmp_path: Path) -> None:
    """A mirror client pulls the private repository with cr-proxy's login."""
    assert await pull(client, "lib/secret", SECRET_DIGEST) == SECRET_LAYER
    assert (tmp_path / f"cache/lists/{DOMAIN}/lib/secret/_private").exists()


@pytest.mark.parametrize("name", ["lib/public", "made/up"])
@pytest.mark.parametrize("registry_state", ["refused", "503"])
async def test_a_private_blob_is_served_under_no_other_name_while_its_registry_cannot_say(
    aiohttp_server, aiohttp_client, tmp_path: Path, name: str, registry_state: str,
) -> None:
    """The digest asked for under another repository, with no credential:
    online the registry's 404; unreachable or answering 503, it was the
    private bytes (200, X-Cache: UNNAMED). Now the answer for a digest the
    cache does not hold: 404 offline, the registry's error otherwise."""
    registry = Registry()
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, registry)
    await pull_secret(client, tmp_path)
    online = await client.get(f"/v2/{name}/blobs/{SECRET_DIGEST}", headers=PROXY)
    assert online.status == 404, online.headers.get("X-Cache")  # the registry: not there
    if registry_state == "refused":
        await server.close()
    else:
        registry.status = 503
    own = await client.get(f"/v2/lib/secret/blobs/{SECRET_DIGEST}", headers=PROXY)
    assert own.status == 401  # its own name: private, no credential
    other = await client.get(f"/v2/{name}/blobs/{SECRET_DIGEST}", headers=PROXY)
    body = await other.read()
    assert SECRET_LAYER not in body, other.headers.get("X-Cache")
    assert other.status == (404 if registry_state == "refused" else 502)


async def test_a_public_blob_is_still_served_unnamed_offline(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """Public behaviour unchanged: a digest of a public repository, asked
    for under another name while the registry is down, is served from the
    cache unnamed (no name made)."""
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, Registry())
    assert await pull(client, "lib/public", PUBLIC_DIGEST) == PUBLIC_LAYER
    await server.close()
    other = await client.get(f"/v2/{DOMAIN}/lib/other/blobs/{PUBLIC_DIGEST}")
    assert other.status == 200 and await other.read() == PUBLIC_LAYER
    assert other.headers["X-Cache"] == "UNNAMED"
    assert not (tmp_path / f"cache/content/{DOMAIN}/v2/lib/other/blobs/{PUBLIC_DIGEST}").exists()


async def test_a_reader_of_another_name_never_joins_a_private_download(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """While the private layer downloads, the same digest under another
    repository: it joined that download (one per registry and digest) and
    got its bytes as they came; now it is a download of its own, which
    the registry answers 404."""
    registry = Registry()
    registry.gate = asyncio.Event()
    _, client = await start(aiohttp_server, aiohttp_client, tmp_path, registry)
    private = asyncio.create_task(client.get(f"/v2/{DOMAIN}/lib/secret/blobs/{SECRET_DIGEST}"))
    await asyncio.wait_for(registry.secret_asked.wait(), 10)
    other = asyncio.create_task(client.get(f"/v2/made/up/blobs/{SECRET_DIGEST}",
                                           headers=PROXY))
    await asyncio.wait({other}, timeout=2)  # joined, it waits for the gate
    registry.gate.set()
    answer = await other
    body = await answer.read()
    assert SECRET_LAYER not in body, answer.headers.get("X-Cache")
    assert answer.status == 404
    pulled = await private
    assert pulled.status == 200 and await pulled.read() == SECRET_LAYER


async def test_a_cache_from_before_the_marks_is_marked_at_start(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """Blobs an older cr-proxy stored under a private repository have no
    mark of their own: the fetcher's start-up marks every blob named under
    a marked repository."""
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, Registry())
    await pull_secret(client, tmp_path)
    marks = tmp_path / "cache/private"
    shutil.rmtree(marks, ignore_errors=True)  # as an older cr-proxy left it
    endpoint = f"http://127.0.0.1:{server.port}"
    await server.close()
    restarted = await aiohttp_client(make_app(config_at(
        tmp_path, endpoints={DOMAIN: endpoint}, registries=LOGIN)))
    other = await restarted.get(f"/v2/made/up/blobs/{SECRET_DIGEST}", headers=PROXY)
    assert SECRET_LAYER not in await other.read(), other.headers.get("X-Cache")
    assert other.status == 404
    assert Store(tmp_path / "cache").is_private_blob(SECRET_DIGEST)


# --- the store: marks made before the blob, removed after it ----------------------

SECRET_PATH = f"v2/lib/secret/blobs/{SECRET_DIGEST}"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    made = Store(tmp_path / "cache")
    made.prepare()
    made.mark_private(DOMAIN, "lib/secret", True)
    return made


def commit(store: Store, data: bytes, digest: str, path: str, named: bool = True) -> Path:
    writer = store.blob_writer(digest)
    writer.write(data)
    writer.verify(len(data))
    return store.commit_blob(writer, DOMAIN, path, named=named)


def test_a_private_repositorys_blob_is_marked_and_a_public_ones_is_not(store: Store) -> None:
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    commit(store, PUBLIC_LAYER, PUBLIC_DIGEST, f"v2/lib/public/blobs/{PUBLIC_DIGEST}")
    assert store.has_blob(SECRET_DIGEST) and store.is_private_blob(SECRET_DIGEST)
    assert not store.has_public_blob(SECRET_DIGEST)
    assert store.has_public_blob(PUBLIC_DIGEST) and not store.is_private_blob(PUBLIC_DIGEST)
    assert store.linked(SECRET_DIGEST, DOMAIN, SECRET_PATH) is not None


def test_bytes_kept_from_an_unnamed_answer_are_not_marked(store: Store) -> None:
    """A peer's or parent's UNNAMED answer keeps the bytes only: a node
    answers so only for a digest it holds for no private repository, and a
    mark would keep them from the very name they were fetched for (its
    upstream's yes links them: test_unnamed_private_bytes.py)."""
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH, named=False)
    assert store.has_blob(SECRET_DIGEST) and not store.is_private_blob(SECRET_DIGEST)
    assert store.linked(SECRET_DIGEST, DOMAIN, SECRET_PATH) is None


def test_a_crash_before_the_blob_is_stored_leaves_its_mark(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mark is made first: a crash at the blob's rename leaves a mark
    with no blob (a digest never stored: harmless), never the reverse."""
    blob = store.tree.blob(SECRET_DIGEST)
    rename = os.replace

    def crash_at_the_blob(source: Path, target: Path) -> None:
        if Path(target) == blob:
            raise KeyboardInterrupt("power cut")
        rename(source, target)

    monkeypatch.setattr(store_module.os, "replace", crash_at_the_blob)
    with pytest.raises(KeyboardInterrupt):
        commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    assert store.is_private_blob(SECRET_DIGEST) and not store.has_blob(SECRET_DIGEST)


def test_a_mark_outlives_its_blob_until_the_next_start(store: Store) -> None:
    """Eviction, `rm` and `verify` take the blob and leave its mark: a
    commit of the digest may be racing them. The next start, before any
    commit runs, drops the marks of blobs no longer stored."""
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    removed = remove_blobs(store, Scan.of(store.tree), [SECRET_DIGEST])  # the evictor's
    assert removed.blobs == (SECRET_DIGEST,)
    assert not store.has_blob(SECRET_DIGEST) and store.is_private_blob(SECRET_DIGEST)
    store.mark_private_blobs()  # the next start
    assert not store.is_private_blob(SECRET_DIGEST)
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    assert store.quarantine(SECRET_DIGEST) is not None  # verify's
    assert store.is_private_blob(SECRET_DIGEST)
    store.mark_private_blobs()
    assert not store.is_private_blob(SECRET_DIGEST)


@pytest.mark.parametrize("crash", [False, True])
def test_a_commit_racing_a_removal_leaves_the_blob_marked_even_if_it_crashes(
    store: Store, monkeypatch: pytest.MonkeyPatch, crash: bool,
) -> None:
    """The removal takes the blob; a pull of the digest commits it again
    (its mark already there: nothing to make), and with `crash` power is
    cut before its second mark. The removal took no mark, so the blob
    stored is marked (found by the review of session 14: removals dropped
    marks then)."""
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    blob = store.tree.blob(SECRET_DIGEST)
    inode = blob.stat().st_ino
    unlink, mark = store_module.unlink_if, Store.mark_private_blob
    marks = [0]

    def crashing_mark(self: Store, digest: str) -> None:
        marks[0] += 1
        if marks[0] == 2:  # the commit's second mark, after its rename
            raise KeyboardInterrupt("power cut")
        mark(self, digest)

    def commit_between(path: Path, inode: int | None = None) -> bool:
        removed = unlink(path, inode)
        if path == blob and crash:
            monkeypatch.setattr(Store, "mark_private_blob", crashing_mark)
            with pytest.raises(KeyboardInterrupt):
                commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
        elif path == blob:
            commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
        return removed

    monkeypatch.setattr(store_module, "unlink_if", commit_between)
    assert store.remove_blob(SECRET_DIGEST, inode)
    monkeypatch.undo()
    store.mark_private_blobs()  # the restart
    assert store.has_blob(SECRET_DIGEST) and store.is_private_blob(SECRET_DIGEST)


def test_a_private_blob_is_named_by_no_upstreams_word(store: Store) -> None:
    """A HEAD's 200 or a mount's 201 (a registry any client names says yes
    to anything) links a public digest to a new name, never a private one."""
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    commit(store, PUBLIC_LAYER, PUBLIC_DIGEST, f"v2/lib/public/blobs/{PUBLIC_DIGEST}")
    assert store.link_if_stored(SECRET_DIGEST, "evil.test", f"v2/x/blobs/{SECRET_DIGEST}") \
        is None
    assert not store.has_content("evil.test", f"v2/x/blobs/{SECRET_DIGEST}")
    assert store.link_if_stored(PUBLIC_DIGEST, "evil.test", f"v2/x/blobs/{PUBLIC_DIGEST}") \
        is not None


def test_a_repository_marked_private_marks_the_blobs_named_under_it(store: Store) -> None:
    """Pulled while it looked public, then found private: its blobs too."""
    path = f"v2/lib/late/blobs/{PUBLIC_DIGEST}"
    commit(store, PUBLIC_LAYER, PUBLIC_DIGEST, path)
    assert store.has_public_blob(PUBLIC_DIGEST)
    store.mark_private(DOMAIN, "lib/late", True)
    assert store.is_private_blob(PUBLIC_DIGEST)


def test_start_up_marks_the_blobs_of_every_private_repository_and_skips_stray_names(
    store: Store,
) -> None:
    commit(store, SECRET_LAYER, SECRET_DIGEST, SECRET_PATH)
    shutil.rmtree(store.root / "private")  # as an older cr-proxy left it
    stray = store.root / "lists" / "Not A Host" / "x" / "_private"  # made by hand
    stray.parent.mkdir(parents=True)
    stray.write_text("private\n")
    assert store.mark_private_blobs() == 1
    assert store.is_private_blob(SECRET_DIGEST)
