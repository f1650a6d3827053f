"""Hostile answers to the OCI reads (manifests, tag lists, referrers,
token answers), at the parsers and through the fetcher in-process
(make_app) against a scripted upstream for up.test: a clear registry
error, never a 500 or unbounded memory, and never one name's answer for
another. Each case was a review finding of session 13 (docs/reliability.md,
bug 31)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from aiohttp import web

from cr_proxy.errors import ManifestInvalid, UpstreamError
from cr_proxy.oci.manifest import manifest_media_type, parse
from cr_proxy.oci.referrers import parse_referrers
from cr_proxy.oci.tags import parse_tag_list
from tests.inprocess import fetcher

DOMAIN = "up.test"
D = "sha256:" + "a" * 64
IMAGE = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 2}
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D, "size": 3}
ENTRY = {"mediaType": IMAGE, "digest": "sha256:" + "b" * 64, "size": 9,
         "platform": {"os": "linux", "architecture": "amd64"}}
DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under every size limit


# --- manifests ------------------------------------------------------------------------

# CVE-2021-41190 / GHSA-mc8v-mgrf-8f4m (distribution's fix, Nov 2021): a
# document that is both a manifest and an index, read one way by the proxy
# and another by a client.
@pytest.mark.parametrize("doc, content_type", [
    ({"schemaVersion": 2, "mediaType": IMAGE, "config": CONFIG, "layers": [LAYER],
      "manifests": [ENTRY]}, IMAGE),
    ({"schemaVersion": 2, "mediaType": INDEX, "manifests": [ENTRY],
      "config": CONFIG, "layers": [LAYER]}, INDEX),
    ({"schemaVersion": 2, "config": CONFIG, "layers": [LAYER], "manifests": [ENTRY]},
     "application/json"),
], ids=["image-with-manifests", "index-with-config-layers", "no-mediatype-both"])
def test_an_ambiguous_manifest_is_refused(doc, content_type) -> None:
    body = json.dumps(doc).encode()
    try:
        kind = manifest_media_type(body, content_type)
    except ManifestInvalid:
        return
    pytest.fail(f"stored as {kind}; parse() reads {parse(body, kind)}")


# Two mediaType keys (Go's encoding/json also matches "MediaType" to the
# field, case-insensitively, and keeps the last; Python reads only the
# exact key).
def test_duplicate_or_case_variant_media_type_is_refused() -> None:
    body = (b'{"schemaVersion": 2, "mediaType": "' + INDEX.encode() + b'", "manifests": [], '
            b'"MediaType": "' + IMAGE.encode() + b'", "config": ' + json.dumps(CONFIG).encode()
            + b', "layers": []}')
    with pytest.raises(ManifestInvalid):
        manifest_media_type(body, "application/json")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_manifest_that_is_not_utf8_is_refused(encoding) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": IMAGE, "config": CONFIG,
                       "layers": [LAYER]}).encode(encoding)
    with pytest.raises(ManifestInvalid):
        manifest_media_type(body, IMAGE)


@pytest.mark.parametrize("tags", [{}, "", False, 0])
def test_tags_of_the_wrong_shape_are_refused(tags) -> None:
    body = json.dumps({"name": "a/b", "tags": tags}).encode()
    with pytest.raises(UpstreamError):
        parse_tag_list(body, "a/b", None)


@pytest.mark.parametrize("manifests", [{}, "", False, 0])
def test_referrers_manifests_of_the_wrong_shape_are_refused(manifests) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}).encode()
    with pytest.raises(UpstreamError):
        parse_referrers(body, "r")


def test_a_duplicate_key_is_refused() -> None:
    body = (b'{"schemaVersion": 2, "mediaType": "' + IMAGE.encode() + b'", "config": '
            + json.dumps(CONFIG).encode() + b', "layers": [], "layers": '
            + json.dumps([LAYER]).encode() + b"}")
    with pytest.raises(ManifestInvalid):
        manifest_media_type(body, IMAGE)


def test_a_plain_manifest_and_index_still_pass() -> None:
    image = json.dumps({"schemaVersion": 2, "mediaType": IMAGE, "config": CONFIG,
                        "layers": [LAYER], "annotations": {"a": "1", "A": "2"}}).encode()
    assert manifest_media_type(image, IMAGE) == IMAGE
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [ENTRY]}).encode()
    assert manifest_media_type(index, "application/json") == INDEX
    assert parse(index, INDEX).entries[0].digest == ENTRY["digest"]


# --- tag lists, referrers and token answers from the wire --------------------------


async def deep_answers(request: web.Request) -> web.StreamResponse:
    if request.path.endswith("/tags/list"):
        return web.Response(body=b'{"name": "lib/app", "tags": ["v1"], "x": ' + DEEP + b"}",
                            content_type="application/json")
    if "/referrers/" in request.path:
        return web.Response(body=b'{"schemaVersion": 2, "mediaType": "' + INDEX.encode()
                            + b'", "manifests": [], "x": ' + DEEP + b"}", content_type=INDEX)
    if request.path == "/token":
        return web.Response(body=DEEP, content_type="application/json")
    return web.json_response({})


@pytest.mark.parametrize("path", ["/v2/up.test/lib/app/tags/list",
                                  f"/v2/up.test/lib/app/referrers/{D}"])
async def test_json_nested_past_the_stack_is_a_registry_error(
    aiohttp_server, aiohttp_client, tmp_path: Path, path: str,
) -> None:
    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, deep_answers)
    response = await client.get(path)
    text = await response.text()
    assert response.status == 502, text[:200]
    assert json.loads(text)["errors"][0]["code"] == "UPSTREAM_ERROR"


async def test_a_token_answer_nested_past_the_stack_is_relayed_not_a_500(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """https_proxy mode: a token request with a Basic credential, whose
    answer is parsed to bind its token."""
    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, deep_answers)
    response = await client.get(
        "/token?service=up.test&scope=repository:lib/app:pull",
        headers={"Host": DOMAIN, "X-CR-Mode": "https_proxy", "X-CR-Port": "443",
                 "X-CR-Scheme": "https", "Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status == 200 and await response.read() == DEEP


async def test_one_sha512_subjects_referrers_are_not_anothers(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """Two sha512 subjects sharing their first 64 hex digits: stored (and
    their fetches merged) under the tag schema's 64-hex cut, the second
    was answered the first one's referrers (a signature list planted
    under a made-up subject would hide a real image's)."""
    prefix = "sha512:" + "ab" * 32
    first, second = prefix + "1" * 64, prefix + "2" * 64
    signature = {"mediaType": IMAGE, "digest": "sha256:" + "c" * 64, "size": 100,
                 "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"}
    asked: list[str] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        if "/referrers/" not in request.path:
            return web.json_response({})  # the /v2/ probe
        asked.append(request.path)
        manifests = [signature] if request.path.endswith(first) else []
        return web.json_response({"schemaVersion": 2, "mediaType": INDEX,
                                  "manifests": manifests}, content_type=INDEX)

    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry)
    answer = await client.get(f"/v2/{DOMAIN}/lib/app/referrers/{first}")
    assert json.loads(await answer.read())["manifests"] == [signature]
    answer = await client.get(f"/v2/{DOMAIN}/lib/app/referrers/{second}")
    assert json.loads(await answer.read())["manifests"] == []
    assert asked == [f"/v2/lib/app/referrers/{first}", f"/v2/lib/app/referrers/{second}"]


async def test_referrers_pages_stop_once_the_answer_is_too_large(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """Every page under the limit, each one naming a next: no page past
    the limit is asked for (16 were, about 600 MiB held for one request)."""
    annotations = {f"{i:x}": "" for i in range(380_000)}
    page = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": "a/b", "digest": "sha256:" + "b" * 64, "size": 1,
         "annotations": annotations}]}, separators=(",", ":")).encode()  # 4.1 MB
    pages: list[str] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        if "/referrers/" not in request.path:
            return web.json_response({})  # the /v2/ probe
        pages.append(request.query_string)
        link = f'<{request.path}?page={len(pages)}>; rel="next"'
        return web.Response(body=page, content_type=INDEX, headers={"Link": link})

    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry)
    response = await client.get(f"/v2/{DOMAIN}/lib/app/referrers/{D}")
    assert response.status == 502
    assert len(pages) == 2  # the second page's bytes alone pass the limit


async def test_the_upstream_is_asked_for_bytes_as_they_are(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """aiohttp asks for gzip unless told; a registry (or its CDN) that
    honours it sent bytes the tag list's check could not read."""
    seen: list[str | None] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        if not request.path.endswith("/tags/list"):
            return web.json_response({})  # the /v2/ probe
        seen.append(request.headers.get("Accept-Encoding"))
        body = json.dumps({"name": "lib/app", "tags": ["v1"]}).encode()
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(body), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        return web.Response(body=body, content_type="application/json")

    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry)
    response = await client.get(f"/v2/{DOMAIN}/lib/app/tags/list")
    assert response.status == 200, await response.text()
    assert seen == ["identity"]
