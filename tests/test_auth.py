"""cr_proxy.auth: challenges, token URLs, the dummy token and the token cache."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.config import Credentials
from cr_proxy.upstream.auth import (
    DEFAULT_TOKEN_LIFETIME,
    DUMMY_LIFETIME,
    EXPIRY_MARGIN,
    Challenge,
    TokenCache,
    basic_header,
    dummy_token,
    parse_challenge,
    pull_scope,
    token_url,
)

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/alpine:pull"'
)
HUB_CHALLENGE = Challenge(
    "bearer",
    {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    },
)


# --- parse_challenge -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (HUB, HUB_CHALLENGE),
        ('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"})),
        ("Basic", Challenge("basic", {})),
        ("Bearer", Challenge("bearer", {})),
        ('BEARER REALM="https://a.test/t"', Challenge("bearer", {"realm": "https://a.test/t"})),
        ("Bearer realm=token68-ish,service=svc", Challenge(
            "bearer", {"realm": "token68-ish", "service": "svc"})),
        (
            'Bearer realm = "https://a.test/t" , service = "s"',
            Challenge("bearer", {"realm": "https://a.test/t", "service": "s"}),
        ),
        (
            'Bearer realm="https://a.test/t",scope="repository:a/b:pull,push"',
            Challenge("bearer", {"realm": "https://a.test/t", "scope": "repository:a/b:pull,push"}),
        ),
        (
            'Bearer realm="https://a.test/t",scope="repository:a:pull,push,delete",service="s"',
            Challenge("bearer", {"realm": "https://a.test/t",
                                 "scope": "repository:a:pull,push,delete", "service": "s"}),
        ),
        ('Basic realm="say \\"hi\\""', Challenge("basic", {"realm": 'say "hi"'})),
        ('Basic realm="back\\\\slash"', Challenge("basic", {"realm": "back\\slash"})),
        ('Basic realm=""', Challenge("basic", {"realm": ""})),
        ('Bearer realm="x",', Challenge("bearer", {"realm": "x"})),
        ('  Bearer   realm="x"', Challenge("bearer", {"realm": "x"})),
    ],
)
def test_parse_challenge(header, expected):
    assert parse_challenge(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        'realm="x"',
        "=",
        'Bearer realm="unterminated',
        'Bearer realm="x" service="y"',
        "Bearer ,,,",
        'Bearer realm="x",,service="y"',
        "Bearer realm=",
        "Bearer realm=a b",
        "Bearer abc==",
        'Bearer realm="x", Basic realm="y"',
        '"Bearer" realm="x"',
        "Bearer \x00",
        "B\u00e9arer realm=x",
    ],
)
def test_parse_challenge_rejects_garbage(header):
    assert parse_challenge(header) is None


def test_challenge_realm_defaults_to_empty():
    assert Challenge("basic").realm == ""
    assert HUB_CHALLENGE.realm == "https://auth.docker.io/token"


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_challenge_never_raises_and_lower_cases_names(header):
    challenge = parse_challenge(header)
    if challenge is not None:
        assert challenge.scheme == challenge.scheme.lower()
        assert all(key == key.lower() for key in challenge.params)


QUOTABLE = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)


@given(
    st.dictionaries(
        st.sampled_from(["realm", "service", "scope", "error", "x-extra"]), QUOTABLE, max_size=4
    )
)
@settings(max_examples=300, deadline=None)
def test_parse_challenge_round_trips_quoted_values(params):
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = "Bearer " + ",".join(f"{k}={quote(v)}" for k, v in params.items())
    assert parse_challenge(header) == Challenge("bearer", params)


# --- token_url, scopes, basic auth ---------------------------------------------------


def test_pull_scope():
    assert pull_scope("library/alpine") == "repository:library/alpine:pull"


def test_token_url_for_docker_hub():
    url = token_url(HUB_CHALLENGE, pull_scope("library/alpine"))
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "auth.docker.io", "/token")
    assert parse_qs(parts.query) == {
        "service": ["registry.docker.io"],
        "scope": ["repository:library/alpine:pull"],
    }


def test_token_url_without_scope_has_only_the_service():
    url = token_url(HUB_CHALLENGE, "")
    assert parse_qs(urlsplit(url).query) == {"service": ["registry.docker.io"]}


def test_token_url_escapes_hostile_values():
    challenge = Challenge("bearer", {"realm": "https://a.test/t", "service": "a&b=c#d"})
    url = token_url(challenge, "repository:x:pull&admin=1")
    assert parse_qs(urlsplit(url).query) == {
        "service": ["a&b=c#d"],
        "scope": ["repository:x:pull&admin=1"],
    }


def test_token_url_keeps_a_query_already_in_the_realm():
    challenge = Challenge("bearer", {"realm": "https://a.test/t?x=1", "service": "s"})
    url = token_url(challenge, "repository:a:pull")
    assert parse_qs(urlsplit(url).query) == {
        "x": ["1"],
        "service": ["s"],
        "scope": ["repository:a:pull"],
    }


@pytest.mark.parametrize(
    ("username", "password"),
    [("bot", "s3cret"), ("user", "p:a:ss"), ("\u00fcser", "p\u00e4ss")],
)
def test_basic_header_is_base64_of_user_colon_password(username, password):
    header = basic_header(Credentials(username, password))
    scheme, _, encoded = header.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"{username}:{password}"


# --- dummy_token -------------------------------------------------------------------


def test_dummy_token_has_the_fields_clients_need():
    token = dummy_token()
    assert set(token) == {"token", "access_token", "expires_in", "issued_at"}
    assert token["token"] == token["access_token"]
    assert str(token["token"]).startswith("cr-proxy-offline-")
    assert token["expires_in"] == DUMMY_LIFETIME
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(token["issued_at"]))
    issued = datetime.strptime(str(token["issued_at"]), "%Y-%m-%dT%H:%M:%SZ")
    assert issued.replace(tzinfo=UTC) <= datetime.now(UTC)


# --- TokenCache ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeAuthServer:
    """A fake http_get: counts calls, records what was asked, answers in turn."""

    def __init__(self, answer: dict | None = None) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.answer = answer

    async def __call__(self, url: str, headers: dict[str, str]) -> dict:
        self.calls.append((url, dict(headers)))
        if self.answer is not None:
            return self.answer
        return {"token": f"token-{len(self.calls)}", "expires_in": 300}


SCOPE_A = pull_scope("library/alpine")
SCOPE_B = pull_scope("library/busybox")


async def test_token_cache_fetches_once_per_scope_until_expiry():
    clock, server = FakeClock(), FakeAuthServer()
    cache = TokenCache(clock)
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server) == "token-1"
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server) == "token-1"
    assert len(server.calls) == 1
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_B, None, server) == "token-2"
    assert len(server.calls) == 2
    clock.now += 300 - EXPIRY_MARGIN - 0.5
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server) == "token-1"
    assert len(server.calls) == 2
    clock.now += 0.5  # exactly at expiry minus margin: dropped
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server) == "token-3"
    assert len(server.calls) == 3


async def test_token_cache_asks_the_realm_with_service_and_scope():
    server = FakeAuthServer()
    await TokenCache(FakeClock()).fetch(HUB_CHALLENGE, SCOPE_A, None, server)
    (url, headers), = server.calls
    assert url == token_url(HUB_CHALLENGE, SCOPE_A)
    assert headers == {}


async def test_token_cache_sends_basic_auth_when_credentials_have_a_password():
    server = FakeAuthServer()
    creds = Credentials("bot", "s3cret")
    await TokenCache(FakeClock()).fetch(HUB_CHALLENGE, SCOPE_A, creds, server)
    (_, headers), = server.calls
    assert headers == {"Authorization": basic_header(creds)}
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"bot:s3cret").decode()


async def test_token_cache_sends_no_basic_auth_for_token_only_credentials():
    server = FakeAuthServer()
    await TokenCache(FakeClock()).fetch(HUB_CHALLENGE, SCOPE_A, Credentials(token="t"), server)
    (_, headers), = server.calls
    assert "Authorization" not in headers


async def test_token_cache_keeps_tokens_apart_per_user():
    server = FakeAuthServer()
    cache = TokenCache(FakeClock())
    anonymous = await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server)
    bot = await cache.fetch(HUB_CHALLENGE, SCOPE_A, Credentials("bot", "pw"), server)
    assert (anonymous, bot) == ("token-1", "token-2")
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, Credentials("bot", "pw"), server) == bot
    assert len(server.calls) == 2


async def test_token_cache_keeps_tokens_apart_per_realm_and_service():
    server = FakeAuthServer()
    cache = TokenCache(FakeClock())
    other_service = Challenge("bearer", {**HUB_CHALLENGE.params, "service": "other"})
    other_realm = Challenge("bearer", {**HUB_CHALLENGE.params, "realm": "https://b.test/t"})
    tokens = {
        await cache.fetch(c, SCOPE_A, None, server)
        for c in (HUB_CHALLENGE, other_service, other_realm)
    }
    assert len(tokens) == 3
    assert len(server.calls) == 3


@pytest.mark.parametrize(
    ("answer", "token", "lifetime"),
    [
        ({"token": "t", "expires_in": 120}, "t", 120),
        ({"access_token": "a", "expires_in": 120}, "a", 120),
        ({"token": "t", "access_token": "a", "expires_in": 120}, "t", 120),
        ({"token": "t"}, "t", DEFAULT_TOKEN_LIFETIME),
        ({"token": "t", "expires_in": 0}, "t", DEFAULT_TOKEN_LIFETIME),
    ],
)
async def test_token_cache_reads_token_and_lifetime_from_the_answer(answer, token, lifetime):
    clock, server = FakeClock(), FakeAuthServer(answer)
    cache = TokenCache(clock)
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server) == token
    clock.now += lifetime - EXPIRY_MARGIN - 0.5
    await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server)
    assert len(server.calls) == 1
    clock.now += 0.5
    await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server)
    assert len(server.calls) == 2


async def test_token_cache_does_not_cache_an_empty_token():
    server = FakeAuthServer({"expires_in": 300})
    cache = TokenCache(FakeClock())
    assert await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server) == ""
    await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server)
    assert len(server.calls) == 2


async def test_token_cache_get_drops_expired_entries():
    clock, server = FakeClock(), FakeAuthServer()
    cache = TokenCache(clock)
    await cache.fetch(HUB_CHALLENGE, SCOPE_A, None, server)
    key = (HUB_CHALLENGE.realm, "registry.docker.io", SCOPE_A, "")
    assert cache.get(key) == "token-1"
    assert repr(cache) == "<TokenCache 1 tokens>"
    clock.now += 300
    assert cache.get(key) is None
    assert repr(cache) == "<TokenCache 0 tokens>"
