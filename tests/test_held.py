"""cr_proxy.fetch.held: what a registry holds (read back from the tree after
a restart) and the claims that make a second pusher wait for the first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cr_proxy.cache.store import Store
from cr_proxy.fetch import held as held_mod
from cr_proxy.fetch.held import Held
from cr_proxy.oci.reference import digest_of

DATA = b"a layer" * 1000
DIGEST = digest_of(DATA)
DOMAIN = "registry.example"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


def test_load_reads_blob_names_from_the_tree(store: Store) -> None:
    store.put_bytes(DATA, DIGEST)
    store.link(DIGEST, DOMAIN, f"v2/team/app/blobs/{DIGEST}")
    store.link(DIGEST, DOMAIN, f"v2/base/blobs/{DIGEST}")
    store.link(DIGEST, "other.example", f"v2/elsewhere/blobs/{DIGEST}")
    held = Held(store)

    async def run() -> None:
        await held.load(DOMAIN)
        await held.load("empty.example")  # no directory at all: nothing held

    asyncio.run(run())
    assert held.holders(DOMAIN, DIGEST) == {"team/app", "base"}
    assert held.size(DOMAIN, DIGEST) == len(DATA)
    assert held.size("other.example", DIGEST) is None  # not loaded: another registry
    assert held.holders("empty.example", DIGEST) == set()
    held.forget(DOMAIN, "base", DIGEST)
    assert held.holders(DOMAIN, DIGEST) == {"team/app"}


def test_a_probe_waits_for_a_live_claim_until_it_is_released(store: Store) -> None:
    held = Held(store)

    async def run() -> None:
        held.claim(DOMAIN, "first", DIGEST)
        held.began(DOMAIN, "first")  # its upload in progress
        # The claimant's own probe never waits on itself.
        assert await held.wait(DOMAIN, "first", DIGEST) is False
        waiter = asyncio.ensure_future(held.wait(DOMAIN, "second", DIGEST))
        await asyncio.sleep(0)
        assert not waiter.done()
        held.add(DOMAIN, "first", DIGEST, len(DATA))
        held.ended(DOMAIN, "first")
        held.release(DOMAIN, DIGEST)
        assert await waiter is True
        assert held.claim_of(DOMAIN, DIGEST) is None

    asyncio.run(run())


def test_an_abandoned_claim_is_taken_over(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(held_mod, "CLAIM_IDLE", 0.0)
    held = Held(store)

    async def run() -> None:
        held.claim(DOMAIN, "gone", DIGEST)  # probed, then never a request again
        assert await held.wait(DOMAIN, "second", DIGEST) is False
        assert held.claim_of(DOMAIN, DIGEST) is None

    asyncio.run(run())


def test_one_registrys_word_on_a_size_is_never_anothers(tmp_path: Path) -> None:
    """A push probe's HEAD of evil.test said 1 byte for a digest; a pusher
    of registry.test, which holds it, was answered that (a review finding,
    session 13)."""
    held = Held(Store(tmp_path / "cache"))
    held.add("evil.test", "x", DIGEST, 1)
    held.add(DOMAIN, "team/app", DIGEST, len(DATA))
    held.add("evil.test", "x", DIGEST, 2)
    assert held.size(DOMAIN, DIGEST) == len(DATA)
    assert held.size("evil.test", DIGEST) == 2
