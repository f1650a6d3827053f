"""Loopback ports that DROP connection attempts instead of refusing them: an
outage as a cut cable or a dead uplink looks (connects time out), without
root, iptables or network namespaces.

A listening socket with a backlog of 0 takes one connection into its accept
queue; nobody accepts it, so the queue stays full, and Linux then drops
every further SYN (tcp_conn_request: "accept queue full"): the client's
connect hangs until its own timeout. `BlackHole` proves its port drops
before it returns (a filler connect that times out); `cable_out` puts one
on each port of a testbed.registry.Upstream (registry, token server, CDN)
in place of the stopped server, and starts the servers again after.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Self

from testbed.registry import Upstream

FILL_TIMEOUT = 1.0  # seconds a filler connect may take before the port counts as dropping
MAX_FILLERS = 8  # the queue holds one on Linux; a few more before giving up


class BlackHole:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    def __repr__(self) -> str:
        return f"<BlackHole {self.address[0]}:{self.address[1]} {len(self._fillers)} queued>"

    def __enter__(self) -> Self:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        listener = self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The stopped server's connections may linger in TIME_WAIT on this port.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.address)
        listener.listen(0)
        for _ in range(MAX_FILLERS):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(FILL_TIMEOUT)
            try:
                filler.connect(self.address)
            except TimeoutError:
                filler.close()
                return  # the queue is full: this SYN, and every later one, was dropped
            self._fillers.append(filler)
        raise RuntimeError(f"{self!r}: connects are still accepted, not dropped")

    def close(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


@contextmanager
def cable_out(upstream: Upstream) -> Iterator[None]:
    """The upstream's registry, token server and CDN gone the way a cut
    cable takes them: their ports drop packets. All back after, even when
    the body fails."""
    upstream.stop_registry()
    upstream.stop_auth()
    upstream.stop_cdn()
    try:
        with ExitStack() as holes:
            for port in (upstream.registry_port, upstream.auth_port, upstream.cdn_port):
                holes.enter_context(BlackHole(port))
            yield
    finally:
        upstream.start_registry()
        upstream.start_auth()
        upstream.start_cdn()
