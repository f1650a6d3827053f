"""Tag lists: GET and HEAD of /v2/<name>/tags/list[?n=<n>&last=<tag>].

Fetched with cr-proxy's own login (Upstream.registry: a client's own
token first in https_proxy mode, else ours), so a mirror client needs
none; stored per query and served by listings.py's policy (fresh for
tag_ttl, then upstream-first, stale when the upstream fails). The list is
the upstream's, not what the cache happens to hold: paging follows the
upstream's Link, re-made on the client's own path; redirects are followed
(registry.k8s.io), and the list must name the repository it was sent for.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from cr_proxy.cache.layout import Kind, Target, mirror_ns
from cr_proxy.errors import NotFound
from cr_proxy.fetch.context import API_HEADERS, FetchContext, client_auth, in_thread, read_bounded
from cr_proxy.fetch.listings import Listed, Listing, Listings, check_status, forced
from cr_proxy.oci.tags import (
    MAX_TAG_LIST,
    TagPage,
    TagQuery,
    listed_name,
    parse_stored,
    parse_tag_list,
)


class Tags:
    __slots__ = ("ctx", "listings")

    def __init__(self, ctx: FetchContext, listings: Listings) -> None:
        self.ctx = ctx
        self.listings = listings

    def __repr__(self) -> str:
        return f"<Tags {self.listings!r}>"

    async def get(self, request: web.Request, target: Target) -> web.Response:
        query = TagQuery.parse(request.query.get("n"), request.query.get("last"))
        name = target.rpath.name
        auth = client_auth(request)
        listed = await self.listings.get(
            _listing(target, query), lambda: self._fetch(target, query, auth),
            lambda body: parse_stored(body, name), forced(request),
            stand_in=lambda: self._cut_from_whole(target, query),
        )
        return await _answer(request, name, listed)

    async def cached(self, request: web.Request, target: Target) -> web.Response | None:
        """The stored page answered as get() answers it, asking no one
        (listings.py's `cached`); None when none is stored."""
        query = TagQuery.parse(request.query.get("n"), request.query.get("last"))
        name = target.rpath.name
        listed = await self.listings.cached(
            _listing(target, query), lambda body: parse_stored(body, name),
            stand_in=lambda: self._cut_from_whole(target, query))
        return None if listed is None else await _answer(request, name, listed)

    async def _fetch(self, target: Target, query: TagQuery, auth: str | None) -> bytes:
        """The upstream's page, checked, as it is stored. Redirects are
        followed (registry.k8s.io sends tags/list to Artifact Registry): the
        list must then name the repository of the last hop's path."""
        upstream = self.ctx.upstream
        opened = await upstream.open(
            "GET", target, headers={"Accept": "application/json"}, client_auth=auth,
            query=urlencode(query.params()),
        )
        name = target.rpath.name
        async with opened.response as response:
            check_status(response, target, NotFound(
                "NAME_UNKNOWN", f"repository {name} not found on {target.domain}"))
            with upstream.rate_guard(response.content):
                body = await read_bounded(
                    response, MAX_TAG_LIST, f"{target.domain}: the tag list of {name}")
            link = response.headers.get("Link")
        if opened.hops:
            name = listed_name(opened.hops[-1].target_path) or name
        page = await in_thread(parse_tag_list, body, name, link)
        # Stored and served under the name the client asked for.
        return TagPage(target.rpath.name, page.tags, page.next).stored()


    def _cut_from_whole(self, target: Target, query: TagQuery) -> tuple[bytes, float] | None:
        """The page `query` asks for, cut from a stored whole list (a page
        asked from the start, with no next: every tag), as a registry pages
        one (tags in lexical order, the spec's; those after `last`, at most
        `n`, a next page when more are left); the newest whole list's time.
        None when no whole list is stored. Blocking."""
        name = target.rpath.name
        whole: tuple[TagPage, float] | None = None
        for file_name in self.ctx.store.listing_queries(target.domain, name, Kind.TAGS):
            stored_query = TagQuery.from_file_name(file_name)
            if stored_query is None or stored_query.last is not None:
                continue
            stored = self.listings.read(_listing(target, stored_query),
                                        lambda body: parse_stored(body, name))
            if stored is None:
                continue
            page = parse_stored(stored[0], name)
            # Whole: no next page, and not cut short by its own n (n=0 is
            # an empty page with no next, distribution's answer to it).
            complete = stored_query.n is None or len(page.tags) < stored_query.n
            if page.next is None and complete and (whole is None or stored[1] > whole[1]):
                whole = (page, stored[1])
        if whole is None:
            return None
        return whole[0].cut(query).stored(), whole[1]


def _listing(target: Target, query: TagQuery) -> Listing:
    name = target.rpath.name
    return Listing(target.domain, name, Kind.TAGS, query.file_name, f"the tag list of {name}")


async def _answer(request: web.Request, name: str, listed: Listed) -> web.Response:
    """The client's page of a stored list, its Link (if any) on the
    client's own path (a mirror's prefix, its ns= too)."""
    page = await in_thread(parse_stored, listed.body, name)
    headers = {"Content-Type": "application/json", **listed.headers(), **API_HEADERS}
    if page.next is not None:
        # As the target was read, then encoded once by urlencode.
        ns = mirror_ns(request.rel_url.raw_query_string)
        params = [("ns", ns)] if ns else []
        params += page.next.params()
        headers["Link"] = f'<{request.path}?{urlencode(params)}>; rel="next"'
    return web.Response(body=page.list_body(), headers=headers)
