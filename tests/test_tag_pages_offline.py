"""A tag list is stored per query; offline, a query never asked before is
answered from a stored whole list (a page from the start with no next:
every tag), cut as a registry pages it, marked stale; online the registry
answers it (docs/reliability.md, bug 40). In-process (make_app) against a
scripted registry that is then closed (connections refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from cr_proxy.fetch.app import make_app
from cr_proxy.oci.reference import is_tag
from cr_proxy.oci.tags import TagPage, TagQuery
from tests.inprocess import config_at, scripted

TAGS = ["a", "b", "c", "d", "e"]
BASE = "/v2/up.test/lib/app/tags/list"


class Registry:
    """lib/app's tags/list, paged by n and last as distribution pages it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.asked.append(request.path_qs)
        if request.path != "/v2/lib/app/tags/list":
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        tags = [t for t in TAGS if t > request.query.get("last", "")]
        n = int(request.query.get("n", len(tags)))
        headers = {}
        if len(tags) > n:
            tags = tags[:n]
            if tags:
                headers["Link"] = f'</v2/lib/app/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return web.json_response({"name": "lib/app", "tags": tags}, headers=headers)


async def _mirror(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path,
                  registry: Registry) -> tuple[Any, Any]:
    server = await scripted(aiohttp_server, registry.handle)
    client = await aiohttp_client(make_app(config_at(
        tmp_path, endpoints={"up.test": f"http://127.0.0.1:{server.port}"}, tag_ttl=0)))
    return server, client


async def _answer(client: Any, query: str) -> tuple[int, Any, str | None]:
    response = await client.get(BASE + query)
    body = await response.json() if response.status == 200 else await response.text()
    return response.status, body, response.headers.get("Link")


@pytest.mark.parametrize("stored, asked", [
    ("", "?n=1000"),        # the whole list, then a client that pages by 1000
    ("?n=1000", ""),        # a page of 1000 with no next is the whole list
    ("", "?n=2&last=b"),    # the whole list, then a page of it (with a next)
    ("", "?n=2&last=d"),    # ...and its last page
], ids=["whole-then-n", "n-then-whole", "whole-then-page", "whole-then-last-page"])
async def test_a_stored_whole_list_answers_any_page_offline_as_the_registry_would(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, stored: str, asked: str,
) -> None:
    registry = Registry()
    server, client = await _mirror(aiohttp_server, aiohttp_client, tmp_path / "online", registry)
    online = await _answer(client, asked)  # what the registry says, for comparison
    await server.close()
    # The same cache state with only `stored` asked: a second mirror.
    registry = Registry()
    server, client = await _mirror(aiohttp_server, aiohttp_client, tmp_path / "one", registry)
    first = await client.get(BASE + stored)
    assert first.status == 200 and "Link" not in first.headers  # a whole list
    await server.close()

    response = await client.get(BASE + asked)
    assert response.status == 200, await response.text()
    assert response.headers["X-Cache"] == "STALE"
    assert (200, await response.json(), response.headers.get("Link")) == online


async def test_a_page_is_never_cut_from_a_list_that_is_not_whole(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path,
) -> None:
    """A first page with a next holds some tags only: cutting from it could
    leave tags out; offline, another query is the usual offline 404."""
    server, client = await _mirror(aiohttp_server, aiohttp_client, tmp_path, Registry())
    first = await client.get(BASE + "?n=2")
    assert "Link" in first.headers
    await server.close()
    status, body, _ = await _answer(client, "?n=3")
    assert status == 404
    assert "not in the cache" in body


async def test_online_the_registry_answers_a_new_query_though_a_whole_list_is_fresh(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path,
) -> None:
    registry = Registry()
    server = await scripted(aiohttp_server, registry.handle)
    client = await aiohttp_client(make_app(config_at(
        tmp_path, endpoints={"up.test": f"http://127.0.0.1:{server.port}"}, tag_ttl=3600)))
    assert (await client.get(BASE)).status == 200
    response = await client.get(BASE + "?n=2")
    assert response.headers["X-Cache"] == "MISS"
    assert registry.asked == ["/v2/lib/app/tags/list", "/v2/lib/app/tags/list?n=2"]


tags = st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,5}", fullmatch=True).filter(is_tag),
                unique=True, max_size=12)


@given(tags, st.one_of(st.none(), st.integers(0, 14)), st.one_of(st.none(), tags))
def test_paging_a_cut_list_by_its_next_queries_yields_every_tag_after_last_once(
    whole: list[str], n: int | None, lasts: list[str] | None,
) -> None:
    last = lasts[0] if lasts else None
    page = TagPage("lib/app", tuple(whole)).cut(TagQuery(n, last))
    seen = list(page.tags)
    while page.next is not None and n:
        page = TagPage("lib/app", tuple(whole)).cut(page.next)
        seen += page.tags
    expected = sorted(t for t in whole if last is None or t > last)
    assert seen == (expected if n != 0 else [])


@pytest.mark.parametrize("query", [TagQuery(), TagQuery(5), TagQuery(None, "v1.2"),
                                   TagQuery(1000, "latest")])
def test_a_stored_query_is_read_back_from_its_file_name(query: TagQuery) -> None:
    assert TagQuery.from_file_name(query.file_name) == query


@pytest.mark.parametrize("name", ["list,n=010", "list,x=1", "lists", "list,n=1,n=2",
                                  "list,last=", "list,n=99999", ".list.tmp"])
def test_a_file_name_no_query_makes_is_no_query(name: str) -> None:
    assert TagQuery.from_file_name(name) is None
