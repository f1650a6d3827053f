"""Real container clients for end-to-end tests: dockerd (Debian's docker.io)
and podman, each with its own state under the test's directory, started
and stopped by the test. The https_proxy settings go into the daemon's own
environment (dockerd) or the command's (podman), with the CA in
SSL_CERT_FILE / --cert-dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from tests.crproxy import clean_env

READY_TIMEOUT = 60.0


class Dockerd:
    """`dockerd` as root on vfs, no networking of its own, private paths."""

    def __init__(self, workdir: Path, proxy_url: str, ca_file: Path) -> None:
        self.dir = workdir
        # containerd's sockets live under the exec root: keep its path short,
        # unix socket paths stop at 108 bytes and pytest's tmp paths are long.
        self.exec_root = Path(tempfile.mkdtemp(prefix="crdk-"))
        self.socket = self.exec_root / "docker.sock"
        self.proxy_url = proxy_url
        self.ca_file = ca_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "dockerd.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {**clean_env(), "HTTPS_PROXY": self.proxy_url, "HTTP_PROXY": self.proxy_url,
               "NO_PROXY": "", "SSL_CERT_FILE": str(self.ca_file)}
        args = [
            "dockerd", "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
            "--ip-masq=false", "--bridge=none",
            "--data-root", str(self.dir / "data"), "--exec-root", str(self.exec_root / "x"),
            "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.socket}",
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        # Ready when the API answers; bounded by READY_TIMEOUT.
        try:
            self.docker("version", timeout=READY_TIMEOUT, retry_until_ready=True)
        except Exception:
            self.stop()
            raise

    def docker(
        self, *args: str, timeout: float = 300, retry_until_ready: bool = False
    ) -> subprocess.CompletedProcess[str]:
        command = ["docker", "-H", f"unix://{self.socket}", *args]
        if not retry_until_ready:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env=clean_env())
        # `docker version` blocks until the daemon answers or the timeout.
        wait = ["timeout", str(int(timeout)), "sh", "-c",
                f'until docker -H unix://{self.socket} version >/dev/null 2>&1; do '
                f'[ -e /proc/{self.proc.pid if self.proc else 0} ] || exit 1; '
                'sleep 0.1; done']
        result = subprocess.run(wait, capture_output=True, text=True, env=clean_env())
        if result.returncode != 0:
            raise RuntimeError(f"dockerd did not start:\n{self.log.read_text()[-3000:]}")
        return result

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # dockerd leaves its data root bind-mounted (and may leave netns
        # mounts): unmount what lies below our paths before removing them.
        unmount_below(self.dir)
        unmount_below(self.exec_root)
        shutil.rmtree(self.dir / "data", ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unmount_below(path: Path) -> None:
    prefix = str(path.resolve())
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def podman(workdir: Path, proxy_url: str, cert_dir: Path, *args: str
           ) -> subprocess.CompletedProcess[str]:
    """One podman command with private storage, through the proxy. Its
    runroot must be under 50 characters: a short path derived from workdir."""
    env = {**clean_env(), "HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "NO_PROXY": "",
           "CONTAINERS_REGISTRIES_CONF": str(_empty_registries_conf(workdir))}
    runroot = workdir / "runroot"
    if not runroot.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        short = Path(tempfile.mkdtemp(prefix="crpm-"))
        runroot.symlink_to(short)
    base = ["podman", "--root", str(workdir / "root"), "--runroot", os.readlink(runroot),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file"]
    command = [*base, *args]
    if args and args[0] == "pull":
        command = [*base, "pull", "--cert-dir", str(cert_dir), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _empty_registries_conf(workdir: Path) -> Path:
    path = workdir / "registries.conf"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text('unqualified-search-registries = []\n')
    return path


def available(tool: str) -> bool:
    return shutil.which(tool) is not None or os.path.exists(f"/usr/sbin/{tool}")


class Containerd:
    """A private containerd (CRI off) and `ctr` against it."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.short = Path(tempfile.mkdtemp(prefix="crct-"))  # socket paths stay short
        self.address = self.short / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "containerd.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        config.write_text('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
        args = ["containerd", "--config", str(config), "--root", str(self.dir / "root"),
                "--state", str(self.short / "state"), "--address", str(self.address)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, env=clean_env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait = ["timeout", str(int(READY_TIMEOUT)), "sh", "-c",
                f"until ctr --address {self.address} version >/dev/null 2>&1; do "
                f"[ -e /proc/{self.proc.pid} ] || exit 1; sleep 0.1; done"]
        if subprocess.run(wait, capture_output=True, env=clean_env()).returncode != 0:
            self.stop()
            raise RuntimeError(f"containerd did not start:\n{self.log.read_text()[-3000:]}")

    def ctr(self, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.address), *args],
                              capture_output=True, text=True, timeout=300,
                              env=env or clean_env())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        unmount_below(self.dir)
        unmount_below(self.short)
        shutil.rmtree(self.short, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
