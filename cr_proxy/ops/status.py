"""The images the status page (`/` on listen.metrics, metrics.py) names:
those that would not pull whole offline, and those whose tag is stale.

Policy:

- Incomplete: what `cr-proxy ls` shows as `N missing` (inventory.py's
  "complete": a pulled platform's manifest, a config or a layer not in
  blobs/).
- Stale: a tag not validated upstream for longer than `tag_ttl` (the
  docker-content-digest sidecar's mtime): the next pull asks the upstream,
  and with the upstream down it is served stale. Oldest first.
- Cheap: the tree is scanned (Inventory.images, in a thread) at most once
  every SCAN_INTERVAL seconds whatever the page's traffic, and a request
  arriving meanwhile gets the last scan's rows; a scan in progress is
  joined, not repeated. At most MAX_SHOWN images of each kind are named,
  then how many more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from cr_proxy.cache.image import Image
from cr_proxy.cache.inventory import Inventory
from cr_proxy.config import Config
from cr_proxy.ops.report import state

log = logging.getLogger("cr_proxy.status")

SCAN_INTERVAL = 60.0  # seconds a scan of the tree is shown before the next
MAX_SHOWN = 50  # images of each kind named on the page

Row = tuple[str, str]


def status_rows(images: Sequence[Image], tag_ttl: float, now: float) -> list[Row]:
    """The page's rows: a count of each kind, then the images named."""
    incomplete = [i for i in images if not i.complete]
    stale = sorted((i for i in images if i.validated_at is not None
                    and now - i.validated_at > tag_ttl), key=lambda i: i.validated_at or 0.0)
    rows: list[Row] = [("incomplete images", str(len(incomplete)))]
    rows += _named("incomplete", incomplete, state)
    rows.append(("stale images", f"{len(stale)} (tags not validated for over {tag_ttl:.0f} s)"))
    rows += _named("stale", stale, lambda i: f"validated {now - (i.validated_at or 0):.0f} s ago")
    return rows


def _named(kind: str, images: Sequence[Image], say: Callable[[Image], str]) -> list[Row]:
    rows = [(kind, f"{image.name}: {say(image)}") for image in images[:MAX_SHOWN]]
    if len(images) > MAX_SHOWN:
        rows.append((kind, f"... and {len(images) - MAX_SHOWN} more (cr-proxy ls)"))
    return rows


class ImageStatus:
    """The rows of the last scan, scanning again when it is SCAN_INTERVAL
    old (the module docstring)."""

    __slots__ = ("_lock", "_rows", "_scanned_at", "config", "interval")

    def __init__(self, config: Config, interval: float = SCAN_INTERVAL) -> None:
        self.config = config
        self.interval = interval
        self._rows: list[Row] = []
        self._scanned_at: float | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<ImageStatus scanned_at={self._scanned_at}>"

    async def rows(self) -> list[Row]:
        async with self._lock:  # a scan in progress is joined
            due = self._scanned_at is None or time.monotonic() - self._scanned_at >= self.interval
            if due:
                try:
                    images = await asyncio.get_running_loop().run_in_executor(
                        None, Inventory.from_config(self.config).images)
                    self._rows = status_rows(images, self.config.tag_ttl, time.time())
                except OSError as err:  # the page still shows the counters
                    log.warning("status page: cannot scan the cache: %s", err)
                    self._rows = [("images", f"cannot scan the cache: {err.strerror}")]
                self._scanned_at = time.monotonic()
        return self._rows
