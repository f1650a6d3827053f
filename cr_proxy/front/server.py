"""The CONNECT front: https_proxy clients talk to it; it hands their bytes to
nginx, which ends TLS with a leaf from our CA (Debian's nginx has no CONNECT
module, so this small piece sits in front of it).

    client --CONNECT host:443--> front --PROXY line + splice--> nginx (loopback TCP, TLS)
    client --GET http://host/--> front --PROXY line + splice--> nginx (unix socket, HTTP)

The head is read and decided here (connect.py, sans-IO); after that the
front only moves bytes (relay.py: small exchanges on the event loop, a
bulk direction spliced through a kernel pipe in a thread, so a layer's
bytes never enter Python).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cr_proxy.cache.layout import Tree
from cr_proxy.config import Config
from cr_proxy.front import certs, tlshello
from cr_proxy.front.connect import (
    CONNECTED,
    Action,
    Head,
    ProtocolError,
    ProxyRefused,
    decide,
    find_head_end,
    parse_head,
    reply,
)
from cr_proxy.front.relay import Relay
from cr_proxy.front.stamp import FrontStamp
from cr_proxy.net.policy import Destinations, resolved_refusal
from cr_proxy.upstream.client import PolicyResolver

log = logging.getLogger("cr_proxy.front")

HEAD_TIMEOUT = 30.0  # seconds a client has to send its request head (and its ClientHello)
# accept() errors that pass: out of descriptors or buffers (wait a moment),
# and a connection gone before it was taken (take the next at once).
ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_PAUSE = 0.1  # seconds
# Names looked up at once before a first leaf: each lookup holds a thread of
# the default executor, which the fetcher's file I/O shares; a flood of
# invented names is refused past this instead of queueing there.
MAX_LOOKUPS = 4
# First leaves for names that only resolve (not in endpoints, nothing
# cached): a burst as a client's first pulls bring (registries, their
# token and CDN hosts), then one every NEW_LEAF_EVERY seconds. Each costs a
# key, a file and an nginx reload; a wildcard DNS name (nip.io, sslip.io)
# resolves for every invented name.
NEW_LEAF_BURST = 32
NEW_LEAF_EVERY = 2.0


class Bucket:
    """A token bucket: `take()` is True while tokens are left; one comes
    back every `every` seconds, up to `burst`."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "every")

    def __init__(self, burst: int, every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.every, self._clock = burst, every, clock
        self._tokens = float(burst)
        self._last = clock()

    def __repr__(self) -> str:
        return f"<Bucket {self._tokens:.1f} of {self.burst}>"

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) / self.every)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Front:
    __slots__ = (
        "_active", "_cache", "_clients", "_executor", "_listener", "_lookups", "_new_leaves",
        "_resolver", "_task",
        "config", "destinations", "leaves", "on_host", "stamp",
    )

    def __init__(
        self, config: Config, leaves: certs.LeafCache, stamp: FrontStamp | None = None
    ) -> None:
        self.config = config
        self.leaves = leaves
        # In every PROXY line: nginx answers no connection without it.
        self.stamp = stamp or FrontStamp.new()
        self.destinations = Destinations.of(config)
        self._cache = Tree(config.cache_dir)
        self._resolver: PolicyResolver | None = None  # made on the loop, when first needed
        self._lookups: dict[tuple[str, int], asyncio.Future[bool]] = {}  # resolves?
        self._new_leaves = Bucket(NEW_LEAF_BURST, NEW_LEAF_EVERY)
        # Told of every intercepted host (serve gives it a server of its own).
        self.on_host: Callable[[str], None] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=2 * config.proxy.max_tunnels, thread_name_prefix="splice"
        )
        self._active = 0
        self._clients: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Front {self.config.listen.proxy} active={self._active}>"

    @property
    def http_socket(self) -> Path:
        return self.config.run_dir / "mitm-http.sock"

    async def start(self) -> None:
        address = self.config.listen.proxy
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address.host, address.port))
        listener.listen(1024)
        listener.setblocking(False)
        self._listener = listener
        self._task = asyncio.create_task(self._accept_loop(), name="front accept")
        self._task.add_done_callback(_said_if_it_ended)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listener:
            self._listener.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        failing = False  # said once per spell of failed accepts, not ten times a second
        while True:
            try:
                conn, addr = await loop.sock_accept(self._listener)
            except OSError as err:
                # Out of descriptors (a burst of idle connections, or the
                # fetcher's own), or a connection gone before it was taken:
                # the front goes on accepting once there is room again.
                # Ending here left it deaf for good, serve none the wiser.
                if err.errno in ACCEPT_RETRY:
                    if not failing:
                        log.warning("front: accept failed (%s); trying again every %.1f s",
                                    err.strerror, ACCEPT_PAUSE)
                    failing = True
                    await asyncio.sleep(ACCEPT_PAUSE)
                    continue
                if err.errno in ACCEPT_SKIP:
                    continue
                raise
            if failing:
                log.warning("front: accepting again")
                failing = False
            conn.setblocking(False)
            task = asyncio.create_task(self._client(conn, addr))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _client(self, conn: socket.socket, addr: tuple) -> None:
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            try:
                # asyncio.timeout, not wait_for: no task of its own per client.
                async with asyncio.timeout(HEAD_TIMEOUT):
                    raw, rest = await _read_head(loop, conn)
                head = parse_head(raw)
                decision = decide(head, addr[0], self.config.proxy, self.destinations)
            except ProxyRefused as err:
                await self._refuse(loop, conn, addr, err)
                return
            except ProtocolError as err:
                await loop.sock_sendall(conn, reply(400, "Bad Request", err.message + "\n"))
                return
            except (TimeoutError, ConnectionError):
                return
            action = decision.action
            if action is Action.SERVE_CA:
                pem = self.leaves.ca.cert.read_text()
                await loop.sock_sendall(conn, reply(200, "OK", pem).replace(
                    b"text/plain", b"application/x-pem-file"))
                return
            if self._active >= self.config.proxy.max_tunnels:
                await loop.sock_sendall(conn, reply(503, "Busy", "too many tunnels\n"))
                return
            # The tunnel's slot is taken before any wait (a lookup, a
            # connect, a hello): every CONNECT arriving meanwhile counts it.
            self._active += 1
            try:
                if action is Action.INTERCEPT:
                    intercepted = await self._intercept(loop, conn, head, rest, addr)
                    if intercepted is None:
                        return
                    upstream, rest = intercepted, b""
                else:
                    try:
                        upstream = await self._open(action, head.host, head.port, addr)
                    except ProxyRefused as err:  # a tunnelled name that resolves into the LAN
                        await self._refuse(loop, conn, addr, err)
                        return
                    except OSError as err:
                        log.warning("CONNECT %s:%d failed: %s", head.host, head.port, err)
                        await loop.sock_sendall(conn, reply(502, "Bad Gateway", f"{err}\n"))
                        return
                    if action is Action.FORWARD:
                        await loop.sock_sendall(upstream, raw)
                    else:
                        await loop.sock_sendall(conn, CONNECTED)
                if rest:
                    await loop.sock_sendall(upstream, rest)
                handed_over = True
                await Relay(conn, upstream, self._executor).run()
            finally:
                self._active -= 1
        except OSError as err:
            log.debug("client %s: %s", addr[0], err)
        finally:
            if not handed_over:
                conn.close()

    async def _refuse(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, addr: tuple, err: ProxyRefused
    ) -> None:
        log.warning("refused %s: %s", addr[0], err.message)
        await loop.sock_sendall(conn, reply(403, "Forbidden", err.message + "\n"))

    async def _intercept(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, head: Head, rest: bytes,
        client: tuple,
    ) -> socket.socket | None:
        """Answer the CONNECT, read the client's ClientHello, make sure the
        host it names has a leaf, then hand the hello to nginx (which ends
        TLS); None when the client is turned away (and told, if it can be).
        Waiting for the hello holds a tunnel (proxy.max_tunnels: the
        caller's slot)."""
        try:
            await loop.sock_sendall(conn, CONNECTED)
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    hello, data = await _read_hello(loop, conn, rest)
            except ProtocolError as err:
                log.info("CONNECT %s from %s: %s", head.host, client[0], err.message)
                return None
            refusal = await self._leaf_for(head.host, head.port, hello)
            if refusal is not None:
                await loop.sock_sendall(conn, tlshello.alert(refusal))
                return None
            try:
                return await self._open(Action.INTERCEPT, head.host, head.port, client, data)
            except OSError as err:
                log.warning("CONNECT %s: nginx: %s", head.host, err)
                return None
        except (TimeoutError, ConnectionError):
            return None

    async def _leaf_for(self, host: str, port: int, hello: tlshello.Hello) -> int | None:
        """Make sure the host has a leaf when its ClientHello names it; None,
        or the TLS alert that refuses it. A hello without SNI, or naming
        another host, gets no leaf: nginx answers it with the fallback
        certificate (and 421 to any request)."""
        if hello.server_name != host or ":" in host:  # RFC 6066 3: no IPv6 literals
            return None
        if not self.leaves.has(host) and not await self._may_have_leaf(host, port):
            return tlshello.UNRECOGNIZED_NAME  # RFC 6066 3: a name we will not serve
        await self.leaves.ensure(host)
        if self.on_host:
            self.on_host(host)
        return None

    async def _may_have_leaf(self, host: str, port: int) -> bool:
        """A first leaf only for a host the operator named, one already in
        the cache, or a name that resolves to an address the policy allows:
        invented names never reach the disk (a leaf, an nginx server)."""
        endpoints = self.config.endpoints
        if host in endpoints or f"{host}:{port}" in endpoints:
            return True
        if self._cache.domain_dir(host).is_dir():
            return True
        lookup = self._lookups.get((host, port))
        if lookup is None:
            if len(self._lookups) >= MAX_LOOKUPS:
                log.warning("no leaf for %s: %d other new hosts are being looked up",
                            host, MAX_LOOKUPS)
                return False
            # Its slot is held until the lookup's thread is done, even when
            # the client stopped waiting for it: a slow resolver cannot
            # gather threads.
            lookup = asyncio.ensure_future(self._first_leaf(host, port))
            self._lookups[host, port] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop((host, port), None))
        try:
            async with asyncio.timeout(self.config.timeouts.connect):
                return await asyncio.shield(lookup)
        except TimeoutError:
            log.warning("no leaf for %s: lookup timed out", host)
            return False

    async def _first_leaf(self, host: str, port: int) -> bool:
        """Whether a new host gets its first leaf: it resolves, and the
        new-leaf budget has room. Once per host, whoever waits on it."""
        if not await self._resolves(host, port):
            return False
        if not self._new_leaves.take():
            log.warning("no leaf for %s: more than %d new hosts, then one every %.0f s",
                        host, NEW_LEAF_BURST, NEW_LEAF_EVERY)
            return False
        return True

    async def _resolves(self, host: str, port: int) -> bool:
        if self._resolver is None:
            self._resolver = PolicyResolver(self.destinations)
        try:
            await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        except OSError as err:
            log.warning("no leaf for %s: %s", host, err)
            return False
        return True

    async def _open(
        self, action: Action, host: str, port: int, client: tuple, first: bytes = b""
    ) -> socket.socket:
        """The socket the client's bytes go to; `first` follows the PROXY line."""
        loop = asyncio.get_running_loop()
        if action is Action.TUNNEL:
            return await asyncio.wait_for(
                _connect_tcp(loop, host, port, self.destinations), self.config.timeouts.connect
            )
        if action is Action.INTERCEPT:
            address = self.config.listen.front_tls
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            # TCP, so splice moves nginx's TLS records by page reference.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            destination: str | tuple[str, int] = (address.host, address.port)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            destination = str(self.http_socket)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, destination)
            await loop.sock_sendall(sock, self.stamp.line(client[0], port) + first)
        except OSError:
            sock.close()
            raise
        return sock


async def _read_head(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[bytes, bytes]:
    buffer = b""
    while True:
        end = find_head_end(buffer)
        if end >= 0:
            return buffer[:end], buffer[end:]
        chunk = await loop.sock_recv(conn, 65536)
        if not chunk:
            raise ConnectionResetError("client closed before sending a request")
        buffer += chunk


def _said_if_it_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("front: accepts no more connections: %r", task.exception())


async def _read_hello(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, buffer: bytes
) -> tuple[tlshello.Hello, bytes]:
    """Read until the client's ClientHello is whole (tlshello bounds its
    size); (what it asks for, every byte read)."""
    reader = tlshello.HelloReader()
    hello = reader.feed(buffer)
    while hello is None:
        chunk = await loop.sock_recv(conn, 65536)
        if not chunk:
            raise ConnectionResetError("client closed before its TLS ClientHello")
        hello = reader.feed(chunk)
    return hello, bytes(reader.received)


async def _connect_tcp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, destinations: Destinations
) -> socket.socket:
    """A tunnel's far end: the addresses `host` resolves to that the policy
    allows (the fetcher's check, Destinations.resolved_allowed), tried in
    turn. The address checked is the address connected to: no second lookup
    a rebinding name could answer differently."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    allowed = [info for info in infos if destinations.resolved_allowed(host, port, info[4][0])]
    if not allowed:
        raise ProxyRefused(message=resolved_refusal(host, port))
    last: OSError | None = None
    for family, kind, proto, _, address in allowed:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last or OSError(f"cannot connect to {host}")
