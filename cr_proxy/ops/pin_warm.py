"""The images the configuration pins (cache.pins) are warmed at start,
through serve's own fetcher, as `cr-proxy warm` does (every platform, every
blob, verified). An image that fails (the upstream away, a name it does not
know) is tried again every `RETRY` seconds until it warms, so a site that
starts with the cable out fills its pins once the link is back; each try
costs one short wait while the registry is down (fetch's fast offline).
"""

from __future__ import annotations

import asyncio
import logging

from cr_proxy.config import Config
from cr_proxy.ops.warm import ImageResult, warm

log = logging.getLogger("cr_proxy.pins")

RETRY = 60.0  # seconds between tries of the pins that failed


class LogProgress:
    """warm's Progress, as log lines: one per image done."""

    def note(self, image: str, text: str) -> None:
        pass

    def expect(self, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None:
        pass

    def image_done(self, result: ImageResult) -> None:
        if result.error is None:
            log.info("pinned %s warmed: %d blobs fetched, %d cached", result.image,
                     result.blobs_fetched, result.blobs_cached)

    def close(self) -> None:
        pass


async def warm_pins(config: Config, retry: float = RETRY) -> None:
    pending = list(config.cache.pins)
    while pending:
        summary = await warm(config, pending, progress=LogProgress())
        pending = [image for image, _ in summary.failures]
        for image, error in summary.failures:
            log.warning("pinned %s not warmed (%s); trying again in %.0f s", image, error, retry)
        if pending:
            await asyncio.sleep(retry)
    log.info("every pinned image of the configuration is warm")
