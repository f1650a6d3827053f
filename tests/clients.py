"""Real container clients for end-to-end tests: dockerd (Debian's docker.io)
and podman, each with its own state under the test's directory, started
and stopped by the test. The https_proxy settings go into the daemon's own
environment (dockerd) or the command's (podman), with the CA in
SSL_CERT_FILE / --cert-dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from testbed.crproxy import clean_env

READY_TIMEOUT = 60.0


class Daemon:
    """A daemon of the test's own: started, waited for, stopped, its mounts
    and short socket directory cleaned up."""

    name = "daemon"

    def __init__(self, workdir: Path, prefix: str, netns: list[str] | None = None) -> None:
        """`netns`: a command prefix (testbed.netns.Netns.prefix()) that runs
        the daemon in a network namespace."""
        self.dir = workdir
        self.netns = list(netns or [])
        # Socket paths stop at 108 bytes and pytest's tmp paths are long:
        # sockets live under a short directory of their own.
        self.short = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"

    def _spawn(self, args: list[str], env: dict[str, str], ready_check: str) -> None:
        """Start it in a session of its own, then wait (bounded) until
        `ready_check` succeeds. A start that fails, however (not ready in
        time, the daemon dead, the wait interrupted), stops what it began."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*self.netns, *args], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(self.proc, ready_check)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], ready_check: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        tick = threading.Event()
        while subprocess.run(["sh", "-c", ready_check], capture_output=True,
                             env=clean_env()).returncode != 0:
            # poll(), not /proc: a daemon that died is a zombie until reaped.
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.returncode is not None else "not ready"
                raise RuntimeError(f"{self.name} did not start ({state}):\n"
                                   f"{self.log.read_text()[-3000:]}")
            tick.wait(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            # What it started and left behind (dockerd's containerd, a
            # shim, a child of a daemon that died) is still in its session.
            kill_session(self.proc.pid)
        # dockerd leaves its data root bind-mounted (and may leave netns
        # mounts): unmount what lies below our paths before removing them.
        unmount_below(self.dir)
        unmount_below(self.short)
        shutil.rmtree(self.short, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError


class Dockerd(Daemon):
    """`dockerd` as root on vfs, no networking of its own, private paths;
    through an https_proxy (`proxy_url`, with `ca_file` as SSL_CERT_FILE)
    or not (None), with a daemon.json of the test's (`config`)."""

    name = "dockerd"

    def __init__(self, workdir: Path, proxy_url: str | None, ca_file: Path | None, *,
                 netns: list[str] | None = None, config: dict[str, object] | None = None
                 ) -> None:
        super().__init__(workdir, "crdk-", netns)
        self.socket = self.short / "docker.sock"
        self.proxy_url = proxy_url
        self.ca_file = ca_file
        self.config = config

    def start(self) -> None:
        env = clean_env()
        if self.proxy_url is not None:
            env.update(HTTPS_PROXY=self.proxy_url, HTTP_PROXY=self.proxy_url, NO_PROXY="")
        if self.ca_file is not None:
            env["SSL_CERT_FILE"] = str(self.ca_file)
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "daemon.json"
        config.write_text(json.dumps(self.config or {}))
        args = [
            "dockerd", "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
            "--ip-masq=false", "--bridge=none",
            "--data-root", str(self.dir / "data"), "--exec-root", str(self.short / "x"),
            "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.socket}",
            "--config-file", str(config),
        ]
        self._spawn(args, env, f"docker -H unix://{self.socket} version")

    def docker(self, *args: str, timeout: float = 300, stdin: str | None = None
               ) -> subprocess.CompletedProcess[str]:
        """The docker CLI on this daemon, with a config directory of its
        own (`docker login` keeps its credentials there, not in ~/.docker)."""
        env = {**clean_env(), "DOCKER_CONFIG": str(self.dir / "cli")}
        return subprocess.run(["docker", "-H", f"unix://{self.socket}", *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout, env=env)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir / "data", ignore_errors=True)


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session `sid` (a session's id is not
    reused while any of its processes lives)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # stat: pid (comm) state ppid pgrp session ...; comm may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def unmount_below(path: Path) -> None:
    prefix = str(path.resolve())
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def podman(workdir: Path, proxy_url: str | None, cert_dir: Path, *args: str,
           netns: list[str] | None = None, registries_conf: Path | None = None,
           tool: str = "podman") -> subprocess.CompletedProcess[str]:
    """One podman (or buildah: `tool`) command with private storage, through
    the proxy (None: none), with a registries.conf (default: an empty one).
    Its runroot must be under 50 characters: a short path derived from
    workdir."""
    env = {**clean_env(), "CONTAINERS_REGISTRIES_CONF": str(
        registries_conf or _empty_registries_conf(workdir))}
    if proxy_url is not None:
        env.update(HTTPS_PROXY=proxy_url, HTTP_PROXY=proxy_url, NO_PROXY="")
    runroot = workdir / "runroot"
    if not runroot.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        short = Path(tempfile.mkdtemp(prefix="crpm-"))
        runroot.symlink_to(short)
    base = [*(netns or []), tool, "--root", str(workdir / "root"),
            "--runroot", os.readlink(runroot), "--storage-driver", "vfs"]
    if tool == "podman":
        base += ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    command = [*base, *args]
    if args and args[0] == "pull":
        command = [*base, "pull", "--cert-dir", str(cert_dir), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def podman_cleanup(workdir: Path, run: Callable[..., subprocess.CompletedProcess[str]],
                   tool: str = "podman") -> None:
    """After podman()/buildah commands in workdir: their storage reset and
    every file gone, the short runroot outside workdir included. `run`
    runs one command as the test did (its proxy, netns, registries.conf)."""
    if tool == "podman":
        run("system", "reset", "--force")
    runroot = workdir / "runroot"
    if runroot.is_symlink():
        shutil.rmtree(os.readlink(runroot), ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)


def _empty_registries_conf(workdir: Path) -> Path:
    path = workdir / "registries.conf"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text('unqualified-search-registries = []\n')
    return path


def available(tool: str) -> bool:
    return shutil.which(tool) is not None or os.path.exists(f"/usr/sbin/{tool}")


class Containerd(Daemon):
    """A private containerd (CRI off) and `ctr` against it."""

    name = "containerd"

    def __init__(self, workdir: Path, netns: list[str] | None = None) -> None:
        super().__init__(workdir, "crct-", netns)
        self.address = self.short / "containerd.sock"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        config.write_text('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
        args = ["containerd", "--config", str(config), "--root", str(self.dir / "root"),
                "--state", str(self.short / "state"), "--address", str(self.address)]
        self._spawn(args, clean_env(), f"ctr --address {self.address} version")

    def ctr(self, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        # In the daemon's namespace: ctr fetches images itself.
        return subprocess.run([*self.netns, "ctr", "--address", str(self.address), *args],
                              capture_output=True, text=True, timeout=300,
                              env=env or clean_env())
