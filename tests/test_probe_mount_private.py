"""Review s14b: a push probe (a HEAD of a blob from a push.allow_clients
address) of a digest the cache holds under a private repository mounts
it from there into the probed repository upstream, with cr-proxy's own
login (Pushes._ask_upstream: held.holders() lists every repository the
tree names the digest in, private ones too; _mount asks pull on the
source with `registries:`'s credential). A client that may not read
lib/secret (mirror_auth: no rule grants it; pull-public) gets its
layer copied into lib/public, which it then pulls: from the registry,
and from the cache."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from tests import test_private_blobs as private_blobs
from tests.test_private_blobs import DOMAIN, SECRET_DIGEST, SECRET_LAYER, pull_secret


class Registry(private_blobs.Registry):
    """lib/secret as in test_private_blobs; lib/public open to anyone,
    and a registry's mount: a token that may pull the source copies the
    blob into the target."""

    def __init__(self) -> None:
        super().__init__()
        self.public: set[str] = set()
        self.mounts: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.method == "POST" and path == "/v2/lib/public/blobs/uploads/":
            self.mounts.append(request.query_string)
            if request.query.get("from") == "lib/secret" and \
                    request.headers.get("Authorization") == "Bearer good":
                self.public.add(request.query["mount"])
                return web.Response(status=201, headers={
                    "Location": f"/v2/lib/public/blobs/{request.query['mount']}"})
            return web.Response(status=202, headers={"Location": "/v2/lib/public/blobs/"
                                                                 "uploads/u1"})
        if path == f"/v2/lib/public/blobs/{SECRET_DIGEST}" and SECRET_DIGEST in self.public:
            return await self._layer(request, SECRET_LAYER, SECRET_DIGEST)
        return await super().handle(request)


async def test_a_push_probe_mounts_no_private_blob_into_another_repository(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    registry = Registry()
    _, client = await private_blobs.start(aiohttp_server, aiohttp_client, tmp_path, registry,
                                          push={"enabled": True})
    await pull_secret(client, tmp_path)  # an entitled mirror client's pull
    # bob, on a push.allow_clients address, with no grant for lib/secret:
    # nginx lets his HEAD of lib/public (public) through to the fetcher.
    probe = await client.head(f"/v2/{DOMAIN}/lib/public/blobs/{SECRET_DIGEST}",
                              headers={"X-Forwarded-For": "127.0.0.1"})
    got = await client.get(f"/v2/{DOMAIN}/lib/public/blobs/{SECRET_DIGEST}")
    body = await got.read()
    seen = (probe.status, registry.mounts, got.status, SECRET_LAYER in body)
    assert not registry.mounts and SECRET_LAYER not in body, repr(seen)
