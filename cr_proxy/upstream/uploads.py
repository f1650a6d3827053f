"""The upstream login of a push: a bearer token with push scope for the
repository (and pull on a mount's source), from the `registries:`
credentials, or those credentials themselves.

A push's body streams through once and cannot be sent again, so the token
is had before the request is made, from the challenge of the host's /v2/
(kept per host), not after a 401 as registry() does for pulls.
"""

from __future__ import annotations

from cr_proxy.upstream.auth import Challenge, basic_header, parse_challenge, pull_scope
from cr_proxy.upstream.client import Upstream


def push_scope(name: str, delete: bool = False) -> str:
    """distribution wants `delete` too for cancelling an upload (DELETE)."""
    return f"repository:{name}:pull,push" + (",delete" if delete else "")


class PushAuth:
    __slots__ = ("_challenges", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._challenges: dict[str, Challenge | None] = {}  # host -> its /v2/ challenge

    def __repr__(self) -> str:
        return f"<PushAuth {len(self._challenges)} hosts>"

    async def header(
        self, registry: str, domain: str, name: str, mount_from: str | None = None,
        delete: bool = False,
    ) -> str | None:
        """The Authorization for a push to domain's repository `name`; None
        when the registry asks for none (or we have no login it takes)."""
        config = self.upstream.config
        creds = config.credentials(registry) or config.credentials(domain)
        if creds and creds.token:
            return f"Bearer {creds.token}"
        challenge = await self._challenge(domain)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return basic_header(creds) if creds and creds.password else None
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        # One scope value, space-separated (the OAuth2 form of several).
        scope = push_scope(name, delete) + (f" {pull_scope(mount_from)}" if mount_from else "")
        return "Bearer " + await self.upstream.token(challenge, scope, creds, domain)

    async def _challenge(self, domain: str) -> Challenge | None:
        """The host's /v2/ challenge, kept once /v2/ has said: a 401 with
        one, or open (2xx). Another answer (a 5xx, a 429) is not kept: as
        "no login" it would send every later push without one."""
        if domain in self._challenges:
            return self._challenges[domain]
        response = await self.upstream.send("GET", domain, "/v2/", {})
        try:
            header = response.headers.get("WWW-Authenticate", "")
            challenge = parse_challenge(header) if response.status == 401 else None
            said = challenge is not None or 200 <= response.status < 300
        finally:
            response.release()
        if said:
            self._challenges[domain] = challenge
        return challenge
