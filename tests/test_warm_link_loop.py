"""Bug 40 (found by the review of session 14): FetcherClient.tag_list follows
the fetcher's Link up to MAX_TAG_PAGES with no check that paging moves on.
The Link is rebuilt from the registry's own (tags.next_page): a registry
whose Link names the same page again (its `last` never moving past the
tags it sent) gets the same forced query (X-CR-Revalidate: every one goes
upstream) 99 times per repository per warm."""

from __future__ import annotations

from aiohttp import web

from cr_proxy.ops.warm import warm
from tests.test_warm import Quiet, fake  # noqa: F401  (the fixture)


async def test_a_link_that_names_a_page_already_asked_ends_the_paging(fake) -> None:  # noqa: F811
    fetcher, conf = fake

    def same_page_again(request: web.Request, tail: str) -> web.Response:
        fetcher.tag_queries.append(request.query_string)
        return web.json_response({"name": tail, "tags": ["a"]}, headers={
            "Link": f'<{request.path}?n=1&last=a>; rel="next"'})

    fetcher._tag_list = same_page_again  # type: ignore[method-assign]
    summary = await warm(conf, ["registry.test/one:v1"], progress=Quiet(), referrers=True)
    assert summary.failures == []
    assert len(fetcher.tag_queries) <= 2, (len(fetcher.tag_queries), fetcher.tag_queries[:3])
