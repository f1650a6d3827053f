"""A registry that holds the mirror's upstream connections, for the resource
limit tests (tests/test_e2e_trust_limits.py).

`TricklingRegistry` is a FaultyRegistry whose blobs added with
`add_trickling` answer their headers at once and then one byte every
TRICKLE_INTERVAL seconds: never silent long enough for a read timeout to
fire, hopelessly slow. It records the most connections it held at once
(`peak_connections`), so a test can see the mirror's per-host limit from
the far side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from tests.faulty import HOLD_MAX, Blob, FaultyRegistry, _head, sha256

TRICKLE_INTERVAL = 0.1  # seconds between two bytes of a trickling blob


class TricklingRegistry(FaultyRegistry):
    name = "trickle.test"

    def __init__(self) -> None:
        super().__init__()
        self.trickling: set[str] = set()
        self.peak_connections = 0

    def add_trickling(self, count: int, size: int = 64 << 10) -> list[str]:
        """`count` distinct blobs of `size` bytes that trickle."""
        digests = []
        for _ in range(count):
            data = os.urandom(size)
            digest = sha256(data)
            self.blobs[digest] = Blob(data)
            self.trickling.add(digest)
            digests.append(digest)
        return digests

    async def _send_blob(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
        digest: str, blob: Blob,
    ) -> None:
        self.peak_connections = max(self.peak_connections, self.open_connections)
        if digest not in self.trickling or method == "HEAD":
            await super()._send_blob(reader, writer, method, digest, blob)
            return
        writer.write(_head(200, {
            "Content-Type": blob.media_type, "Docker-Content-Digest": digest,
            "Content-Length": str(len(blob.data)), "Connection": "close",
        }))
        await writer.drain()
        # A byte at a time until the peer hangs up (the write then fails in
        # _serve), we stop, or HOLD_MAX.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HOLD_MAX):
                for byte in blob.data:
                    await asyncio.sleep(TRICKLE_INTERVAL)
                    writer.write(bytes([byte]))
                    await writer.drain()
