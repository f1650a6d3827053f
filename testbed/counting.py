"""A TCP relay that counts the bytes clients send through it: put in front
of the test registry, it measures what a pusher made the registry receive
(request heads and bodies, as on the wire).

Threads, not an event loop: a relay of a test's handful of connections,
each copied by two threads until either side closes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

CHUNK = 1 << 16


class CountingRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sent = 0  # client -> target bytes
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<CountingRelay :{self.port} -> {self.target} {self._sent} bytes>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sent(self) -> int:
        with self._lock:
            return self._sent

    def start(self) -> None:
        self._spawn(self._accept)

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.target, timeout=30)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
            self._spawn(self._copy, client, server, True)
            self._spawn(self._copy, server, client, False)

    def _copy(self, source: socket.socket, dest: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(CHUNK):
                dest.sendall(data)
                if counted:
                    with self._lock:
                        self._sent += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dest.shutdown(socket.SHUT_WR)
