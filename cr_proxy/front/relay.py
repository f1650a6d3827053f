"""Moving a tunnel's bytes between two sockets, both ways, until both ends
are done (the CONNECT front's byte mover; front.py decides what to connect).

Most tunnels are short: a TLS handshake and one small answer, since docker,
skopeo and podman open a connection per request. Those stay on the event
loop: a recv and a send per burst, no thread, no pipe. A direction that has
carried PROMOTE_AFTER bytes is a bulk transfer (a layer): it moves to a
thread that splices through a kernel pipe, so a layer's bytes never enter
Python and the event loop never wakes for them. Measured side by side, a
thread pair per tunnel from the start cost about 34 context switches and
1.3 ms of CPU per connection; on the loop, a small tunnel costs a few
syscalls.

Both directions share the sockets, and a socket's blocking mode is shared
too, so the sockets stay non-blocking throughout: the thread polls before
each splice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
from concurrent.futures import Executor

IDLE_TIMEOUT = 600.0  # seconds a tunnel may carry nothing before it is closed
PROMOTE_AFTER = 256 << 10  # bytes in one direction before it moves to a thread
RECV_SIZE = 64 << 10  # bytes per recv on the loop
PIPE_SIZE = 1 << 20  # bytes per splice pipe: fewer, larger moves
F_SETPIPE_SZ = 1031
POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
POLL_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


class _Direction:
    """One way of a tunnel, while it runs on the event loop. The loop is
    given file numbers, not sockets: removing a socket that is not
    registered makes the selector format its repr, a getpeername each."""

    __slots__ = ("done", "dst", "dst_fd", "moved", "pending", "reading", "src", "src_fd",
                 "writing")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.src_fd = src, src.fileno()
        self.dst, self.dst_fd = dst, dst.fileno()
        self.moved = 0
        self.pending = b""  # received, not yet accepted by dst
        self.reading = False  # the loop watches src for this direction
        self.writing = False  # the loop watches dst (pending bytes)
        self.done = False


class Relay:
    """Both directions of one tunnel; `await Relay(...).run()` returns when
    both have ended, with both sockets closed."""

    __slots__ = ("_directions", "_executor", "_finished", "_idle", "_last_active", "_loop",
                 "_threads", "a", "b")

    def __init__(self, a: socket.socket, b: socket.socket, executor: Executor) -> None:
        self.a, self.b = a, b
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._directions = (_Direction(a, b), _Direction(b, a))
        self._threads: list[asyncio.Future[None]] = []
        self._finished = self._loop.create_future()
        self._last_active = self._loop.time()
        self._idle: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Relay fd {self.a.fileno()}<->{self.b.fileno()} threads={len(self._threads)}>"

    async def run(self) -> None:
        for sock in (self.a, self.b):
            sock.setblocking(False)
        try:
            for way in self._directions:
                self._watch_src(way, True)
            self._idle = self._loop.call_later(IDLE_TIMEOUT, self._check_idle)
            await self._finished
            if self._threads:
                await asyncio.gather(*self._threads, return_exceptions=True)
        finally:
            if not self._finished.done():  # cancelled: wake any splice thread
                self._break()
            self._stop_watching()
            if self._idle:
                self._idle.cancel()
            self.a.close()
            self.b.close()

    # --- on the event loop ----------------------------------------------------

    def _readable(self, way: _Direction) -> None:
        try:
            data = way.src.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._break()
            return
        self._last_active = self._loop.time()
        if not data:
            self._end(way)
            return
        way.moved += len(data)
        self._send(way, data)

    def _send(self, way: _Direction, data: bytes) -> None:
        try:
            sent = way.dst.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._break()
            return
        if sent < len(data):
            # dst is full: stop reading src until it drains (backpressure).
            way.pending = data[sent:]
            self._watch_src(way, False)
            self._watch_dst(way, True)
        elif way.moved >= PROMOTE_AFTER:
            self._promote(way)

    def _writable(self, way: _Direction) -> None:
        data, way.pending = way.pending, b""
        self._watch_dst(way, False)
        if way.done:
            return
        self._watch_src(way, True)
        self._send(way, data)

    def _promote(self, way: _Direction) -> None:
        """A bulk transfer: this direction continues in a splice thread."""
        self._watch_src(way, False)
        future = self._loop.run_in_executor(self._executor, splice_one_way, way.src, way.dst)
        self._threads.append(future)
        future.add_done_callback(lambda _: self._end(way, half_close=False))

    def _end(self, way: _Direction, half_close: bool = True) -> None:
        """src has no more to send: pass the end on, and finish once both
        directions have ended."""
        if way.done:
            return
        way.done = True
        self._watch_src(way, False)
        if half_close:
            with contextlib.suppress(OSError):
                way.dst.shutdown(socket.SHUT_WR)
        if all(w.done for w in self._directions) and not self._finished.done():
            self._finished.set_result(None)

    def _break(self) -> None:
        """One side failed: end both directions (a splice thread wakes too)."""
        for sock in (self.a, self.b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._stop_watching()
        for way in self._directions:
            way.done = True
        if not self._finished.done():
            self._finished.set_result(None)

    def _stop_watching(self) -> None:
        for way in self._directions:
            self._watch_src(way, False)
            self._watch_dst(way, False)

    def _watch_src(self, way: _Direction, on: bool) -> None:
        if on and not way.reading:
            self._loop.add_reader(way.src_fd, self._readable, way)
        elif way.reading and not on:
            self._loop.remove_reader(way.src_fd)
        way.reading = on

    def _watch_dst(self, way: _Direction, on: bool) -> None:
        if on and not way.writing:
            self._loop.add_writer(way.dst_fd, self._writable, way)
        elif way.writing and not on:
            self._loop.remove_writer(way.dst_fd)
        way.writing = on

    def _check_idle(self) -> None:
        if self._finished.done():
            return
        idle = self._loop.time() - self._last_active
        # A splice thread keeps its own idle limit.
        if idle >= IDLE_TIMEOUT and all(f.done() for f in self._threads):
            self._break()
            return
        self._idle = self._loop.call_later(max(IDLE_TIMEOUT - idle, 1.0), self._check_idle)


# --- in a thread ------------------------------------------------------------------


def splice_one_way(src: socket.socket, dst: socket.socket) -> None:
    """Move bytes src -> dst through a kernel pipe until src ends, then pass
    the end on (half-close). The sockets are non-blocking (the other
    direction may still be on the event loop), so this polls before each
    move; a failure shuts both sockets so the other direction ends too."""
    pipe_r, pipe_w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
    readable, writable = select.poll(), select.poll()
    readable.register(src, POLL_IN)
    writable.register(dst, POLL_OUT)
    src_fd, dst_fd = src.fileno(), dst.fileno()
    timeout_ms = int(IDLE_TIMEOUT * 1000)
    try:
        while True:
            if not readable.poll(timeout_ms):
                raise TimeoutError("tunnel idle")
            try:
                moved = os.splice(src_fd, pipe_w, PIPE_SIZE, flags=os.SPLICE_F_MOVE)
            except BlockingIOError:
                continue
            if moved == 0:
                break
            while moved:
                try:
                    moved -= os.splice(pipe_r, dst_fd, moved, flags=os.SPLICE_F_MOVE)
                except BlockingIOError:
                    if not writable.poll(timeout_ms):
                        raise TimeoutError("tunnel stalled") from None
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except (OSError, TimeoutError):
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)

