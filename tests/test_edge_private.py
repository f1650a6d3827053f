"""Review s14b: a module resolved by the edge route (/artifacts/ on the
mirror ports, and MQTT: cr_proxy/edge/resolve.py) goes through
Manifests.lookup and Blobs.ensure directly, never through
Privacy.learn: a private repository's manifest and layer are stored,
named under the repository, with no private mark on the repository
nor on the digests. nginx's https_proxy blob location then serves the
hit to anyone (no _private file), and offline the fetcher serves the
layer to a client with no credential, under its own name and (unnamed)
under any other."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aiohttp import web

from cr_proxy.cache.store import Store
from cr_proxy.edge.http import make_app as make_edge_app
from tests import test_private_blobs as private_blobs
from tests.test_private_blobs import DOMAIN, PROXY, SECRET_DIGEST, SECRET_LAYER

IMAGE = "application/vnd.oci.image.manifest.v1+json"
WASM = "application/vnd.wasm.content.layer.v1+wasm"
CONFIG = b"{}"
CONFIG_DIGEST = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
MODULE_MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": IMAGE,
    "config": {"mediaType": "application/vnd.wasm.config.v1+json", "digest": CONFIG_DIGEST,
               "size": len(CONFIG)},
    "layers": [{"mediaType": WASM, "digest": SECRET_DIGEST, "size": len(SECRET_LAYER)}],
}).encode()
MODULE_DIGEST = "sha256:" + hashlib.sha256(MODULE_MANIFEST).hexdigest()


class Registry(private_blobs.Registry):
    """test_private_blobs' registry (lib/secret readable by the token
    "good" only), with a module manifest lib/secret:v1."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.status is None and request.headers.get("Authorization") == "Bearer good" \
                and request.path in ("/v2/lib/secret/manifests/v1",
                                     f"/v2/lib/secret/manifests/{MODULE_DIGEST}"):
            return web.Response(body=MODULE_MANIFEST, headers={
                "Content-Type": IMAGE, "Docker-Content-Digest": MODULE_DIGEST})
        return await super().handle(request)


async def test_a_private_module_resolved_by_the_edge_is_marked_private(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    server, client = await private_blobs.start(aiohttp_server, aiohttp_client, tmp_path,
                                               Registry(), make_edge_app)
    # An edge device asks for the module on the mirror port (cr-proxy's login).
    module = await client.get(f"/artifacts/{DOMAIN}/lib/secret:v1")
    assert module.status == 200, await module.text()
    await client.server.app["fetcher"].ctx.flights.close(grace=60)
    store = Store(tmp_path / "cache")
    assert store.has_content(DOMAIN, f"v2/lib/secret/blobs/{SECRET_DIGEST}")
    # The registry answers anonymously with 401 for lib/secret: a mirror
    # client's pull of it marks it (test_private_blobs.pull_secret).
    marked = store.is_private(DOMAIN, "lib/secret")
    layer_marked = store.is_private_blob(SECRET_DIGEST)
    # What an https_proxy client with no credential gets once the registry
    # cannot be asked (online, nginx serves the named hit itself: no mark).
    await server.close()
    own = await client.get(f"/v2/lib/secret/blobs/{SECRET_DIGEST}", headers=PROXY)
    own_body = await own.read()
    other = await client.get(f"/v2/made/up/blobs/{SECRET_DIGEST}", headers=PROXY)
    other_body = await other.read()
    seen = (marked, layer_marked, own.status, SECRET_LAYER in own_body,
            other.status, other.headers.get("X-Cache"), SECRET_LAYER in other_body)
    assert seen == (True, True, 401, False, 404, None, False), seen
