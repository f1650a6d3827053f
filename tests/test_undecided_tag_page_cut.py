"""Bug 40 (found by the review of session 14): the stand-in (a page cut from
a stored whole list) is in Listings.get only; bug 37's undecided path
(_from_the_cache_only -> Tags.cached -> Listings.cached) never cuts. With
a `registries:` login (every miss of an unmarked repository asks the
privacy check once private.verdict_ttl passed) a registry answering 503
gets a 502 for `?n=2`, while the same registry and cache without a login
gets the cut page (200, STALE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.inprocess import fetcher
from tests.test_undecided_listings import CREDS, MIRROR, Registry


@pytest.mark.parametrize("login", [False, True], ids=["no-login", "registries-login"])
async def test_a_page_never_asked_is_cut_from_the_whole_list_while_the_registry_fails(
    aiohttp_server, aiohttp_client, tmp_path: Path, login: bool,
) -> None:
    registry = Registry()
    settings = {"registries": CREDS} if login else {}
    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry.handle,
                           tag_ttl=0, private={"verdict_ttl": 0}, **settings)
    whole = await client.get(f"{MIRROR}/tags/list")
    assert whole.status == 200 and "Link" not in whole.headers
    registry.failing = True  # 503 to everything, the privacy check included
    page = await client.get(f"{MIRROR}/tags/list?n=2")
    assert page.status == 200, await page.text()
    assert page.headers["X-Cache"] == "STALE"
    assert await page.json() == {"name": "lib/app", "tags": ["a", "b"]}
