"""A hostile registry for manifests and the headers stored beside them.

`ScriptedRegistry` is tests/faulty.py's `FaultyRegistry` (its images, blobs,
faults and request counts) plus scripted answers: for a path the test
names, the status, Content-Type, Docker-Content-Digest and body are the
test's, and the body can come

    whole        with a Content-Length
    in pieces    chunked; with `gated`, the pieces after the first wait for
                 release() (the test sees `first_piece_sent` first)
    endless      chunked, garbage, until the reader hangs up (or ENDLESS_MAX)

Any other path is FaultyRegistry's.

Client side: `get()` sends one request through one of cr-proxy's three
doors (mirror HTTP, mirror TLS, https_proxy CONNECT + TLS) and returns every
header line as received, so a header injected on the way shows up as the
separate line it became.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from enum import Enum

from testbed.crproxy import CrProxy
from tests.faulty import FaultyRegistry, connect_tunnel, raw_exchange, sha256

FAKE = FaultyRegistry.name
ENDLESS_PIECE = 64 << 10
ENDLESS_MAX = 256 << 20  # a bound for the test's own sake, far past any cap
MT_OCI = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Script:
    body: bytes
    content_type: str = MT_OCI
    status: int = 200
    digest: str | None = None  # Docker-Content-Digest; None: the body's, "": none
    pieces: int = 1  # >1: chunked, in this many pieces
    gated: bool = False  # pieces after the first wait for release()
    endless: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # more header lines


def manifest_body(media_type: object = MT_OCI, **extra: object) -> bytes:
    """A schema 2 image manifest of one made-up layer, with any mediaType."""
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": "sha256:" + "c" * 64, "size": 2},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": "sha256:" + "d" * 64, "size": 3}], **extra}
    return json.dumps(doc).encode()


class _Replay:
    """A reader whose request head was read already: FaultyRegistry's parser
    gets the head again, then the connection's own reader."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._head, self._reader = head, reader

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        head, self._head = self._head, b""
        return head

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.read(n)


class ScriptedRegistry(FaultyRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, Script] = {}
        self.first_piece_sent = threading.Event()

    def script(self, path: str, script: Script) -> None:
        """Answer GET and HEAD of `path` (e.g. /v2/evil/manifests/v1) so."""
        if script.gated:
            self.first_piece_sent.clear()
            self._call(self._arm)
        self.scripts[path] = script

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        path = target.split("?", 1)[0]
        script = self.scripts.get(path)
        if script is None:
            await super()._one_request(_Replay(head, reader), writer)  # type: ignore[arg-type]
            return
        with self._lock:
            self._requests[(method, path)] += 1
        await self._send_script(writer, method, script)

    async def _send_script(self, writer: asyncio.StreamWriter, method: str, script: Script) -> None:
        headers = {"Content-Type": script.content_type,
                   "Docker-Content-Digest": sha256(script.body) if script.digest is None
                   else script.digest,
                   "Docker-Distribution-API-Version": "registry/2.0", "Connection": "close"}
        if not headers["Docker-Content-Digest"]:
            del headers["Docker-Content-Digest"]
        headers.update(script.headers)
        chunked = script.endless or script.pieces > 1
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(len(script.body))
        lines = [f"HTTP/1.1 {script.status} Status"] + [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if method == "HEAD":
            writer.write(head)
        elif script.endless:
            await self._send_endless(writer, head)
            return
        elif chunked:
            await self._send_pieces(writer, head, script)
            return
        else:
            writer.write(head + script.body)
        await writer.drain()

    async def _send_pieces(self, writer: asyncio.StreamWriter, head: bytes, script: Script) -> None:
        size = -(-len(script.body) // script.pieces)
        pieces = [script.body[i:i + size] for i in range(0, len(script.body), size)]
        # The head and the first piece in one write: the reader has both at once.
        writer.write(head + _chunk(pieces[0]))
        await writer.drain()
        self.first_piece_sent.set()
        if script.gated:
            assert self._gate is not None
            await self._gate.wait()
        for piece in pieces[1:]:
            writer.write(_chunk(piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _send_endless(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(head)
        garbage = _chunk(b"\x00garbage" * (ENDLESS_PIECE // 8))
        for _ in range(ENDLESS_MAX // ENDLESS_PIECE):
            writer.write(garbage)
            await writer.drain()  # ConnectionError once the reader hangs up


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


# --------------------------------------------------------------------------- client side


class Door(Enum):
    """The ways a client reaches cr-proxy's nginx."""

    MIRROR_HTTP = "mirror-http"
    MIRROR_TLS = "mirror-tls"
    PROXY_TLS = "https_proxy"


@dataclass
class Reply:
    status: int | None
    lines: list[tuple[str, str]]  # every header line, in order, duplicates kept
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.lines if k.lower() == name.lower()]

    def error_code(self) -> str:
        return json.loads(self.body)["errors"][0]["code"]


def get(
    cr: CrProxy, door: Door, path: str, *, method: str = "GET",
    headers: dict[str, str] | None = None, host: str | None = None, registry: str = FAKE,
) -> Reply:
    """One request for a registry path of faulty.test (`/v2/<repo>/...`)
    through `door`; the mirror doors name the registry in the path (spelt
    `registry`). `host` replaces the Host header (https_proxy)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    if door is Door.PROXY_TLS:
        sock, answer = connect_tunnel(cr.proxy_port, f"{FAKE}:443", sni=FAKE,
                                      cafile=str(cr.ca_cert))
        assert answer.startswith(b"HTTP/1.1 200"), answer
        host, target = host or FAKE, path
    else:
        port = cr.http_port if door is Door.MIRROR_HTTP else cr.https_port
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        if door is Door.MIRROR_TLS:
            context = ssl.create_default_context(cafile=str(cr.ca_cert))
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        host, target = "cr-proxy.test", "/v2/" + registry + path[len("/v2"):]
        if path in ("/v2/", "/v2"):
            target = path  # the ping names no registry
    request = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    with sock:
        raw = raw_exchange(sock, request.encode())
    return parse_reply(raw, method)


def parse_reply(raw: bytes, method: str = "GET") -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        return Reply(None, [], raw)
    pairs = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    if any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in pairs):
        body = _dechunk(body)
    return Reply(status, pairs, b"" if method == "HEAD" else body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)
