"""`cr-proxy serve` as a test subprocess, and skopeo pulls through it.

The process is the real command (`python -m cr_proxy serve --config ...`):
real nginx, real fetcher. Readiness is the "cr-proxy ready" line serve
prints after nginx is started; every process started here is stopped by
stop() (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import yaml

from testbed.ports import free_ports

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
COMMIT_TIMEOUT = 30.0  # seconds for a finished download to be in the tree


class CrProxy:
    def __init__(self, workdir: Path, endpoints: dict[str, str] | None, *,
                 embedded_default: bool = False, address: str = "127.0.0.1",
                 prefix: list[str] | None = None, env: dict[str, str] | None = None,
                 **settings: Any) -> None:
        """`endpoints` None: no override at all (names resolve as they do
        where serve runs). `address`: where every listener binds; `prefix`
        runs serve under a wrapper (`ip netns exec NS`), with `env` added to
        its environment."""
        self.dir = workdir
        self.address = address
        self.prefix = list(prefix or [])
        self.extra_env = dict(env or {})
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.https_port, self.metrics_port = free_ports(3)
        self.config: dict[str, Any] = {
            "cache_dir": str(self.dir / "cache"),
            "certs_dir": str(self.dir / "certs"),
            "run_dir": str(self.dir / "run"),
            "listen": {
                "proxy": 0,
                "mirror_http": f"{address}:{self.http_port}",
                "mirror_https": f"{address}:{self.https_port}",
                "metrics": f"{address}:{self.metrics_port}",
            },
            "timeouts": {"connect": 2, "read": 10, "down_host": 1},
            "log_level": "debug",
        }
        if endpoints is not None:
            self.config["endpoints"] = dict(endpoints)
        self.proxy_port = 0
        if "listen_proxy" in settings:
            self.config["listen"]["proxy"] = settings.pop("listen_proxy")
            self.proxy_port = int(self.config["listen"]["proxy"].rsplit(":", 1)[1])
        self.config.update(settings)
        self.config_path = self.dir / "cr-proxy.yml"
        # As `make serve` runs it: the installed `cr-proxy` command, no file,
        # the embedded default configuration (./cache, ./certs, ./run in the
        # working directory); only the listeners (loopback, free ports) and
        # the upstream's endpoints come in through CR_PROXY_* variables.
        self.embedded_default = embedded_default
        self.proc: subprocess.Popen[str] | None = None
        # nginx processes stop() found still running after serve had exited
        # (and killed): serve should never leave any.
        self.strays: list[int] = []
        self.output: list[str] = []
        self._output_changed = threading.Condition()
        self._reader: threading.Thread | None = None

    # --- where things are ------------------------------------------------------

    @property
    def cache(self) -> Path:
        return Path(self.config["cache_dir"])

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def ca_cert(self) -> Path:
        return Path(self.config["certs_dir"]) / "ca.crt"

    @property
    def http(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def https(self) -> str:
        return f"{self.address}:{self.https_port}"

    @property
    def access_log(self) -> Path:
        return self.run_dir / "access.log"

    def access_lines(
        self, match: str | re.Pattern[str], at_least: int, timeout: float = 30.0
    ) -> list[str]:
        """The access log's lines containing a string (or matching a pattern),
        once there are at least `at_least` of them. Polled, bounded: each nginx
        worker buffers its lines and flushes them a second after its buffer's
        first line, so a line logged by one worker can land after a later line
        from another, and no marker request proves the file complete."""
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        while True:
            text = self.access_log.read_text(errors="replace") if self.access_log.exists() else ""
            lines = [line for line in text.splitlines()
                     if (match.search(line) if isinstance(match, re.Pattern) else match in line)]
            if len(lines) >= at_least:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after {timeout:.0f}s the access log has {len(lines)} of {at_least} "
                    f"lines matching {match!r}")
            tick.wait(0.1)

    def wait_committed(self, domain: str, repo: str, *digests: str,
                       timeout: float = COMMIT_TIMEOUT) -> list[Path]:
        """Until each blob is in the digest store and linked where it was
        asked for, content/<domain>/v2/<repo>/blobs/<digest> (after the
        redirect target's name and record: the commit's last link); returns
        the stored files. A client has the last verified byte before the
        fetcher fsyncs, renames and links it, so a tree check right after a
        pull waits here first (polled, bounded)."""
        stored = [self.cache / "blobs/sha256" / digest.split(":", 1)[1] for digest in digests]
        links = [self.cache / f"content/{domain}/v2/{repo}/blobs/{digest}" for digest in digests]
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        while not all(path.is_file() for path in stored + links):
            if time.monotonic() > deadline:
                absent = [str(path) for path in stored + links if not path.is_file()]
                raise AssertionError(f"not committed after {timeout:.0f}s: {absent}")
            tick.wait(0.05)
        return stored

    # --- life --------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The CR_PROXY_* variables an embedded-default serve is given."""
        env = {f"CR_PROXY_LISTEN__{key.upper()}": str(value)
               for key, value in self.config["listen"].items()}
        if "endpoints" in self.config:
            env["CR_PROXY_ENDPOINTS"] = json.dumps(self.config["endpoints"])  # JSON is YAML
        return env

    def start(self) -> None:
        self.output = []
        if self.embedded_default:
            command = [str(Path(sys.executable).with_name("cr-proxy")), "serve"]
            env: dict[str, str] | None = {**os.environ, **self.environment(), **self.extra_env}
        else:
            self.config_path.write_text(yaml.safe_dump(self.config))
            command = [sys.executable, "-m", "cr_proxy", "serve", "--config",
                       str(self.config_path)]
            env = {**os.environ, **self.extra_env} if self.extra_env else None
        self.proc = subprocess.Popen(
            [*self.prefix, *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=self.dir,
        )
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                with self._output_changed:
                    self.output.append(line.rstrip())
                    self._output_changed.notify_all()
                if "cr-proxy ready" in line:
                    ready.set()
            ready.set()  # EOF: the process died; start() reports it

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            tail = "\n".join(self.output[-30:])
            self.stop()
            raise RuntimeError(f"cr-proxy serve did not start:\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM serve (SIGKILL after STOP_TIMEOUT), then SIGKILL any nginx
        of ours still running, noted in `strays`: whatever a test did to
        serve or nginx, and however it failed, no process is left behind."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader:
            self._reader.join(5)
        code = self.proc.returncode
        self.proc = None
        for pid in self.nginx_processes():
            self.strays.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return code

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGKILL serve, as a crash would: nginx goes with it
        (PR_SET_PDEATHSIG); returns once serve and every nginx of it are
        gone (polled, bounded), so start() can listen on the same ports."""
        assert self.proc is not None, "not running"
        if self.proc.poll() is not None:
            raise AssertionError(f"serve had exited ({self.proc.returncode}) before the kill")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        self.proc = None
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        while self.nginx_processes():
            if time.monotonic() > deadline:
                left = [(pid, Path(f"/proc/{pid}/cmdline").read_bytes())
                        for pid in self.nginx_processes()]
                raise AssertionError(f"nginx still running {timeout:.0f}s after serve's "
                                     f"SIGKILL: {left}")
            tick.wait(0.05)

    def nginx_processes(self) -> list[int]:
        """This cr-proxy's running nginx processes, master and workers. Found
        by their working directory (serve's, self.dir, which nginx keeps),
        not by the pid file or parentage: a worker whose master died is
        found too, and another cr-proxy's nginx never is."""
        here = str(self.dir.resolve())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # (A zombie has no command line and no cwd left: not listed.)
                if ((entry / "cmdline").read_bytes().startswith(b"nginx")
                        and os.readlink(entry / "cwd") == here):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return found

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return "\n".join(self.output)

    def wait_for_output(self, needle: str, timeout: float) -> str:
        """Block until serve prints a line containing `needle` (woken by the
        reader thread, no polling); returns it, or raises after `timeout`."""
        with self._output_changed:
            found = self._output_changed.wait_for(
                lambda: next((line for line in self.output if needle in line), None), timeout
            )
        if not found:
            raise AssertionError(f"serve never printed {needle!r}:\n{self.log_text()[-2000:]}")
        return found


def clean_env() -> dict[str, str]:
    """The environment without proxy variables: clients talk to the mirror."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def skopeo_pull(
    source: str, dest: Path, *, all_platforms: bool = False, cert_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """skopeo copy docker://SOURCE oci:DEST:pulled; returns the finished process."""
    args = ["skopeo", "copy", "--preserve-digests", "--retry-times", "0"]
    if all_platforms:
        args.append("--all")
    if cert_dir is not None:
        args += ["--src-cert-dir", str(cert_dir)]
    else:
        args.append("--src-tls-verify=false")
    args += [f"docker://{source}", f"oci:{dest}:pulled"]
    return subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=300)


def layout_blobs(layout: Path) -> dict[str, int]:
    """digest -> size of every blob in an OCI layout, each hashed and checked
    against its name: a pulled layout whose bytes do not match fails here."""
    out = {}
    for path in sorted((layout / "blobs" / "sha256").iterdir()):
        with path.open("rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        assert actual == path.name, f"blob {path.name} is corrupt"
        out[f"sha256:{path.name}"] = path.stat().st_size
    return out
