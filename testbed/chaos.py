"""A fault injector between cr-proxy and the real test upstream (the chaos soak).

`Chaos(upstream, seed)` listens on one loopback port per upstream host
(registry.test, auth.test, cdn.test) and relays each request to the real
one (testbed/registry.py), except when a seeded random.Random decides to
break it. cr-proxy reaches the upstream through `Chaos.endpoints` (its
`endpoints` config): every request of a miss passes here.

The faults, by kind (`counts` has how many of each were injected):

    reset        a TCP reset (SO_LINGER 0) before the answer
    reset_body   the answer's head and part of its body, then a reset
    cut          the head and part of the body, then a clean close short of
                 Content-Length
    wrong        the whole body, one byte of it flipped (blobs and manifests)
    stall        silence for a bounded while (STALL seconds), before the
                 answer or mid-body, then the rest
    5xx, 429     an error answer with a registry's JSON errors body
                 (429 with Retry-After)
    token        401 with the registry's own challenge to a request whose
                 Bearer token worked before (the token expired)
    cdn_expired  the CDN answering 403 (or 404) to a blob URL: the registry's
                 redirects are signed here (`?sig=N` added to the Location),
                 and a signed URL asked again (a resume) is expired more often

Body faults fall at a random offset; `flipped` has the digests whose bytes
a `wrong` fault changed. The rng is drawn from on the relay's
one event loop thread, so a seed replays the same faults for the same order
of requests (concurrent clients may order them differently from run to run).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import socket
import struct
from collections import Counter, deque
from collections.abc import Iterator
from typing import NoReturn

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from testbed.lifecycle import Started
from testbed.ports import free_ports
from testbed.registry import _HOP_BY_HOP, AioServer, LoopThread, Upstream

STALL = (0.5, 4.0)  # seconds a stall lasts: bounded, sometimes past timeouts.read
SIGNED_REUSE_EXPIRES = 0.5  # chance that a signed CDN URL asked a second time has expired

# Chance of each fault per request, by the host asked (the rest pass untouched).
# Body faults apply only to answers with a body (GET 2xx); token only to a
# request bearing a token that worked before.
RATES: dict[str, dict[str, float]] = {
    "registry": {"reset": 0.02, "5xx": 0.03, "429": 0.02, "stall": 0.02, "token": 0.06,
                 "cut": 0.03, "reset_body": 0.02, "wrong": 0.04},
    "auth": {"reset": 0.03, "5xx": 0.04, "429": 0.02, "stall": 0.02},
    "cdn": {"reset": 0.03, "5xx": 0.03, "429": 0.02, "stall": 0.03, "cdn_expired": 0.04,
            "cut": 0.06, "reset_body": 0.05, "wrong": 0.05},
}
DIGEST_IN_PATH = re.compile(r"sha256:([a-f0-9]{64})|/sha256/../([a-f0-9]{64})/data")
BODY_FAULTS = frozenset({"cut", "reset_body", "wrong", "stall_body"})
KINDS = ("reset", "reset_body", "cut", "wrong", "stall", "5xx", "429", "token", "cdn_expired")


def _errors(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class Chaos(Started):
    """See the module docstring. Use as a context manager."""

    def __init__(self, upstream: Upstream, seed: int,
                 rates: dict[str, dict[str, float]] | None = None,
                 stall: tuple[float, float] = STALL) -> None:
        """`rates`: RATES' shape; a case that wants a stall mid-body for
        sure names `stall_body` there."""
        self.upstream = upstream
        self.seed = seed
        self.rng = random.Random(seed)
        self.rates = rates or RATES
        self.stall = stall
        self.counts: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # relayed or broken, by host kind
        # (host kind, method, path, fault drawn, token tail) of the last requests: what
        # a failing case shows.
        self.recent: deque[tuple[str, str, str, str | None, str]] = deque(maxlen=200)
        self.enabled = True
        self._hosts = {upstream.registry_name: "registry", upstream.auth_name: "auth",
                       upstream.cdn_name: "cdn"}
        self._targets = {kind: upstream.endpoints[name] for name, kind in self._hosts.items()}
        self.ports = dict(zip(self._hosts.values(), free_ports(3), strict=True))
        # Digests whose bytes a `wrong` fault flipped on the way (by the
        # path asked: a registry's blob or manifest path, the CDN's .../data).
        self.flipped: set[str] = set()
        self._good_tokens: set[str] = set()
        self._signatures = itertools.count(1)
        self._signed_used: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop: LoopThread | None = None
        self._servers: list[AioServer] = []

    @property
    def endpoints(self) -> dict[str, str]:
        """cr-proxy's `endpoints`: every upstream name to its chaos port."""
        return {name: f"http://127.0.0.1:{self.ports[kind]}" for name, kind in self._hosts.items()}

    def table(self) -> Iterator[tuple[str, int]]:
        for kind in KINDS:
            yield kind, self.counts[kind]

    # --- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = LoopThread()
        for kind, port in self.ports.items():
            server = AioServer(self._loop, lambda kind=kind: self._app(kind), port)
            server.start()
            self._servers.append(server)

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
        self._servers = []
        if self._loop is not None:
            if self._session is not None:
                self._loop.run(self._session.close())
                self._session = None
            self._loop.close()
            self._loop = None

    def _app(self, kind: str) -> web.Application:
        app = web.Application(client_max_size=0)

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(kind, request)

        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,  # bytes pass untouched: digests intact
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=60),
            )
        return self._session

    # --- the relay ---------------------------------------------------------------------------

    def _pick(self, kind: str, request: web.Request) -> str | None:
        """One fault for this request (or None), drawn from the seeded rng."""
        if not self.enabled:
            return None
        roll = self.rng.random()
        for fault, rate in self.rates[kind].items():
            if roll < rate:
                return fault
            roll -= rate
        return None

    async def _handle(self, kind: str, request: web.Request) -> web.StreamResponse:
        self.requests[kind] += 1
        fault = self._pick(kind, request)
        self.recent.append((kind, request.method, request.path, fault,
                            request.headers.get("Authorization", "")[-12:]))
        token = request.headers.get("Authorization", "")
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        if fault == "token":
            if not token.startswith("Bearer ") or token not in self._good_tokens:
                fault = None
            else:
                del headers["Authorization"]  # the registry's own 401 and challenge
        if kind == "cdn" and fault is None:
            fault = self._expired(request)
        if fault == "cdn_expired":
            self.counts[fault] += 1
            status = self.rng.choice((403, 404))
            return web.Response(status=status, content_type="application/xml",
                                body=b"<Error><Code>AccessDenied</Code><Message>Request has "
                                     b"expired</Message></Error>")
        if fault == "reset":
            self.counts[fault] += 1
            return self._reset(request)
        if fault in ("5xx", "429"):
            self.counts[fault] += 1
            return self._error_answer(fault)
        if fault == "stall":
            self.counts[fault] += 1
            fault = "stall_body" if self.rng.random() < 0.5 else None
            if fault is None:
                await asyncio.sleep(self.rng.uniform(*self.stall))
        body = await request.read() if request.body_exists else None
        target = self._targets[kind] + request.raw_path
        try:
            async with self._client().request(request.method, target, headers=headers,
                                              data=body, allow_redirects=False) as up:
                payload = await up.read()
                status, reason, up_headers = up.status, up.reason, up.headers
        except aiohttp.ClientError as exc:
            return web.Response(status=502, content_type="application/json",
                                body=_errors("UNAVAILABLE", f"chaos relay: {exc}"))
        if fault == "token":
            self.counts[fault] += 1
            fault = None  # the registry's 401, relayed as it is
        elif status < 400 and token.startswith("Bearer "):
            self._good_tokens.add(token)
        response = web.StreamResponse(status=status, reason=reason)
        for key, value in up_headers.items():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                response.headers.add(key, value)
        if kind == "registry" and status in (301, 302, 303, 307, 308):
            response.headers["Location"] = self._sign(up_headers.get("Location", ""))
        with_body = request.method == "GET" and 200 <= status < 300 and payload
        if fault in BODY_FAULTS and not with_body:
            fault = None  # nothing to break: relayed as it is
        response.content_length = len(payload) if request.method != "HEAD" else int(
            up_headers.get("Content-Length", "0"))
        await response.prepare(request)
        if fault is None:
            if request.method != "HEAD":
                await response.write(payload)
            await response.write_eof()
            return response
        self.counts["stall" if fault == "stall_body" else fault] += 1
        if fault == "wrong":
            if found := DIGEST_IN_PATH.search(request.path):
                self.flipped.add(f"sha256:{found[1] or found[2]}")
            at = self.rng.randrange(len(payload))
            flipped = payload[:at] + bytes([payload[at] ^ 0xFF]) + payload[at + 1:]
            await response.write(flipped)
            await response.write_eof()
            return response
        at = self.rng.randrange(len(payload))
        await response.write(payload[:at])
        if fault == "stall_body":
            await asyncio.sleep(self.rng.uniform(*self.stall))
            await response.write(payload[at:])
            await response.write_eof()
            return response
        if fault == "reset_body":
            return self._reset(request)
        # cut: what was written goes out, then a FIN short of Content-Length
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError  # aiohttp ends the connection quietly

    def _reset(self, request: web.Request) -> NoReturn:
        """A TCP reset: SO_LINGER 0, then abort."""
        transport = request.transport
        assert transport is not None
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        raise asyncio.CancelledError  # aiohttp writes nothing more, logs nothing

    def _error_answer(self, fault: str) -> web.Response:
        if fault == "429":
            return web.Response(status=429, content_type="application/json",
                                headers={"Retry-After": "1"},
                                body=_errors("TOOMANYREQUESTS", "chaos: slow down"))
        status = self.rng.choice((500, 502, 503))
        return web.Response(status=status, content_type="application/json",
                            body=_errors("UNAVAILABLE", f"chaos: {status}"))

    # --- signed CDN URLs ----------------------------------------------------------------------

    def _sign(self, location: str) -> str:
        """The registry's redirect, made a one-time URL: `sig=N` added."""
        joiner = "&" if "?" in location else "?"
        return f"{location}{joiner}sig={next(self._signatures)}"

    def _expired(self, request: web.Request) -> str | None:
        """cdn_expired for a signed URL asked again (a resume), at
        SIGNED_REUSE_EXPIRES; a first use is left to the drawn faults."""
        signature = request.query.get("sig")
        if signature is None or request.method != "GET":
            return None
        if signature not in self._signed_used:
            self._signed_used.add(signature)
            return None
        return "cdn_expired" if self.rng.random() < SIGNED_REUSE_EXPIRES else None

