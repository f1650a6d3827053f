"""cr_proxy.upstream.challenges: the /v2/ answer kept per host (200, or 401
with its challenge without its scope), checked both ways, and replayed while
the host is down; the realm it names on the host itself."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from cr_proxy.cache.store import Store
from cr_proxy.upstream.auth import scoped, without_scope
from cr_proxy.upstream.challenges import (
    PING_PATH,
    SIDECAR,
    Challenges,
    PingAnswer,
    own_realm_path,
)

HOST = "registry.test"
HEADER = 'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:a:pull"'
PLAIN = 'Bearer realm="https://auth.test/token",service="registry.test"'


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


def test_without_scope_drops_only_the_scope():
    assert without_scope(HEADER) == PLAIN
    assert without_scope("not a challenge ,,") == "not a challenge ,,"


def test_scoped_adds_the_pull_scope_of_a_repository():
    assert scoped(PLAIN, "org/app") == PLAIN + ',scope="repository:org/app:pull"'


def test_a_seen_challenge_is_stored_once_without_its_scope(store):
    challenges = Challenges(store)
    challenges.seen(HOST, HEADER)
    assert challenges.stored(HOST) == PingAnswer(PLAIN)
    assert challenges.stored(HOST).status == 401
    with mock.patch.object(Store, "write_sidecar") as write:
        challenges.seen(HOST, HEADER.replace("repository:a", "repository:b"))
    write.assert_not_called()  # the same challenge: no write


def test_for_repository_scopes_the_hosts_challenge(store):
    challenges = Challenges(store)
    assert challenges.for_repository(HOST, "a") is None
    challenges.seen(HOST, HEADER)
    assert challenges.for_repository(HOST, "org/app") == scoped(PLAIN, "org/app")
    assert challenges.for_repository("other.test", "org/app") is None


def test_a_challenge_the_tree_refuses_is_not_kept(store):
    challenges = Challenges(store)
    challenges.seen(HOST, 'Bearer realm="x\r\nSet-Cookie: a"')
    assert challenges.stored(HOST) is None
    assert challenges.for_repository(HOST, "a") is None


def test_without_a_store_nothing_is_kept():
    challenges = Challenges()
    challenges.seen(HOST, HEADER)
    assert challenges.stored(HOST) is None
    assert challenges.for_repository(HOST, "a") is None


def test_an_anonymous_ping_is_kept_as_a_200_and_replaces_a_challenge(store):
    challenges = Challenges(store)
    challenges.answered(HOST, 401, HEADER)
    assert challenges.stored(HOST) == PingAnswer(PLAIN)
    challenges.answered(HOST, 200, None)
    assert challenges.stored(HOST) == PingAnswer(None)
    assert challenges.stored(HOST).status == 200
    # No challenge to write beside what a commit stores.
    assert challenges.for_repository(HOST, "a") is None
    with mock.patch.object(Store, "write_sidecar") as write:
        challenges.answered(HOST, 200, None)
    write.assert_not_called()  # the same answer: no write
    challenges.answered(HOST, 401, HEADER)
    assert challenges.stored(HOST) == PingAnswer(PLAIN)


@pytest.mark.parametrize("status", [404, 500, 503, 401])
def test_other_answers_leave_the_record_alone(store, status):
    challenges = Challenges(store)
    challenges.answered(HOST, 200, None)
    challenges.answered(HOST, status, None)  # a 401 without a challenge says nothing
    assert challenges.stored(HOST) == PingAnswer(None)


def test_what_is_not_a_challenge_is_neither_kept_nor_replayed(store):
    challenges = Challenges(store)
    challenges.seen(HOST, "not a challenge ,,")
    assert challenges.stored(HOST) is None
    for written in ("not a challenge ,,", 'Bearer realm="caf\u00e9"'.encode().decode(
            "unicode_escape")):
        store.write_sidecar(SIDECAR, HOST, PING_PATH, written)  # by hand, say
        assert challenges.stored(HOST) is None


def test_a_401_elsewhere_leaves_an_anonymous_ping_alone(store):
    """/v2/ open, a repository guarded: the record stays what /v2/ said."""
    challenges = Challenges(store)
    challenges.answered(HOST, 200, None)
    with mock.patch.object(Store, "write_sidecar") as write:
        challenges.seen(HOST, HEADER)
    write.assert_not_called()
    assert challenges.stored(HOST) == PingAnswer(None)


def test_known_is_what_this_process_kept(store):
    Challenges(store).answered(HOST, 401, HEADER)
    challenges = Challenges(store)
    assert challenges.known(HOST) is None  # stored, not kept by this one
    challenges.seen(HOST, HEADER)
    assert challenges.known(HOST) == PingAnswer(PLAIN)
    challenges.answered(HOST, 200, None)
    assert challenges.known(HOST) == PingAnswer(None)


@pytest.mark.parametrize(("challenge", "path"), [
    ('Bearer realm="https://registry.test/v2/token",service="x"', "/v2/token"),
    ('Bearer realm="https://REGISTRY.test:443/v2/auth"', "/v2/auth"),
    ('Bearer realm="https://registry.test/token?x=1"', "/token"),
    (PLAIN, None),  # another host's
    ('Bearer realm="https://registry.test:8443/v2/token"', None),
    ('Bearer realm="http://registry.test/v2/token"', None),
    ('Bearer realm="https://registry.test.evil/v2/token"', None),
    ('Bearer realm="/v2/token"', None),  # no host at all
    ('Bearer realm="https://registry.test:99999/v2/token"', None),
    ('Bearer realm="https://[::1/v2/token"', None),
    ('Basic realm="https://registry.test/v2/token"', None),  # no token realm
    ('Bearer service="registry.test"', None),
    ("not a challenge ,,", None),
])
def test_own_realm_path_is_a_realm_on_the_host_itself(challenge: str, path: str | None):
    assert own_realm_path(challenge, "https", HOST, 443) == path
