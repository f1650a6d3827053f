"""relay.Relay on socket pairs: small exchanges stay on the event loop, a bulk
direction moves to a splice thread, bytes arrive whole and in order, ends
are passed on, and a failure ends both sides. (End to end through the real
front and nginx: test_e2e_proxy.py, test_e2e_clients.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from cr_proxy.front import relay
from cr_proxy.front.relay import Relay


class CountingExecutor(ThreadPoolExecutor):
    """Counts the directions handed to a thread."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.submitted = 0

    def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.fixture
def executor():
    pool = CountingExecutor()
    yield pool
    pool.shutdown(wait=True)


def tunnel() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """client <-> a ==relay== b <-> server"""
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    for end in (client, server):
        end.setblocking(False)
    return client, a, b, server


async def recv_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < count:
        chunk = await loop.sock_recv(sock, min(1 << 20, count - len(got)))
        assert chunk, f"EOF after {len(got)} of {count} bytes"
        got += chunk
    return bytes(got)


async def recv_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


async def test_small_exchange_stays_on_the_loop_and_ends_pass_through(executor) -> None:
    loop = asyncio.get_running_loop()
    client, a, b, server = tunnel()
    running = asyncio.create_task(Relay(a, b, executor).run())
    await loop.sock_sendall(client, b"hello")
    assert await recv_exactly(server, 5) == b"hello"
    await loop.sock_sendall(server, b"world!")
    assert await recv_exactly(client, 6) == b"world!"
    # The client's end of sending reaches the server; the server may still answer.
    client.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(server) == b""
    await loop.sock_sendall(server, b"bye")
    server.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(client) == b"bye"
    await asyncio.wait_for(running, 10)
    assert executor.submitted == 0, "a small exchange must not cost a thread"
    assert a.fileno() == -1 and b.fileno() == -1, "both relayed sockets are closed"
    client.close()
    server.close()


async def test_bulk_directions_move_to_threads_and_arrive_whole(executor) -> None:
    loop = asyncio.get_running_loop()
    client, a, b, server = tunnel()
    down = os.urandom(8 * relay.PROMOTE_AFTER + 12345)
    up = os.urandom(3 * relay.PROMOTE_AFTER + 7)
    running = asyncio.create_task(Relay(a, b, executor).run())

    async def send_and_end(sock: socket.socket, data: bytes) -> None:
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    _, _, to_server, to_client = await asyncio.gather(
        send_and_end(client, up), send_and_end(server, down),
        recv_to_eof(server), recv_to_eof(client),
    )
    assert hashlib.sha256(to_server).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(to_client).digest() == hashlib.sha256(down).digest()
    await asyncio.wait_for(running, 10)
    assert executor.submitted == 2, "each bulk direction is spliced in a thread"
    client.close()
    server.close()


async def test_a_full_receiver_holds_the_sender_back_and_loses_nothing(executor) -> None:
    """Below PROMOTE_AFTER, on the loop: a server that does not read fills
    its socket; the relay keeps the rest pending, then delivers it all."""
    loop = asyncio.get_running_loop()
    client, a, b, server = tunnel()
    for sock in (b, server):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(relay.PROMOTE_AFTER // 2)
    running = asyncio.create_task(Relay(a, b, executor).run())
    await loop.sock_sendall(client, data)
    client.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(server) == data
    server.close()
    await asyncio.wait_for(running, 10)
    assert executor.submitted == 0
    client.close()


@pytest.mark.parametrize("bulk", [False, True], ids=["on-loop", "in-thread"])
async def test_a_peer_that_is_gone_ends_both_sides(executor, bulk: bool) -> None:
    """The server closes: its end reaches the client; the client's next
    bytes cannot be delivered, and the relay ends, both sockets closed."""
    loop = asyncio.get_running_loop()
    client, a, b, server = tunnel()
    running = asyncio.create_task(Relay(a, b, executor).run())
    if bulk:
        # Upwards in a thread: the failed delivery happens in the splice thread.
        await asyncio.gather(loop.sock_sendall(client, os.urandom(2 * relay.PROMOTE_AFTER)),
                             recv_exactly(server, 2 * relay.PROMOTE_AFTER))
        assert executor.submitted == 1
    server.close()
    assert await asyncio.wait_for(recv_to_eof(client), 10) == b""
    with contextlib.suppress(OSError):  # the relay may have shut us already
        for _ in range(64):
            await loop.sock_sendall(client, b"x" * 65536)
    await asyncio.wait_for(running, 10)
    assert a.fileno() == -1 and b.fileno() == -1
    client.close()
