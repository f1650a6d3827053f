"""Misbehaving servers on loopback, for the fault and hostile-input tests.

`FaultyRegistry` is a tiny registry (raw asyncio, one request per
connection, `Connection: close`) that answers `/v2/`, manifests and blobs,
and makes any blob (or manifest by digest) misbehave on demand:

    ok          the whole, right bytes
    reset       headers and `cut_at` bytes, then a TCP RST
    close       headers and `cut_at` bytes, then a clean FIN (short of Content-Length)
    wrong       headers and as many bytes as promised, one of them flipped
    stall       reads the request, then sends nothing at all
    stall_body  headers and one byte, then silence
    hold        headers and `cut_at` bytes, then the rest once the test calls release()

`reset`, `close` and `hold` wait at their cut for release() when armed with
`gated=True`, so a test can first observe that the download really is in the
middle (e.g. a temp file with bytes in it) before the fault happens.

Every request is counted (`count(method, path)`), and every connection the
server holds is counted too (`open_connections`), so a test can see that a
stalled upstream connection is let go.

`Canary` is a loopback TCP listener that records every connection and
answers any request with a recognisable body: a test that must prove that
nothing reaches some address points a hostile request at it and asserts
that `connections == 0` and that the body never comes back.

Both run on one event loop in a daemon thread (testbed.registry.LoopThread);
`stop()` ends every connection they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client as http_client
import json
import os
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from testbed.ports import free_ports
from testbed.registry import LoopThread

FAULTS = ("ok", "reset", "close", "wrong", "stall", "stall_body", "hold")
HOLD_MAX = 120.0  # seconds a gated or stalled connection is held at most
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
WRITE_CHUNK = 256 << 10


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    data: bytes
    media_type: str = "application/octet-stream"
    fault: str = "ok"
    cut_at: int = 0
    gated: bool = False
    chunked: bool = False


@dataclass
class FakeImage:
    repo: str
    tag: str
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    blobs: dict[str, bytes] = field(default_factory=dict)


class FaultyRegistry:
    """See the module docstring. Use as a context manager."""

    name = "faulty.test"

    def __init__(self) -> None:
        (self.port,) = free_ports(1)
        self.blobs: dict[str, Blob] = {}
        self.manifests: dict[tuple[str, str], str] = {}  # (repo, tag or digest) -> digest
        self._requests: Counter[tuple[str, str]] = Counter()
        self._open = 0
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._gate: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoints(self) -> dict[str, str]:
        return {self.name: self.url}

    # --- content ------------------------------------------------------------------

    def add_blob(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        digest = sha256(data)
        self.blobs[digest] = Blob(data, media_type)
        return digest

    def add_image(self, repo: str, tag: str, layers: list[bytes]) -> FakeImage:
        """An OCI image of these layers (stored as given, uncompressed type)."""
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]}},
                            sort_keys=True).encode()
        config_digest = self.add_blob(config, MT_CONFIG)
        layer_digests = [self.add_blob(layer, MT_LAYER) for layer in layers]
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": MT_LAYER, "digest": d, "size": len(x)}
                       for d, x in zip(layer_digests, layers, strict=True)],
        }, sort_keys=True).encode()
        manifest_digest = self.add_blob(manifest, MT_MANIFEST)
        self.manifests[(repo, tag)] = manifest_digest
        self.manifests[(repo, manifest_digest)] = manifest_digest
        blobs = {config_digest: config, **dict(zip(layer_digests, layers, strict=True))}
        return FakeImage(repo, tag, manifest, manifest_digest, config_digest, layer_digests,
                         blobs)

    def set_fault(
        self, digest: str, fault: str, *, cut_at: int = 0, gated: bool = False,
        chunked: bool = False,
    ) -> None:
        if fault not in FAULTS:
            raise ValueError(fault)
        blob = self.blobs[digest]
        blob.fault, blob.cut_at, blob.gated, blob.chunked = fault, cut_at, gated, chunked
        if gated:
            self._call(self._arm)

    def behave(self, digest: str) -> None:
        self.set_fault(digest, "ok")

    def release(self) -> None:
        """Let every connection waiting at a gated cut go on."""
        self._call(self._open_gate)

    # --- what it saw --------------------------------------------------------------------

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self._requests[(method, path)]

    def blob_gets(self, repo: str, digest: str) -> int:
        return self.count("GET", f"/v2/{repo}/blobs/{digest}")

    def seen(self) -> Counter[tuple[str, str]]:
        """(method, path as received) -> how many times, for every request."""
        with self._lock:
            return Counter(self._requests)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    # --- life ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._loop = LoopThread()
        self._loop.run(self._start())

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.run(self._stop())
        self._loop.close()
        self._loop = None

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def _stop(self) -> None:
        assert self._server is not None and self._stopping is not None
        self._stopping.set()
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    def _call(self, fn) -> None:
        assert self._loop is not None, "start() first"
        self._loop.loop.call_soon_threadsafe(fn)

    def _arm(self) -> None:
        assert self._gate is not None
        self._gate.clear()

    def _open_gate(self) -> None:
        assert self._gate is not None
        self._gate.set()

    # --- the protocol ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self._lock:
            self._open += 1
        try:
            await self._one_request(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with self._lock:
                self._open -= 1
            self._handlers.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        path = target.split("?", 1)[0]
        with self._lock:
            self._requests[(method, path)] += 1
        await self._dispatch(reader, writer, method, target, head)

    async def _dispatch(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
        target: str, head: bytes,
    ) -> None:
        """One request, its head read and counted (a subclass's hook)."""
        path = target.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            await self._send(writer, method, 200, b"{}", "application/json")
            return
        parts = path[len("/v2/"):].rsplit("/", 2) if path.startswith("/v2/") else []
        if len(parts) != 3 or parts[1] not in ("manifests", "blobs"):
            await self._send(writer, method, 404, b'{"errors":[{"code":"NOT_FOUND"}]}',
                             "application/json")
            return
        repo, kind, ref = parts
        digest = self.manifests.get((repo, ref)) if kind == "manifests" else ref
        blob = self.blobs.get(digest or "")
        if blob is None:
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            await self._send(writer, method, 404, json.dumps(
                {"errors": [{"code": code, "message": "unknown"}]}).encode(), "application/json")
            return
        await self._send_blob(reader, writer, method, digest, blob)

    async def _send(
        self, writer: asyncio.StreamWriter, method: str, status: int, body: bytes,
        content_type: str, extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
                   "Docker-Distribution-API-Version": "registry/2.0", "Connection": "close",
                   **(extra or {})}
        writer.write(_head(status, headers))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()

    async def _send_blob(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
        digest: str, blob: Blob,
    ) -> None:
        data, fault = blob.data, blob.fault
        headers = {"Content-Type": blob.media_type, "Docker-Content-Digest": digest,
                   "Docker-Distribution-API-Version": "registry/2.0", "Connection": "close"}
        if blob.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(len(data))
        if fault == "stall":
            await self._hold(reader)
            return
        writer.write(_head(200, headers))
        if method == "HEAD":
            await writer.drain()
            return
        if fault == "wrong":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        cut = {"stall_body": 1, "reset": blob.cut_at, "close": blob.cut_at,
               "hold": blob.cut_at}.get(fault, len(data))
        await self._write_body(writer, data[:cut], blob.chunked)
        if fault == "stall_body":
            await self._hold(reader)
            return
        if fault in ("reset", "close", "hold") and blob.gated:
            assert self._gate is not None
            await asyncio.wait_for(self._gate.wait(), HOLD_MAX)
        if fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if fault == "close":
            return  # writer.close() in _serve: a clean FIN short of the length
        if fault == "hold":
            await self._write_body(writer, data[cut:], blob.chunked)
        if blob.chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _write_body(self, writer: asyncio.StreamWriter, data: bytes, chunked: bool) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            piece = view[start:start + WRITE_CHUNK]
            if chunked:
                writer.write(b"%x\r\n" % len(piece) + bytes(piece) + b"\r\n")
            else:
                writer.write(piece)
            await writer.drain()

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the peer hangs up (or we stop, or HOLD_MAX)."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), HOLD_MAX)


def _head(status: int, headers: dict[str, str]) -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Canary:
    """A loopback listener that must never be reached: it records every
    connection and answers any request with `body`, a random marker."""

    def __init__(self) -> None:
        (self.port,) = free_ports(1)
        self.body = b"CANARY-" + secrets.token_hex(16).encode()
        self.seen: list[bytes] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.seen)

    def __enter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.2)  # the accept loop checks _stop this often
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, daemon=True, name="canary")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    head = conn.recv(65536)
                except OSError:
                    head = b""
                with self._lock:
                    self.seen.append(head)
                with contextlib.suppress(OSError):
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Docker-Content-Digest: " + sha256(self.body).encode() + b"\r\n"
                        b"Content-Length: " + str(len(self.body)).encode() + b"\r\n"
                        b"Connection: close\r\n\r\n" + self.body
                    )


# --------------------------------------------------------------------------- client side


POLL = 0.05  # seconds between two looks at a condition in wait_until


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll `condition()` until it is true; fail naming `what` after `timeout`
    seconds. Bounded polling of an observable condition, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        tick.wait(POLL)


@dataclass
class Answer:
    """One HTTP exchange: status and headers if they came, the body bytes that
    came, and the error that cut it short (None when the body was whole)."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    def json_errors(self) -> list[dict]:
        """The registry-style error list of this body (fails if it is not one)."""
        doc = json.loads(self.body)
        assert isinstance(doc.get("errors"), list) and doc["errors"], self.body[:300]
        return doc["errors"]


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 60,
) -> Answer:
    """A request with http.client; an incomplete body is reported, not raised."""
    parts = urlsplit(url)
    conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, target, headers=headers or {})
        response = conn.getresponse()
    except (OSError, http_client.HTTPException) as err:
        conn.close()
        return Answer(None, {}, b"", repr(err))
    answer = Answer(response.status, dict(response.getheaders()), b"")
    try:
        answer.body = response.read()
    except http_client.IncompleteRead as err:
        answer.body, answer.error = err.partial, repr(err)
    except (OSError, http_client.HTTPException) as err:
        answer.error = repr(err)
    finally:
        conn.close()
    return answer


def raw_exchange(sock: socket.socket, data: bytes, limit: int = 1 << 24) -> bytes:
    """Send `data`, read until the peer closes (or `limit` bytes)."""
    sock.sendall(data)
    out = bytearray()
    with contextlib.suppress(OSError):
        while len(out) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return bytes(out)


def split_response(raw: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """A raw HTTP/1.x response -> (status, headers, body as received)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        return None, {}, raw
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip()] = value.strip()
    return status, headers, body


def connect_tunnel(
    proxy_port: int, target: str, *, sni: str | None, cafile: str | None = None,
    timeout: float = 30,
) -> tuple[socket.socket, bytes]:
    """CONNECT through the front; TLS over the tunnel with `sni` (None: no SNI).
    Returns (the TLS socket or, if the CONNECT was refused, the plain one,
    the front's answer to the CONNECT)."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        return sock, answer
    context = ssl.create_default_context(cafile=cafile)
    if cafile is None or sni is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname=sni), answer


def tree_snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of everything under root, except
    paths starting with one of `skip` (relative, e.g. "run/")."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(rel == s.rstrip("/") or rel.startswith(s) for s in skip):
            continue
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            out[rel] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict; {} when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody reaped yet)."""
    state = proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if proc_status(int(entry.name)).get("PPid", "").strip() == str(pid):
            out.append(int(entry.name))
    return out


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in KiB."""
    return int(proc_status(pid)["VmHWM"].split()[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
