"""Private content (issue 14): no one pulls from the cache what they could
not pull from the upstream.

A repository is private when the upstream refuses it to a client with no
credential, asked once a credential fetched something of it (ours from
`registries:`, or a client's own): upstream/entitlement.py puts the
question, the cache keeps the answer as a mark (lists/<domain>/<name>/
_private, layout.Tree.private_marker) before any of its content is named,
and nginx sends every hit under a marked repository here instead of
serving it (nginx/locations.conf, https_proxy server only). Its blobs
are marked too (private/<alg>/<hex>, Store.has_public_blob): the one
copy of a digest is served under no other repository's name, whose
privacy this check, asked for that name, cannot know (fetch/blobs.py).

In https_proxy mode a client brings its own Authorization. For a private
repository it is checked with the upstream (a HEAD of what it asked for)
and the verdict kept per (repository, credential) for
`private.verdict_ttl`; the credential itself is never kept, only an HMAC
of it under a key made at start. With the upstream unreachable,
`private.offline` decides: `verified` serves a credential whose last
verdict was a yes younger than `private.offline_grace`, `deny` serves no
one, `allow` serves any credential but an unbound dummy token.

Offline, a client asking for a token gets cr-proxy's dummy one
(passthrough.py). A dummy token stands for nothing, so it never unlocks
private content by itself; but a client that asked for it with its Basic
credential is that credential: the dummy is bound to it (`bind`), as a
real token obtained online with a Basic credential is, so the
credential's verdicts count for both. Mirror clients bring no credential
(containerd does not send pull secrets to mirrors): the mirror ports
serve their clients everything, unless mirror_auth is on; then nginx
decides who they are and what they may pull (nginx.py), and tells the
fetcher, for a miss of a repository not yet known private, what it would
decide if it were (`admit_mirror`).

Who an https_proxy client is, for the access log (never a secret): the
user name of its Basic credential, or of the one its token was bound to
(`bind`); the fetcher says it on each answer (X-CR-User, `identify`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web

from cr_proxy.cache.layout import OPEN_FILE_CACHE_VALID, Kind, Target
from cr_proxy.config import (
    IDENTITY_RE,
    MIRROR_AUTH_REALM,
    MIRROR_GRANT_FOR_HEADER,
    MIRROR_GRANT_HEADER,
    USER_HEADER,
)
from cr_proxy.errors import BadRequest, Denied, NotFound, Unauthorized, UpstreamError
from cr_proxy.fetch.context import FetchContext, in_thread
from cr_proxy.upstream.auth import DUMMY_PREFIX
from cr_proxy.upstream.challenges import Challenges
from cr_proxy.upstream.entitlement import accepts, refused_anonymously

log = logging.getLogger("cr_proxy.private")

# A private object the upstream says is not there: the registry's error code.
_UNKNOWN = {Kind.BLOB: "BLOB_UNKNOWN", Kind.MANIFEST: "MANIFEST_UNKNOWN",
            Kind.TAGS: "NAME_UNKNOWN", Kind.REFERRERS: "NAME_UNKNOWN"}

MAX_REMEMBERED = 50_000  # verdicts, bindings and public repositories kept (least recent go)
USER_KEY = web.RequestKey("cr_user", str)  # a request's client, as identify() found it


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    at: float  # time.monotonic() of the upstream's answer


K = TypeVar("K")
V = TypeVar("V")


class Remembered(Generic[K, V]):
    """A bounded mapping: the least recently set entries go first."""

    __slots__ = ("_items", "_limit")

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._limit = limit

    def __repr__(self) -> str:
        return f"<Remembered {len(self._items)}/{self._limit}>"

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def set(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)


class Undecided(UpstreamError):
    """The registry answered the anonymous check, but neither yes nor no
    (a 5xx, a 429): the repository may be private. Nothing is fetched."""


class Privacy:
    """Which repositories are private, and who may read them."""

    __slots__ = ("_bound", "_key", "_public", "_users", "_verdicts", "ctx")

    def __init__(self, ctx: FetchContext) -> None:
        self.ctx = ctx
        # Credentials are known here only by this HMAC; the key dies with us.
        self._key = secrets.token_bytes(32)
        self._verdicts: Remembered[tuple[str, str, str], Verdict] = Remembered()
        self._bound: Remembered[str, str] = Remembered()  # token's id -> Basic credential's
        self._public: Remembered[tuple[str, str], float] = Remembered()  # probed public, when
        self._users: Remembered[str, str] = Remembered()  # token's id -> its Basic user's name

    def __repr__(self) -> str:
        return f"<Privacy verdicts={self._verdicts!r}>"

    def _id(self, authorization: str) -> str:
        return hmac.new(self._key, authorization.encode(), hashlib.sha256).hexdigest()

    # --- which repositories are private -------------------------------------

    async def learn(self, target: Target, client_auth: str | None, pushed: bool = False) -> bool:
        """Whether `target`'s repository is private: its mark, else (when
        some credential will fetch it, or it was just pushed) the upstream
        asked without one, at most once per private.verdict_ttl for a
        public repository. A repository fetched with no credential at all
        is public."""
        domain, name = target.domain, target.rpath.name
        store, upstream = self.ctx.store, self.ctx.upstream
        marked = await in_thread(store.private_since, domain, name)
        if marked is not None:
            await self._seen_by_nginx(marked)
            return True
        credentialed = pushed or client_auth or self.ctx.config.credentials(target.registry) \
            or self.ctx.config.credentials(domain)
        # A parent (parent_mirror) fetches for us: it is not ours to probe around it.
        if not credentialed or upstream.parent is not None:
            return False
        probed = self._public.get((domain, name))
        if probed is not None and time.monotonic() - probed < self.ctx.config.private.verdict_ttl:
            return False
        try:
            private = await refused_anonymously(upstream, target)
        except UpstreamError as err:
            if upstream.is_down(domain):
                # Offline: the fetch that follows dials nothing either; it
                # answers from the cache alone, and stores nothing new.
                return False
            # Up, but not saying: guessing public would store what a
            # credential fetches unmarked, for every client to pull. The
            # caller serves what the cache holds, and fetches nothing.
            raise Undecided(message=f"cannot tell whether {domain}/{name} is private "
                            f"({err.message}); nothing was fetched, ask again") from err
        if private:
            log.info("private: %s/%s is private (refused without a credential)", domain, name)
            await in_thread(store.mark_private, domain, name, True)
            await self._seen_by_nginx(time.time())
        else:
            self._public.set((domain, name), time.monotonic())
        return private

    async def _seen_by_nginx(self, marked: float) -> None:
        """Wait until every nginx worker sees a mark made at `marked`. With
        mirror_auth on, the mirror's blob location keeps that a mark is
        missing for OPEN_FILE_CACHE_VALID seconds (nginx.MARK_CACHE): were a
        blob of a newly private repository named sooner, a worker that had
        just found no mark would serve it to anyone. Once per repository:
        only its first requests wait (one more second covers nginx's clock,
        which counts whole seconds)."""
        if not self.ctx.config.mirror_auth.enabled:
            return
        left = marked + OPEN_FILE_CACHE_VALID + 1 - time.time()
        if left > 0:
            await asyncio.sleep(left)

    # --- who may read them (https_proxy mode) --------------------------------

    async def admit(self, request: web.Request, target: Target) -> None:
        """Return if the client may read `target` of a private repository;
        raise Unauthorized (401, with the challenge) or Denied otherwise."""
        domain, name = target.domain, target.rpath.name
        authorization = request.headers.get("Authorization", "")
        if not authorization:
            self._refuse("no_credential")
            raise Unauthorized(f"{name} is private: authentication required",
                               self._challenge(domain, name))
        credential = self._id(authorization)
        key = (domain, name, credential)
        verdict = self._verdicts.get(key)
        if verdict is not None and (time.monotonic() - verdict.at
                                    < self.ctx.config.private.verdict_ttl):
            self.ctx.metrics.private_checks.labels(how="cached").inc()
            return self._decided(verdict.allowed, domain, name)
        dummy = DUMMY_PREFIX in authorization
        if dummy and not self.ctx.upstream.health.is_down(domain):
            # Ours, and the registry answers: the client is to get a real token.
            self._refuse("dummy_token")
            raise Unauthorized(f"{name} is private: a token cr-proxy handed out offline "
                               "unlocks nothing", self._challenge(domain, name))
        if not dummy:
            try:
                allowed = await accepts(self.ctx.upstream, target, authorization)
            except UpstreamError as err:
                log.info("private: cannot check a credential for %s/%s (%s): private.offline "
                         "decides", domain, name, err.message)
            else:
                self.ctx.metrics.private_checks.labels(how="upstream").inc()
                if allowed is None:
                    # Not there for this credential: the upstream's answer,
                    # and nothing of ours (a pusher's HEAD before its upload).
                    self._refuse("not_found_upstream")
                    raise NotFound(_UNKNOWN[target.rpath.kind],
                                   f"{target.rpath.path} is not known upstream")
                self._remember(domain, name, credential, allowed)
                return self._decided(allowed, domain, name)
        self.ctx.metrics.private_checks.labels(how="offline").inc()
        self._offline(domain, name, authorization, credential)

    def check_mirror_reading(self, request: web.Request, target: Target) -> None:
        """Mirror mode with mirror_auth on: nginx decided (its rules, the
        private mark) for the repository it read; raise BadRequest when the
        fetcher reads the request as another. A registry in upper case, with
        its default port or percent-encoded is one repository to the fetcher
        and another to nginx: a deny rule, or a grant for another registry,
        would otherwise reach this one."""
        read = f"{target.domain}/{target.rpath.name}"
        if request.headers.get(MIRROR_GRANT_FOR_HEADER, "") != read:
            self._refuse("mirror_not_granted")
            raise BadRequest("NAME_INVALID", f"{target.registry}/{target.rpath.name}: write "
                             "the registry in lower case, without a default port, unencoded "
                             "(mirror_auth decides for the name as written)")

    def admit_mirror(self, request: web.Request, target: Target) -> None:
        """Mirror mode with mirror_auth on: return if nginx's verdict for this
        client, had the repository been private, lets it pull; else raise
        Unauthorized (no identity) or Denied. nginx refuses a marked
        repository itself: this is the miss that first found it private."""
        grant = request.headers.get(MIRROR_GRANT_HEADER, "")
        if grant == "pull":
            return
        name = target.rpath.name
        if grant == "anonymous":
            self._refuse("mirror_no_identity")
            raise Unauthorized(f"{name} is private: authentication required (mirror_auth)",
                               f'Basic realm="{MIRROR_AUTH_REALM}"')
        self._refuse("mirror_not_granted")
        raise Denied(message=f"{name} is private and no mirror_auth rule grants it this client")

    def granted(self, domain: str, name: str, authorization: str) -> None:
        """The upstream has just accepted a push to the repository with this
        credential (push.py): a yes, as if it had been asked."""
        self._remember(domain, name, self._id(authorization), True)

    def bind(self, token: str, basic: str) -> None:
        """`token` was handed out for the Basic credential `basic` (by the
        upstream's token server, or as our dummy offline): verdicts for
        either count for the other."""
        self._bound.set(self._id(f"Bearer {token}"), self._id(basic))
        user = basic_user(basic)
        if user:
            self._users.set(self._id(f"Bearer {token}"), user)

    def identify(self, request: web.Request, authorization: str) -> None:
        """Note who an https_proxy client is, for its answer's X-CR-User
        (`user_header`): its Basic credential's user, or the one its token
        was bound to."""
        if not authorization:
            return
        user = basic_user(authorization) or self._users.get(self._id(authorization))
        if user:
            request[USER_KEY] = user

    def _remember(self, domain: str, name: str, credential: str, allowed: bool) -> None:
        verdict = Verdict(allowed, time.monotonic())
        self._verdicts.set((domain, name, credential), verdict)
        basic = self._bound.get(credential)
        if basic is not None:
            self._verdicts.set((domain, name, basic), verdict)

    def _decided(self, allowed: bool, domain: str, name: str) -> None:
        if not allowed:
            self._refuse("refused_upstream")
            raise Unauthorized(f"{name} is private: the upstream does not accept this "
                               "credential for it", self._challenge(domain, name))

    def _offline(self, domain: str, name: str, authorization: str, credential: str) -> None:
        """The upstream cannot be asked: private.offline decides."""
        policy = self.ctx.config.private.offline
        basic = self._bound.get(credential)
        if policy == "deny":
            self._refuse("offline_deny")
            raise Denied(message=f"{name} is private and its registry is unreachable "
                         "(private.offline: deny)")
        if policy == "allow":
            if DUMMY_PREFIX in authorization and basic is None:
                self._refuse("dummy_token")
                raise Denied(message=f"{name} is private: a token cr-proxy handed out "
                             "offline without a credential unlocks nothing")
            return None
        grace = self.ctx.config.private.offline_grace
        now = time.monotonic()
        for who in (credential, basic):
            verdict = self._verdicts.get((domain, name, who)) if who else None
            if verdict is not None and verdict.allowed and now - verdict.at < grace:
                return None
        self._refuse("offline_unverified")
        raise Denied(message=f"{name} is private and its registry is unreachable: this "
                     "credential was not verified for it within private.offline_grace")

    def _refuse(self, reason: str) -> None:
        self.ctx.metrics.private_denied.labels(reason=reason).inc()

    def _challenge(self, domain: str, name: str) -> str | None:
        challenges: Challenges = self.ctx.upstream.challenges
        return challenges.for_repository(domain, name)


def basic_user(authorization: str) -> str:
    """The user name of a Basic credential when it is a plain identity
    (config.IDENTITY_RE: nothing that could end a log field or a header),
    else ""."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        user = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return user if IDENTITY_RE.fullmatch(user) else ""


async def user_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the client identify() found, for nginx's access log."""
    user = request.get(USER_KEY)
    if user:
        response.headers[USER_HEADER] = user
