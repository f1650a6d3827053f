"""Hostile servers for the blob miss path (tests/test_e2e_trust_blobs.py).

`Routes` is a FaultyRegistry (tests/faulty.py) that first answers routes of
its own, and otherwise behaves as a FaultyRegistry does:

- `redirect_blob(digest, location)`: a blob GET/HEAD of that digest, in
  any repository, answers `307 Location: <location>`;
- `redirect(path, to_param)`: GET <path>?<to_param>=URL answers `302 URL`
  (an open redirect, as many sites have one);
- `serve(path, page)`: GET <path> answers 200 with `page(query)` (bytes, or
  a function of the query parameters);
- `endless(digest)`: a blob GET of that digest answers a chunked body that
  never ends (random bytes until the peer hangs up, or ENDLESS_MAX bytes);
  `endless_sent` is how many bytes it wrote before the peer went away.

`victim()` is the other host of the redirect-poisoning test: a site with an
open redirect (`/go?to=URL`) and a download page that answers its own files
(`/download?file=N`) or sends a download to a mirror
(`/download?file=N&mirror=URL`); the hostile registry is a plain `Routes`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from urllib.parse import parse_qs

from tests.faulty import FaultyRegistry, _head

ENDLESS_MAX = 256 << 20  # what an endless body writes at most (keeps a failing test bounded)
ENDLESS_CHUNK = 64 << 10


Query = dict[str, list[str]]
Page = bytes | Callable[[Query], bytes]


class Routes(FaultyRegistry):
    """See the module docstring."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._blob_redirects: dict[str, str] = {}
        self._redirects: dict[str, str] = {}  # path -> query parameter naming the target
        self._pages: dict[str, Page] = {}
        self._endless: set[str] = set()
        self.endless_sent = 0
        self.endless_done = threading.Event()

    def redirect_blob(self, digest: str, location: str) -> None:
        self._blob_redirects[digest] = location

    def redirect(self, path: str, to_param: str) -> None:
        self._redirects[path] = to_param

    def serve(self, path: str, page: Page) -> None:
        self._pages[path] = page

    def endless(self, digest: str) -> None:
        self._endless.add(digest)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        path, _, query = target.partition("?")
        if not await self._route(writer, method, path, parse_qs(query)):
            replay = asyncio.StreamReader()
            replay.feed_data(head)  # the FaultyRegistry reads the head again
            await super()._one_request(replay, writer)
            return
        with self._lock:
            self._requests[(method, path)] += 1

    async def _route(self, writer: asyncio.StreamWriter, method: str, path: str,
                     query: Query) -> bool:
        digest = path.rsplit("/", 1)[-1]
        to_param = self._redirects.get(path)
        if "/blobs/" in path and digest in self._blob_redirects:
            await self._send(writer, method, 307, b"", "text/plain",
                             {"Location": self._blob_redirects[digest]})
        elif to_param is not None and query.get(to_param):
            await self._send(writer, method, 302, b"moved\n", "text/plain",
                             {"Location": query[to_param][0]})
        elif path in self._pages:
            page = self._pages[path]
            body = page if isinstance(page, bytes) else page(query)
            await self._send(writer, method, 200, body, "application/octet-stream")
        elif "/blobs/" in path and digest in self._endless and method == "GET":
            await self._send_endless(writer)
        else:
            return False
        return True

    async def _send_endless(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "application/octet-stream",
                                 "Transfer-Encoding": "chunked", "Connection": "close"}))
        chunk = os.urandom(ENDLESS_CHUNK)
        framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        try:
            while self.endless_sent < ENDLESS_MAX:
                writer.write(framed)
                await writer.drain()
                self.endless_sent += len(chunk)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the peer hung up: what a capped download does
        finally:
            self.endless_done.set()


def victim_file(query: Query) -> bytes:
    return f"victim's own file {query.get('file', ['?'])[0]}\n".encode()


def victim() -> Routes:
    """victim.test: an open redirect (/go?to=URL), and a download page that
    answers its own files (/download?file=N), or sends a download to a mirror
    (/download?file=N&mirror=URL)."""
    site = Routes("victim.test")
    site.redirect("/go", "to")
    site.redirect("/download", "mirror")
    site.serve("/download", victim_file)
    return site
