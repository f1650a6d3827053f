"""Zero-copy relay of a tunnel's bytes, on the event loop: os.splice moves
them socket -> kernel pipe -> socket, so they never enter Python.

One SplicePump per direction. It waits for its source to be readable, then
moves as much as the kernel has (non-blocking splices until EAGAIN), so a
wake-up carries everything that arrived, not one segment; when the
destination is full it stops reading (backpressure) until it drains. No
threads: a tunnel costs no thread switch or GIL handoff per wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket

PIPE_SIZE = 1 << 20  # bytes per pipe: fewer, larger moves
F_SETPIPE_SZ = 1031
CHUNK = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
IDLE_TIMEOUT = 600.0  # seconds a tunnel may carry nothing before it is closed


class SplicePump:
    """src -> dst until src ends; then the end is passed on (half-close)."""

    __slots__ = ("_done", "_dst", "_loop", "_pending", "_pipe_r", "_pipe_w", "_src",
                 "_src_done", "moved")

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket,
                 dst: socket.socket) -> None:
        self._loop = loop
        self._src, self._dst = src, dst
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        self._pending = 0  # bytes in the pipe, not yet in dst
        self._src_done = False
        self._done: asyncio.Future[None] = loop.create_future()
        self.moved = 0

    def __repr__(self) -> str:
        return f"<SplicePump {self.moved} bytes, {self._pending} pending>"

    async def run(self) -> None:
        self._loop.add_reader(self._src.fileno(), self._on_readable)
        try:
            await self._done
        finally:
            self._loop.remove_reader(self._src.fileno())
            self._loop.remove_writer(self._dst.fileno())
            os.close(self._pipe_r)
            os.close(self._pipe_w)

    def _on_readable(self) -> None:
        try:
            while not self._src_done and self._pending < PIPE_SIZE:
                try:
                    n = os.splice(self._src.fileno(), self._pipe_w, CHUNK, flags=FLAGS)
                except BlockingIOError:
                    break
                if n == 0:
                    self._src_done = True
                    self._loop.remove_reader(self._src.fileno())
                    break
                self._pending += n
            self._flush()
        except OSError as err:
            self._fail(err)

    def _on_writable(self) -> None:
        try:
            self._flush()
        except OSError as err:
            self._fail(err)

    def _flush(self) -> None:
        while self._pending:
            try:
                n = os.splice(self._pipe_r, self._dst.fileno(), self._pending, flags=FLAGS)
            except BlockingIOError:
                # dst is full: wait for it, and stop reading src meanwhile.
                self._loop.remove_reader(self._src.fileno())
                self._loop.add_writer(self._dst.fileno(), self._on_writable)
                return
            self._pending -= n
            self.moved += n
        self._loop.remove_writer(self._dst.fileno())
        if self._src_done:
            with contextlib.suppress(OSError):
                self._dst.shutdown(socket.SHUT_WR)
            if not self._done.done():
                self._done.set_result(None)
        else:
            self._loop.add_reader(self._src.fileno(), self._on_readable)

    def _fail(self, err: OSError) -> None:
        if err.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            err = OSError(err.errno, f"relay: {err.strerror}")
        if not self._done.done():
            self._done.set_exception(err)


async def relay(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Both directions until both ended (or one broke, or the tunnel idled
    past IDLE_TIMEOUT with nothing moving); returns bytes moved each way.
    The sockets are closed at the end."""
    loop = asyncio.get_running_loop()
    a.setblocking(False)
    b.setblocking(False)
    there, back = SplicePump(loop, a, b), SplicePump(loop, b, a)
    tasks = [asyncio.ensure_future(there.run()), asyncio.ensure_future(back.run())]
    try:
        while True:
            before = there.moved + back.moved
            done, _ = await asyncio.wait(tasks, timeout=IDLE_TIMEOUT,
                                         return_when=asyncio.FIRST_EXCEPTION)
            if all(t.done() for t in tasks) or any(t.done() and t.exception() for t in tasks):
                break
            if there.moved + back.moved == before and not done:
                break  # idle: nothing moved for IDLE_TIMEOUT
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        a.close()
        b.close()
    return there.moved, back.moved
