"""The usage feed: nginx's access log, sent to us over a unix datagram
socket (nginx's `syslog:server=unix:` target), one line per request.

nginx serves hits without the fetcher, so this is where cr-proxy learns of
them: it counts hits and bytes served for the metrics, and records when each
cached path was last used, which the evictor (least recently used first)
trusts rather than file access times (often off: noatime, relatime).

Line format (nginx.conf, log_format cr_usage):
    <domain> <path> <status> <body bytes> <request type> <X-Cache>
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .metrics import Metrics

log = logging.getLogger("cr_proxy.usage")

# <PRI>TIMESTAMP TAG: MESSAGE  (RFC 3164, as nginx sends it with nohostname)
SYSLOG_RE = re.compile(r"<\d{1,3}>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d [^:]{1,32}: (.*)", re.S)
CACHED_KINDS = frozenset({"blob", "manifest", "other"})


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


def parse_line(datagram: bytes) -> Use | None:
    """One syslog datagram -> Use; None for anything else."""
    match = SYSLOG_RE.fullmatch(datagram.decode("utf-8", "replace").rstrip("\n"))
    if not match:
        return None
    fields = match.group(1).split(" ")
    if len(fields) != 6 or not fields[2].isdigit():
        return None
    domain, path, status, size, kind, cache = fields
    return Use(domain, path, int(status), int(size) if size.isdigit() else 0, kind, cache)


class UsageFeed(asyncio.DatagramProtocol):
    """Receives the lines; keeps last-use times per (domain, path)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.last_used: dict[tuple[str, str], float] = {}
        self.lines = 0

    def __repr__(self) -> str:
        return f"<UsageFeed {self.lines} lines, {len(self.last_used)} paths>"

    def datagram_received(self, data: bytes, addr: object) -> None:
        use = parse_line(data)
        if use is None:
            return
        self.lines += 1
        self.record(use)

    def record(self, use: Use) -> None:
        self.metrics.requests.labels(type=use.kind or "-", status=str(use.status)).inc()
        if use.nginx_hit:
            self.metrics.hits.labels(kind=use.kind).inc()
            self.metrics.bytes_served.inc(use.size)
        if use.domain and use.status in (200, 206) and use.kind.split("-")[0] in CACHED_KINDS:
            self.last_used[(use.domain, use.path.lstrip("/"))] = time.time()


async def start(socket_path: Path, metrics: Metrics) -> tuple[asyncio.DatagramTransport, UsageFeed]:
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    loop = asyncio.get_running_loop()
    transport, feed = await loop.create_datagram_endpoint(
        lambda: UsageFeed(metrics), local_addr=str(socket_path), family=socket.AF_UNIX
    )
    os.chmod(socket_path, 0o666)  # nginx workers may run as another user
    return transport, feed  # type: ignore[return-value]
