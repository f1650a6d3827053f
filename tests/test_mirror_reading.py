"""How the fetcher reads a mirror request, in-process (make_app) against a
scripted upstream: as nginx reads it (`?ns=` as containerd writes it),
and what it answers when the registry will not say whether a repository
is private. Regressions of session 13's own fixes, found by its review
(docs/reliability.md, bug 35); nginx's side end to end:
test_e2e_mirror_auth.py."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from yarl import URL

from cr_proxy.cache.layout import ns_registry
from cr_proxy.oci.reference import digest_of
from tests.inprocess import IMAGE, fetcher, image_manifest

BODY = image_manifest()
DIGEST = digest_of(BODY)


def test_ns_of_a_registry_with_a_port_reads_as_containerd_wrote_it() -> None:
    assert ns_registry("reg.test%3A5000") == ns_registry("reg.test%3a5000") == "reg.test:5000"
    assert ns_registry("ghcr.io") == "ghcr.io"
    assert ns_registry("a%2Eb%3A1") == "a%2Eb%3A1"  # nothing else decoded: no host
    assert ns_registry("x%3Aab") == "x%3Aab"


async def test_containerd_reaches_a_registry_with_a_port_through_ns(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """containerd writes ?ns= with Go's url.Values: reg.test:5000 arrives
    as reg.test%3A5000. Read raw (as nginx reads $arg_ns), every such pull
    was a 400."""
    asked: list[str] = []

    async def registry(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(body=BODY, headers={"Content-Type": IMAGE,
                                                "Docker-Content-Digest": DIGEST})

    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry,
                           hosts=["reg.test:5000"])
    response = await client.get(URL("/v2/app/manifests/v1?ns=reg.test%3A5000", encoded=True))
    assert response.status == 200, await response.text()
    assert await response.read() == BODY
    assert "/v2/app/manifests/v1" in asked


async def test_a_stale_tag_is_served_while_the_registry_answers_503_to_its_privacy_check(
    aiohttp_server, aiohttp_client, tmp_path: Path,
) -> None:
    """With a `registries:` login (Docker Hub's usual set-up) every miss of
    an unmarked repository asks the registry anonymously whether it is
    private. A 503 to that is no answer: nothing is fetched, and what the
    cache holds is served as while the registry is down (it was a 502)."""
    down = [False]

    async def registry(request: web.Request) -> web.Response:
        if down[0]:
            return web.Response(status=503)
        if "/manifests/" in request.path:
            return web.Response(body=BODY if request.method == "GET" else None,
                                headers={"Content-Type": IMAGE, "Docker-Content-Digest": DIGEST,
                                         "Content-Length": str(len(BODY))})
        return web.Response(status=404)

    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry,
                           registries={"up.test": {"username": "bot", "password": "pw"}},
                           tag_ttl=0, private={"verdict_ttl": 0})
    first = await client.get("/v2/up.test/lib/app/manifests/v1")
    assert first.status == 200 and await first.read() == BODY
    down[0] = True
    again = await client.get("/v2/up.test/lib/app/manifests/v1")
    assert again.status == 200 and await again.read() == BODY
    assert again.headers["X-Cache"] == "STALE"
    never = await client.get("/v2/up.test/lib/other/manifests/v1")  # nothing cached
    assert never.status == 502
    assert "cannot tell whether" in (await never.json())["errors"][0]["message"]
