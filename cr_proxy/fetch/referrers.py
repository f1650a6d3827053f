"""Referrers (OCI 1.1): GET and HEAD of
/v2/<name>/referrers/<digest>[?artifactType=<type>], in both modes.

The answer is an image index of the manifests whose `subject` is the
digest (signatures, attestations, SBOMs). It is asked upstream with our
own login and stored unfiltered per subject (listings.py's way: fresh for
tag_ttl, then upstream-first, stale when the upstream fails). An upstream
without the API answers 404 (CNCF distribution 2.8, Docker Hub): then the
answer is the spec's tag schema, the index the `<alg>-<hex>` tag holds,
fetched and cached as a tag by manifests.py (so the tag itself also pulls
offline), and no tag means no referrers (an empty index). The
`artifactType` filter is always ours, said by `OCI-Filters-Applied`.

Offline with no stored answer, a tag-schema index cached as a tag (pulled
by a client, warmed) still answers. The manifests and blobs an answer
names are cached by the normal paths as clients fetch them.
"""

from __future__ import annotations

import time

from aiohttp import web

from cr_proxy.cache.layout import Kind, RegistryPath, Target
from cr_proxy.errors import NotCached, NotFound, TooLarge, UpstreamError
from cr_proxy.fetch.context import (
    API_HEADERS,
    STALE,
    FetchContext,
    client_auth,
    in_thread,
    read_bounded,
)
from cr_proxy.fetch.listings import (
    STALE_OK_ERRORS,
    Listed,
    Listing,
    Listings,
    check_status,
    forced,
)
from cr_proxy.fetch.manifests import Manifests
from cr_proxy.oci.referrers import (
    FILTER_HEADER,
    INDEX_TYPE,
    MAX_PAGES,
    MAX_REFERRERS,
    Descriptor,
    check_artifact_type,
    next_query,
    parse_referrers,
    referrers_body,
    stored_name,
    tag_schema_tag,
)


class Referrers:
    __slots__ = ("ctx", "listings", "manifests")

    def __init__(self, ctx: FetchContext, listings: Listings, manifests: Manifests) -> None:
        self.ctx = ctx
        self.listings = listings
        self.manifests = manifests

    def __repr__(self) -> str:
        return f"<Referrers {self.listings!r}>"

    async def get(self, request: web.Request, target: Target) -> web.Response:
        artifact_type = check_artifact_type(request.query.get("artifactType"))
        listing = _listing(target)
        auth = client_auth(request)
        try:
            listed = await self.listings.get(
                listing, lambda: self._fetch(request, target, listing, auth),
                lambda body: parse_referrers(body, listing.what), forced(request),
            )
        except STALE_OK_ERRORS as err:
            # Nothing stored, and the upstream failed: the tag schema's
            # index may still be in the cache as a tag.
            listed = await self._from_cached_tag(request, target, err)
        return await _answer(listed, listing.what, artifact_type)

    async def cached(self, request: web.Request, target: Target) -> web.Response | None:
        """The stored answer (listings.py's `cached`), else the tag schema's
        index as the cache holds it (manifests.py's `cached`), answered as
        get() answers it, asking no one; None when neither is stored."""
        artifact_type = check_artifact_type(request.query.get("artifactType"))
        listing = _listing(target)
        listed = await self.listings.cached(
            listing, lambda body: parse_referrers(body, listing.what))
        if listed is None:
            answer = await self.manifests.cached(_tag_target(target))
            if answer is None:
                return None
            listed = _as_listed(answer)
        return await _answer(listed, listing.what, artifact_type)

    async def _fetch(
        self, request: web.Request, target: Target, listing: Listing, auth: str | None
    ) -> bytes:
        """The upstream's answer by the API, else by the tag schema; checked
        and rebuilt, as it is stored."""
        by_api = await self._by_api(target, listing, auth)
        if by_api is not None:
            return by_api
        try:
            answer = await self._tag_index(request, target)
        except NotCached:
            raise
        except NotFound:
            return referrers_body([])  # no tag: no referrers
        if answer.headers.get("X-Cache") == STALE:
            # The tag's revalidation failed: this is not a fresh answer.
            raise UpstreamError(message=f"{target.domain}: the tag schema index of "
                                f"{listing.what} could not be revalidated")
        assert isinstance(answer.body, bytes)
        return referrers_body(await in_thread(parse_referrers, answer.body, listing.what))

    async def _by_api(self, target: Target, listing: Listing, auth: str | None) -> bytes | None:
        """The API's answer, its pages followed (at most MAX_PAGES, whole at
        most MAX_REFERRERS bytes); None when the upstream has no API."""
        descriptors: list[Descriptor] = []
        query = ""
        received = 0  # the pages' bytes: past MAX_REFERRERS, no next page is asked for
        for _ in range(MAX_PAGES):
            page = await self._page(target, listing, auth, query)
            if page is None:
                return None
            body, link = page
            received += len(body)
            if received > MAX_REFERRERS:
                raise TooLarge(message=f"{target.domain}: {listing.what} larger than "
                               f"{MAX_REFERRERS} bytes")
            descriptors += await in_thread(parse_referrers, body, listing.what)
            following = next_query(link, "/" + target.rpath.path)
            if following is None:
                whole = referrers_body(descriptors)
                if len(whole) > MAX_REFERRERS:
                    raise TooLarge(message=f"{target.domain}: {listing.what} larger than "
                                   f"{MAX_REFERRERS} bytes")
                return whole
            query = following
        raise UpstreamError(message=f"{target.domain}: {listing.what} in more than "
                            f"{MAX_PAGES} pages")

    async def _page(
        self, target: Target, listing: Listing, auth: str | None, query: str
    ) -> tuple[bytes, str | None] | None:
        """One page of the upstream's answer by the API and its Link; None
        when the first page is a 404 (no API)."""
        upstream = self.ctx.upstream
        response = await upstream.registry(
            "GET", target, headers={"Accept": INDEX_TYPE}, client_auth=auth, query=query)
        async with response:
            # A registry with the API never answers 404 (the spec): this one
            # has none.
            if response.status == 404 and not query:
                return None
            check_status(response, target, NotFound("MANIFEST_UNKNOWN", listing.what))
            with upstream.rate_guard(response.content):
                body = await read_bounded(
                    response, MAX_REFERRERS, f"{target.domain}: {listing.what}")
            return body, response.headers.get("Link")

    async def _tag_index(self, request: web.Request, target: Target) -> web.Response:
        """The `<alg>-<hex>` tag's index through manifests.py: cached, and
        revalidated, as any tag (NotFound when there is no such tag)."""
        answer = await self.manifests.get(request, _tag_target(target))
        assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
        return answer

    async def _from_cached_tag(
        self, request: web.Request, target: Target, err: BaseException
    ) -> Listed:
        """When no referrers answer is stored and the upstream failed: the
        tag schema's index as the cache holds it (stale, or fresh); else
        the upstream's failure."""
        try:
            answer = await self._tag_index(request, target)
        except (NotFound, UpstreamError):
            raise err from None
        return _as_listed(answer)


def _listing(target: Target) -> Listing:
    rpath = target.rpath
    return Listing(target.domain, rpath.name, Kind.REFERRERS, stored_name(rpath.ref),
                   f"the referrers index of {rpath.name}@{rpath.ref}", "MANIFEST_UNKNOWN")


def _tag_target(target: Target) -> Target:
    """The referrers tag schema's `<alg>-<hex>` tag of `target`'s subject."""
    rpath = target.rpath
    tag = RegistryPath(Kind.MANIFEST, rpath.name, tag_schema_tag(rpath.ref))
    return Target(target.registry, target.domain, tag)


def _as_listed(answer: web.StreamResponse) -> Listed:
    """The tag schema's index, as manifests.py answered it, as a listing."""
    assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
    # A stale tag is counted (crproxy_stale_served) by manifests.py.
    age = int(answer.headers.get("Age", "0"))
    cache = answer.headers.get("X-Cache", STALE)
    return Listed(answer.body, time.time() - age, cache)


async def _answer(listed: Listed, what: str, artifact_type: str | None) -> web.Response:
    """A stored index, rebuilt and filtered by `artifact_type` (ours, said
    by OCI-Filters-Applied)."""
    descriptors = await in_thread(parse_referrers, listed.body, what)
    headers = {"Content-Type": INDEX_TYPE, **listed.headers(), **API_HEADERS}
    if artifact_type is not None:
        headers[FILTER_HEADER] = "artifactType"
    return web.Response(body=referrers_body(descriptors, artifact_type), headers=headers)
