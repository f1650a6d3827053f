"""cr_proxy.cache.evict on a tree built with Store (no serve): least recently
used images go first, down to low_water; an image used within min_age
stays; a blob another image uses stays. And removal and verify racing a
pull that names a blob meanwhile."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import yaml

from cr_proxy.cache.evict import evict_once
from cr_proxy.cache.inventory import Inventory
from cr_proxy.cache.pins import Pins
from cr_proxy.cache.removal import remove_images
from cr_proxy.cache.scan import Reader, Scan
from cr_proxy.cache.store import Store
from cr_proxy.cache.verify import verify
from cr_proxy.config import Config, load
from cr_proxy.oci.reference import digest_of
from tests.test_inventory import REG, Cached, cache_blob, cache_image

NOW = 1_000_000_000.0
LAYER = 10_000  # bytes of each image's own layer: the images' sizes are alike
HOUR = 3600.0


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


def config(tmp_path: Path, store: Store, max_size: int, low_water: float = 0.9,
           min_age: float = 300, pins: tuple[str, ...] = ()) -> Config:
    path = tmp_path / "cr-proxy.yml"
    path.write_text(yaml.safe_dump({
        "cache_dir": str(store.root),
        "cache": {"max_size": max_size, "low_water": low_water, "min_age": min_age,
                  "pins": list(pins)},
    }))
    return load(path, environ={})


def image(store: Store, name: str, *shared: bytes) -> Cached:
    own = name.encode() * (LAYER // len(name))
    return cache_image(store, name, "v1", [own, *shared])


def used(*names_and_ages: tuple[str, float]) -> dict[tuple[str, str], float]:
    """The usage feed: each image's tag asked for `age` seconds before NOW."""
    return {(REG, f"v2/{name}/manifests/v1"): NOW - age for name, age in names_and_ages}


def keys(*names: str) -> tuple[str, ...]:
    return tuple(f"{REG}/{name}:v1" for name in names)


def cached_names(store: Store) -> set[str]:
    return {i.repository for i in Inventory(store.root, {}).images()}


def test_under_the_limit_nothing_goes(tmp_path: Path, store: Store) -> None:
    for name in ("old", "mid", "new"):
        image(store, name)
    total = store.blob_bytes()
    result = evict_once(config(tmp_path, store, max_size=total), store,
                        used(("old", 3 * HOUR)), now=NOW)
    assert (result.images, result.bytes_freed, result.size_after) == ((), 0, total)
    assert cached_names(store) == {"old", "mid", "new"}


def test_no_limit_means_nothing_goes(tmp_path: Path, store: Store) -> None:
    image(store, "old")
    result = evict_once(config(tmp_path, store, max_size=0), store, {}, now=NOW)
    assert result.images == ()


def test_least_recently_used_go_first_down_to_low_water(tmp_path: Path, store: Store) -> None:
    sizes = {name: image(store, name).size for name in ("mid", "old", "new", "newest")}
    total = store.blob_bytes()
    assert total == sum(sizes.values())
    # Over the limit by a byte; low_water leaves room for two images and a half.
    conf = config(tmp_path, store, max_size=total - 1, low_water=0.6)
    uses = used(("old", 4 * HOUR), ("mid", 3 * HOUR), ("new", 2 * HOUR), ("newest", HOUR))
    result = evict_once(conf, store, uses, now=NOW)
    assert result.images == keys("old", "mid")
    assert result.bytes_freed == sizes["old"] + sizes["mid"]
    assert result.size_after == store.blob_bytes() == total - result.bytes_freed
    assert result.size_after <= 0.6 * (total - 1)
    assert cached_names(store) == {"new", "newest"}


def test_a_higher_low_water_evicts_less(tmp_path: Path, store: Store) -> None:
    for name in ("old", "mid", "new", "newest"):
        image(store, name)
    total = store.blob_bytes()
    conf = config(tmp_path, store, max_size=total - 1, low_water=0.9)
    uses = used(("old", 4 * HOUR), ("mid", 3 * HOUR), ("new", 2 * HOUR), ("newest", HOUR))
    assert evict_once(conf, store, uses, now=NOW).images == keys("old")
    assert cached_names(store) == {"mid", "new", "newest"}


def test_an_image_used_within_min_age_stays(tmp_path: Path, store: Store) -> None:
    """However far over the limit: what was used lately may be mid-pull."""
    for name in ("old", "mid", "new"):
        image(store, name)
    conf = config(tmp_path, store, max_size=1, low_water=0.9, min_age=HOUR)
    uses = used(("old", 2 * HOUR), ("mid", 600), ("new", 60))
    result = evict_once(conf, store, uses, now=NOW)
    assert result.images == keys("old")
    assert result.size_after == store.blob_bytes() > 1
    assert cached_names(store) == {"mid", "new"}


def test_every_image_too_young_is_logged(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    image(store, "young")
    conf = config(tmp_path, store, max_size=1, min_age=HOUR)
    with caplog.at_level(logging.WARNING):
        result = evict_once(conf, store, used(("young", 60)), now=NOW)
    assert result.images == ()
    assert "over its limit" in caplog.text


def test_a_blob_shared_with_an_image_that_stays_is_kept(tmp_path: Path, store: Store) -> None:
    base = b"a base layer both images use\n" * 400
    old = image(store, "old", base)
    new = image(store, "new", base)
    total = store.blob_bytes()
    conf = config(tmp_path, store, max_size=total - 1, low_water=0.9)
    result = evict_once(conf, store, used(("old", 2 * HOUR), ("new", HOUR)), now=NOW)
    assert result.images == keys("old")
    assert result.bytes_freed == old.size - len(base)  # the shared layer was not freed
    assert store.tree.blob(old.layers[1]).exists()
    assert not store.tree.blob(old.layers[0]).exists()
    (left,) = Inventory(store.root, {}).images()
    assert (left.repository, left.digest, left.missing) == ("new", new.digest, frozenset())


def test_an_image_the_feed_never_saw_falls_back_to_the_tree_times(
    tmp_path: Path, store: Store
) -> None:
    """Pulled before this serve started: its files' times (now, here) count,
    so an image the feed saw an hour ago goes first."""
    image(store, "seen")
    image(store, "unseen")
    conf = config(tmp_path, store, max_size=store.blob_bytes() - 1, low_water=0.9, min_age=0)
    result = evict_once(conf, store, {(REG, "v2/seen/manifests/v1"): time.time() - HOUR})
    assert result.images == keys("seen")


def test_pinned_images_stay_whoever_pinned_them(tmp_path: Path, store: Store) -> None:
    """Pinned by the configuration (cache.pins) or by `cr-proxy pin` (the
    file, read at each pass): never evicted, however long unused; the next
    least recently used go instead."""
    for name in ("old", "mid", "new", "newest"):
        image(store, name)
    total = store.blob_bytes()
    conf = config(tmp_path, store, max_size=total - 1, low_water=0.6,
                  pins=(f"{REG}/old:v1",))
    Pins.from_config(conf, store).pin([f"{REG}/mid:v1"])
    uses = used(("old", 4 * HOUR), ("mid", 3 * HOUR), ("new", 2 * HOUR), ("newest", HOUR))
    result = evict_once(conf, store, uses, now=NOW)
    assert result.images == keys("new", "newest")
    assert cached_names(store) == {"old", "mid"}


def test_all_pinned_is_over_the_limit_and_says_so(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    image(store, "old")
    conf = config(tmp_path, store, max_size=1, min_age=0, pins=(f"{REG}/old:v1",))
    with caplog.at_level(logging.WARNING):
        assert evict_once(conf, store, used(("old", HOUR)), now=NOW).images == ()
    assert "or is pinned" in caplog.text


def test_a_blob_a_push_in_progress_references_is_kept(tmp_path: Path, store: Store) -> None:
    """`keep` (fetch/push.py's pending(): what a push without its manifest
    yet uploaded) is kept like a blob an image that stays uses."""
    old = image(store, "old")
    own = old.layers[0]
    result = evict_once(config(tmp_path, store, max_size=1), store, used(("old", 3 * HOUR)),
                        now=NOW, keep=frozenset({own}))
    assert result.images == keys("old")
    assert store.has_blob(own)
    assert not store.has_blob(old.config)


def test_a_blob_no_image_uses_goes_by_its_last_use_as_an_image_would(
    tmp_path: Path, store: Store,
) -> None:
    """A blob this node filled for a cluster peer (its image's manifest
    lives on another node), counted toward the limit: freed when its last
    use is the oldest, not left while every image goes (a review finding,
    session 13). Its names and its CDN record go with it."""
    for name in ("old", "mid", "new"):
        image(store, name)
    images_total = store.blob_bytes()
    layer = b"a peer's layer\n" * (2 * images_total // 15)
    digest = cache_blob(store, REG, "other/app", layer, cdn=True)
    os.utime(store.tree.blob(digest), (NOW - 3 * HOUR,) * 2)  # committed hours ago
    conf = config(tmp_path, store, max_size=int(2.5 * images_total), low_water=0.9)
    uses = {**used(("old", 2 * HOUR), ("mid", 2 * HOUR), ("new", HOUR)),
            (REG, f"v2/other/app/blobs/{digest}"): NOW - 3 * HOUR}
    result = evict_once(conf, store, uses, now=NOW)
    assert result.images == () and result.blobs == (digest,)
    assert cached_names(store) == {"old", "mid", "new"}
    assert not store.has_blob(digest)
    assert not store.tree.content(REG, f"v2/other/app/blobs/{digest}").exists()
    assert result.size_after == store.blob_bytes() == images_total


def test_a_blob_no_image_uses_is_kept_while_young_or_kept_by_a_push(
    tmp_path: Path, store: Store,
) -> None:
    image(store, "old")
    digest = cache_blob(store, REG, "other/app", b"pushed, no manifest yet\n" * 2000)
    os.utime(store.tree.blob(digest), (NOW - 2 * HOUR,) * 2)
    conf = config(tmp_path, store, max_size=store.blob_bytes() // 2)
    young = {(REG, f"v2/other/app/blobs/{digest}"): NOW - 10, **used(("old", HOUR))}
    assert evict_once(conf, store, young, now=NOW).blobs == ()
    # Committed a moment ago (its name to follow), whatever min_age says:
    os.utime(store.tree.blob(digest), (NOW - 5,) * 2)
    zero = config(tmp_path, store, max_size=store.blob_bytes() // 2, min_age=0)
    old_use = {(REG, f"v2/other/app/blobs/{digest}"): NOW - HOUR, **used(("old", 10))}
    assert evict_once(zero, store, old_use, now=NOW).blobs == ()
    os.utime(store.tree.blob(digest), (NOW - 2 * HOUR,) * 2)
    old = {(REG, f"v2/other/app/blobs/{digest}"): NOW - HOUR, **used(("old", 10))}
    assert evict_once(conf, store, old, now=NOW, keep={digest}).blobs == ()
    assert store.has_blob(digest)


def test_a_blob_named_again_while_rm_ran_keeps_its_file_and_its_count(store: Store) -> None:
    """rm (or the evictor) scans, then a pull of another repository that
    shares the base layer links it under its own name, then the removal
    frees the layer: its blobs/ file stays (the new name's bytes counted,
    freeable later), where it was removed (a review finding, session 13)."""
    shared = b"a base layer\n" * 500
    cache_image(store, "a", "v1", [shared])
    inventory = Inventory(store.root, {})
    scan = Scan.of(store.tree)
    current = inventory._images(scan)
    layer = digest_of(shared)
    assert store.link_if_stored(layer, REG, f"v2/b/c/blobs/{layer}") is not None
    remove_images(store, scan, current, [i for i in current if i.repository == "a"])
    assert store.tree.content(REG, f"v2/b/c/blobs/{layer}").exists()
    assert store.has_blob(layer) and store.blob_bytes() == len(shared)


def test_a_corrupt_blob_named_while_verify_hashed_is_taken_off_that_name_too(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = b"a layer that rots on disk\n" * 100
    digest = cache_blob(store, REG, "a", data)
    with open(store.tree.blob(digest), "r+b") as rotten:
        rotten.write(b"X")
    real_hash = Reader.hash

    def hashing(self: Reader, path: Path, algorithm: str) -> str | None:
        # Hashing a big store takes hours; a pull links the blob meanwhile.
        store.link_if_stored(digest, REG, f"v2/b/blobs/{digest}")
        return real_hash(self, path, algorithm)

    monkeypatch.setattr(Reader, "hash", hashing)
    failures = verify(store).failures
    assert [f.digest for f in failures] == [digest]
    assert f"{REG}/v2/b/blobs/{digest}" in failures[0].removed
    assert not store.tree.content(REG, f"v2/b/blobs/{digest}").exists()


def test_blobs_no_image_uses_are_freed_in_one_scan_not_one_each(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster node most blobs are such blobs: freed one at a time,
    each rescanned the whole tree (40 blobs, 42 scans)."""
    for i in range(40):
        cache_blob(store, REG, "peer/app", f"peer layer {i}\n".encode() * 500)
    conf = config(tmp_path, store, max_size=1000, min_age=0)
    scans = [0]
    real = Scan.of.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Scan], tree: object) -> Scan:
        scans[0] += 1
        return real(cls, tree)

    monkeypatch.setattr(Scan, "of", classmethod(counted))
    result = evict_once(conf, store, {}, now=time.time() + HOUR)
    assert len(result.blobs) == 40 and store.blob_bytes() == 0
    assert scans[0] <= 3
