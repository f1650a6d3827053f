"""The upstream side: where a host is really reached, how long we wait for
it, what we remember when it is down, the token exchange on a 401, and
redirects followed by hand.

- Endpoint overrides map a host name to the URL where it is reached
  (air-gapped sites, tests); otherwise a host is reached over HTTPS, plain
  HTTP when listed as insecure, and HTTPS-then-HTTP on loopback, as Docker
  does.
- A connect failure marks the host down for `timeouts.down_host` seconds:
  requests to it fail at once, so an offline pull of a ten-layer image does
  not wait for ten connect timeouts.
- Redirects are followed here, not by aiohttp, because the fetcher must know
  the hops (the last one's target may be cached under its own host, see
  Fetcher._name_redirect_target) and because the registry's Authorization
  must not travel to a CDN host.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from .auth import Challenge, TokenCache, parse_challenge, pull_scope
from .config import Config
from .errors import DestinationRefused, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from .layout import Target, check_domain
from .policy import SCHEME_PORTS, Destinations, refusal, resolved_refusal

log = logging.getLogger("cr_proxy.upstream")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = "cr-proxy/0.1"


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


def is_loopback(host: str) -> bool:
    """host[:port] names this machine (localhost, 127/8, ::1)."""
    if host.startswith("["):
        bare = host[1 : host.find("]")]
    else:
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def split_url(url: str) -> tuple[str, str, str]:
    """-> (scheme, host[:port] as stored, path?query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port and parts.port not in (80, 443):
        host = f"{host}:{parts.port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, path


ChallengeHook = Callable[[str, str, str], None]


class PrivateAddress(OSError):
    """A name resolved only to addresses the policy refuses."""


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


class Upstream:
    __slots__ = (
        "_down_until", "_scheme_ok", "config", "destinations", "on_challenge", "session", "tokens",
    )

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.destinations = Destinations.of(config)
        self.session = session
        self.tokens = TokenCache()
        self._down_until: dict[str, float] = {}
        self._scheme_ok: dict[str, str] = {}  # loopback host -> scheme that worked
        # Called with (host, path, WWW-Authenticate) for every 401 seen.
        self.on_challenge: ChallengeHook | None = None

    def __repr__(self) -> str:
        down = [h for h, t in self._down_until.items() if t > time.monotonic()]
        return f"<Upstream down={down} {self.tokens!r}>"

    @staticmethod
    def make_session(config: Config) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeouts.connect, sock_read=config.timeouts.read
        )
        resolver = PolicyResolver(Destinations.of(config))
        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=60, resolver=resolver)
        return aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT},
        )

    # --- where a host is reached -------------------------------------------

    def base_urls(self, host: str, scheme: str = "https") -> list[str]:
        host = check_domain(host)
        if host in self.config.endpoints:
            return [self.config.endpoints[host]]
        if host in self.config.insecure or scheme == "http":
            return [f"http://{host}"]
        if is_loopback(host):
            known = self._scheme_ok.get(host)
            return [f"{known}://{host}"] if known else [f"https://{host}", f"http://{host}"]
        return [f"https://{host}"]

    def is_down(self, host: str) -> bool:
        until = self._down_until.get(host)
        return until is not None and until > time.monotonic()

    def _mark_down(self, host: str, err: BaseException) -> None:
        log.warning("upstream %s unreachable (%s); skipping it for %.0fs",
                    host, err, self.config.timeouts.down_host)
        self._down_until[host] = time.monotonic() + self.config.timeouts.down_host

    def _check_destination(self, host: str, base: str) -> None:
        """An endpoint's URL is the operator's own; any other is checked as
        it will be dialled: its host and its port (a name's addresses again
        by PolicyResolver)."""
        if host in self.config.endpoints:
            return
        parts = urlsplit(base)
        hostname, port = parts.hostname or "", parts.port or SCHEME_PORTS[parts.scheme]
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
    ) -> aiohttp.ClientResponse:
        """One request to host+path (path may carry a query), no auth, no
        redirects. Raises UpstreamUnreachable when the host cannot be reached."""
        if self.is_down(host):
            raise UpstreamUnreachable(message=f"{host} is unreachable (remembered)")
        bases = self.base_urls(host, scheme)
        last_error: BaseException | None = None
        for base in bases:
            self._check_destination(host, base)
            try:
                response = await self.session.request(
                    method, base + path, headers=headers, allow_redirects=False, data=data
                )
            except PrivateAddress as err:
                raise DestinationRefused(message=str(err)) from err
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as err:
                if isinstance(err.__cause__, PrivateAddress) or isinstance(
                    getattr(err, "os_error", None), PrivateAddress
                ):
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
            return response
        assert last_error is not None
        self._mark_down(host, last_error)
        raise UpstreamUnreachable(message=f"{host} is unreachable: {last_error}") from last_error

    async def get_json(self, url: str, headers: Mapping[str, str]) -> dict:
        scheme, host, path = split_url(url)
        async with await self.send("GET", host, path, headers, scheme=scheme) as response:
            if response.status != 200:
                raise UpstreamError(message=f"token server {host} answered {response.status}")
            try:
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
    ) -> aiohttp.ClientResponse:
        """A request for a registry path, with the token exchange on a 401:
        the client's own Authorization first, else a token we get (with the
        registry's credentials, if configured) for the repository."""
        domain, path, name = target.domain, "/" + target.rpath.path, target.rpath.name
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
        if self.on_challenge and header:
            self.on_challenge(domain, path, header)
        challenge = parse_challenge(header)
        if challenge is None or challenge.scheme != "bearer" or not challenge.realm:
            return response
        response.release()
        scope = challenge.params.get("scope") or (pull_scope(name) if name else "")
        token = await self.token(challenge, scope, creds)
        sent["Authorization"] = f"Bearer {token}"
        return await self.send(method, domain, path, sent)

    async def token(self, challenge: Challenge, scope: str, creds: object) -> str:
        return await self.tokens.fetch(challenge, scope, creds, self.get_json)  # type: ignore[arg-type]

    async def open(
        self,
        method: str,
        target: Target,
        *,
        headers: Mapping[str, str] | None = None,
        client_auth: str | None = None,
    ) -> Opened:
        """registry() and then any redirects, followed without credentials."""
        response = await self.registry(method, target, headers=headers, client_auth=client_auth)
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
            url = urljoin(url, location)
            scheme, host, target = split_url(url)
            opened.hops.append(Hop(response.status, url, check_domain(host), target.split("?")[0]))
            response = await self.send(method, host, target, plain, scheme=scheme)
            opened.response = response
        return opened

