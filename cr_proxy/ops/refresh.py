"""Background tag refresh (seed 003 refreshes `latest` periodically): every
`refresh.interval` seconds, cached tags matching `refresh.tags`, and pinned
ones whatever their tag (cache/pins.py), are
revalidated through the fetcher's own revalidation (the same HEAD and digest
comparison a stale client request triggers), so an offline site has the
newest image it could have had. Failures are logged, never fatal; hosts
remembered as down are skipped.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from dataclasses import dataclass

import aiohttp

from cr_proxy.cache.pins import Pins
from cr_proxy.errors import CrProxyError
from cr_proxy.fetch.app import Fetcher
from cr_proxy.fetch.context import in_thread

log = logging.getLogger("cr_proxy.refresh")


@dataclass(frozen=True, slots=True)
class RefreshResult:
    checked: int
    changed: int
    failed: int


def wanted(tag: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(tag, pattern) for pattern in patterns)


async def refresh_once(fetcher: Fetcher) -> RefreshResult:
    patterns = fetcher.ctx.config.refresh.tags
    pins = Pins.from_config(fetcher.ctx.config, fetcher.ctx.store)
    pinned = await in_thread(pins.keys)
    checked = changed = failed = 0
    for domain, name, tag in await in_thread(fetcher.ctx.store.cached_tags):
        if not (wanted(tag, patterns) or f"{domain}/{name}:{tag}" in pinned):
            continue
        if fetcher.ctx.upstream.skips(domain):
            failed += 1
            continue
        checked += 1
        try:
            if await fetcher.revalidate_tag(domain, name, tag):
                changed += 1
                log.info("refresh: %s/%s:%s moved upstream; cached the new one", domain, name, tag)
        except (CrProxyError, aiohttp.ClientError, TimeoutError, OSError) as err:
            # One tag's failure (a registry gone silent mid-body too) is
            # that tag's: the pass, and the loop, go on.
            failed += 1
            log.warning("refresh: %s/%s:%s: %s", domain, name, tag,
                        getattr(err, "message", None) or repr(err))
    return RefreshResult(checked, changed, failed)


async def refresh_loop(fetcher: Fetcher) -> None:
    interval = fetcher.ctx.config.refresh.interval
    while True:
        await asyncio.sleep(interval)
        result = await refresh_once(fetcher)
        log.info("refresh: %d tags checked, %d changed, %d failed",
                 result.checked, result.changed, result.failed)
