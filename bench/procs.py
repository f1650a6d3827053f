"""The reference servers the benchmark runs beside cr-proxy, on 127.0.0.1.

* `PlainNginx` - nginx with nothing but a static root (the physical reference
  for the hit path): HTTP with sendfile, and TLS with an EC P-256 certificate
  from a throw-away CA made here. `output_buffers 2 1m` like cr-proxy's nginx,
  so the TLS rows compare the same read size.
* `PeerRegistry` - CNCF distribution (`docker-registry serve`) in proxy mode,
  the pull-through cache people run today. Its remote is `http://registry.test`,
  a name only the Upstream's name-mapping forward proxy knows: the peer runs
  with HTTP_PROXY/HTTPS_PROXY set to it and NO_PROXY empty (Go bypasses a proxy
  only for localhost and loopback IPs, so registry.test, auth.test and the
  cdn.test redirect target all go through it).

* `PushFloor` - the push's floor for bench.push_ab --floor: `FrontNginx`
  (nginx configured as cr-proxy's fetch location, nothing else) in front of
  bench.passthrough on a unix socket.

Every process is started by us, on ports we chose, and stopped by stop()
(SIGTERM, then SIGKILL); both classes are context managers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Self

from cr_proxy.front import certs
from testbed.ports import free_ports

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def port_open(port: int | Path) -> bool:
    """A port of 127.0.0.1, or a unix socket's path, accepts connections."""
    family, address = ((socket.AF_UNIX, str(port)) if isinstance(port, Path)
                       else (socket.AF_INET, ("127.0.0.1", port)))
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(address) == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_listening(ports: list[int | Path], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until every port accepts; fail at once if `proc` exits first (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} not listening on {pending}:\n{_tail(log)}")
        if port_open(pending[0]):
            pending.pop(0)
            continue
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


# --------------------------------------------------------------------------- TLS


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for 127.0.0.1/localhost, made by cr-proxy's own
    certificate code (EC P-256, as the mirror's). Returns (ca.crt, leaf
    chain, leaf key)."""
    ca = certs.ensure_ca(directory)
    leaf = certs.issue_leaf(
        ca, ["127.0.0.1", "localhost"],
        certs.CertPair(directory / "tls.crt", directory / "tls.key"),
    )
    return ca.cert, leaf.cert, leaf.key


# --------------------------------------------------------------------------- plain nginx


class Managed:
    """A server process of the bench's own: started by the subclass, waited
    for until it listens, stopped whatever happens."""

    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def _ready(self, ports: list[int | Path], log: Path) -> None:
        assert self.proc is not None
        try:
            wait_listening(ports, self.proc, log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PlainNginx(Managed):
    """A static nginx serving `root` on an HTTP and a TLS port of 127.0.0.1.

    Matched to cr-proxy's nginx only where a static server would be configured
    the same anyway (workers, sendfile, 1 MiB output buffers, keep-alive, TLS
    protocols and session cache); it logs every request, as nginx does by
    default and as cr-proxy does.
    """

    def __init__(self, workdir: Path, root: Path) -> None:
        self.dir = workdir
        self.root = root
        self.http_port, self.https_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca_cert = self.dir / "tls" / "ca.crt"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def https(self) -> str:
        return f"127.0.0.1:{self.https_port}"

    def config(self, cert: Path, key: Path) -> str:
        user = "user root;\n" if os.geteuid() == 0 else ""
        d = self.dir
        return f"""{user}worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{}}
    default_type application/octet-stream;
    sendfile on;
    output_buffers 2 1m;
    keepalive_requests 10000;{self.http_extra()}
    server {{
        listen 127.0.0.1:{self.http_port};
        listen 127.0.0.1:{self.https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:plain:10m;
        {self.site()}
    }}
}}
"""

    def http_extra(self) -> str:
        return ""

    def site(self) -> str:
        return f"root {self.root};"

    def start(self) -> None:
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        _, cert, key = make_tls(self.dir / "tls")
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config(cert, key))
        log = self.dir / "error.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(self.dir), "-c", str(conf), "-e", str(log)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        self._ready([self.http_port, self.https_port], log)



class FrontNginx(PlainNginx):
    """nginx relaying every request to a server on the unix socket `relay`
    as cr-proxy's fetch location does (nginx/fetch.conf: bodies streamed
    both ways in 1 MiB buffers, kept-alive upstream connections), and
    nothing else: the push floor's front (bench.push_ab --floor)."""

    def __init__(self, workdir: Path, relay: Path) -> None:
        super().__init__(workdir, workdir)
        self.relay = relay

    def http_extra(self) -> str:
        return f"""
    upstream relay {{ server unix:{self.relay}; keepalive 16; }}"""

    def site(self) -> str:
        return """location / {
            proxy_pass http://relay;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_buffer_size 1m;
            proxy_buffers 4 1m;
            proxy_busy_buffers_size 1m;
            proxy_request_buffering off;
            client_body_buffer_size 1m;
            client_max_body_size 0;
        }"""


class PushFloor(Managed):
    """FrontNginx in front of bench.passthrough (its own process, as the
    fetcher is), relaying to `target`: what a push through cr-proxy's
    architecture costs without the fetcher's own work; with `hash_bodies`,
    with the SHA-256 a verified copy needs."""

    def __init__(self, workdir: Path, target: str, hash_bodies: bool) -> None:
        self.dir = workdir
        self.target = target
        self.hash_bodies = hash_bodies
        self.relay = workdir / "relay.sock"  # as the fetcher's, a unix socket
        self.front = FrontNginx(workdir / "nginx", self.relay)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return self.front.http

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "passthrough.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.passthrough", "--socket", str(self.relay),
                 "--target", self.target, *(["--hash"] if self.hash_bodies else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        self._ready([self.relay], log)
        self.front.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.front.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.front.stop()
        super().stop()


# --------------------------------------------------------------------------- peer


class PeerRegistry(Managed):
    """distribution in proxy mode in front of registry.test, own storage."""

    def __init__(self, workdir: Path, name_proxy_url: str, remote: str) -> None:
        self.dir = workdir
        self.storage = self.dir / "storage"
        self.log = self.dir / "registry.log"
        self.name_proxy_url = name_proxy_url
        self.remote = remote
        (self.port,) = free_ports(1)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> dict[str, object]:
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "fields": {"service": "peer"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                # The registry's own sample configuration has this cache.
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "cr-proxy-bench-not-a-secret"},
            "proxy": {"remoteurl": self.remote},
        }

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            env[var] = self.name_proxy_url
        env["NO_PROXY"] = env["no_proxy"] = ""
        return env

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "registry.yml"
        conf.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
            )
        self._ready([self.port], self.log)


    def log_tail(self) -> str:
        return _tail(self.log)
