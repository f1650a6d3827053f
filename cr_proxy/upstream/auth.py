"""Registry authentication: challenges, the token exchange, the token cache,
and the dummy token handed out when an auth server cannot be reached.

The token flow is Docker's (distribution `docs/spec/auth/token.md`): a 401
carries `WWW-Authenticate: Bearer realm="…",service="…",scope="…"`; we GET
`realm?service=…&scope=…` (with Basic credentials when configured) and get
JSON with `token` or `access_token` and `expires_in`.

Parsing is pure; only TokenCache.fetch does I/O, through a callable the
upstream module provides.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit, urlunsplit

from cr_proxy.config import Credentials
from cr_proxy.errors import UpstreamError

# RFC 7230 3.2.6 / RFC 7235 2.1:
#   token         = 1*tchar
#   quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE
#   auth-param    = token BWS "=" BWS ( token / quoted-string )
#   challenge     = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
QUOTED = r'"(?:[^"\\]|\\.)*"'
PARAM_RE = re.compile(rf"\s*({TOKEN})\s*=\s*({TOKEN}|{QUOTED})\s*(?:,|$)")
SCHEME_RE = re.compile(rf"\s*({TOKEN})(?:\s+|$)")

DEFAULT_TOKEN_LIFETIME = 60  # seconds, the spec's default for expires_in
MAX_TOKEN_LIFETIME = 24 * 3600  # seconds a token is kept at most, whatever it says
# A token goes into an Authorization header: visible ASCII only (JWTs,
# OAuth2 and token68 tokens all are), no space, CR or LF.
TOKEN_VALUE_RE = re.compile(r"[\x21-\x7e]{1,16384}")
EXPIRY_MARGIN = 10  # seconds before expiry a cached token is dropped
DUMMY_LIFETIME = 300
DUMMY_PREFIX = "cr-proxy-offline-"  # every dummy token begins so; none is a real token


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-cased: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge | None:
    """Parse one WWW-Authenticate challenge; None if it is not one."""
    match = SCHEME_RE.match(header)
    if not match:
        return None
    params: dict[str, str] = {}
    pos = match.end()
    while pos < len(header):
        param = PARAM_RE.match(header, pos)
        if not param:
            return None
        value = param.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[param.group(1).lower()] = value
        pos = param.end()
    return Challenge(match.group(1).lower(), params)


def without_scope(header: str) -> str:
    """A challenge as it applies to any repository: its scope dropped (one
    that does not parse is kept as it is)."""
    challenge = parse_challenge(header)
    if challenge is None:
        return header
    params = ",".join(f'{k}="{v}"' for k, v in challenge.params.items() if k != "scope")
    return f"{challenge.scheme.capitalize()} {params}"


def scoped(header: str, name: str) -> str:
    """A scope-less challenge as a 401 for repository `name` would carry it."""
    return f'{header},scope="{pull_scope(name)}"'


def pull_scope(name: str) -> str:
    return f"repository:{name}:pull"


def token_url(challenge: Challenge, scope: str) -> str:
    """The realm with service and scope added to whatever query it has."""
    query = {}
    if challenge.params.get("service"):
        query["service"] = challenge.params["service"]
    if scope:
        query["scope"] = scope
    try:
        parts = urlsplit(challenge.realm)
    except ValueError as err:  # "http://[::1/token": the registry's words
        raise UpstreamError(message=f"token realm {challenge.realm[:100]!r} is not a URL") from err
    merged = "&".join(q for q in (parts.query, urlencode(query)) if q)
    return urlunsplit(parts._replace(query=merged))


def token_of(answer: object) -> str:
    """The token of a token server's JSON answer (`token`, else the OAuth2
    `access_token`), "" when it has none; UpstreamError for one that cannot
    go into a header (not a string, or other than visible ASCII)."""
    if not isinstance(answer, dict):
        return ""
    token = answer.get("token") or answer.get("access_token") or ""
    if token == "":
        return ""
    if not isinstance(token, str) or not TOKEN_VALUE_RE.fullmatch(token):
        raise UpstreamError(message="the token server's token is not a header value")
    return token


def lifetime_of(answer: dict) -> float:
    """Seconds a token lives by its `expires_in`: the spec's default when
    missing or not a positive number, at most MAX_TOKEN_LIFETIME."""
    value = answer.get("expires_in")
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return DEFAULT_TOKEN_LIFETIME
    return min(float(value), MAX_TOKEN_LIFETIME)


def basic_header(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def dummy_token() -> dict[str, object]:
    """What a token request gets when its auth server is unreachable: enough
    for a client to go on and pull what is cached."""
    issued = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Unique: a dummy handed out for a Basic credential stands for it
    # (fetch/private.py binds them); no other client may hold the same one.
    token = (DUMMY_PREFIX + base64.urlsafe_b64encode(issued.encode()).decode().rstrip("=")
             + "." + secrets.token_urlsafe(16))
    return {
        "token": token,
        "access_token": token,
        "expires_in": DUMMY_LIFETIME,
        "issued_at": issued,
    }


@dataclass(slots=True)
class _Cached:
    token: str
    expires: float


TokenFetch = Callable[[str, dict[str, str]], Awaitable[dict]]


class TokenCache:
    """Bearer tokens per (realm, service, scope, who), until they expire."""

    __slots__ = ("_clock", "_tokens")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tokens: dict[tuple[str, str, str, str], _Cached] = {}
        self._clock = clock

    def __repr__(self) -> str:
        return f"<TokenCache {len(self._tokens)} tokens>"

    def get(self, key: tuple[str, str, str, str]) -> str | None:
        cached = self._tokens.get(key)
        if cached and cached.expires > self._clock():
            return cached.token
        self._tokens.pop(key, None)
        return None

    @staticmethod
    def key(challenge: Challenge, scope: str,
            credentials: Credentials | None) -> tuple[str, str, str, str]:
        who = credentials.username if credentials else ""
        return (challenge.realm, challenge.params.get("service", ""), scope, who)

    def discard(self, key: tuple[str, str, str, str]) -> None:
        """Forget a token the registry refused before its expires_in said."""
        self._tokens.pop(key, None)

    async def fetch(
        self,
        challenge: Challenge,
        scope: str,
        credentials: Credentials | None,
        http_get: TokenFetch,
    ) -> str:
        """A token for this challenge and scope, from the cache or the realm."""
        key = self.key(challenge, scope, credentials)
        token = self.get(key)
        if token:
            return token
        headers = {}
        if credentials and credentials.password:
            headers["Authorization"] = basic_header(credentials)
        answer = await http_get(token_url(challenge, scope), headers)
        if not isinstance(answer, dict):
            raise UpstreamError(message="the token server's answer is not a JSON object")
        token = token_of(answer)
        self._tokens[key] = _Cached(token, self._clock() + lifetime_of(answer) - EXPIRY_MARGIN)
        return token
