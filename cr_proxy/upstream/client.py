"""The upstream side: where a host is really reached, how long we wait for
it, what we remember when it is down, the token exchange on a 401, and
redirects followed by hand.

- Endpoint overrides map a host name to the URL where it is reached
  (air-gapped sites, tests); otherwise a host is reached over HTTPS, plain
  HTTP when listed as insecure, and HTTPS-then-HTTP on loopback, as Docker
  does.
- A connect failure (refused, timed out, a name that does not resolve)
  marks the host's registry down (health.py: one notion of down for a
  registry, its auth realm and its CDN): requests to any of its hosts fail
  at once until a background probe (`_probe`: `GET /v2/` on a new
  connection, every `timeouts.down_host` seconds) finds them answering, so
  an offline pull waits for no connect timeout once the first failed, and
  no client pays for the probe. An outage logs one warning when it starts
  and one when the registry answers again; the rest is counted.
- No host takes more than `limits.upstream_connections_per_host` of the
  pool; a request waits at most `timeouts.pool` for a free connection
  (UpstreamTimeout, the host is not marked down: it is busy, not gone), and
  a blob body slower than `limits.min_rate` is cut (RateGuard). So a
  registry that trickles cannot hold every connection and hang the misses
  of every other registry.
- Redirects are followed here, not by aiohttp, because the fetcher must know
  the hops (the last one's target may be cached under its own host, see
  Store.commit_blob) and because the registry's Authorization
  must not travel to a CDN host.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import urljoin

import aiohttp
from multidict import CIMultiDict

from cr_proxy.cache.layout import Target, check_domain
from cr_proxy.config import UPSTREAM_CONNECTIONS, Config
from cr_proxy.errors import (
    CrProxyError,
    DestinationRefused,
    TokenRefused,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from cr_proxy.metrics import Metrics
from cr_proxy.net.address import dial_target, is_loopback, split_url
from cr_proxy.net.policy import Destinations, refusal, resolved_refusal
from cr_proxy.upstream.auth import (
    Challenge,
    TokenCache,
    parse_challenge,
    pull_scope,
    token_of,
    token_url,
)
from cr_proxy.upstream.challenges import Challenges
from cr_proxy.upstream.health import Health
from cr_proxy.upstream.parent import Parent

log = logging.getLogger("cr_proxy.upstream")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = "cr-proxy/0.1"
PROBE_CONNECTIONS = 16  # probes (health.py) dialling at once, on their own pool
# Registries that answered, kept as metrics labels besides the configured
# ones (a hostile wildcard domain answers too: the labels stay bounded).
MAX_ANSWERED_HOSTS = 256
OTHER_REGISTRIES = "other"  # the label of every other registry name
# aiohttp's body buffer per connection (read_bufsize; its default is 64 KiB).
# A body is paused at twice this and resumed below it: at 64 KiB a layer's
# download paused and resumed the socket at every recv, two epoll calls and
# their Python each time. At 1 MiB (the write batch, fetch/writes.py) the
# cold blob miss took 6-8% less wall and CPU, side by side
# (bench.miss_ab; docs/performance.md, "Session 11").
BODY_READ_BUFFER = 1 << 20


@dataclass(frozen=True, slots=True)
class Hop:
    """One redirect followed: from <host><path> to <location>."""

    status: int
    location: str  # absolute URL as the client would follow it, query included
    target_host: str
    # Without the query string. Never a cache key by itself: only the last
    # hop's, and only when it names the digest (layout.digest_url_path).
    target_path: str


@dataclass(slots=True)
class Opened:
    """An upstream response after redirects, with the hops that led to it."""

    response: aiohttp.ClientResponse
    hops: list[Hop] = field(default_factory=list)




class PrivateAddress(OSError):
    """A name resolved only to addresses the policy refuses."""


def _abandon(task: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """A request no one waits for: cancelled, and its response, should one
    come all the same, released (its connection back to the pool)."""
    def release(done: asyncio.Future[aiohttp.ClientResponse]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().release()

    task.cancel()
    task.add_done_callback(release)


def upstream_url(url: str, what: str) -> tuple[str, str, str]:
    """(scheme, checked host, path?query) of a URL an upstream named (a
    token realm, a redirect): checked where it enters; one that does not
    parse (a port out of range, an unclosed IPv6 bracket) is the
    upstream's error, not ours."""
    try:
        scheme, host, path = split_url(url)
    except ValueError as err:
        raise UpstreamError(message=f"{what} {url[:100]!r} is not a URL we can follow") from err
    return scheme, check_domain(host), path


def _private(err: BaseException) -> bool:
    """A connect error that is PolicyResolver's refusal, not an outage."""
    return isinstance(err.__cause__, PrivateAddress) or isinstance(
        getattr(err, "os_error", None), PrivateAddress)


class PolicyResolver(aiohttp.abc.AbstractResolver):
    """DNS through aiohttp's resolver, minus the private addresses the policy
    refuses, so a public-looking name cannot lead into the LAN."""

    def __init__(self, destinations: Destinations) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._destinations = destinations

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
        infos = await self._inner.resolve(host, port, family)
        kept = [i for i in infos if self._destinations.resolved_allowed(host, port, i["host"])]
        if not kept:
            raise PrivateAddress(resolved_refusal(host, port))
        return kept

    async def close(self) -> None:
        await self._inner.close()


def configured_hosts(config: Config) -> frozenset[str]:
    """Every registry name and host the operator wrote down, and the hosts
    the configured registry names are served by."""
    names = {config.default_registry, *config.registry_hosts, *config.endpoints,
             *config.registries, *config.insecure}
    return frozenset(names | {config.registry_hosts.get(name, name) for name in names})


class PoolWait:
    """Whether a request is waiting for a free connection in the pool, set by
    the session's trace hooks: a connect timeout then means the pool was
    full, not the host down."""

    __slots__ = ("queued",)

    def __init__(self) -> None:
        self.queued = False


async def _queued(_: object, context: SimpleNamespace, __: object) -> None:
    if isinstance(context.trace_request_ctx, PoolWait):
        context.trace_request_ctx.queued = True


async def _dequeued(_: object, context: SimpleNamespace, __: object) -> None:
    if isinstance(context.trace_request_ctx, PoolWait):
        context.trace_request_ctx.queued = False


class RateGuard:
    """Cuts a response body that brings less than `min_rate` bytes/s on
    average over each `window` seconds (UpstreamTimeout from the reader), so
    a trickle, a byte now and then, cannot hold a connection: the read
    timeout only catches silence. One timer per window, nothing per chunk."""

    __slots__ = ("_body", "_handle", "_least", "_seen", "_window")

    def __init__(self, body: aiohttp.StreamReader, min_rate: int, window: float) -> None:
        self._body = body
        self._least = min_rate * window
        self._window = window
        self._seen = body.total_bytes
        self._handle: asyncio.TimerHandle | None = None
        if min_rate > 0:
            self._handle = asyncio.get_running_loop().call_later(window, self._check)

    def __repr__(self) -> str:
        return f"<RateGuard {self._body.total_bytes - self._seen} bytes this window>"

    def _check(self) -> None:
        total = self._body.total_bytes
        if total - self._seen < self._least and not self._body.is_eof():
            self._handle = None
            self._body.set_exception(UpstreamTimeout(message=(
                f"upstream sent {total - self._seen} bytes in {self._window:.0f}s, "
                f"below limits.min_rate ({self._least / self._window:.0f} bytes/s)")))
            return
        self._seen = total
        self._handle = asyncio.get_running_loop().call_later(self._window, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def __enter__(self) -> RateGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Upstream:
    __slots__ = (
        "_answered", "_known", "_probes", "_scheme_ok", "challenges", "config", "destinations",
        "health", "metrics", "parent", "session", "tokens",
    )

    def __init__(
        self, config: Config, session: aiohttp.ClientSession, challenges: Challenges | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.destinations = Destinations.of(config)
        self.session = session
        self.tokens = TokenCache()
        self.metrics = metrics or Metrics()
        self._scheme_ok: dict[str, str] = {}  # loopback host -> scheme that worked
        self._known = configured_hosts(config)
        self._answered: set[str] = set()
        # Every registry 401's challenge is kept, to replay when the host is down.
        self.challenges = challenges or Challenges()
        self.health = Health(config.timeouts.down_host, self._probe, self.metrics,
                             self.registry_label)
        self._probes: aiohttp.ClientSession | None = None  # made at the first probe
        self.parent = Parent.of(config)

    def __repr__(self) -> str:
        return f"<Upstream {self.health!r} {self.tokens!r}>"

    async def close(self) -> None:
        """Stop the probes and close their pool (the caller closes `session`)."""
        await self.health.close()
        if self._probes is not None:
            await self._probes.close()

    @staticmethod
    def make_session(config: Config) -> aiohttp.ClientSession:
        timeouts = config.timeouts
        timeout = aiohttp.ClientTimeout(
            # connect: the wait for a free connection, then the connect.
            total=None, connect=timeouts.pool + timeouts.connect,
            sock_connect=timeouts.connect, sock_read=timeouts.read,
        )
        resolver = PolicyResolver(Destinations.of(config))
        connector = aiohttp.TCPConnector(
            limit=UPSTREAM_CONNECTIONS,
            limit_per_host=config.limits.upstream_connections_per_host,
            ttl_dns_cache=60, resolver=resolver,
        )
        pool = aiohttp.TraceConfig()
        pool.on_connection_queued_start.append(_queued)
        pool.on_connection_queued_end.append(_dequeued)
        return aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            # One session serves every client: a cookie one client's request
            # earned must not go out with another's (nor with none).
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            read_bufsize=BODY_READ_BUFFER,
            # aiohttp asks for gzip unless told: a registry or CDN that honours
            # it would send bytes no manifest check or digest reads.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            trace_configs=[pool],
        )

    def rate_guard(self, body: aiohttp.StreamReader) -> RateGuard:
        """Watch a body for limits.min_rate; cancel() it once read."""
        return RateGuard(body, self.config.limits.min_rate, self.config.timeouts.read)

    def registry_label(self, domain: str) -> str:
        """The metrics label of a registry: its domain if the operator
        configured it or it has answered (the first MAX_ANSWERED_HOSTS),
        else OTHER_REGISTRIES, so invented names add no series."""
        if domain in self._known or domain in self._answered:
            return domain
        return OTHER_REGISTRIES

    def _answered_once(self, host: str) -> None:
        if len(self._answered) < MAX_ANSWERED_HOSTS:
            self._answered.add(host)

    # --- where a host is reached -------------------------------------------

    def base_urls(self, host: str, scheme: str = "https") -> list[str]:
        """Where a checked host (a Target's domain, a checked Host header, a
        redirect or token URL's host, each checked where it enters) is
        reached."""
        if host in self.config.endpoints:
            return [self.config.endpoints[host]]
        if host in self.config.insecure or scheme == "http":
            return [f"http://{host}"]
        if is_loopback(host):
            known = self._scheme_ok.get(host)
            return [f"{known}://{host}"] if known else [f"https://{host}", f"http://{host}"]
        return [f"https://{host}"]

    def is_down(self, host: str) -> bool:
        """Whether host's registry is down: requests to it fail at once."""
        return self.health.is_down(host)

    def skips(self, host: str) -> bool:
        """is_down, for a request that is not made because of it (counted)."""
        return self.health.skip(host)

    def suspect(self, host: str) -> None:
        """A request to host outran its budget: probe it now (health.py).
        Not with a parent: the request went to the parent, and the probe
        would dial the registry, which a site may not reach at all; a
        failed probe then kept every tag stale, the parent never asked."""
        if self.parent is None:
            self.health.suspect(host)

    def _check_destination(self, host: str, base: str) -> None:
        """An endpoint's URL is the operator's own; any other is checked as
        it will be dialled: its host and its port (a name's addresses again
        by PolicyResolver)."""
        if host in self.config.endpoints:
            return
        hostname, port = dial_target(base)  # base_urls makes only http(s) URLs
        if not self.destinations.host_allowed(hostname, port):
            raise DestinationRefused(message=refusal(hostname, port))

    # --- plain requests -------------------------------------------------------

    async def send(
        self,
        method: str,
        host: str,
        path: str,
        headers: Mapping[str, str],
        scheme: str = "https",
        data: object = None,
        registry: str | None = None,
    ) -> aiohttp.ClientResponse:
        """One request to host+path (path may carry a query), no auth, no
        redirects. `registry`: the registry that sent us to host (its realm,
        a redirect), whose outage host shares. Raises UpstreamUnreachable
        when the host cannot be reached, at once while its registry is down."""
        if registry is not None:
            self.health.learn(host, registry)
        else:
            self.health.own(host)
        if self.health.skip(host):
            raise UpstreamUnreachable(message=f"{host} is unreachable (remembered)")
        bases = self.base_urls(host, scheme)
        last_error: BaseException | None = None
        for base in bases:
            self._check_destination(host, base)
            try:
                wait = PoolWait()
                response = await self._answer(host, scheme, self.session.request(
                    method, base + path, headers=headers, allow_redirects=False, data=data,
                    trace_request_ctx=wait,
                ))
            except PrivateAddress as err:
                raise DestinationRefused(message=str(err)) from err
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as err:
                if wait.queued:
                    raise UpstreamTimeout(message=(
                        f"no free connection to {host} within {self.config.timeouts.pool:.0f}s "
                        "(limits.upstream_connections_per_host)")) from err
                if _private(err):
                    raise DestinationRefused(message=str(err)) from err
                last_error = err
                continue
            except (aiohttp.ServerTimeoutError, TimeoutError) as err:
                raise UpstreamTimeout(message=f"{host} did not answer in time") from err
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as err:
                # An HTTPS attempt at a plain-HTTP loopback registry ends here.
                if len(bases) > 1:
                    last_error = err
                    continue
                raise UpstreamError(message=f"{host}: {err}") from err
            if len(bases) > 1:
                self._scheme_ok[host] = base.split(":", 1)[0]
            self._answered_once(host)
            self.health.answered(host)
            return response
        assert last_error is not None
        self.health.failed(host, scheme, last_error)
        raise UpstreamUnreachable(message=f"{host} is unreachable: {last_error}") from last_error

    async def _answer(
        self, host: str, scheme: str, request: Awaitable[aiohttp.ClientResponse]
    ) -> aiohttp.ClientResponse:
        """The request's response. One not there within timeouts.stale_budget
        makes host's registry suspect (health.suspect: a probe on a new
        connection); if the registry goes down meanwhile, the request is
        given up at once rather than left on a kept-alive connection into a
        cut cable, which only timeouts.read would end."""
        task = asyncio.ensure_future(request)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.config.timeouts.stale_budget)
            if not done:
                self.health.suspect(host, scheme)
            while not task.done():
                went_down = asyncio.ensure_future(self.health.went_down.wait())
                try:
                    await asyncio.wait({task, went_down}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    went_down.cancel()
                if not task.done() and self.health.is_down(host):
                    raise UpstreamUnreachable(message=f"{host} is unreachable (its registry "
                                              "went down while this request waited)")
            return task.result()
        except BaseException:
            _abandon(task)
            raise

    def _prober(self) -> aiohttp.ClientSession:
        """The probes' own pool: a new connection each (a kept-alive one
        into a cut cable proves nothing), short timeouts, the same policy."""
        if self._probes is None:
            short = self.config.timeouts.connect
            self._probes = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=short, sock_connect=short,
                                              sock_read=short),
                connector=aiohttp.TCPConnector(
                    limit=PROBE_CONNECTIONS, force_close=True,
                    resolver=PolicyResolver(self.destinations)),
                auto_decompress=False, headers={"User-Agent": USER_AGENT},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._probes

    async def _probe(self, host: str, scheme: str) -> BaseException | None:
        """health.Probe: `GET /v2/` of host on a new connection; None once it
        answers anything at all (a 404, a TLS or protocol error: it is
        reachable, what it says is the requests' business), else the
        connect error (refused, timed out, not resolved)."""
        last_error: BaseException | None = None
        for base in self.base_urls(host, scheme):
            try:
                self._check_destination(host, base)
                async with self._prober().get(base + "/v2/", allow_redirects=False):
                    return None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as err:
                if _private(err):
                    return None  # the policy's business, not an outage
                last_error = err
            except (CrProxyError, aiohttp.ClientError, TimeoutError, OSError):
                return None
        return last_error

    async def get_json(
        self, url: str, headers: Mapping[str, str], registry: str | None = None
    ) -> dict:
        """GET a token server's JSON; `url` is the upstream's (a challenge's
        realm), so its host is checked here, where it enters."""
        scheme, host, path = upstream_url(url, "token realm")
        async with await self.send("GET", host, path, headers, scheme=scheme,
                                   registry=registry) as response:
            if response.status != 200:
                refused = TokenRefused if response.status in (401, 403) else UpstreamError
                raise refused(message=f"token server {host} answered {response.status}")
            try:
                # The registry names the token server: it may trickle too.
                with self.rate_guard(response.content):
                    return await response.json(content_type=None)
            except (ValueError, aiohttp.ClientError) as err:
                raise UpstreamError(message=f"token server {host} sent no JSON") from err

    # --- registry requests ----------------------------------------------------

    async def registry(
        self,
        method: str,
        target: Target,
        *,
        headers: Mapping[str, str] | None = None,
        client_auth: str | None = None,
        query: str = "",
    ) -> aiohttp.ClientResponse:
        """A request for a registry path (and a query the caller built from
        checked parts), with the token exchange on a 401: the client's own
        Authorization first, else a token we get (with the registry's
        credentials, if configured) for the repository."""
        domain, path, name = target.domain, "/" + target.rpath.path, target.rpath.name
        path += f"?{query}" if query else ""
        if self.parent is not None:
            # parent_mirror: the parent answers (None: unreachable, go direct).
            answer = await self.parent.send(self.session, method, domain, path, headers or {})
            if answer is not None:
                return answer
        sent = CIMultiDict(headers or {})
        creds = self.config.credentials(target.registry) or self.config.credentials(domain)
        if client_auth:
            sent["Authorization"] = client_auth
        elif creds and creds.token:
            sent["Authorization"] = f"Bearer {creds.token}"
        response = await self.send(method, domain, path, sent)
        if response.status != 401:
            return response
        header = response.headers.get("WWW-Authenticate", "")
        if header:
            self.challenges.seen(domain, header)
        challenge = parse_challenge(header)
        if challenge is None or challenge.scheme != "bearer" or not challenge.realm:
            return response
        response.release()
        scope = challenge.params.get("scope") or (pull_scope(name) if name else "")
        if client_auth and client_auth[:6].lower() == "basic ":
            token = await self.client_token(challenge, scope, client_auth, domain)
            sent["Authorization"] = f"Bearer {token}"
            return await self.send(method, domain, path, sent)
        key = TokenCache.key(challenge, scope, creds)
        cached = self.tokens.get(key)
        token = await self.token(challenge, scope, creds, domain)
        sent["Authorization"] = f"Bearer {token}"
        response = await self.send(method, domain, path, sent)
        if response.status != 401 or cached is None:
            return response
        # A cached token refused: it expired before its expires_in said (a
        # registry's clock, a rolled key, a revoked grant). One fresh token;
        # a fresh one refused is the registry's answer.
        response.release()
        self.tokens.discard(key)
        token = await self.token(challenge, scope, creds, domain)
        sent["Authorization"] = f"Bearer {token}"
        return await self.send(method, domain, path, sent)

    async def client_token(
        self, challenge: Challenge, scope: str, basic: str, registry: str
    ) -> str:
        """A token for a client's own Basic credential, exchanged as the client
        would, uncached (the cache knows users by name, not by password).
        Raises TokenRefused when the realm refuses it."""
        answer = await self.get_json(token_url(challenge, scope), {"Authorization": basic},
                                     registry=registry)
        return token_of(answer)

    async def token(
        self, challenge: Challenge, scope: str, creds: object, registry: str | None = None
    ) -> str:
        """A token from the challenge's realm: a host of `registry` (its outage)."""
        fetch = functools.partial(self.get_json, registry=registry)
        return await self.tokens.fetch(challenge, scope, creds, fetch)  # type: ignore[arg-type]

    async def open(
        self,
        method: str,
        target: Target,
        *,
        headers: Mapping[str, str] | None = None,
        client_auth: str | None = None,
        query: str = "",
    ) -> Opened:
        """registry() and then any redirects, followed without credentials."""
        response = await self.registry(method, target, headers=headers, client_auth=client_auth,
                                       query=query)
        opened = Opened(response)
        domain, path = target.domain, "/" + target.rpath.path
        url = f"https://{domain}{path}"
        plain = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        while response.status in REDIRECT_STATUSES:
            if len(opened.hops) >= MAX_REDIRECTS:
                response.release()
                raise UpstreamError(message=f"{domain}{path}: too many redirects")
            location = response.headers.get("Location", "")
            response.release()
            if not location:
                raise UpstreamError(message=f"{domain}{path}: redirect without Location")
            try:
                url = urljoin(url, location)
            except ValueError as err:
                raise UpstreamError(message=f"{domain}{path}: redirect to "
                                    f"{location[:100]!r}, not a URL") from err
            scheme, host, target = upstream_url(url, "redirect")
            opened.hops.append(Hop(response.status, url, host, target.split("?")[0]))
            response = await self.send(method, host, target, plain, scheme=scheme,
                                       registry=domain)
            opened.response = response
        return opened

