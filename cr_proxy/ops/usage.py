"""The usage feed: nginx's second access log, read back by serve.

nginx serves hits without the fetcher, so this is where cr-proxy learns of
them: it counts hits and bytes served for the metrics, and records when each
cached path was last used, which the evictor (least recently used first)
trusts rather than file access times (often off: noatime, relatime).

nginx writes the log buffered (64 KiB, flushed every second), so a hit
costs nginx no extra syscall of its own; serve reads what is new once a
second. When the file passes ROTATE_BYTES it is renamed and nginx told to
reopen its logs (SIGUSR1); the old file is read to its end first.

Line format (nginx.conf, log_format cr_usage):
    <domain> <path> <status> <body bytes> <request type> <X-Cache>
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cr_proxy.metrics import Metrics
from cr_proxy.ops.logs import rotate_if_larger

log = logging.getLogger("cr_proxy.usage")

CACHED_KINDS = frozenset({"blob", "manifest", "other", "artifact"})
DENIED = "denied-"  # nginx's mirror_auth refusals: denied-<reason> (nginx.py)
READ_INTERVAL = 1.0  # seconds between reads of the log
ROTATE_BYTES = 64 << 20
MAX_USES = 100_000  # (domain, path) last-use times kept; the oldest go first


@dataclass(frozen=True, slots=True)
class Use:
    domain: str
    path: str
    status: int
    size: int
    kind: str  # the location's request type; "-fetch" suffix: the fetcher answered
    cache: str  # X-Cache: HIT, MISS, STALE, REVALIDATED, or "-"

    @property
    def nginx_hit(self) -> bool:
        return self.kind in CACHED_KINDS and self.cache == "HIT" and self.status in (200, 206)


def parse_line(line: str) -> Use | None:
    """One log line -> Use; None for anything else."""
    fields = line.rstrip("\n").split(" ")
    if len(fields) != 6 or not fields[2].isdigit():
        return None
    domain, path, status, size, kind, cache = fields
    return Use(domain, path, int(status), int(size) if size.isdigit() else 0, kind, cache)


class UsageFeed:
    """Keeps last-use times per (domain, path) and feeds the metrics."""

    __slots__ = ("last_used", "lines", "metrics")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.last_used: dict[tuple[str, str], float] = {}
        self.lines = 0

    def __repr__(self) -> str:
        return f"<UsageFeed {self.lines} lines, {len(self.last_used)} paths>"

    def record(self, use: Use, when: float, times: int = 1) -> None:
        self.lines += times
        self.metrics.requests.labels(type=use.kind or "-", status=str(use.status)).inc(times)
        if use.kind.startswith(DENIED):
            self.metrics.mirror_auth_denied.labels(reason=use.kind[len(DENIED):]).inc(times)
        if use.nginx_hit:
            self.metrics.hits.labels(kind=use.kind).inc(times)
            self.metrics.bytes_served.inc(use.size * times)
        if use.domain and use.status in (200, 206) and use.kind.split("-")[0] in CACHED_KINDS:
            # Kept in the order of use and bounded: the names are the
            # clients' (a stored blob is answered under invented ones when
            # the upstream cannot be asked); past the bound the oldest go,
            # and an image whose names went falls back to the tree's times.
            key = (use.domain, use.path.lstrip("/"))
            self.last_used.pop(key, None)
            self.last_used[key] = when
            if len(self.last_used) > MAX_USES:
                del self.last_used[next(iter(self.last_used))]

    def feed(self, text: str, when: float) -> None:
        # Hits repeat: a busy second is thousands of identical lines. Count
        # them first (in C), then parse and record each distinct line once;
        # serve shares the CPU with nginx.
        for line, times in collections.Counter(text.splitlines()).items():
            use = parse_line(line)
            if use is not None:
                self.record(use, when, times)


class LogTail:
    """Reads the lines nginx appended since the last read (blocking I/O;
    serve runs it in an executor)."""

    __slots__ = ("_offset", "_partial", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""

    def read_new(self) -> str:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    self._offset = 0  # replaced under us: start over
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._offset += len(data)
        text = self._partial + data.decode("utf-8", "replace")
        complete, _, self._partial = text.rpartition("\n")
        return complete

    def rotate_if_large(self, reopen: Callable[[], None]) -> str:
        """Rename a large log, have nginx reopen it, return the old tail."""
        old = rotate_if_larger(self.path, ROTATE_BYTES, reopen)
        if old is None:
            return ""
        self.path, kept = old, self.path
        # nginx may still write to the old file until it has reopened; the
        # next read_new of the new file picks up from 0.
        rest = self.read_new()
        self.path, self._offset = kept, 0
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
        return rest


async def follow(feed: UsageFeed, tail: LogTail, reopen: Callable[[], None]) -> None:
    """serve's task: feed what nginx logged, once a second."""
    loop = asyncio.get_running_loop()
    while True:
        text = await loop.run_in_executor(None, tail.read_new)
        text += await loop.run_in_executor(None, tail.rotate_if_large, reopen)
        if text:
            feed.feed(text, time.time())
        await asyncio.sleep(READ_INTERVAL)
