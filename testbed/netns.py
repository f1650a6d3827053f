"""Network namespaces for the test bed: made, wired and removed by the test.

A `Netns` is one `ip netns add` namespace with its loopback up, its own
/etc files (`ip netns exec NS` bind-mounts each entry of /etc/netns/NS over
/etc: `hosts`, `resolv.conf`, even a directory such as `docker`), and
`prefix()`, the command prefix that runs a process inside it. `veth()` joins
two namespaces with an address on each end. `in_netns()` runs a Python
callable on a thread that has entered a namespace (setns is per thread), so
this process can open a listening socket there or probe a port there, and
`wait_listening()` polls a port inside a namespace.

Names carry the test process's id so that parallel beds never collide, and
`Netns.delete()` (always called from a `finally`) kills whatever still runs
inside, deletes the namespace and removes /etc/netns/NS.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
READY_TIMEOUT = 30.0


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One setup command (ip, iptables); raise with its stderr if it fails."""
    result = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


class Netns:
    """One network namespace, its /etc files and the processes inside it."""

    def __init__(self, name: str) -> None:
        if len(name) > 15:  # also used in interface names' peers: keep it short
            raise ValueError(f"netns name {name!r} is longer than 15 characters")
        self.name = name
        self.etc = NETNS_ETC / name

    def add(self) -> None:
        run("ip", "netns", "add", self.name)
        self.etc.mkdir(parents=True, exist_ok=True)
        self.ip("link", "set", "lo", "up")

    def prefix(self) -> list[str]:
        """Prepend to a command to run it in here (with the /etc/netns files)."""
        return ["ip", "netns", "exec", self.name]

    def prefix_keep_sys(self) -> list[str]:
        """prefix() for a daemon that needs the host's /sys (dockerd reads
        its cgroups there, and `ip netns exec` mounts a fresh sysfs over /sys):
        a mount namespace of its own with the same /etc/netns files bound,
        then only the network namespace entered."""
        script = (f'for f in {self.etc}/*; do t="/etc/${{f##*/}}"; '
                  '[ -e "$t" ] && mount --bind "$f" "$t"; done; '
                  f'exec nsenter --net={NETNS_RUN / self.name} -- "$@"')
        return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh"]

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.prefix(), *args, check=check)

    def ip(self, *args: str) -> None:
        run("ip", "-n", self.name, *args)

    def iptables(self, *args: str) -> None:
        self.exec("iptables", "-w", *args)

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def write_etc(self, name: str, text: str) -> Path:
        """Write /etc/netns/NS/<name> IN PLACE (truncate and write, never a
        rename): a running process sees it through a bind mount of the old
        inode, and a rename would leave it reading the old file."""
        path = self.etc / name
        with path.open("w") as out:
            out.write(text)
        return path

    def pids(self) -> list[int]:
        found = run("ip", "netns", "pids", self.name, check=False)
        return [int(pid) for pid in found.stdout.split()]

    def delete(self) -> None:
        """Kill what still runs inside (a client a test left behind), delete
        the namespace and its /etc files. Safe to call twice."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and self.pids() and time.monotonic() < deadline:
                threading.Event().wait(0.05)
        if (NETNS_RUN / self.name).exists():
            run("ip", "netns", "delete", self.name, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when no other bed uses it
            NETNS_ETC.rmdir()


def veth(left: Netns, left_name: str, left_cidr: str,
         right: Netns, right_name: str, right_cidrs: list[str]) -> None:
    """A veth pair from `left` to `right`, both ends up, with addresses.
    Made directly inside the namespaces: no name is ever taken on the host."""
    run("ip", "link", "add", left_name, "netns", left.name, "type", "veth",
        "peer", "name", right_name, "netns", right.name)
    left.ip("addr", "add", left_cidr, "dev", left_name)
    for cidr in right_cidrs:
        right.ip("addr", "add", cidr, "dev", right_name)
    left.ip("link", "set", left_name, "up")
    right.ip("link", "set", right_name, "up")


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """fn() on a fresh thread that has joined namespace `name`: a socket it
    makes stays in that namespace after the thread ends (setns moves only
    the calling thread, so this process's other threads never move)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            with open(NETNS_RUN / name) as handle:
                if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {name}: {os.strerror(errno)}")
            result.append(fn())
        except BaseException as err:  # handed to the caller's thread
            error.append(err)

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def listening_socket(name: str, address: str, port: int) -> socket.socket:
    """A TCP socket listening on address:port inside namespace `name`."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    return in_netns(name, make)


def port_open_in(name: str, address: str, port: int) -> bool:
    def probe() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((address, port)) == 0

    return in_netns(name, probe)


def wait_listening(name: str, address: str, port: int,
                   proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll (bounded) until address:port accepts inside namespace `name`;
    fail at once if `proc` exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    tick = threading.Event()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n{tail}")
        if port_open_in(name, address, port):
            return
        tick.wait(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port} in netns {name}")
