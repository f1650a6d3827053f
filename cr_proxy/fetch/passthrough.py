"""Pass-through: requests this mirror does not cache (the catalog, token
requests, in https_proxy mode pushes and anything outside
/v2/), relayed to the upstream.

Policy: nothing is stored but what the upstream's /v2/ answered, 200 or
401 with its challenge (upstream/challenges.py). Offline, cached pulls go
on: a token request whose auth server cannot be reached gets a dummy
token, and a /v2/ ping gets the stored answer replayed. A token request
is one outside /v2/ (https_proxy mode), or one to the exact path under
/v2/ that the host's own challenge names as its realm (`is_token_realm`).
The mirror's origin answers registry JSON only: whatever type an upstream
names (text/html, a script), a browser there gets JSON.
"""

from __future__ import annotations

import json
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cr_proxy.errors import CrProxyError, UpstreamUnreachable
from cr_proxy.fetch.context import API_HEADERS, FetchContext, in_thread, read_bounded
from cr_proxy.fetch.private import Privacy
from cr_proxy.net.address import parse_authority
from cr_proxy.upstream.auth import dummy_token
from cr_proxy.upstream.challenges import own_realm_path

log = logging.getLogger("cr_proxy.fetcher")

RELAYED_REQUEST = frozenset({"accept", "authorization", "content-type", "content-length", "range",
                             "user-agent"})
RELAYED_RESPONSE = frozenset({"content-type", "content-length", "docker-content-digest",
                              "www-authenticate", "location", "docker-distribution-api-version",
                              "link", "range", "docker-upload-uuid", "content-range"})


TOKEN_ANSWER_LIMIT = 1 << 20  # bytes of a token server's answer read to bind its token


class Passthrough:
    __slots__ = ("ctx", "privacy")

    def __init__(self, ctx: FetchContext, privacy: Privacy | None = None) -> None:
        self.ctx = ctx
        self.privacy = privacy

    def __repr__(self) -> str:
        return f"<Passthrough {self.ctx.upstream.challenges!r}>"

    async def relay(
        self, request: web.Request, host: str, path_qs: str, token_ok: bool = False,
        scheme: str = "https", mirror: bool = False,
    ) -> web.StreamResponse:
        """Relay a request we do not cache to host + path_qs (checked)."""
        upstream = self.ctx.upstream
        # A multidict: Go clients send Accept once per media type.
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() in RELAYED_REQUEST
        )
        body = request.content if request.can_read_body else None
        try:
            answer = await upstream.send(
                request.method, host, path_qs, headers, scheme=scheme, data=body
            )
        except UpstreamUnreachable:
            if token_ok and request.method in ("GET", "POST") and _looks_like_token(request):
                self.ctx.metrics.dummy_tokens.inc()
                dummy = dummy_token()
                self._bind(request, str(dummy["token"]))
                return web.json_response(dummy)
            if _is_ping(path_qs):
                return await self._replay_ping(host)
            raise
        if _is_ping(path_qs) and request.method in ("GET", "HEAD"):
            upstream.challenges.answered(host, answer.status,
                                         answer.headers.get("WWW-Authenticate"))
        elif answer.status == 401 and path_qs.startswith("/v2/"):
            header = answer.headers.get("WWW-Authenticate")
            if header:
                upstream.challenges.seen(host, header)
        relayed = {k: v for k, v in answer.headers.items() if k.lower() in RELAYED_RESPONSE}
        if mirror:
            relayed = {k: v for k, v in relayed.items() if k.lower() != "content-type"}
            relayed["Content-Type"] = "application/json"
        if token_ok and answer.status == 200 and self._basic(request):
            # A token got with a Basic credential: bound to it (private.py).
            return await self._relay_token(request, answer, relayed)
        response = web.StreamResponse(status=answer.status, headers=relayed)
        try:
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(64 << 10):
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            # The head is gone already: no error answer can follow, and a
            # body left short of its length on a kept-alive connection would
            # hold the client until nginx's proxy_read_timeout. Cutting the
            # connection is the only way left to tell it the body is not whole.
            log.warning("%s %s: relay cut short: %s", request.method, path_qs[:200],
                        err or type(err).__name__)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            answer.release()
        await response.write_eof()
        return response

    async def is_token_realm(self, request: web.Request, host: str, path: str) -> bool:
        """Whether `path`, under /v2/ and no registry API path, is the token
        realm of `host`'s own /v2/ challenge (gcr.io and Artifact Registry:
        /v2/token; quay.io: /v2/auth): relayed then as a token request, so
        its token is bound online and a dummy handed out offline, as for a
        realm outside /v2/. That exact path of that host only: a client
        must not make any other /v2/ path a dummy-token answer. The
        challenge this process kept, else the stored one (after a restart
        it is all there is while the upstream is down)."""
        challenges = self.ctx.upstream.challenges
        answer = challenges.known(host) or await in_thread(challenges.stored, host)
        if answer is None or answer.challenge is None:
            return False
        name, port = parse_authority(host)
        if request.headers.get("X-CR-Scheme", "https") == "https":
            origin = ("https", name, port or 443)
        else:
            origin = ("http", name, port or 80)
        return own_realm_path(answer.challenge, *origin) == path

    def _basic(self, request: web.Request) -> str | None:
        """The Basic credential of a token request, when private.py binds tokens."""
        value = request.headers.get("Authorization", "")
        if self.privacy is None or value[:6].lower() != "basic " or not _looks_like_token(request):
            return None
        return value

    def _bind(self, request: web.Request, token: str) -> None:
        basic = self._basic(request)
        if basic is not None and self.privacy is not None:
            self.privacy.bind(token, basic)

    async def _relay_token(
        self, request: web.Request, answer: aiohttp.ClientResponse, relayed: dict[str, str]
    ) -> web.Response:
        """A token server's answer, read whole (it is small) to bind its token
        to the Basic credential that got it, then sent as it came."""
        try:
            body = await read_bounded(answer, TOKEN_ANSWER_LIMIT, "token answer")
        finally:
            answer.release()
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested past the stack
            parsed = None
        if isinstance(parsed, dict):
            for field in ("token", "access_token"):
                if isinstance(parsed.get(field), str) and parsed[field]:
                    self._bind(request, parsed[field])
        relayed = {k: v for k, v in relayed.items() if k.lower() != "content-length"}
        return web.Response(status=answer.status, body=body, headers=relayed)

    async def _replay_ping(self, host: str) -> web.Response:
        """The host's /v2/ answer as it was: 200, or 401 with its challenge
        (the client then asks for a token and gets a dummy one)."""
        answer = await in_thread(self.ctx.upstream.challenges.stored, host)
        if answer is None:
            raise UpstreamUnreachable(message=f"{host} is unreachable")
        if answer.challenge is None:
            return web.json_response({}, headers=API_HEADERS)
        err = CrProxyError("UNAUTHORIZED", "authentication required")
        return web.Response(status=401, body=err.body(), content_type="application/json",
                            headers={"WWW-Authenticate": answer.challenge, **API_HEADERS})


def _is_ping(path_qs: str) -> bool:
    """GET /v2/ (or /v2): the version check every client starts with."""
    return path_qs.startswith("/v2") and path_qs.rstrip("/") == "/v2"


def _looks_like_token(request: web.Request) -> bool:
    return "scope" in request.query or "service" in request.query or request.path.endswith("/token")
