"""cr_proxy.upstream.challenges: the /v2/ challenge kept per host, without
its scope, and replayed while the host is down."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from cr_proxy.cache.store import Store
from cr_proxy.upstream.auth import scoped, without_scope
from cr_proxy.upstream.challenges import Challenges

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
    assert challenges.stored(HOST) == PLAIN
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
