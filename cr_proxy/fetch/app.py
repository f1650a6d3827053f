"""The fetcher's dispatch: the aiohttp app nginx hands every miss to, its
one route, and the way from a request to the part that answers it.

nginx serves fresh hits itself; what reaches us is a miss, a stale tag, a
token request or something we do not cache. Dispatch resolves the mode
(X-CR-Mode: mirror, or https_proxy) and the Target (the registry, the host
that serves it, the parsed path), enforces the proxy's port rule, hands
mirror-mode writes to push.py (which refuses them unless push.enabled), and hands the request to
the part that owns its policy, as distribution's registry/proxy:

- blobs.py: blobs, local-first and immutable;
- manifests.py: manifests by digest local-first, tags upstream-first once
  stale with a stale fallback;
- tags.py: tag lists, fetched with our own login, stored per query, the
  same way as a tag (listings.py);
- referrers.py: referrers (OCI 1.1), by the upstream's API or its tag
  schema, stored per subject as tag lists are;
- push.py: mirror-mode pushes, relayed and written through;
- private.py: which repositories are private, and (https_proxy mode) whether
  the client's own credential may read one, before any part answers;
- passthrough.py: everything else, relayed uncached (token requests: those
  outside /v2/, and in https_proxy mode the host's own realm under /v2/).

Errors of any part become registry-style JSON answers here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from cr_proxy.cache.layout import (
    Kind,
    Target,
    mirror_ns,
    mirror_target,
    proxy_target,
)
from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.errors import (
    CrProxyError,
    DestinationRefused,
    NotFound,
    UpstreamError,
    UpstreamTimeout,
)
from cr_proxy.fetch.blobs import Blobs
from cr_proxy.fetch.context import (
    API_HEADERS,
    CacheFill,
    FetchContext,
    client_auth,
    error_response,
    in_thread,
)
from cr_proxy.fetch.flight import Flights
from cr_proxy.fetch.listings import Listings
from cr_proxy.fetch.manifests import Manifests
from cr_proxy.fetch.passthrough import Passthrough
from cr_proxy.fetch.private import Privacy, Undecided, user_header
from cr_proxy.fetch.push import Pushes
from cr_proxy.fetch.referrers import Referrers
from cr_proxy.fetch.tags import Tags
from cr_proxy.front.connect import check_port
from cr_proxy.metrics import Metrics
from cr_proxy.net.policy import parse_authority
from cr_proxy.upstream.challenges import Challenges
from cr_proxy.upstream.client import Upstream
from cr_proxy.upstream.peers import Peers

log = logging.getLogger("cr_proxy.fetcher")

# What a private repository guards (fetch/private.py): its content and listings.
PRIVATE_KINDS = frozenset({Kind.BLOB, Kind.MANIFEST, Kind.TAGS, Kind.REFERRERS})


class Fetcher:
    """The one route: each request to the part that owns its kind."""

    __slots__ = ("blobs", "ctx", "manifests", "passthrough", "privacy", "pushes", "referrers",
                 "tags")

    def __init__(self, ctx: FetchContext) -> None:
        self.ctx = ctx
        self.privacy = Privacy(ctx)
        self.blobs = Blobs(ctx)
        self.manifests = Manifests(ctx)
        self.passthrough = Passthrough(ctx, self.privacy)
        self.pushes = Pushes(ctx, self.blobs.writes, self.privacy, self.blobs.ensure)
        listings = Listings(ctx)
        self.tags = Tags(ctx, listings)
        self.referrers = Referrers(ctx, listings, self.manifests)

    @classmethod
    def of(cls, config: Config, store: Store, upstream: Upstream,
           metrics: Metrics | None = None, peers: Peers | None = None) -> Fetcher:
        metrics = metrics or Metrics()
        flights = Flights()
        fill = CacheFill(config.cache.max_size, metrics, flights)
        return cls(FetchContext(config, store, upstream, metrics, flights, fill, peers))

    def __repr__(self) -> str:
        return f"<Fetcher {self.ctx.store!r} {self.ctx.flights!r}>"

    async def close(self) -> None:
        await self.ctx.flights.close()
        await self.pushes.finish_commits()
        self.blobs.close()
        self.pushes.close()

    async def revalidate_tag(self, domain: str, name: str, tag: str) -> bool:
        """Background refresh of one cached tag; True if it moved upstream."""
        return await self.manifests.revalidate_tag(domain, name, tag)

    # --- the one route --------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.answer(request, self._dispatch(request))

    async def answer(
        self, request: web.Request, work: Awaitable[web.StreamResponse]
    ) -> web.StreamResponse:
        """`work`'s answer, or its error as a registry-style one (also for
        the routes of the packages above: cr_proxy/edge)."""
        try:
            return await work
        except (aiohttp.ClientError, TimeoutError) as err:
            # An upstream that broke off or stalled mid-answer.
            wrapped = UpstreamTimeout if isinstance(err, TimeoutError) else UpstreamError
            return self._error(request, wrapped(message=f"upstream failed: {err or type(err)}"))
        except CrProxyError as err:
            return self._error(request, err)
        except OSError as err:
            # The cache's disk (full, a link limit, permissions): still an
            # answer a registry client understands.
            return self._error(request, CrProxyError(message=f"cache: {err.strerror or err}"))

    @staticmethod
    def _error(request: web.Request, err: CrProxyError) -> web.Response:
        if err.status >= 500:
            log.warning("%s %s: %s", request.method, request.path_qs[:200], err.message)
        return error_response(err)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        mode = request.headers.get("X-CR-Mode", "mirror")
        if mode == "mirror":
            if self.pushes.claims(request):
                return await self.pushes.handle(request)
            target = mirror_target(
                request.path,
                mirror_ns(request.rel_url.raw_query_string),
                self.ctx.config.default_registry,
                dict(self.ctx.config.registry_hosts),
            )
            return await self._registry_request(request, target, mirror=True)
        domain, rpath = proxy_target(request.headers.get("Host", ""), request.path)
        self._check_proxy_port(request, domain)
        # Who the client is, for nginx's access log (X-CR-User): its Basic
        # credential's user, or the user its token was got for.
        self.privacy.identify(request, request.headers.get("Authorization", ""))
        if self.pushes.claims_proxied(request):
            # Push on: written through as mirror pushes are (push.py).
            return await self.pushes.handle_proxied(request, domain)
        if rpath is None:
            # The path proxy_target checked, not the raw one.
            # As sent (yarl's query_string is decoded: %23 became a fragment).
            raw = request.rel_url.raw_query_string
            query = f"?{raw}" if raw else ""
            return await self.passthrough.relay(
                request, domain, request.path + query, token_ok=True,
                scheme=request.headers.get("X-CR-Scheme", "https"),
            )
        return await self._registry_request(request, Target(domain, domain, rpath), mirror=False)

    def _check_proxy_port(self, request: web.Request, domain: str) -> None:
        """https_proxy mode: the front's port rule, enforced here on every
        request, pipelined ones included (the front sees only the first
        head). Over TLS the Host's port must be the port the client
        CONNECTed to (X-CR-Port, set by nginx from the front's PROXY line):
        an SNI and Host of host:8443 inside a tunnel to :443 must not make
        us dial 8443. Plain HTTP: port 80 or a host:port the operator named,
        whatever the request line said."""
        tls = request.headers.get("X-CR-Scheme", "https") == "https"
        host, port = parse_authority(domain)
        port = port or (443 if tls else 80)
        connected = request.headers.get("X-CR-Port")
        if tls and connected != str(port):
            raise DestinationRefused(message=f"{domain}: the Host's port is not the port "
                                     f"connected to ({connected or 'none'})")
        check_port(host, port, tls, self.ctx.config.proxy, self.ctx.upstream.destinations)

    async def _registry_request(
        self, request: web.Request, target: Target, mirror: bool
    ) -> web.StreamResponse:
        try:
            return await self._registry_kind(request, target, mirror)
        except UpstreamError as err:
            registry = self.ctx.upstream.registry_label(target.domain)
            self.ctx.metrics.upstream_errors.labels(registry=registry, code=err.code).inc()
            raise

    async def _registry_kind(
        self, request: web.Request, target: Target, mirror: bool
    ) -> web.StreamResponse:
        kind = target.rpath.kind
        if request.method not in ("GET", "HEAD"):
            return await self.passthrough.relay(
                request, target.domain, self._relayed_path(request, target, mirror),
                token_ok=await self._at_token_realm(request, target, mirror),
            )
        if kind in PRIVATE_KINDS and mirror and self.ctx.config.mirror_auth.enabled:
            self.privacy.check_mirror_reading(request, target)
        try:
            private = kind in PRIVATE_KINDS and await self.privacy.learn(
                target, client_auth(request))
        except Undecided as err:
            # The registry answers, but not whether the repository is
            # private: what the cache holds of it (unmarked, so nginx serves
            # its hits to anyone already) is served as offline; nothing new.
            return await self._from_the_cache_only(request, target, err)
        if private:
            if not mirror:
                await self.privacy.admit(request, target)
            elif self.ctx.config.mirror_auth.enabled:
                self.privacy.admit_mirror(request, target)
        if kind is Kind.BLOB:
            return await self.blobs.get(request, target)
        if kind is Kind.MANIFEST:
            return await self.manifests.get(request, target)
        if kind is Kind.TAGS:
            return await self.tags.get(request, target)
        if kind is Kind.REFERRERS:
            return await self.referrers.get(request, target)
        if kind is Kind.PING and mirror:
            return web.json_response({}, headers=API_HEADERS)
        return await self.passthrough.relay(
            request, target.domain, self._relayed_path(request, target, mirror), mirror=mirror,
            token_ok=await self._at_token_realm(request, target, mirror),
        )

    async def _at_token_realm(self, request: web.Request, target: Target, mirror: bool) -> bool:
        """https_proxy mode: a path under /v2/ that is no registry API path
        and is the host's own token realm (gcr.io: /v2/token, quay.io:
        /v2/auth) is a token request, as one outside /v2/ is."""
        if mirror or target.rpath.kind is not Kind.OTHER:
            return False
        return await self.passthrough.is_token_realm(request, target.domain,
                                                     "/" + target.rpath.path)

    async def _from_the_cache_only(self, request: web.Request, target: Target,
                                   err: UpstreamError) -> web.StreamResponse:
        """A stored tag (stale), named blob, tag list page or referrers
        answer (paged and filtered as online), else the upstream's error."""
        kind = target.rpath.kind
        answer: web.StreamResponse | None = None
        if kind is Kind.MANIFEST:
            answer = await self.manifests.cached(target)
        elif kind is Kind.BLOB:
            answer = await self.blobs.cached(request, target)
        elif kind is Kind.TAGS:
            answer = await self.tags.cached(request, target)
        elif kind is Kind.REFERRERS:
            answer = await self.referrers.cached(request, target)
        if answer is None:
            raise err
        return answer

    @staticmethod
    def _relayed_path(request: web.Request, target: Target, mirror: bool) -> str:
        """What an uncached GET asks upstream: the checked path, never the raw
        one (no dot segments); in mirror mode only listing paths, with their
        paging parameters (never `ns`)."""
        rpath = target.rpath
        if not mirror:
            raw = request.rel_url.raw_query_string  # as sent, not decoded
            return "/" + rpath.path + (f"?{raw}" if raw else "")
        if rpath.kind is Kind.OTHER and rpath.name != "_catalog":
            raise NotFound("UNSUPPORTED", f"/{rpath.path} is not served by this mirror")
        paging = {k: v for k, v in request.query.items() if k in ("n", "last")}
        return "/" + rpath.path + (f"?{urlencode(paging)}" if paging else "")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(
    config: Config, metrics: Metrics | None = None, clean_temp: bool = True,
    routes: Sequence[tuple[str, Handler]] = (),
) -> web.Application:
    """The fetcher's aiohttp application: one catch-all route, after
    `routes` (path pattern, handler) of the packages above (cr_proxy/edge),
    which find the Fetcher in app["fetcher"]. Only serve cleans temp/ at
    start: a warm beside another warm must not delete the other's downloads
    in progress."""
    store = Store(config.cache_dir)
    # Request bodies (relayed pushes) are streamed from request.content, so
    # aiohttp's client_max_size, which bounds only read(), does not apply.
    app = web.Application()

    async def lifecycle(app: web.Application):
        await in_thread(store.prepare, clean_temp)
        # Before the first request: blobs an older cr-proxy stored under a
        # private repository have no mark of their own (fetch/blobs.py).
        await in_thread(store.mark_private_blobs)
        session = Upstream.make_session(config)
        upstream = Upstream(config, session, Challenges(store), metrics)
        peers = Peers(config, upstream.metrics) if config.cluster.enabled else None
        fetcher = Fetcher.of(config, store, upstream, upstream.metrics, peers)
        app["fetcher"] = fetcher
        yield
        if peers is not None:
            await peers.close()
        await upstream.close()
        await fetcher.close()
        await session.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app["fetcher"].handle(request)

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(_nosniff)
    app.on_response_prepare.append(user_header)
    for pattern, handler in routes:
        app.router.add_route("*", pattern, handler)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer says its type is the one to use: no browser may take a
    JSON body (or a relayed upstream's) for HTML or script."""
    response.headers["X-Content-Type-Options"] = "nosniff"
