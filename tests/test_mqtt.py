"""cr_proxy.edge.mqtt: the wire format (Propeller's, byte for byte), the
requests it refuses, and MqttEdge against a real mosquitto with modules from
files (the whole way, through `cr-proxy serve` and a real registry, is
tests/test_e2e_mqtt.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from cr_proxy.config import build, default_data
from cr_proxy.edge import mqtt
from cr_proxy.errors import ConfigError, NotFound
from testbed.mqtt import Answer, Broker, Device

USER, PASSWORD = "cr-proxy-client", "a key from SuperMQ"
DEVICE_USER, DEVICE_PASSWORD = "proplet-1", "another key"
DOMAIN, CHANNEL = "dom-1", "chan-1"
DEADLINE = 30.0


def settings(broker: Broker, **over: object) -> mqtt.Mqtt:
    data = default_data()
    data["mqtt"].update({"broker": broker.url, "username": USER, "password": PASSWORD,
                         "domain_id": DOMAIN, "channel_id": CHANNEL, "chunk_size": 1000,
                         **over})
    return build(data).mqtt


# --- the wire format ----------------------------------------------------------


def test_a_chunk_is_what_propellers_proxy_sends_plus_the_checksum() -> None:
    # Go's encoding/json writes ChunkPayload{AppName, ChunkIdx, TotalChunks,
    # Data []byte} as below: Data in standard base64 with padding.
    sent = mqtt.chunk_message("ghcr.io/acme/mod:v1", 2, 3, b"\0asm\x01\0\0\0", "ab" * 32)
    assert sent == (b'{"app_name":"ghcr.io/acme/mod:v1","chunk_idx":2,"total_chunks":3,'
                    b'"data":"AGFzbQEAAAA=","checksum":"' + b"ab" * 32 + b'"}')


def test_chunk_counts_round_up_and_an_empty_module_is_one_empty_chunk() -> None:
    assert [mqtt.chunk_count(n, 10) for n in (0, 1, 10, 11, 20, 21)] == [1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize(("payload", "app_name", "reason"), [
    (b"not json", None, "not JSON"),
    (b"\xff\xfe", None, "not JSON"),
    (b"[1, 2]", None, "not a JSON object"),
    (b"{}", None, "no app_name"),
    (b'{"app_name": 7}', None, "no app_name"),
    (b'{"app_name": ""}', None, "no app_name"),
    (b'{"app_name": "a", "chunks": []}', "a", "chunks:"),
    (b'{"app_name": "a", "chunks": [-1]}', "a", "chunks:"),
    (b'{"app_name": "a", "chunks": [true]}', "a", "chunks:"),
    (b'{"app_name": "a", "chunks": "3"}', "a", "chunks:"),
    (json.dumps({"app_name": "a", "chunks": list(range(5000))}).encode(), "a", "at most"),
    (b'{"app_name": "' + b"x" * 70000 + b'"}', None, "bytes"),
    # Nested past Python's stack, under MAX_REQUEST: json raises RecursionError.
    (b'{"app_name": "a", "x": ' + b"[" * 60000 + b"}", None, "not JSON"),
])
def test_bad_requests_are_refused_with_a_reason(payload: bytes, app_name: str | None,
                                                 reason: str) -> None:
    with pytest.raises(mqtt.BadMessage) as caught:
        mqtt.parse_request(payload)
    assert caught.value.app_name == app_name
    assert reason in caught.value.reason


def test_a_request_names_all_chunks_or_some() -> None:
    assert mqtt.parse_request(b'{"app_name": "a"}') == mqtt.Request("a", None)
    assert mqtt.parse_request(b'{"app_name": "a", "chunks": [3, 7, 3]}') == mqtt.Request(
        "a", frozenset({3, 7}))


@pytest.mark.parametrize(("over", "message"), [
    ({"broker": "http://x:1"}, "mqtt.broker"),
    ({"broker": "tcp://:1883"}, "mqtt.broker"),
    ({"broker": "tcp://h:99999"}, "mqtt.broker"),
    ({"broker": "tcp://h", "domain_id": ""}, "mqtt.domain_id"),
    ({"broker": "tcp://h", "domain_id": "a/b", "channel_id": "c"}, "mqtt.domain_id"),
    ({"broker": "tcp://h", "domain_id": "d", "channel_id": "#"}, "mqtt.channel_id"),
    ({"qos": 3}, "mqtt.qos"),
    ({"chunk_size": 0}, "mqtt.chunk_size"),
    ({"chunk_size": 2**30}, "mqtt.chunk_size"),
    ({"max_deliveries": 0}, "mqtt.max_deliveries"),
    ({"password_env": "NOT_SET_ANYWHERE"}, "mqtt.password_env"),
])
def test_bad_mqtt_settings_name_the_key(over: dict[str, object], message: str) -> None:
    data = default_data()
    data["mqtt"].update(over)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build(data, {})


def test_the_mqtt_password_is_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    data = default_data()
    data["mqtt"].update({"broker": "ssl://broker.example", "username": "u",
                         "password_file": str(secret), "domain_id": "d", "channel_id": "c"})
    config = build(data, {})
    assert config.mqtt.password == "hunter2"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("broker.example", 8883, True)
    assert "hunter2" not in repr(config) and "hunter2" not in json.dumps(config.masked())


# --- against a real broker --------------------------------------------------------


@dataclass(frozen=True)
class FileModule:
    path: Path
    digest: str
    size: int

    def open(self) -> BinaryIO:
        return self.path.open("rb")


class Modules:
    """A resolver over files: counts its calls, and can be held back."""

    def __init__(self) -> None:
        self.known: dict[str, FileModule] = {}
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def add(self, where: Path, name: str, data: bytes, algorithm: str = "sha256") -> None:
        where.write_bytes(data)
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        self.known[name] = FileModule(where, digest, len(data))

    async def resolve(self, name: str) -> FileModule:
        self.calls.append(name)
        await self.gate.wait()
        if name not in self.known:
            raise NotFound("MANIFEST_UNKNOWN", f"{name}: no such module")
        return self.known[name]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    users = {USER: PASSWORD, DEVICE_USER: DEVICE_PASSWORD}
    with Broker(tmp_path_factory.mktemp("broker"), users) as running:
        yield running


@pytest.fixture
async def edge(broker: Broker, tmp_path: Path) -> AsyncIterator[tuple[mqtt.MqttEdge, Modules]]:
    modules = Modules()
    modules.add(tmp_path / "small", "small", b"\0asm\x01\0\0\0")
    modules.add(tmp_path / "odd", "odd", bytes(range(256)) * 20, "sha512")  # 5120 bytes
    runner = mqtt.MqttEdge(settings(broker, client_id=f"cr-{tmp_path.name}"), modules.resolve)
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(DEADLINE):
            await runner.link.up.wait()
        yield runner, modules
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def device(broker: Broker, name: str = "dev", persistent: bool = False) -> Device:
    return Device(broker, DEVICE_USER, DEVICE_PASSWORD, DOMAIN, CHANNEL, name,
                  persistent=persistent)


async def until(condition: Callable[[], bool]) -> None:
    """Poll (bounded by the caller's timeout) for state another task sets."""
    while not condition():
        await asyncio.sleep(0.01)


async def test_a_device_gets_a_module_and_the_chunks_it_lost(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules]
) -> None:
    _, modules = edge
    async with device(broker) as dev:
        small = await dev.fetch("small", DEADLINE)
        assert small.data == b"\0asm\x01\0\0\0" and small.total == 1
        odd = await dev.fetch("odd", DEADLINE, drop=frozenset({1, 4}))
    assert odd.data == modules.known["odd"].path.read_bytes()
    assert odd.total == 6 and odd.asked_again == [[1, 4]]
    # A sha512-addressed module's checksum is still its sha256.
    assert odd.checksum == hashlib.sha256(odd.data).hexdigest()


async def test_bad_requests_get_an_error_answer_or_are_dropped(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules]
) -> None:
    runner, _ = edge
    async with device(broker) as dev:
        for junk in (b"not json", b"{}", b'{"app_name": 1}', b"x" * 100000):
            await dev.send(junk)
        await dev.ask("no/such:module")
        assert "no such module" in await dev.error_for("no/such:module", DEADLINE)
        await dev.send(json.dumps({"app_name": "odd", "chunks": list(range(3000))}))
        assert "at most" in await dev.error_for("odd", DEADLINE)
        await dev.ask("odd", [2, 99])
        assert "out of range" in await dev.error_for("odd", DEADLINE)
        # Still serving.
        assert (await dev.fetch("small", DEADLINE)).total == 1
    assert not runner.deliveries


async def test_devices_asking_at_once_cost_one_resolution_and_one_send(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules]
) -> None:
    runner, modules = edge
    modules.gate.clear()  # resolution held until every request is in
    seen = 0
    real_request = runner.request

    def counting(payload: bytes) -> None:
        nonlocal seen
        seen += 1
        real_request(payload)

    runner.request = counting  # type: ignore[method-assign]
    devices = [device(broker, f"dev-{i}") for i in range(8)]
    async with asyncio.timeout(DEADLINE):
        for dev in devices:
            await dev.__aenter__()
        try:
            for dev in devices:
                await dev.ask("odd")
            while seen < len(devices):
                await asyncio.sleep(0.01)  # polls (bounded by the timeout) for the broker
            modules.gate.set()
            got = await asyncio.gather(*(dev.fetch("odd", DEADLINE, ask=False)
                                         for dev in devices))
        finally:
            for dev in devices:
                await dev.__aexit__(None, None, None)
    assert modules.calls == ["odd"]
    # Each chunk went out once: no device saw one twice.
    assert all(g.duplicates == 0 and g.data == got[0].data for g in got)


async def test_a_request_sent_while_the_broker_was_away_is_answered(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules]
) -> None:
    runner, _ = edge
    broker.stop()
    try:
        async with asyncio.timeout(DEADLINE):
            while runner.link.up.is_set():
                await asyncio.sleep(0.01)
    finally:
        broker.start()
    # Straight away, before cr-proxy is back: the broker keeps the request
    # for cr-proxy's persistent session.
    async with device(broker) as dev:
        assert (await dev.fetch("small", DEADLINE)).data == b"\0asm\x01\0\0\0"


async def test_a_delivery_cut_by_the_broker_going_away_carries_on_when_it_is_back(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules]
) -> None:
    runner, modules = edge
    modules.gate.clear()
    async with asyncio.timeout(DEADLINE):
        async with device(broker, "patient", persistent=True) as dev:
            await dev.ask("odd")
            await until(lambda: modules.calls == ["odd"])  # resolving: no chunk out yet
        broker.stop()
        try:
            await until(lambda: not runner.link.up.is_set())
            modules.gate.set()  # the chunks now wait for the broker
            await until(lambda: len(runner.deliveries["odd"].todo) == 5)  # chunk 0 waits
        finally:
            broker.start()
        # The device's session kept the answers that came while it was away.
        async with device(broker, "patient", persistent=True) as dev:
            got = await dev.fetch("odd", DEADLINE, ask=False)
    assert got.data == modules.known["odd"].path.read_bytes()


async def test_an_unanswerable_module_does_not_stop_the_others(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules], tmp_path: Path
) -> None:
    _, modules = edge
    modules.known["gone"] = FileModule(tmp_path / "missing", "sha256:" + "0" * 64, 10)
    async with device(broker) as dev:
        await dev.ask("gone")
        assert "internal error" in await dev.error_for("gone", DEADLINE)
        with pytest.raises(Answer):
            await dev.fetch("gone", DEADLINE)
        assert (await dev.fetch("small", DEADLINE)).total == 1


def test_base64_is_standard_with_padding() -> None:
    assert base64.b64decode(json.loads(mqtt.chunk_message("a", 0, 1, b"\xff\xfe", ""))["data"],
                            validate=True) == b"\xff\xfe"


async def test_a_flood_of_bad_requests_queues_a_bounded_number_of_answers() -> None:
    data = default_data()
    data["mqtt"].update({"broker": "tcp://127.0.0.1:1", "domain_id": "d", "channel_id": "c"})
    runner = mqtt.MqttEdge(build(data, {}).mqtt, Modules().resolve)  # never connected
    for i in range(mqtt.MAX_PENDING_ANSWERS + 50):
        runner.request(json.dumps({"app_name": f"m{i}", "chunks": []}).encode())
    assert runner._answering == mqtt.MAX_PENDING_ANSWERS
    assert len(runner._tasks) == mqtt.MAX_PENDING_ANSWERS
    for task in list(runner._tasks):
        task.cancel()
    await asyncio.gather(*runner._tasks, return_exceptions=True)
    assert runner._answering == 0


def test_a_wave_waiting_for_its_module_holds_a_bounded_set_of_chunks() -> None:
    """Requests naming chunks while the module resolves: kept in one set,
    which becomes "all" past MAX_CHUNK_LIST; once resolved, the indices
    out of range kept for the error answer are bounded too."""
    delivery = mqtt.Delivery("m", set())
    for k in range(300):  # 300 requests of 1,000 indices each, all legal
        delivery.ask(frozenset(range(k * 1000, k * 1000 + 1000)))
    assert delivery.wanted is None  # every chunk, once resolved
    delivery.resolved(3)
    assert delivery.todo == {0, 1, 2}
    for k in range(300):
        delivery.ask(frozenset(range(k * 1000 + 3, k * 1000 + 1003)))
    assert len(delivery.out_of_range) <= 2 * mqtt.MAX_CHUNK_LIST


async def test_a_request_that_fails_unforeseen_keeps_the_connection_for_the_others(
    broker: Broker, edge: tuple[mqtt.MqttEdge, Modules], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message whose handling raises what nobody foresaw (as deep JSON
    once did) is logged; the connection stays, and the messages after it,
    already delivered to this client, are answered."""
    runner, _ = edge
    handle, failed, losses = runner.request, [], []

    def request(payload: bytes) -> None:
        if b"boom" in payload:
            failed.append(payload)
            raise RuntimeError("unforeseen")
        handle(payload)

    monkeypatch.setattr(runner, "request", request)
    monkeypatch.setattr(runner.link, "lost", lambda: losses.append(1))
    async with device(broker) as dev:
        await dev.send(b'{"app_name": "boom"}')
        assert (await dev.fetch("small", DEADLINE)).total == 1
    assert failed and not losses


async def test_requests_on_an_older_configurations_topic_are_not_answered(
    broker: Broker, tmp_path: Path
) -> None:
    modules = Modules()
    modules.add(tmp_path / "small", "small", b"\0asm\x01\0\0\0")
    modules.add(tmp_path / "odd", "odd", bytes(range(256)) * 20)
    session = f"cr-moved-{tmp_path.name}"

    async def serving(channel: str) -> tuple[mqtt.MqttEdge, asyncio.Task[None]]:
        runner = mqtt.MqttEdge(settings(broker, client_id=session, channel_id=channel),
                               modules.resolve)
        task = asyncio.create_task(runner.run())
        await runner.link.up.wait()
        return runner, task

    async with asyncio.timeout(DEADLINE):
        _, old = await serving("old-channel")  # its subscription stays in the session
        old.cancel()
        with pytest.raises(asyncio.CancelledError):
            await old
        _, new = await serving(CHANNEL)
        try:
            async with device(broker) as dev:
                await dev.send(b'{"app_name": "small"}',
                               f"m/{DOMAIN}/c/old-channel/registry/proplet")
                got = await dev.fetch("odd", DEADLINE)
        finally:
            new.cancel()
            with pytest.raises(asyncio.CancelledError):
                await new
    assert got.total == 6
    assert modules.calls == ["odd"]


async def test_a_tls_broker_is_reached_with_the_ca_of_mqtt_ca_file(tmp_path: Path) -> None:
    modules = Modules()
    modules.add(tmp_path / "small", "small", b"\0asm\x01\0\0\0")
    users = {USER: PASSWORD, DEVICE_USER: DEVICE_PASSWORD}
    with Broker(tmp_path / "tls-broker", users, tls=True) as broker:
        assert broker.url.startswith("ssl://")
        runner = mqtt.MqttEdge(settings(broker, ca_file=str(broker.ca_file)), modules.resolve)
        task = asyncio.create_task(runner.run())
        try:
            async with asyncio.timeout(DEADLINE):
                await runner.link.up.wait()
                async with device(broker) as dev:
                    assert (await dev.fetch("small", DEADLINE)).total == 1
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
