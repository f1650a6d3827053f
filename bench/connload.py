"""A new connection per request, as docker, skopeo and podman open them: TCP
connect, (through an https_proxy: CONNECT host:443 and its 200), a full TLS
handshake verified against a CA (no session resumption, as Go's client
default), one GET with `Connection: close`, the whole answer read, close.

`count` requests over `workers` threads, each thread one request after the
other; the wall time covers them all. The same code drives both sides of a
comparison (through the CONNECT front, and straight to a TLS server), and
it runs as its own process (`python -m bench.connload ...`, JSON on stdout)
so that neither the bench's own threads nor its GIL are in the way.

    python -m bench.connload --connect 127.0.0.1:PORT --host registry.test \
        --path /v2/x/manifests/v1 --cafile ca.crt [--proxy] [--count 2000] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass

TIMEOUT = 30.0
ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass
class Result:
    count: int
    ok: int
    bad: int
    wall: float
    rps: float
    first_error: str
    request_type: str  # X-CR-Request-Type of the last good answer ("" if none)


class Target:
    def __init__(self, connect: str, host: str, path: str, cafile: str, proxy: bool,
                 expect_size: int | None) -> None:
        address, _, port = connect.rpartition(":")
        self.address = (address, int(port))
        self.host = host
        self.proxy = proxy
        self.expect_size = expect_size
        self.context = ssl.create_default_context(cafile=cafile)
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cr-proxy-bench\r\n"
                        f"Accept: {ACCEPT}\r\nConnection: close\r\n\r\n").encode()
        self.connect_line = f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode()

    def once(self) -> str:
        """One request on a new connection; returns X-CR-Request-Type (or "-"),
        raises on anything but a complete 200."""
        with socket.create_connection(self.address, timeout=TIMEOUT) as raw:
            if self.proxy:
                raw.sendall(self.connect_line)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = raw.recv(4096)
                    if not chunk:
                        raise ConnectionError(f"proxy closed after {answer!r}")
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 200") or not answer.endswith(b"\r\n\r\n"):
                    raise ConnectionError(f"CONNECT answered {answer[:200]!r}")
            with self.context.wrap_socket(raw, server_hostname=self.host) as tls:
                tls.sendall(self.request)
                data = bytearray()
                while chunk := tls.recv(65536):
                    data += chunk
        head, sep, body = bytes(data).partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.1 200 "):
            raise ConnectionError(f"answer {head[:200]!r}")
        kind = "-"
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"x-cr-request-type":
                kind = value.strip().decode()
        if length != len(body) or (self.expect_size is not None and length != self.expect_size):
            raise ConnectionError(f"body {len(body)} bytes, Content-Length {length}, "
                                  f"wanted {self.expect_size}")
        return kind


def run(target: Target, count: int, workers: int) -> Result:
    lock = threading.Lock()
    left = count
    ok = bad = 0
    first_error = ""
    kind = ""

    def work() -> None:
        nonlocal left, ok, bad, first_error, kind
        while True:
            with lock:
                if left <= 0:
                    return
                left -= 1
            try:
                got = target.once()
            except (OSError, ValueError) as err:
                with lock:
                    bad += 1
                    first_error = first_error or f"{type(err).__name__}: {err}"
                continue
            with lock:
                ok += 1
                kind = got

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    return Result(count, ok, bad, wall, ok / wall if wall else 0.0, first_error, kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connload",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--connect", required=True, help="HOST:PORT to connect to")
    parser.add_argument("--host", required=True, help="the TLS server name and Host header")
    parser.add_argument("--path", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--proxy", action="store_true", help="--connect is an https_proxy")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=16, help="requests before the timed ones")
    parser.add_argument("--expect-size", type=int)
    args = parser.parse_args(argv)
    target = Target(args.connect, args.host, args.path, args.cafile, args.proxy,
                    args.expect_size)
    if args.warmup:
        warm = run(target, args.warmup, min(args.workers, args.warmup))
        if warm.bad:
            print(json.dumps(asdict(warm)))
            return 1
    result = run(target, args.count, args.workers)
    print(json.dumps(asdict(result)))
    return 0 if result.bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
