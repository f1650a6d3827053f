"""Bug 39 (a regression the review of session 14 found): a peer's UNNAMED
answer for a private repository's blob is committed as bytes only
(blobs.py _fill -> commit_blob(named=False)), and, its path being private,
marked. The name was to wait for its upstream's yes; but a marked digest
is never looked at again for any name without a link (has_public_blob) nor
linked on a yes (link_if_stored): the kept bytes are served to no one, the
very repository they were fetched for included: offline a 404, online a
second download."""

from __future__ import annotations

from pathlib import Path

import pytest

from cr_proxy.cache.store import Store
from cr_proxy.fetch.app import make_app
from tests.inprocess import config_at, scripted
from tests.test_private_blobs import DOMAIN, LOGIN, SECRET_DIGEST, SECRET_LAYER, Registry

SECRET_PATH = f"v2/lib/secret/blobs/{SECRET_DIGEST}"


def kept_as_a_peer_left_it(cache: Path) -> Store:
    """What _fill does with a peer's UNNAMED answer for lib/secret (marked
    private by the privacy check before the miss)."""
    store = Store(cache)
    store.prepare()
    store.mark_private(DOMAIN, "lib/secret", True)
    writer = store.blob_writer(SECRET_DIGEST)
    writer.write(SECRET_LAYER)
    writer.verify(len(SECRET_LAYER))
    try:
        store.commit_blob(writer, DOMAIN, SECRET_PATH, named=False)
    except TypeError:  # the code before 636033c..HEAD: blobs.py called commit_verified
        store.commit_verified(writer)
    return store


class Counting(Registry):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def handle(self, request):  # type: ignore[override]
        if request.method == "GET" and "/blobs/" in request.path:
            self.gets += 1
        return await super().handle(request)


@pytest.mark.parametrize("online", [False, True])
async def test_the_bytes_kept_for_a_private_repository_serve_it_and_are_not_fetched_again(
    aiohttp_server, aiohttp_client, tmp_path: Path, online: bool,
) -> None:
    """Offline they are served; online they are named (a HEAD's yes), not
    downloaded again."""
    kept_as_a_peer_left_it(tmp_path / "cache")
    registry = Counting()
    server = await scripted(aiohttp_server, registry.handle)
    endpoint = f"http://127.0.0.1:{server.port}"
    if not online:
        await server.close()  # the registry unreachable, as it was for the peer
    client = await aiohttp_client(make_app(config_at(
        tmp_path, endpoints={DOMAIN: endpoint}, registries=LOGIN)))
    answer = await client.get(f"/v2/{DOMAIN}/lib/secret/blobs/{SECRET_DIGEST}")
    body = await answer.read()
    assert answer.status == 200 and body == SECRET_LAYER, (answer.status, body[:200])
    assert registry.gets == 0, "downloaded again: the kept bytes were never looked at"
