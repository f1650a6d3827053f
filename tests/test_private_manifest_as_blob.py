"""A private repository's manifest lives in the same digest store as its
layers, and was never marked (docs/reliability.md, bug 39; found by the
review of session 14) (commit_manifest -> put_bytes -> commit ->
commit_verified(private=False)). Asked for as a *blob* under any other
repository, it is served unnamed while the registry cannot say, and linked
under a name on a mere HEAD's 200."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from cr_proxy.fetch.app import make_app
from cr_proxy.oci.reference import digest_of
from tests import test_private_blobs as private_blobs
from tests.inprocess import IMAGE, config_at, image_manifest, scripted
from tests.test_private_blobs import DOMAIN, LOGIN, PROXY

SECRET_MANIFEST = image_manifest(annotations={"secret": "internal build of the private product"})
SECRET_MANIFEST_DIGEST = digest_of(SECRET_MANIFEST)


class Registry(private_blobs.Registry):
    """test_private_blobs' registry, with lib/secret's manifest (to the
    good token only) and, when `yes_to_any_head`, a yes to any blob HEAD."""

    def __init__(self) -> None:
        super().__init__()
        self.yes_to_any_head = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if self.status is None and request.headers.get("Authorization") == "Bearer good" \
                and path in ("/v2/lib/secret/manifests/v1",
                             f"/v2/lib/secret/manifests/{SECRET_MANIFEST_DIGEST}"):
            return web.Response(body=SECRET_MANIFEST, headers={
                "Content-Type": IMAGE, "Docker-Content-Digest": SECRET_MANIFEST_DIGEST})
        if self.status is None and self.yes_to_any_head and request.method == "HEAD" \
                and "/blobs/" in path and not path.startswith("/v2/lib/secret/"):
            return web.Response(headers={"Content-Length": str(len(SECRET_MANIFEST))})
        return await super().handle(request)


async def start(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, registry: Registry):
    server = await scripted(aiohttp_server, registry.handle)
    client = await aiohttp_client(make_app(config_at(
        tmp_path, endpoints={DOMAIN: f"http://127.0.0.1:{server.port}"}, registries=LOGIN)))
    pulled = await client.get(f"/v2/{DOMAIN}/lib/secret/manifests/v1",
                              headers={"Accept": IMAGE})
    assert pulled.status == 200 and await pulled.read() == SECRET_MANIFEST
    assert (tmp_path / f"cache/lists/{DOMAIN}/lib/secret/_private").exists()
    return server, client


async def test_offline_a_private_manifest_is_not_served_as_a_blob_of_another_name(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    registry = Registry()
    server, client = await start(aiohttp_server, aiohttp_client, tmp_path, registry)
    await server.close()
    own = await client.get(f"/v2/lib/secret/manifests/{SECRET_MANIFEST_DIGEST}", headers=PROXY)
    assert own.status == 401  # its own name: private, no credential
    other = await client.get(f"/v2/made/up/blobs/{SECRET_MANIFEST_DIGEST}", headers=PROXY)
    body = await other.read()
    assert SECRET_MANIFEST not in body, (other.status, other.headers.get("X-Cache"))


async def test_a_private_manifest_is_not_linked_under_a_name_on_a_heads_word(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    registry = Registry()
    _, client = await start(aiohttp_server, aiohttp_client, tmp_path, registry)
    registry.yes_to_any_head = True  # a registry any client names says yes to anything
    other = await client.get(f"/v2/made/up/blobs/{SECRET_MANIFEST_DIGEST}", headers=PROXY)
    body = await other.read()
    assert SECRET_MANIFEST not in body, (other.status, other.headers.get("X-Cache"))
    assert not (tmp_path / f"cache/content/{DOMAIN}/v2/made/up/blobs/"
                f"{SECRET_MANIFEST_DIGEST}").exists()
