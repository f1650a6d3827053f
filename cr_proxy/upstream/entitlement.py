"""Two questions put to a registry about one repository (issue 14): does it
refuse a client with no credential (the repository is private), and does
it accept this client's own credential. Each is one cheap HEAD of the
object the client asked for, with the token exchange a 401 calls for.

Neither goes through the token cache: an anonymous token must not be
mistaken for ours, and a client's Basic credential is exchanged afresh
(the cache keys tokens by user name, and a wrong password must not find a
right one's token). Redirects are not followed: a 3xx from the registry
is its yes. Nothing here keeps or logs a credential.
"""

from __future__ import annotations

from cr_proxy.cache.layout import Kind, Target
from cr_proxy.errors import TokenRefused, UpstreamError
from cr_proxy.oci.manifest import MANIFEST_ACCEPT
from cr_proxy.upstream.auth import parse_challenge, pull_scope, token_of, token_url
from cr_proxy.upstream.client import Upstream

REFUSED = frozenset({401, 403})
NOT_FOUND = 404


async def refused_anonymously(upstream: Upstream, target: Target) -> bool:
    """Whether the upstream refuses `target` to a client with no credential:
    True for a 401 or 403, False for an answer (or a 404); UpstreamError
    when its answer says neither (a 5xx, a 429): a public verdict guessed
    from it would store a private repository's content for every client."""
    status = await _status(upstream, target, None)
    if status in REFUSED:
        return True
    if status < 400 or status == NOT_FOUND:
        return False
    raise UpstreamError(message=f"{target.domain} answered {status} to an anonymous check")


async def accepts(upstream: Upstream, target: Target, authorization: str) -> bool | None:
    """Whether the upstream lets a client with this Authorization (Bearer,
    or Basic exchanged for a token as the client would) read `target`;
    None when it says the object is not there (404: unknown, deleted, or a
    registry hiding a repository from those who may not see it), which
    grants nothing. Raises UpstreamUnreachable when it cannot be asked,
    UpstreamError when its answer says neither (a 5xx)."""
    status = await _status(upstream, target, authorization)
    if status in REFUSED:
        return False
    if status == NOT_FOUND:
        return None
    if status < 400:
        return True
    raise UpstreamError(message=f"{target.domain} answered {status} to a credential check")


async def _status(upstream: Upstream, target: Target, authorization: str | None) -> int:
    domain, path = target.domain, "/" + target.rpath.path
    # A listing (tags, referrers) has no HEAD in distribution: a GET, unread.
    method = "HEAD" if target.rpath.kind in (Kind.BLOB, Kind.MANIFEST) else "GET"
    headers = {"Accept": MANIFEST_ACCEPT}
    basic = authorization is not None and authorization[:6].lower() == "basic "
    if authorization is not None:
        headers["Authorization"] = authorization
    async with await upstream.send(method, domain, path, headers) as response:
        status = response.status
        header = response.headers.get("WWW-Authenticate", "")
    # A Bearer credential the registry refused is its answer; no credential
    # or a Basic one is exchanged for a token first, as a client would.
    if status != 401 or (authorization is not None and not basic):
        return status
    challenge = parse_challenge(header)
    if challenge is None or challenge.scheme != "bearer" or not challenge.realm:
        return status
    scope = challenge.params.get("scope") or pull_scope(target.rpath.name)
    try:
        if basic and authorization:
            token = await upstream.client_token(challenge, scope, authorization, domain)
        else:  # anonymous: a token asked for with no credential
            token = token_of(await upstream.get_json(token_url(challenge, scope), {},
                                                     registry=domain))
    except TokenRefused:
        return 401
    if not token:
        return 401
    headers["Authorization"] = f"Bearer {token}"
    async with await upstream.send(method, domain, path, headers) as response:
        return response.status
