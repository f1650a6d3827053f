"""A disk limit, enforced while serving: least recently used images first.

Policy:
- Size is what the digest store holds (each blob once). Over `max_size`,
  whole images are removed, least recently used first, until the store is
  under `low_water * max_size`; a blob shared with an image that stays is
  kept (Inventory.remove does the reference counting).
- "Used" is what the usage feed saw: any request for the image's manifests
  or blobs, hits served by nginx alone included. An image the feed never
  saw (pulled before this serve started, warmed) falls back to the times
  the tree records (image.file_times).
- Downloads in progress (temp/) count toward the limit: they are on the
  same disk and become stored blobs at their commit, so the store makes
  room while they run. They are never refused for it (the limit is a
  target, not a quota), except a blob larger than the whole limit, which
  could never be stored (fetch/blobs.py, Blobs._size_limit).
- Nothing being served or downloaded is evicted: an image used within
  `min_age` seconds may be in the middle of a pull, and a download in
  progress is in temp/, not in the store. A client already reading a file
  keeps its bytes (an open file outlives its unlink).
- A blob no image uses (filled for a cluster peer whose image lives on
  another node, a pushed layer whose manifest never came, a commit cut
  before its name) is a candidate as an image is, by its last use (its
  names in the feed, else its commit): it counts toward the limit, and
  were it never freed, every image would go instead.
- A pinned image (cache.pins, `cr-proxy pin`: pins.py) is never evicted,
  and so neither are its blobs; the pins are read at each pass.
- Nothing a push in progress references is removed (`keep`: the blobs it
  uploaded, mounted or was told the registry holds, until its manifest
  makes them an image's; fetch/push.py), even when an evicted image shares
  them: the pushed image must pull from the cache once its manifest lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from cr_proxy.cache.image import Image, file_times
from cr_proxy.cache.inventory import Inventory, UnusedBlob
from cr_proxy.cache.pins import Pins
from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.metrics import Metrics

log = logging.getLogger("cr_proxy.evict")

Uses = Mapping[tuple[str, str], float]
NAMING_GRACE = 60.0  # seconds a blob no image uses is spared after its commit


@dataclass(frozen=True, slots=True)
class Evicted:
    images: tuple[str, ...]
    bytes_freed: int
    size_after: int  # the store's, downloads in progress not included
    blobs: tuple[str, ...] = ()  # digests of blobs no image used, freed


def last_use(uses: Uses) -> Callable[[Image], float]:
    """An Inventory `last_used` function: the feed's newest use of any of the
    image's paths, else what the tree records."""

    def newest(image: Image) -> float:
        keys = [image.location, *map(image.manifest, image.manifests),
                *map(image.blob, image.digests)]
        seen = [uses[(k.domain, k.path)] for k in keys if (k.domain, k.path) in uses]
        return max(seen) if seen else file_times(image)

    return newest


def evict_once(config: Config, store: Store, uses: Uses, now: float | None = None,
               keep: Collection[str] = frozenset()) -> Evicted:
    """Bring the store under the limit, if it is over, keeping the digests
    in `keep`. Blocking."""
    limit = config.cache
    downloading = store.temp_bytes()
    size = store.blob_bytes() + downloading
    if not limit.max_size or size <= limit.max_size:
        return Evicted((), 0, size - downloading)
    goal = limit.max_size * limit.low_water
    now = time.time() if now is None else now
    inventory = Inventory.from_config(config, last_used=last_use(uses))
    pinned = Pins.from_config(config, store).keys()
    candidates: list[tuple[float, Image | UnusedBlob]] = [
        (image.last_used, image) for image in inventory.images()]
    # A blob committed a moment ago has no name yet (its naming follows):
    # whatever min_age says, it is not taken between the two.
    candidates += [(blob_last_use(blob, uses), blob) for blob in inventory.unused_blobs()
                   if blob.digest not in keep and now - blob.stored_at >= NAMING_GRACE]
    evicted: list[str] = []
    blobs: list[str] = []
    unused: dict[str, int] = {}  # blobs no image uses, to free together: one scan
    freed = 0

    def free_unused() -> None:
        nonlocal freed, size
        if unused:
            removed = inventory.remove_blobs(unused, keep=keep)
            blobs.extend(removed.blobs)
            freed += removed.bytes
            size += sum(unused.values()) - removed.bytes  # counted as gone below
            unused.clear()

    for used_at, item in sorted(candidates, key=lambda candidate: candidate[0]):
        if size <= goal:
            break
        if now - used_at < limit.min_age:
            continue  # may be in the middle of a pull
        if isinstance(item, UnusedBlob):
            unused[item.digest] = item.size
            size -= item.size
            continue
        if item.key in pinned:
            continue
        free_unused()  # in the order of use: before the image that comes after them
        removed = inventory.remove(item, keep=keep)
        evicted.append(item.key)
        freed += removed.bytes
        size -= removed.bytes
    free_unused()
    if size > limit.max_size:
        log.warning("cache is %d bytes (%d of them downloads in progress), over its limit of "
                    "%d, and every image left was used in the last %.0f s or is pinned",
                    size, downloading, limit.max_size, limit.min_age)
    return Evicted(tuple(evicted), freed, size - downloading, tuple(blobs))


def blob_last_use(blob: UnusedBlob, uses: Uses) -> float:
    """A blob no image uses: the feed's newest use of any of its names,
    else its commit."""
    return max((uses[name] for name in blob.names if name in uses), default=blob.stored_at)


async def evict_loop(config: Config, store: Store, uses: Uses, metrics: Metrics,
                     wake: asyncio.Event,
                     keep: Callable[[], Collection[str]] = frozenset) -> None:
    """Check every check_interval, or at once when a commit passed the limit;
    `keep()`: the digests pushes in progress reference, asked at each pass."""
    loop = asyncio.get_running_loop()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), config.cache.check_interval)
        wake.clear()
        result = await loop.run_in_executor(None, evict_once, config, store, dict(uses), None,
                                            frozenset(keep()))
        metrics.cache_bytes.set(result.size_after)
        if result.images:
            metrics.evictions.inc(len(result.images))
        if result.images or result.blobs:
            unused = [f"{len(result.blobs)} blobs no image used"] if result.blobs else []
            log.info("evicted %s (%d bytes freed; cache now %d bytes)",
                     ", ".join([*result.images, *unused]), result.bytes_freed,
                     result.size_after)
