"""cr_proxy.front: a tunnel connects only to addresses the policy checked."""

from __future__ import annotations

import asyncio
import socket

import pytest

from cr_proxy.errors import ProxyRefused
from cr_proxy.front.server import _connect_tcp
from cr_proxy.net.policy import Destinations


class StubLoop:
    """getaddrinfo answers `addresses` (counted); every connect is recorded
    and fails, so a test sees which addresses were tried, in order."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.lookups = 0
        self.tried: list[str] = []

    async def getaddrinfo(self, host: str, port: int, **_: object) -> list:
        self.lookups += 1
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in self.addresses]

    async def sock_connect(self, sock: socket.socket, address: tuple) -> None:
        self.tried.append(address[0])
        raise ConnectionRefusedError(address[0])


def connect(loop: StubLoop, host: str, port: int, destinations: Destinations) -> None:
    asyncio.run(_connect_tcp(loop, host, port, destinations))  # type: ignore[arg-type]


def test_a_name_resolving_into_loopback_is_refused_without_connecting() -> None:
    loop = StubLoop(["127.0.0.1", "::1"])
    with pytest.raises(ProxyRefused):
        connect(loop, "rebind.example", 443, Destinations((), {}))
    assert loop.tried == []


def test_only_the_checked_addresses_are_tried_after_one_lookup() -> None:
    loop = StubLoop(["127.0.0.1", "10.0.0.9", "192.168.1.1", "8.8.8.8"])
    with pytest.raises(ConnectionRefusedError):
        connect(loop, "mixed.example", 443, Destinations(("10.0.0.0/8",), {}))
    assert loop.tried == ["10.0.0.9", "8.8.8.8"]
    assert loop.lookups == 1


def test_a_name_the_operator_allowed_may_resolve_privately() -> None:
    loop = StubLoop(["127.0.0.1"])
    with pytest.raises(ConnectionRefusedError):
        connect(loop, "localhost", 5000, Destinations(("localhost:5000",), {}))
    assert loop.tried == ["127.0.0.1"]
    with pytest.raises(ProxyRefused):
        connect(StubLoop(["127.0.0.1"]), "localhost", 5001, Destinations(("localhost:5000",), {}))
