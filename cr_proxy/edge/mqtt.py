"""Modules to edge devices over MQTT, as Propeller's proxy delivers them.

The wire format is Propeller's (absmach/propeller v0.5.0-67-g102e676,
proxy/service.go, pkg/proplet ChunkPayload, proplet/src/service.rs): a
device publishes `{"app_name": "<reference>"}` on
`m/<domain>/c/<channel>/registry/proplet`; the answer is one message per
chunk on `m/<domain>/c/<channel>/registry/server`:
`{"app_name", "chunk_idx", "total_chunks", "data"}`, `data` in standard
base64 with padding (how Go's encoding/json writes a []byte, and what the
proplet's serde decoder reads), `chunk_idx` from 0. Beyond Propeller:

- `checksum`: the sha256 hex of the whole module, in every chunk (the
  proplet ignores fields it does not know), so a device checks what it
  reassembled.
- `{"app_name": ..., "chunks": [3, 7]}` asks for just those chunks again
  (a device that lost some); without `chunks`, all of them.
- `{"app_name": ..., "error": "..."}` answers a request that cannot be
  served (a reference that does not resolve, chunks out of range), instead
  of silence and a device timeout.
- Coalescing: one delivery per app_name at a time. Requests arriving while
  it waits for a slot, resolves, or within GATHER seconds of the first
  (devices "at once" are a few milliseconds apart, and a cached module
  resolves faster) join it at no cost: one resolution, one upstream fetch,
  each chunk published once for all of them, since they share the topic.
  A request arriving while chunks are being published puts the chunks
  already published back in the queue, once however many such requests
  come, for a device that was not yet listening.

Chunks are read from the cached blob one at a time (never the whole module
in memory: at most max_deliveries chunks at once), so a module in the cache
is delivered while the upstream is offline. A publish waits for the broker's
acknowledgement (QoS 1 and 2) before the next chunk is read.

The broker connection comes back with backoff when it goes; deliveries
under way wait for it and carry on. The session is persistent
(clean_session false, named by mqtt.client_id): requests published while
cr-proxy reconnects are kept by the broker and delivered once it is back.
Bad input (not JSON, no app_name, a reference that is no reference, chunk
lists out of range or too long) is answered with an error or logged and
dropped; nothing a device sends stops the task.

May import: cr_proxy.config, cr_proxy.errors.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import aiomqtt

from cr_proxy.config import Mqtt
from cr_proxy.errors import CrProxyError

log = logging.getLogger("cr_proxy.edge.mqtt")

REQUEST_TOPIC = "m/{domain}/c/{channel}/registry/proplet"
ANSWER_TOPIC = "m/{domain}/c/{channel}/registry/server"
MAX_REQUEST = 64 * 1024  # bytes of one request message; larger ones are dropped
MAX_CHUNK_LIST = 1000  # indices one request may name; a device missing more asks for all
WAITING_PER_SLOT = 10  # deliveries waiting for a slot, per mqtt.max_deliveries
BACKOFF_FIRST = 0.5  # seconds before the first reconnection attempt
BACKOFF_MAX = 30.0
PUBLISH_RETRY = 1.0  # seconds a failed publish waits for a new connection before retrying
HASH_READ = 1024 * 1024  # bytes read at a time to hash a module with no sha256 digest
GATHER = 0.1  # seconds a delivery waits for more devices before its first chunk
SHOWN_NAME = 200  # characters of a bad app_name that go into the log
# Error answers waiting for the broker at once; a flood of bad requests
# beyond it is logged and dropped unanswered, not queued without bound.
MAX_PENDING_ANSWERS = 1000


class Module(Protocol):
    """A resolved module in the cache (cr_proxy.edge.resolve.Module)."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    def open(self) -> BinaryIO: ...


Resolve = Callable[[str], Awaitable[Module]]


class BadMessage(ValueError):
    """A request that cannot be served as it is; answered when it names an
    app_name, logged and dropped otherwise."""

    def __init__(self, app_name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.app_name = app_name
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    app_name: str
    chunks: frozenset[int] | None  # None: every chunk


def parse_request(payload: bytes) -> Request:
    if len(payload) > MAX_REQUEST:
        raise BadMessage(None, f"a request of {len(payload)} bytes (at most {MAX_REQUEST})")
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the stack
        raise BadMessage(None, "not JSON") from None
    if not isinstance(message, dict):
        raise BadMessage(None, "not a JSON object")
    app_name = message.get("app_name")
    if not isinstance(app_name, str) or not app_name:
        raise BadMessage(None, "no app_name")
    chunks = message.get("chunks")
    if chunks is None:
        return Request(app_name, None)
    if not isinstance(chunks, list) or not chunks or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chunks
    ):
        raise BadMessage(app_name, "chunks: a non-empty list of chunk indices (0, 1, ...)")
    if len(chunks) > MAX_CHUNK_LIST:
        raise BadMessage(app_name, f"chunks: {len(chunks)} indices, at most {MAX_CHUNK_LIST}; "
                                   "ask without chunks for all of them")
    return Request(app_name, frozenset(chunks))


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of a module; an empty one is one empty chunk (Propeller sends
    none, and its device then waits for ever)."""
    return max(1, -(-size // chunk_size))


def chunk_message(app_name: str, index: int, total: int, data: bytes, checksum: str) -> bytes:
    return json.dumps({
        "app_name": app_name,
        "chunk_idx": index,
        "total_chunks": total,
        "data": base64.b64encode(data).decode("ascii"),
        "checksum": checksum,
    }, separators=(",", ":")).encode()


def error_message(app_name: str, error: str) -> bytes:
    return json.dumps({"app_name": app_name, "error": error}, separators=(",", ":")).encode()


def read_chunk(file: BinaryIO, index: int, chunk_size: int) -> bytes:
    file.seek(index * chunk_size)
    return file.read(chunk_size)


def sha256_hex(module: Module) -> str:
    """The module's sha256: its digest's when that is one, else read (in
    pieces) from the file."""
    algorithm, _, hexpart = module.digest.partition(":")
    if algorithm == "sha256":
        return hexpart
    hasher = hashlib.sha256()
    with module.open() as file:
        while piece := file.read(HASH_READ):
            hasher.update(piece)
    return hasher.hexdigest()


class Link:
    """The broker connection of the moment, shared by the deliveries: a
    publish waits while the broker is away and is retried once it is back."""

    def __init__(self, qos: int) -> None:
        self.qos = qos
        self.client: aiomqtt.Client | None = None
        self.up = asyncio.Event()
        self._next = asyncio.Event()  # set when the next connection is made

    def connected(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.up.set()
        self._next.set()
        self._next = asyncio.Event()

    def lost(self) -> None:
        self.client = None
        self.up.clear()

    async def publish(self, topic: str, payload: bytes) -> None:
        while True:
            await self.up.wait()
            client, reconnected = self.client, self._next
            assert client is not None
            try:
                await client.publish(topic, payload, qos=self.qos)
                return
            except aiomqtt.MqttError as err:
                # Gone, or slow to acknowledge: once the run loop has a new
                # connection (or after a pause, on this one) it goes again;
                # a device drops the duplicate chunk.
                log.debug("mqtt: publish failed (%s); retrying", err)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reconnected.wait(), PUBLISH_RETRY)


@dataclass(slots=True)
class Delivery:
    """One module being sent on the answer topic, for every device that
    asked for it meanwhile."""

    app_name: str
    wanted: set[int] | None  # before resolution: the chunks asked for (None: all)
    total: int = 0  # chunks, once resolved
    todo: set[int] = field(default_factory=set)
    out_of_range: set[int] = field(default_factory=set)

    def ask(self, chunks: frozenset[int] | None) -> None:
        if not self.total:  # not resolved yet: the request joins the wave
            if self.wanted is not None:
                if chunks is None:
                    self.wanted = None
                else:
                    # In place, and bounded: a wave that wants more chunks
                    # than one request may name gets them all.
                    self.wanted.update(chunks)
                    if len(self.wanted) > MAX_CHUNK_LIST:
                        self.wanted = None
            return
        self._queue(chunks)

    def resolved(self, total: int) -> None:
        self.total = total
        wanted, self.wanted = self.wanted, None
        self._queue(None if wanted is None else frozenset(wanted))

    def _queue(self, chunks: frozenset[int] | None) -> None:
        every = range(self.total)
        if chunks is None:
            self.todo.update(every)
            return
        self.todo.update(i for i in chunks if i < self.total)
        if len(self.out_of_range) < MAX_CHUNK_LIST:  # bounded: a few are reported
            self.out_of_range.update(i for i in chunks if i >= self.total)


class MqttEdge:
    """Answers the devices' requests (the module docstring); run() until
    cancelled."""

    def __init__(self, settings: Mqtt, resolve: Resolve) -> None:
        self.settings = settings
        self.resolve = resolve
        ids = {"domain": settings.domain_id, "channel": settings.channel_id}
        self.request_topic = REQUEST_TOPIC.format(**ids)
        self.answer_topic = ANSWER_TOPIC.format(**ids)
        self.link = Link(settings.qos)
        self.deliveries: dict[str, Delivery] = {}
        self.slots = asyncio.Semaphore(settings.max_deliveries)
        self.max_waiting = settings.max_deliveries * (WAITING_PER_SLOT + 1)
        self._tasks: set[asyncio.Future[None]] = set()
        self._answering = 0  # error answers being published

    def __repr__(self) -> str:
        return f"<MqttEdge {self.settings.broker} {len(self.deliveries)} deliveries>"

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = aiomqtt.TLSParameters(ca_certs=s.ca_file or None) if s.tls else None
        return aiomqtt.Client(
            s.host, s.port, username=s.username or None, password=s.password or None,
            identifier=s.client_id, clean_session=False, tls_params=tls,
            logger=logging.getLogger("cr_proxy.edge.mqtt.client"),
        )

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        try:
            while True:
                try:
                    async with self._client() as client:
                        await client.subscribe(self.request_topic, qos=self.settings.qos)
                        self.link.connected(client)
                        log.info("mqtt: subscribed to %s at %s", self.request_topic,
                                 self.settings.broker)
                        backoff = BACKOFF_FIRST
                        async for message in client.messages:
                            if not message.topic.matches(self.request_topic):
                                # An older configuration's subscription, kept
                                # by the persistent session: not ours to answer.
                                continue
                            payload = message.payload
                            try:
                                self.request(payload if isinstance(payload, bytes | bytearray)
                                             else str(payload).encode())
                            except Exception:  # one message must not end the others'
                                log.exception("mqtt: a request could not be handled")
                except aiomqtt.MqttError as err:
                    log.warning("mqtt: broker %s: %s; connecting again in %.1f s",
                                self.settings.broker, err, backoff)
                except Exception:  # never let one failure end edge delivery
                    log.exception("mqtt: unexpected failure; connecting again in %.1f s",
                                  backoff)
                self.link.lost()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            for task in list(self._tasks):
                task.cancel()

    def request(self, payload: bytes) -> None:
        """One message on the request topic (never raises)."""
        try:
            request = parse_request(bytes(payload))
        except BadMessage as err:
            shown = (err.app_name or "")[:SHOWN_NAME]
            log.warning("mqtt: bad request%s: %s", f" for {shown!r}" if shown else "",
                        err.reason)
            if err.app_name is not None:
                self._refuse(err.app_name, err.reason)
            return
        delivery = self.deliveries.get(request.app_name)
        if delivery is not None:
            delivery.ask(request.chunks)
            return
        if len(self.deliveries) >= self.max_waiting:
            log.warning("mqtt: %d deliveries under way or waiting; refusing %r",
                        len(self.deliveries), request.app_name[:SHOWN_NAME])
            self._refuse(request.app_name,
                         "busy: too many modules being delivered; ask again later")
            return
        delivery = Delivery(request.app_name,
                            None if request.chunks is None else set(request.chunks))
        self.deliveries[request.app_name] = delivery
        self._spawn(self._deliver(delivery))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _refuse(self, app_name: str, error: str) -> None:
        if self._answering >= MAX_PENDING_ANSWERS:
            log.warning("mqtt: %d error answers pending; %r not answered", self._answering,
                        app_name[:SHOWN_NAME])
            return
        # Counted from now, not from when the task runs: a burst is bounded.
        self._answering += 1
        self._spawn(self._answer_error(app_name, error)).add_done_callback(self._answered)

    def _answered(self, _task: asyncio.Future[None]) -> None:
        self._answering -= 1

    async def _answer_error(self, app_name: str, error: str) -> None:
        await self.link.publish(self.answer_topic, error_message(app_name, error))

    async def _deliver(self, delivery: Delivery) -> None:
        name = delivery.app_name
        try:
            async with self.slots:
                try:
                    module, _ = await asyncio.gather(self.resolve(name),
                                                     asyncio.sleep(GATHER))
                    checksum = await asyncio.to_thread(sha256_hex, module)
                except CrProxyError as err:
                    log.info("mqtt: %r not delivered: %s", name[:SHOWN_NAME], err.message)
                    del self.deliveries[name]
                    await self._answer_error(name, err.message)
                    return
                total = chunk_count(module.size, self.settings.chunk_size)
                delivery.resolved(total)
                log.info("mqtt: delivering %r (%s, %d bytes) in %d chunks", name[:SHOWN_NAME],
                         module.digest, module.size, total)
                await self._send(delivery, module, checksum)
        except Exception:
            log.exception("mqtt: delivery of %r failed", name[:SHOWN_NAME])
            if self.deliveries.get(name) is delivery:
                del self.deliveries[name]
                await self._answer_error(name, "internal error; see cr-proxy's log")

    async def _send(self, delivery: Delivery, module: Module, checksum: str) -> None:
        chunk_size = self.settings.chunk_size
        with module.open() as file:
            while delivery.todo or delivery.out_of_range:
                if delivery.out_of_range:
                    bad, delivery.out_of_range = sorted(delivery.out_of_range), set()
                    await self._answer_error(
                        delivery.app_name, f"chunks out of range: {bad[:20]} (the module has "
                                           f"{delivery.total} chunks, 0 to {delivery.total - 1})")
                    continue
                index = min(delivery.todo)
                delivery.todo.discard(index)
                data = await asyncio.to_thread(read_chunk, file, index, chunk_size)
                await self.link.publish(self.answer_topic, chunk_message(
                    delivery.app_name, index, delivery.total, data, checksum))
        # No await between the last check and here: a request that comes
        # after finds no delivery and starts a new one.
        del self.deliveries[delivery.app_name]
