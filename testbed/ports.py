"""Free loopback ports for the test bed's servers, and whether one is listening."""

from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (ip_local_port_range, 32768-60999 by
# default): a port the kernel chose (bind to 0) could be taken as the
# source port of some outgoing connection before the server it was picked
# for binds it ("Address already in use", seen in make test).
PORT_RANGE = range(20000, 32000)
_pick = random.SystemRandom()  # unmoved by a test's random.seed


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once, so none
    repeats), drawn from PORT_RANGE."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", _pick.choice(PORT_RANGE)))
            except OSError:
                s.close()  # in use (or chosen twice): draw again
                continue
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
