"""nginx's request log (run/access.log) kept to a size.

A mirror of a busy CI farm logs millions of hits a day, and nothing else
would ever remove them. Past `access_log_max_size` serve renames the file
to access.log.1 (dropping the one before) and tells nginx to reopen its
logs (SIGUSR1, the signal logrotate sends too): nginx's workers write to
the renamed file until they have reopened, so no line is lost, and the
pair stays near twice the limit. With 0 the operator rotates it.

(The usage feed, usage.py, rotates its own log the same way, then reads
the renamed file to its end and removes it.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("cr_proxy.logs")

CHECK_INTERVAL = 1.0  # seconds between size checks (a stat each)


def rotate_if_larger(path: Path, limit: int, reopen: Callable[[], None]) -> Path | None:
    """Rename a log past `limit` bytes to <name>.1 and have nginx reopen it;
    the renamed file, or None if it was left alone."""
    try:
        if path.stat().st_size < limit:
            return None
    except FileNotFoundError:
        return None
    rotated = path.with_name(path.name + ".1")
    os.replace(path, rotated)
    reopen()
    return rotated


async def keep_access_log(path: Path, limit: int, reopen: Callable[[], None]) -> None:
    """serve's task while `limit` is set: check the size once a second."""
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        if await asyncio.to_thread(rotate_if_larger, path, limit, reopen):
            log.info("%s passed %d bytes: renamed to %s.1, nginx reopens it",
                     path, limit, path.name)
