"""Tag lists and referrers while the registry answers, but not whether a
repository is private (a 5xx or 429 to the anonymous check, private.py's
Undecided), in-process (make_app) against a scripted upstream: served from
the cache as a stale tag is (bug 35), paged and filtered as online, and
nothing fetched. Before, each was a 502 (docs/reliability.md, bug 37).

Two set-ups ask that check on every miss of an unmarked repository once
private.verdict_ttl has passed: a `registries:` login (mirror mode), and
an https_proxy client that sends its own token (any Docker Hub pull does,
anonymous ones too)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cr_proxy.oci.reference import digest_of
from tests.inprocess import IMAGE, fetcher, image_manifest

INDEX = "application/vnd.oci.image.index.v1+json"
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
BODY = image_manifest()
SUBJECT = digest_of(BODY)
SCHEMA_TAG = "sha256-" + SUBJECT.split(":")[1]  # the referrers tag schema's tag
REFERRERS = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
    {"mediaType": IMAGE, "digest": "sha256:" + "c" * 64, "size": 10, "artifactType": SIG},
    {"mediaType": IMAGE, "digest": "sha256:" + "d" * 64, "size": 11, "artifactType": SBOM},
]}).encode()
REFERRERS_DIGEST = "sha256:" + hashlib.sha256(REFERRERS).hexdigest()
TAGS = ["a", "b", "c", "d", "e"]
CREDS = {"up.test": {"username": "bot", "password": "pw"}}
PROXY = {"X-CR-Mode": "https_proxy", "X-CR-Port": "443", "X-CR-Scheme": "https",
         "Host": "up.test"}
MIRROR = "/v2/up.test/lib/app"


class Registry:
    """lib/app of a distribution-like registry: tags/list paged by n and
    last, manifests, referrers by the API or (api=False) by the tag schema;
    every answer a 503 once `failing`."""

    def __init__(self, api: bool = True) -> None:
        self.api = api
        self.failing = False
        self.asked = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.asked += 1
        if self.failing:
            return web.Response(status=503)
        rest = request.path.removeprefix("/v2/lib/app/")
        if rest == "tags/list":
            return self._tags(request)
        if rest.startswith("referrers/") and self.api:
            return web.Response(body=REFERRERS, content_type=INDEX)
        if rest in ("manifests/v1", f"manifests/{SUBJECT}"):
            return _manifest(request, BODY, IMAGE)
        if rest in (f"manifests/{SCHEMA_TAG}", f"manifests/{REFERRERS_DIGEST}") and not self.api:
            return _manifest(request, REFERRERS, INDEX)
        return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)

    @staticmethod
    def _tags(request: web.Request) -> web.Response:
        tags = [t for t in TAGS if t > request.query.get("last", "")]
        headers = {}
        n = int(request.query.get("n", len(tags)))
        if len(tags) > n:
            tags = tags[:n]
            headers["Link"] = f'<{request.path}?n={n}&last={tags[-1]}>; rel="next"'
        return web.json_response({"name": "lib/app", "tags": tags}, headers=headers)


def _manifest(request: web.Request, body: bytes, media_type: str) -> web.Response:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return web.Response(body=body if request.method == "GET" else None,
                        headers={"Content-Type": media_type, "Docker-Content-Digest": digest,
                                 "Content-Length": str(len(body))})


async def mirror(aiohttp_server, aiohttp_client, tmp_path: Path,
                 registry: Registry) -> TestClient:
    """The fetcher in mirror mode with our login for up.test: every request
    of an unmarked repository asks whether it is private (verdict_ttl 0)."""
    return await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry.handle,
                         registries=CREDS, tag_ttl=0, private={"verdict_ttl": 0})


async def answer(client: TestClient, method: str, path: str,
                 headers: dict[str, str] | None = None) -> tuple[int, str | None, bytes]:
    response = await client.request(method, path, headers=headers)
    return response.status, response.headers.get("X-Cache"), await response.read()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_mirror_tags_and_referrers_are_served_stale_like_the_tag(
    aiohttp_server, aiohttp_client, tmp_path: Path, method: str,
) -> None:
    registry = Registry()
    client = await mirror(aiohttp_server, aiohttp_client, tmp_path, registry)
    paths = [f"{MIRROR}/manifests/v1", f"{MIRROR}/tags/list", f"{MIRROR}/referrers/{SUBJECT}"]
    online = {path: (await answer(client, "GET", path))[2] for path in paths}
    registry.failing = True
    asked = registry.asked
    got = {path: await answer(client, method, path) for path in paths}
    body = {path: online[path] if method == "GET" else b"" for path in paths}
    assert got == {path: (200, "STALE", body[path]) for path in paths}
    assert registry.asked == asked + len(paths)  # once each: the privacy check, no fetch


async def test_proxy_client_with_its_own_token_gets_stale_tags(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    registry = Registry()
    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry.handle,
                           tag_ttl=0, private={"verdict_ttl": 0})
    headers = {**PROXY, "Authorization": "Bearer a-real-anonymous-token"}
    paths = ["/v2/lib/app/manifests/v1", "/v2/lib/app/tags/list",
             f"/v2/lib/app/referrers/{SUBJECT}"]
    for path in paths:
        assert (await client.get(path, headers=headers)).status == 200
    registry.failing = True
    got = {path: (await answer(client, "GET", path, headers))[:2] for path in paths}
    assert got == {path: (200, "STALE") for path in paths}


async def test_a_stale_page_keeps_its_link_and_a_filter_still_applies(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """Answered as online: the page's Link made again on the client's own
    path, the artifactType filter applied and said."""
    registry = Registry()
    client = await mirror(aiohttp_server, aiohttp_client, tmp_path, registry)
    page = f"{MIRROR}/tags/list?n=2&last=a"
    filtered = f"{MIRROR}/referrers/{SUBJECT}?artifactType={quote(SIG)}"
    online = [await client.get(path) for path in (page, filtered)]
    registry.failing = True
    stale = [await client.get(path) for path in (page, filtered)]
    assert [r.status for r in stale] == [200, 200]
    assert await stale[0].json() == await online[0].json() == {"name": "lib/app",
                                                                "tags": ["b", "c"]}
    link = f'<{MIRROR}/tags/list?n=2&last=c>; rel="next"'
    assert stale[0].headers["Link"] == online[0].headers["Link"] == link
    assert await stale[1].read() == await online[1].read()
    assert [m["artifactType"] for m in (await stale[1].json())["manifests"]] == [SIG]
    assert stale[1].headers["OCI-Filters-Applied"] == "artifactType"


async def test_referrers_by_the_tag_schema_come_from_the_cached_tag_never_fetched(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """No referrers answer stored, a registry without the API, and its
    `sha256-<hex>` tag pulled by a client: the tag's index answers."""
    registry = Registry(api=False)
    client = await mirror(aiohttp_server, aiohttp_client, tmp_path, registry)
    assert (await client.get(f"{MIRROR}/manifests/{SCHEMA_TAG}")).status == 200
    registry.failing = True
    asked = registry.asked
    response = await client.get(f"{MIRROR}/referrers/{SUBJECT}?artifactType={quote(SBOM)}")
    assert response.status == 200, await response.text()
    assert response.headers["X-Cache"] == "STALE"
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["artifactType"] for m in (await response.json())["manifests"]] == [SBOM]
    assert registry.asked == asked + 1  # the privacy check; the tag was not revalidated


async def test_a_listing_not_in_the_cache_is_the_error_a_manifest_gets(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    registry = Registry()
    client = await mirror(aiohttp_server, aiohttp_client, tmp_path, registry)
    registry.failing = True
    paths = [f"{MIRROR}/manifests/v1", f"{MIRROR}/tags/list", f"{MIRROR}/referrers/{SUBJECT}"]
    for path in paths:
        response = await client.get(path)
        assert response.status == 502, path
        assert "cannot tell whether" in (await response.json())["errors"][0]["message"]
    assert registry.asked == len(paths)
