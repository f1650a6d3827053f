"""The push floor: a relay that does only what any proxy in cr-proxy's
place must do, for bench.push_ab --floor.

cr-proxy's push path is nginx (TLS, the front every client meets) and then
the fetcher (aiohttp), which relays each body to the registry, hashes it
(SHA-256, the digest it is stored under) and writes it into the cache. On a
machine whose cores the client and the registry share, each of those costs
wall time. This relay is the fetcher with the cache taken out (the test
name proxy's relay, testbed.registry.NameProxy: aiohttp server in, aiohttp
client out), the body streamed as it comes, and with --hash its SHA-256
in a thread beside the loop (as the fetcher's writes.py does), nothing
stored. Put behind a plain nginx configured as cr-proxy's
fetch location (bench.procs.FrontNginx), it measures what the architecture
itself costs (nginx's hop; the hash a verified copy needs) apart from the
fetcher's own work.

    python -m bench.passthrough --socket PATH --target http://HOST:PORT [--hash]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

from aiohttp import web
from multidict import CIMultiDict

from testbed.registry import _HOP_BY_HOP as HOP_BY_HOP
from testbed.registry import NameProxy

HASH_BATCH = 1 << 20  # bytes gathered before one hop to the hashing thread (writes.py's)


class Passthrough(NameProxy):
    """The test name proxy's relay (its session, its answers), every
    request to one `target`, bodies optionally hashed."""

    def __init__(self, target: str, hash_bodies: bool) -> None:
        super().__init__({})
        self.target = target
        self.hash_bodies = hash_bodies
        self._hashing = ThreadPoolExecutor(2)

    def __repr__(self) -> str:
        return f"<Passthrough -> {self.target} hash={self.hash_bodies}>"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        body = self._body(request) if request.body_exists else None
        async with self._client().request(request.method, self.target + request.raw_path,
                                          headers=headers, data=body,
                                          allow_redirects=False) as answer:
            return await self._relay(request, answer)

    async def _body(self, request: web.Request) -> AsyncIterator[bytes]:
        """The body as it arrives; with hashing, each MiB hashed in a thread
        while the next arrives, one batch in flight (writes.PipedWrites)."""
        digest = hashlib.sha256()
        batch: list[bytes] = []
        batched = 0
        hashing: Future[None] | None = None
        async for chunk in request.content.iter_any():
            if self.hash_bodies:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= HASH_BATCH:
                    if hashing is not None:
                        await asyncio.wrap_future(hashing)
                    hashing = self._hashing.submit(_update, digest, batch)
                    batch, batched = [], 0
            yield chunk
        if hashing is not None:
            await asyncio.wrap_future(hashing)
        _update(digest, batch)


def _update(digest: hashlib._Hash, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="unix socket to listen on")
    parser.add_argument("--target", required=True, help="http://host:port to relay to")
    parser.add_argument("--hash", action="store_true", help="SHA-256 every body in a thread")
    args = parser.parse_args(argv)
    relay = Passthrough(args.target, args.hash)
    web.run_app(relay.app(), path=args.socket, print=None, access_log=None)


if __name__ == "__main__":
    main()
