"""A registry on a flaky link, for the resume tests (tests/test_e2e_resume.py).

`FlakyRegistry` is FaultyRegistry (tests/faulty.py) with blobs that answer
`Range: bytes=N-` with a 206, and a script per blob (`flake()`):

    cuts        absolute byte offsets: each answer that would pass the next
                one stops there (a clean close, a TCP reset with
                how="reset", or silence until the peer hangs up with
                how="stall"), so [10%, 50%, 99%] breaks one download three
                times, wherever its resumes start
    gated       the first cut waits for release() (the test first sees the
                download under way, and a second client join it)
    ignore_range  answers every Range request with a 200 and the whole blob
    cdn         the registry redirects each GET to a signed CDN URL that is
                good for one GET: asked again (a resume), it answers 403 and
                the registry must be asked for a new one
    wrong_after_resume  a 206 carries one flipped byte

It counts, per blob, the body bytes it sent (`sent`), the Range starts asked
(`ranges`, None for a request without Range) and the expired CDN URLs asked
(`expired`).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import struct
from collections import defaultdict
from dataclasses import dataclass, field

from tests.faulty import FaultyRegistry, _head

RANGE = re.compile(rb"^range:\s*bytes=(\d+)-\s*$", re.IGNORECASE | re.MULTILINE)
CHUNK = 256 << 10


@dataclass
class Flake:
    cuts: list[int] = field(default_factory=list)
    how: str = "close"
    gated: bool = False
    ignore_range: bool = False
    cdn: bool = False
    wrong_after_resume: bool = False


class FlakyRegistry(FaultyRegistry):
    """See the module docstring. Use as a context manager."""

    name = "flaky.test"
    cdn_name = "cdn.flaky.test"  # the redirects' host: an endpoint here too

    def __init__(self) -> None:
        super().__init__()
        self.flakes: dict[str, Flake] = {}
        self.sent: defaultdict[str, int] = defaultdict(int)
        self.ranges: defaultdict[str, list[int | None]] = defaultdict(list)
        self.expired: defaultdict[str, int] = defaultdict(int)
        self._signed: dict[str, str] = {}  # signature -> digest, while unused
        self._used: set[str] = set()
        self._signatures = itertools.count(1)

    @property
    def endpoints(self) -> dict[str, str]:
        return {self.name: self.url, self.cdn_name: self.url}

    def flake(self, digest: str, cuts: list[int], **how: object) -> None:
        """Script a blob (see the module docstring); cuts are sorted here."""
        flake = Flake(sorted(cuts), **how)  # type: ignore[arg-type]
        self.flakes[digest] = flake
        if flake.gated:
            self._call(self._arm)

    async def _dispatch(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
        target: str, head: bytes,
    ) -> None:
        path, _, query = target.partition("?")
        if path.startswith("/cdn/"):
            await self._cdn(reader, writer, method, path[len("/cdn/"):], query, head)
            return
        digest = path.rsplit("/", 1)[-1]
        flake = self.flakes.get(digest)
        if method != "GET" or "/blobs/" not in path or flake is None:
            await super()._dispatch(reader, writer, method, target, head)
            return
        if flake.cdn:
            signature = str(next(self._signatures))
            self._signed[signature] = digest
            await self._send(writer, method, 307, b"", "text/plain",
                             {"Location": f"http://{self.cdn_name}/cdn/{digest}?sig={signature}"})
            return
        await self._flaky_blob(reader, writer, digest, flake, head)

    async def _cdn(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
        digest: str, query: str, head: bytes,
    ) -> None:
        signature = query.removeprefix("sig=")
        if self._signed.get(signature) != digest or signature in self._used:
            self.expired[digest] += 1
            await self._send(writer, method, 403, b"<Error>expired</Error>", "application/xml")
            return
        self._used.add(signature)
        await self._flaky_blob(reader, writer, digest, self.flakes[digest], head)

    async def _flaky_blob(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, digest: str,
        flake: Flake, head: bytes,
    ) -> None:
        data = self.blobs[digest].data
        asked = RANGE.search(head)
        start = int(asked[1]) if asked else None
        self.ranges[digest].append(start)
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest,
                   "Docker-Distribution-API-Version": "registry/2.0", "Connection": "close"}
        if start is None or flake.ignore_range:
            status, start = 200, 0
        else:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        body = data[start:]
        if status == 206 and flake.wrong_after_resume and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        while flake.cuts and flake.cuts[0] <= start:
            flake.cuts.pop(0)  # passed already (a resume that started beyond it)
        end = len(data)
        cut = flake.cuts.pop(0) if flake.cuts else None
        if cut is not None:
            end = cut
        writer.write(_head(status, headers))
        view = memoryview(body)[:end - start]
        for at in range(0, len(view), CHUNK):
            writer.write(view[at:at + CHUNK])
            self.sent[digest] += len(view[at:at + CHUNK])
            await writer.drain()
        if cut is None:
            return
        if flake.gated:
            flake.gated = False
            assert self._gate is not None
            await self._gate.wait()
        if flake.how == "stall":
            await self._hold(reader)
        elif flake.how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        # else: _serve closes the connection: a clean FIN short of the length
