"""Who an https_proxy client is, for the access log (fetch/private.py:
basic_user, Privacy.bind and identify): a plain user name or nothing,
never a secret."""

from __future__ import annotations

import base64
from typing import cast

import pytest
from aiohttp.test_utils import make_mocked_request

from cr_proxy.fetch.context import FetchContext
from cr_proxy.fetch.private import USER_KEY, Privacy, basic_user


def basic(user: str, password: str = "pw") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "user"),
    [
        (basic("testuser"), "testuser"),
        (basic("ci-bot@acme.example"), "ci-bot@acme.example"),
        ("basic " + basic("alice").split(" ", 1)[1], "alice"),  # the scheme's case
        (basic("evil\r\nX-Injected: 1"), ""),
        (basic("two words"), ""),
        (basic("a|b"), ""),
        (basic(""), ""),
        (basic("x" * 65), ""),
        ("Basic !!!not-base64", ""),
        ("Basic " + base64.b64encode(b"\xff\xfe:pw").decode(), ""),
        ("Bearer abc", ""),
        ("", ""),
    ],
)
def test_basic_user_is_a_plain_name_or_nothing(authorization: str, user: str) -> None:
    assert basic_user(authorization) == user


def test_a_bound_token_names_the_user_whose_credential_got_it() -> None:
    privacy = Privacy(cast(FetchContext, None))
    privacy.bind("tok-1", basic("testuser", "secret"))
    privacy.bind("tok-2", basic("bad user", "secret"))
    for authorization, user in (("Bearer tok-1", "testuser"), ("Bearer tok-2", None),
                                ("Bearer unknown", None), (basic("other"), "other"), ("", None)):
        request = make_mocked_request("GET", "/v2/", headers={"Authorization": authorization})
        privacy.identify(request, authorization)
        assert request.get(USER_KEY) == user, authorization
