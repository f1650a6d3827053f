"""A real MQTT broker (Debian's mosquitto) on loopback with a password
file, and a proplet-like device that asks cr-proxy for modules over it.

The broker keeps sessions on disk (persistence), as a production broker
does, so a stop (SIGTERM: it saves them) and a start on the same port keep
cr-proxy's persistent session and its subscription. The device behaves as
Propeller's proplet does (proplet/src/service.rs: subscribe to the answer
topic, publish `{"app_name"}`, reassemble chunks by index) and, beyond it,
checks the checksum and asks again for chunks it lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiomqtt
import trustme

from testbed.ports import free_ports

MOSQUITTO = "/usr/sbin/mosquitto"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class Broker:
    def __init__(self, workdir: Path, users: dict[str, str], *, tls: bool = False) -> None:
        """`tls`: the listener speaks TLS only, with a certificate for
        127.0.0.1 from a CA of its own (`ca_file`)."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        self.users = users
        self.tls = tls
        self.ca_file = self.dir / "ca.pem"
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'ssl' if self.tls else 'tcp'}://127.0.0.1:{self.port}"

    def _tls_lines(self) -> str:
        if not self.tls:
            return ""
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        cert, key = self.dir / "broker.pem", self.dir / "broker.key"
        leaf.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return f"cafile {self.ca_file}\ncertfile {cert}\nkeyfile {key}\n"

    def _configure(self) -> Path:
        passwords = self.dir / "passwords"
        passwords.write_text("")
        for user, password in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password],
                           check=True, capture_output=True)
        conf = self.dir / "mosquitto.conf"
        (self.dir / "data").mkdir(exist_ok=True)
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + self._tls_lines() +
            "allow_anonymous false\n"
            f"password_file {passwords}\n"
            "persistence true\n"
            f"persistence_location {self.dir / 'data'}/\n"
            # Run as who starts it: as root it would switch to the mosquitto
            # user, who cannot read the test's private directories.
            "user root\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            "message_size_limit 0\n"
        )
        return conf

    def start(self) -> None:
        if shutil.which("mosquitto_passwd") is None or not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed: run `make test`, which installs it")
        conf = self.dir / "mosquitto.conf"
        if not conf.exists():
            conf = self._configure()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text()[-2000:] if self.log.exists() else ""
                self.stop()
                raise RuntimeError(f"mosquitto did not start:\n{log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its sessions), SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Answer(Exception):
    """The server answered a request with an error."""


@dataclass
class Fetched:
    data: bytes
    checksum: str
    total: int
    asked_again: list[list[int]] = field(default_factory=list)  # the `chunks` re-requests
    duplicates: int = 0  # chunks received more than once


class Device:
    """A proplet-like MQTT client (one connection), used as `async with`."""

    def __init__(self, broker: Broker, user: str, password: str, domain: str, channel: str,
                 client_id: str, *, persistent: bool = False) -> None:
        """`persistent`: a session the broker keeps (and queues answers for)
        while the device is away."""
        self.broker = broker
        self.request_topic = f"m/{domain}/c/{channel}/registry/proplet"
        self.answer_topic = f"m/{domain}/c/{channel}/registry/server"
        tls = aiomqtt.TLSParameters(ca_certs=str(broker.ca_file)) if broker.tls else None
        self._client = aiomqtt.Client("127.0.0.1", broker.port, username=user,
                                      password=password, identifier=client_id,
                                      clean_session=not persistent, tls_params=tls)
        self.received = 0  # payload bytes the broker delivered to this device

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        await self._client.subscribe(self.answer_topic, qos=2)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.__aexit__(*exc)

    async def send(self, payload: bytes | str, topic: str | None = None) -> None:
        """Publish on the request topic (or another)."""
        await self._client.publish(topic or self.request_topic, payload, qos=2)

    async def ask(self, app_name: str, chunks: list[int] | None = None) -> None:
        message: dict[str, Any] = {"app_name": app_name}
        if chunks is not None:
            message["chunks"] = chunks
        await self.send(json.dumps(message))

    async def answers(self, app_name: str) -> AsyncIterator[dict[str, Any]]:
        """The answers for app_name, as decoded JSON, as they come."""
        async for message in self._client.messages:
            assert isinstance(message.payload, bytes)
            self.received += len(message.payload)
            answer = json.loads(message.payload)
            if answer.get("app_name") == app_name:
                yield answer

    async def error_for(self, app_name: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            async for answer in self.answers(app_name):
                if "error" in answer:
                    return str(answer["error"])
        raise AssertionError("the answers ended")

    async def fetch(self, app_name: str, timeout: float, *, drop: frozenset[int] = frozenset(),
                    ask: bool = True) -> Fetched:
        """Ask for app_name and reassemble it by index. Chunks in `drop` are
        thrown away the first time they come (a bad link); once every other
        chunk is in, the device asks for the missing ones by index. The
        reassembled module must match the checksum the chunks carry."""
        if ask:
            await self.ask(app_name)
        chunks: dict[int, bytes] = {}
        dropped: set[int] = set()
        result = Fetched(b"", "", 0)
        async with asyncio.timeout(timeout):
            async for answer in self.answers(app_name):
                if "error" in answer:
                    raise Answer(answer["error"])
                assert set(answer) == {"app_name", "chunk_idx", "total_chunks", "data",
                                       "checksum"}, answer.keys()
                index, result.total = answer["chunk_idx"], answer["total_chunks"]
                result.checksum = answer["checksum"]
                if index in drop and index not in dropped:
                    dropped.add(index)
                elif index in chunks:
                    result.duplicates += 1
                else:
                    chunks[index] = base64.b64decode(answer["data"], validate=True)
                if len(chunks) == result.total:
                    break
                missing = sorted(set(range(result.total)) - set(chunks))
                if missing and set(missing) <= dropped and len(dropped) + len(chunks) == (
                    result.total
                ) and missing not in result.asked_again:
                    result.asked_again.append(missing)
                    await self.ask(app_name, missing)
        result.data = b"".join(chunks[i] for i in range(result.total))
        assert hashlib.sha256(result.data).hexdigest() == result.checksum
        return result
