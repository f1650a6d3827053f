"""Hostile input, end to end: a clear error, and nothing reaches where it must not.

Through nginx's mirror port and through the https_proxy front (CONNECT +
TLS with our CA, and plain absolute-URI forwarding): traversal in every
spelling, NUL, backslashes, 5000-character names, Host headers with paths,
ports and unicode, `?ns=` tricks. Each answer must be a 4xx (registry-style
JSON when the fetcher answered), no file may appear or change anywhere
beside the cache, and the bytes of a canary file planted next to the cache
dir (or of the CA key, or /etc/passwd) must never come back.

Also: oversized heads, a slowloris client and a flood of CONNECTs, the CA
key's protection, and configured credentials never leaking.

`faulty.test` (tests/faulty.py) is the upstream here, and also stands in
for the default registry (registry-1.docker.io), so any request that
escapes /v2/ towards an upstream is recorded. `Canary` is a loopback
listener that no request may reach.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from cr_proxy import config as config_mod
from cr_proxy.front import certs
from cr_proxy.front import relay as relay_mod
from cr_proxy.front import server as front_mod
from testbed.crproxy import CrProxy, clean_env, layout_blobs, skopeo_pull
from testbed.oci_layout import build_image, tar_layer
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints
from tests.faulty import (
    Answer,
    Canary,
    FakeImage,
    FaultyRegistry,
    connect_tunnel,
    http,
    raw_exchange,
    split_response,
    tree_snapshot,
    wait_until,
)

FAKE = FaultyRegistry.name
DIGEST = "sha256:" + "ab" * 32
CANARY_FILE = "canary.txt"
SECRET_MARKERS = (b"root:x:0:0",)  # /etc/passwd


@dataclass
class Hostile:
    cr: CrProxy
    fake: FaultyRegistry
    canary: Canary
    image: FakeImage
    root: Path  # the directory holding the cr-proxy dir and a canary file
    canary_bytes: bytes
    ca_key: bytes

    def forbidden(self) -> list[bytes]:
        """Bytes that must never appear in any response."""
        return [self.canary_bytes, self.canary.body, self.ca_key.split(b"\n")[1],
                b"PRIVATE KEY", *SECRET_MARKERS]


@pytest.fixture(scope="module")
def hostile(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    canary_bytes = b"CANARY-FILE-" + os.urandom(12).hex().encode()
    (root / CANARY_FILE).write_bytes(canary_bytes)
    (proxy_port,) = free_ports(1)
    with FaultyRegistry() as fake, Canary() as canary:
        image = fake.add_image("app", "v1", [os.urandom(2000)])
        endpoints = {**upstream.endpoints, **fake.endpoints, "registry-1.docker.io": fake.url}
        with CrProxy(root / "crproxy", endpoints, listen_proxy=f"127.0.0.1:{proxy_port}") as cr:
            (cr.dir / CANARY_FILE).write_bytes(canary_bytes)  # beside cache/
            # What is legitimately made on first use, made before any snapshot:
            # the leaf for faulty.test, the cached image, the /v2/ challenge.
            tls, answer = connect_tunnel(proxy_port, f"{FAKE}:443", sni=FAKE,
                                         cafile=str(cr.ca_cert))
            tls.close()
            assert answer.startswith(b"HTTP/1.1 200")
            assert http(f"http://{cr.http}/v2/{FAKE}/app/manifests/v1").status == 200
            assert http(f"http://{cr.http}/v2/registry.test/nothing/manifests/v1").status == 404
            ca_key = (cr.dir / "certs/ca.key").read_bytes()
            yield Hostile(cr, fake, canary, image, root, canary_bytes, ca_key)


def mirror_raw(cr: CrProxy, target: bytes | str, host: bytes | str = b"cr-proxy.test",
               extra: bytes = b"") -> Answer:
    target = target.encode() if isinstance(target, str) else target
    host = host.encode() if isinstance(host, str) else host
    with socket.create_connection(("127.0.0.1", cr.http_port), timeout=30) as sock:
        raw = raw_exchange(sock, b"GET " + target + b" HTTP/1.1\r\nHost: " + host +
                           b"\r\n" + extra + b"Connection: close\r\n\r\n")
    return Answer(*split_response(raw))


def proxy_tls(cr: CrProxy, host: bytes | str, target: bytes | str,
              sni: str | None = FAKE, extra: bytes = b"") -> Answer:
    """CONNECT faulty.test:443, TLS with `sni`, then one request."""
    target = target.encode() if isinstance(target, str) else target
    host = host.encode() if isinstance(host, str) else host
    cafile = str(cr.ca_cert) if sni == FAKE else None
    sock, answer = connect_tunnel(cr.proxy_port, f"{FAKE}:443", sni=sni, cafile=cafile)
    with sock:
        assert answer.startswith(b"HTTP/1.1 200"), answer
        raw = raw_exchange(sock, b"GET " + target + b" HTTP/1.1\r\nHost: " + host +
                           b"\r\n" + extra + b"Connection: close\r\n\r\n")
    return Answer(*split_response(raw))


def proxy_plain(cr: CrProxy, request_line: bytes | str, host: bytes | str = FAKE) -> Answer:
    """A plain-HTTP proxy request (absolute URI) to the front."""
    line = request_line.encode() if isinstance(request_line, str) else request_line
    host = host.encode() if isinstance(host, str) else host
    with socket.create_connection(("127.0.0.1", cr.proxy_port), timeout=30) as sock:
        raw = raw_exchange(sock, line + b"\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    return Answer(*split_response(raw))


def assert_refused(h: Hostile, answer: Answer, what: object) -> None:
    assert answer.status is not None and 400 <= answer.status < 500, (what, answer)
    if (answer.header("X-CR-Request-Type") or "").endswith("-fetch"):
        assert answer.header("Content-Type") == "application/json", (what, answer)
        assert answer.json_errors()[0]["code"], what
    for marker in h.forbidden():
        assert marker not in answer.body, (what, marker)


UNWATCHED = ("crproxy/run/", "crproxy/cache/held/")


class Watch:
    """What must not change while hostile requests are made: every file
    beside and in the cache (run/ aside: logs; and held/, the second names
    of files being sent, each removed a minute on), the upstream's
    requests, the canary listener."""

    def __init__(self, h: Hostile) -> None:
        self.h = h
        self.files = tree_snapshot(h.root, skip=UNWATCHED)
        self.upstream = h.fake.seen()
        self.canary = h.canary.connections

    def assert_untouched(self, upstream_too: bool = True) -> None:
        assert tree_snapshot(self.h.root, skip=UNWATCHED) == self.files
        if upstream_too:
            assert self.h.fake.seen() == self.upstream
        assert self.h.canary.connections == self.canary


LONG = "a" * 5000
# Unicode look-alikes of '.', '/', and a Cyrillic small a in a host name.
UNICODE_TARGETS = [
    f"/v2/{FAKE}\u2024/app/manifests/v1",
    "/v2/faulty\uff0etest/app/manifests/v1",
    f"/v2/{FAKE}\u2215app/manifests/v1",
    f"/v2/{FAKE}/app\u2215..\u2215..\u2215{CANARY_FILE}/manifests/v1",
    "/v2/f\u0430ulty.test/app/manifests/v1",
]
# Non-ASCII that Python's str.lower()/strip() fold into a valid ASCII host.
FOLDED_TARGETS = [
    "/v2/\u212a.test/app/manifests/v1",  # KELVIN SIGN: lower() makes it 'k.test'
    "/v2/app/manifests/v1?ns=\u212a.test",
    "/v2/app/manifests/v1?ns=faulty.test\u3000",  # IDEOGRAPHIC SPACE: strip() drops it
    "/v2/app/manifests/v1?ns=\u00a0faulty.test",  # NO-BREAK SPACE
]
MIRROR_REFUSED = [
    f"/v2/{FAKE}/app/../../../../{CANARY_FILE}",
    f"/v2/{FAKE}/app/../../../../../../../../{CANARY_FILE}",
    f"/v2/{FAKE}/%2e%2e/%2e%2e/{CANARY_FILE}/manifests/v1",
    f"/v2/{FAKE}/app%2f..%2f..%2f..%2f{CANARY_FILE}/blobs/{DIGEST}",
    f"/v2/{FAKE}/app%2F..%2F..%2F{CANARY_FILE}/manifests/v1",
    f"/v2/%2e%2e/%2e%2e/%2e%2e/{CANARY_FILE}",
    f"/..%2f..%2f{CANARY_FILE}",
    f"/../../{CANARY_FILE}",
    "/etc/passwd",
    "//etc/passwd",
    "/v2//etc/passwd/manifests/v1",
    f"/v2/{FAKE}/app%00/manifests/v1",
    f"/v2/{FAKE}/app/manifests/v1%00",
    f"/v2/{FAKE}/app/blobs/{DIGEST}%00",
    f"/v2/{FAKE}/app\\..\\..\\{CANARY_FILE}/manifests/v1",
    f"/v2/{FAKE}/app%5c..%5c..%5c{CANARY_FILE}/manifests/v1",
    f"/v2/{FAKE}/{LONG}/manifests/v1",
    f"/v2/{FAKE}/app/manifests/{LONG}",
    f"/v2/{LONG}.test/app/manifests/v1",
    f"/v2/{FAKE}/app/blobs/sha256:{LONG}",
    f"/v2/{FAKE}/app/manifests/..",
    f"/v2/{FAKE}/app/manifests/%2e%2e",
    f"/v2/{FAKE}/APP/manifests/v1",
    *(quote(target, safe="/:") for target in UNICODE_TARGETS),
    "/v2/app/manifests/v1?ns=faulty.test/../..",
    "/v2/app/manifests/v1?ns=%2e%2e",
    "/v2/app/manifests/v1?ns=..",
    "/v2/app/manifests/v1?ns=/etc",
    "/v2/app/manifests/v1?ns=faulty.test%00",
    "/v2/app/manifests/v1?ns=faulty.test%2f..",
    "/v2/app/manifests/v1?ns=..%2f..%2fetc",
    "/v2/app/manifests/v1?ns=faulty.test%5c..",
    "/v2/app/manifests/v1?ns=faulty.test/app",
    "/v2/app/manifests/v1?ns=faulty.test%3a%3a",
    f"/v2/app/manifests/v1?ns={LONG}",
    "/v2/app/manifests/v1?ns=f%d0%b0ulty.test",
]


@pytest.mark.parametrize("target", MIRROR_REFUSED, ids=lambda t: t[:60])
def test_mirror_refuses_hostile_paths_and_touches_nothing(hostile: Hostile, target: str) -> None:
    watch = Watch(hostile)
    answer = mirror_raw(hostile.cr, target.encode())
    assert_refused(hostile, answer, target)
    watch.assert_untouched()


def test_raw_unicode_in_the_path_gets_a_registry_error(hostile: Hostile) -> None:
    watch = Watch(hostile)
    for target in UNICODE_TARGETS:
        answer = mirror_raw(hostile.cr, target.encode())
        assert_refused(hostile, answer, target)
        assert answer.header("Content-Type") == "application/json", (target, answer)
    watch.assert_untouched()


def test_unicode_look_alike_hosts_are_not_folded_to_ascii(hostile: Hostile) -> None:
    """'\\u212a.test' (KELVIN SIGN) must not become 'k.test', nor unicode
    spaces vanish around a registry name."""
    for target in FOLDED_TARGETS:
        watch = Watch(hostile)
        answer = mirror_raw(hostile.cr, quote(target, safe="/:?="))
        assert_refused(hostile, answer, target)
        watch.assert_untouched()


@pytest.mark.parametrize("host", [b"../../..", b"faulty.test/../..", LONG.encode(),
                                  b"faulty.test\xe2\x80\xa4", b"[..]", b"127.0.0.1:1"])
def test_mirror_ignores_hostile_host_headers(hostile: Hostile, host: bytes) -> None:
    """The mirror names the registry by path or ?ns=, never by Host."""
    watch = Watch(hostile)
    answer = mirror_raw(hostile.cr, f"/v2/{FAKE}/app/manifests/v1", host=host)
    if answer.status == 200:
        assert answer.body == hostile.image.manifest
        watch.assert_untouched(upstream_too=False)
    else:
        assert_refused(hostile, answer, host)
        watch.assert_untouched()


PROXY_HOSTS_REFUSED = [
    "faulty.test/../../x", "faulty.test:99999", "faulty.test:443/x", "faulty.test\u2024", "..",
    "faulty.test@127.0.0.1", "", "FAULTY.TEST", "faulty.test:5000", "[..]", "faulty.test\u2215x",
    "f\u0430ulty.test", "faulty.test%2f..", "localhost", "127.0.0.1:1", LONG,
]


@pytest.mark.parametrize("host", PROXY_HOSTS_REFUSED, ids=lambda h: repr(h[:40]))
def test_proxy_refuses_hostile_host_headers(hostile: Hostile, host: str) -> None:
    watch = Watch(hostile)
    answer = proxy_tls(hostile.cr, host.encode(), b"/v2/app/manifests/v1")
    assert_refused(hostile, answer, host)
    watch.assert_untouched()


PROXY_PATHS_REFUSED = [
    f"/v2/app/../../../{CANARY_FILE}",
    f"/v2/app/../../../../../../../../{CANARY_FILE}",
    f"/v2/%2e%2e/%2e%2e/{CANARY_FILE}",
    f"/../{CANARY_FILE}",
    f"/%2e%2e/%2e%2e/{CANARY_FILE}",
    f"/%2e%2e%2f%2e%2e%2f{CANARY_FILE}",
    f"/v2/..%2f..%2f{CANARY_FILE}",
    f"/x/..%2f..%2f..%2f{CANARY_FILE}",
    "/v2/app%00/manifests/v1",
    "/v2/app/manifests/v1%00",
    "/v2/app\\..\\x/manifests/v1",
    f"/v2/{LONG}/manifests/v1",
    "/" + "b" * 5000,
    "/etc/passwd/..",
]


@pytest.mark.parametrize("target", PROXY_PATHS_REFUSED, ids=lambda t: t[:60])
def test_proxy_refuses_hostile_paths(hostile: Hostile, target: str) -> None:
    watch = Watch(hostile)
    answer = proxy_tls(hostile.cr, FAKE.encode(), target.encode())
    assert_refused(hostile, answer, target)
    watch.assert_untouched()


def canary_forward_lines(h: Hostile) -> list[str]:
    port = h.canary.port
    return [
        f"GET http://{FAKE}/../{CANARY_FILE} HTTP/1.1",
        f"GET http://{FAKE}/v2/app/../../../{CANARY_FILE} HTTP/1.1",
        f"GET http://{FAKE}/v2/app%00/manifests/v1 HTTP/1.1",
        "GET http://127.0.0.1/v2/ HTTP/1.1",
        f"GET http://127.0.0.1:{port}/v2/ HTTP/1.1",
        f"GET http://{FAKE}@127.0.0.1:{port}/v2/ HTTP/1.1",
        f"GET http://localhost:{port}/v2/ HTTP/1.1",
        "GET http://[::1]/v2/ HTTP/1.1",
        "GET https://faulty.test/v2/ HTTP/1.1",
        f"GET /{CANARY_FILE} HTTP/1.1",
        "GET /ca.key HTTP/1.1",
        f"CONNECT 127.0.0.1:{port} HTTP/1.1",
        f"CONNECT {FAKE}:{port} HTTP/1.1",
        f"CONNECT {FAKE}/../x:443 HTTP/1.1",
        "CONNECT [..]:443 HTTP/1.1",
    ]


def test_proxy_refuses_hostile_forward_and_connect_requests(hostile: Hostile) -> None:
    for line in canary_forward_lines(hostile):
        watch = Watch(hostile)
        answer = proxy_plain(hostile.cr, line)
        assert_refused(hostile, answer, line)
        watch.assert_untouched()


# --- SSRF, odd hosts, stray files, overlapping names ---------------------------------------


def test_mirror_never_sends_dot_segments_upstream(hostile: Hostile) -> None:
    """nginx hands @fetch the URI as sent; the fetcher must not forward its
    dot segments: /v2/../metrics?ns=<cr-proxy's metrics> must not return the
    loopback-only metrics page, nor the default registry see /canary.txt."""
    targets = [
        f"/v2/{FAKE}/../../{CANARY_FILE}",
        f"/v2/{FAKE}/app/blobs/..%2f..%2f..%2f{CANARY_FILE}",
        f"/v2/{FAKE}/app/blobs/sha256:..%2f..%2f{CANARY_FILE}",
        f"/v2/../metrics?ns=127.0.0.1:{hostile.cr.metrics_port}",
    ]
    before = hostile.fake.seen()
    answers = {t: mirror_raw(hostile.cr, t) for t in targets}
    escaped = [p for (_, p) in hostile.fake.seen() - before if not p.startswith("/v2/")]
    assert escaped == [], f"upstream saw paths outside /v2/: {escaped}"
    for target, answer in answers.items():
        assert b"crproxy_" not in answer.body, f"{target} returned the metrics page"
        assert_refused(hostile, answer, target)


def test_mirror_never_connects_to_loopback_destinations(hostile: Hostile) -> None:
    """SSRF: a path prefix or ?ns= naming a loopback address is refused,
    not fetched (and never cached as a manifest)."""
    port = hostile.canary.port
    targets = [
        f"/v2/127.0.0.1:{port}/x/manifests/v1",
        f"/v2/localhost:{port}/x/blobs/{DIGEST}",
        f"/v2/x/tags/list?ns=127.0.0.1:{port}",
        f"/v2/x/manifests/v1?ns=127.0.0.1:{port}",
    ]
    answers = {t: mirror_raw(hostile.cr, t) for t in targets}
    assert hostile.canary.connections == 0, hostile.canary.seen
    for target, answer in answers.items():
        assert hostile.canary.body not in answer.body, target
        assert answer.status is not None and 400 <= answer.status < 500, (target, answer)


def test_proxy_host_header_cannot_retarget_a_tunnel(hostile: Hostile) -> None:
    """SSRF: CONNECT faulty.test:443, TLS without SNI, then a Host naming a
    loopback service the front would never CONNECT to."""
    port = hostile.canary.port
    answers = [proxy_tls(hostile.cr, f"127.0.0.1:{port}", path, sni=None)
               for path in ("/v2/", "/v2/x/tags/list", "/v2/x/manifests/v1")]
    assert hostile.canary.connections == 0, hostile.canary.seen
    for answer in answers:
        assert hostile.canary.body not in answer.body
        assert answer.status is not None and 400 <= answer.status < 500, answer


def test_bracketed_non_addresses_get_400(hostile: Hostile) -> None:
    """'[..]', '[.]', '[:]', '[1:2:3]' are not IPv6 addresses: a 400, not a
    500 from aiohttp's URL parser nor a connect attempt."""
    for host in ("[..]", "[.]", "[:]", "[1:2:3]"):
        for target in (f"/v2/{host}/app/manifests/v1", f"/v2/app/manifests/v1?ns={host}",
                       f"/v2/{host}/app/blobs/{DIGEST}"):
            answer = mirror_raw(hostile.cr, target)
            assert answer.status == 400, (target, answer)
            assert answer.json_errors()[0]["code"] == "NAME_INVALID"


def test_unknown_names_leave_no_files_in_the_cache(hostile: Hostile) -> None:
    """A 401 then 404 for a name that does not exist stores nothing: clients
    cannot create files in the cache without bound."""
    watch = Watch(hostile)
    for i in range(10):
        answer = http(f"http://{hostile.cr.http}/v2/registry.test/no-such-{i}/x/manifests/v{i}")
        assert answer.status == 404
        assert answer.json_errors()[0]["code"] == "MANIFEST_UNKNOWN"
    watch.assert_untouched(upstream_too=False)


def test_tag_and_repository_paths_that_overlap_are_both_served(hostile: Hostile) -> None:
    """Tag v1 of `overlap` is a file where repository `overlap/manifests/v1`
    needs a directory: both valid names, both must be served."""
    first = hostile.fake.add_image("overlap", "v1", [os.urandom(100)])
    second = hostile.fake.add_image("overlap/manifests/v1", "x", [os.urandom(100)])
    base = f"http://{hostile.cr.http}/v2/{FAKE}"
    assert http(f"{base}/overlap/manifests/v1").body == first.manifest
    answer = http(f"{base}/overlap/manifests/v1/manifests/x")
    assert (answer.status, answer.body) == (200, second.manifest)


# --- oversized heads, slow heads, floods ------------------------------------------------------


@pytest.mark.parametrize("shape", ["one-20k-header", "five-15k-headers", "20k-request-line"])
def test_oversized_heads_are_refused_and_nginx_serves_on(hostile: Hostile, shape: str) -> None:
    """nginx: large_client_header_buffers 4 x 16k; the front: connect.MAX_HEAD 16 KiB."""
    big = "x" * (15 * 1024)
    headers = {
        "one-20k-header": b"X-Big: " + b"y" * (20 * 1024) + b"\r\n",
        "five-15k-headers": b"".join(f"X-Big-{i}: {big}\r\n".encode() for i in range(5)),
        "20k-request-line": b"",
    }[shape]
    target = f"/v2/{FAKE}/app/manifests/v1"
    if shape == "20k-request-line":
        target += "?pad=" + "z" * (20 * 1024)
    answers = [mirror_raw(hostile.cr, target, extra=headers)]
    # Through a CONNECT tunnel to nginx's https_proxy server.
    proxy_target = target.replace(f"/v2/{FAKE}/", "/v2/")
    answers.append(proxy_tls(hostile.cr, FAKE, proxy_target, extra=headers))
    # The same head through the CONNECT front's plain-HTTP side.
    answers.append(proxy_plain(hostile.cr, f"GET http://{FAKE}{target} HTTP/1.1".encode(),
                               host=FAKE.encode() + b"\r\n" + headers.rstrip(b"\r\n")))
    for answer in answers:
        assert answer.status in (400, 414, 431, 494), answer
    assert http(f"http://{hostile.cr.http}/v2/{FAKE}/app/manifests/v1").status == 200
    assert proxy_tls(hostile.cr, FAKE, "/v2/app/manifests/v1").status == 200


async def test_front_closes_a_slow_head_and_serves_others_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front in-process with front.HEAD_TIMEOUT at 1 s (it is a module
    constant, 30 s; the end-to-end check with the real value is
    test_slowloris_is_cut_by_the_front_and_by_nginx)."""
    monkeypatch.setattr(front_mod, "HEAD_TIMEOUT", 1.0)
    (port,) = free_ports(1)
    path = tmp_path / "cr-proxy.yml"
    path.write_text(yaml.safe_dump({"listen": {"proxy": f"127.0.0.1:{port}"},
                                    "certs_dir": str(tmp_path / "certs"),
                                    "run_dir": str(tmp_path / "run")}))
    conf = config_mod.load(path, environ={})
    front = front_mod.Front(conf, certs.LeafCache(certs.ensure_ca(conf.certs_dir), conf.certs_dir))
    await front.start()
    try:
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
        slow_writer.write(b"CONNECT faulty.test:443 HTTP/1.1\r\nHost: faul")
        await slow_writer.drain()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ca.crt HTTP/1.1\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        # The slow client is closed without an answer once its time is up.
        assert await asyncio.wait_for(slow_reader.read(), 30) == b""
        slow_writer.close()
    finally:
        await front.close()


async def test_front_closes_an_idle_tunnel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IDLE_TIMEOUT (600 s, a module constant) at 1 s, in-process: a
    blind tunnel that carries bytes, then nothing, is closed at both ends."""
    monkeypatch.setattr(relay_mod, "IDLE_TIMEOUT", 1.0)
    port, echo_port = free_ports(2)
    far_end_closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        far_end_closed.set()
        writer.close()

    echo_server = await asyncio.start_server(echo, "127.0.0.1", echo_port)
    path = tmp_path / "cr-proxy.yml"
    path.write_text(yaml.safe_dump({
        "listen": {"proxy": f"127.0.0.1:{port}"},
        "certs_dir": str(tmp_path / "certs"), "run_dir": str(tmp_path / "run"),
        "proxy": {"allow_private": [f"127.0.0.1:{echo_port}"], "ports": [echo_port],
                  "passthrough": ["127.0.0.1"]},
    }))
    conf = config_mod.load(path, environ={})
    front = front_mod.Front(conf, certs.LeafCache(certs.ensure_ca(conf.certs_dir), conf.certs_dir))
    await front.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).startswith(
            b"HTTP/1.1 200")
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 30) == b"ping"
        # Now silence: the tunnel is closed, towards the client and the far end.
        assert await asyncio.wait_for(reader.read(), 30) == b""
        await asyncio.wait_for(far_end_closed.wait(), 30)
        writer.close()
    finally:
        await front.close()
        echo_server.close()
        await echo_server.wait_closed()


def test_slowloris_is_cut_by_the_front_and_by_nginx(hostile: Hostile) -> None:
    """With the real limits: front.HEAD_TIMEOUT and nginx's client_header_timeout
    (30 s each). A partial head, then silence: both close the connection."""
    sockets = {
        "front": socket.create_connection(("127.0.0.1", hostile.cr.proxy_port)),
        "nginx": socket.create_connection(("127.0.0.1", hostile.cr.http_port)),
    }
    try:
        for sock in sockets.values():
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sock.settimeout(90)  # a bound on this test, not an expectation
        # Meanwhile both keep serving others.
        assert http(f"http://{hostile.cr.http}/v2/{FAKE}/app/manifests/v1").status == 200
        assert proxy_plain(hostile.cr, b"GET /ca.crt HTTP/1.1").status == 200

        def closed(sock: socket.socket) -> bytes:
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data

        with ThreadPoolExecutor(2) as pool:
            ends = {name: pool.submit(closed, sock) for name, sock in sockets.items()}
            answers = {name: end.result(120) for name, end in ends.items()}
        assert answers["front"] == b"", "the front closes a slow head without an answer"
        assert answers["nginx"] == b"" or answers["nginx"].startswith(b"HTTP/1.1 408")
    finally:
        for sock in sockets.values():
            sock.close()


@pytest.fixture
def small_front(tmp_path: Path) -> Iterator[tuple[CrProxy, FaultyRegistry]]:
    (port,) = free_ports(1)
    with FaultyRegistry() as fake, CrProxy(
        tmp_path / "crproxy", fake.endpoints, listen_proxy=f"127.0.0.1:{port}",
        proxy={"max_tunnels": 8},
    ) as cr:
        yield cr, fake


def tunnel_request(cr: CrProxy) -> tuple[socket.socket | None, bytes]:
    """A CONNECT + TLS + one request kept open; (socket, the response head),
    or (None, the front's refusal)."""
    sock, answer = connect_tunnel(cr.proxy_port, f"{FAKE}:443", sni=FAKE,
                                  cafile=str(cr.ca_cert))
    if not answer.startswith(b"HTTP/1.1 200"):
        sock.close()
        return None, answer
    sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {FAKE}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "tunnel closed before the answer"
        head += chunk
    return sock, head


def test_connect_flood_is_bounded_by_max_tunnels_and_front_stays_responsive(
    small_front: tuple[CrProxy, FaultyRegistry],
) -> None:
    cr, _ = small_front
    idle: list[socket.socket] = []
    tunnels: list[socket.socket] = []
    try:
        # 300 connections opened and held, sending nothing.
        idle = [socket.create_connection(("127.0.0.1", cr.proxy_port)) for _ in range(300)]
        # The limit: 8 working tunnels, then 503.
        for _ in range(8):
            sock, head = tunnel_request(cr)
            assert sock is not None and head.startswith(b"HTTP/1.1 200"), head
            tunnels.append(sock)
        refused, answer = tunnel_request(cr)
        assert refused is None and answer.startswith(b"HTTP/1.1 503"), answer

        # 300 concurrent CONNECTs at the limit: each answered 503 at once, none hangs.
        def one_connect(_: int) -> bytes:
            with socket.create_connection(("127.0.0.1", cr.proxy_port), timeout=60) as sock:
                return raw_exchange(sock, f"CONNECT {FAKE}:443 HTTP/1.1\r\n\r\n".encode())

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one_connect, range(300)))
        assert all(a.startswith(b"HTTP/1.1 503") for a in answers), {a[:40] for a in answers}

        # One tunnel ends: a new CONNECT is served again (polled: the relay
        # threads notice the close asynchronously).
        tunnels.pop().close()
        fresh: list[socket.socket] = []

        def one_more() -> bool:
            sock, _ = tunnel_request(cr)
            if sock is not None:
                fresh.append(sock)
            return sock is not None

        wait_until(one_more, 30, "a tunnel to be free again")
        tunnels += fresh
    finally:
        for sock in idle + tunnels:
            sock.close()
    # Everything closed: the front serves a new tunnel.
    def serves() -> bool:
        sock, _ = tunnel_request(cr)
        if sock is None:
            return False
        sock.close()
        return True

    wait_until(serves, 30, "the front to serve again")


def test_ca_is_served_while_all_tunnels_are_busy(
    small_front: tuple[CrProxy, FaultyRegistry],
) -> None:
    """GET /ca.crt needs no tunnel: proxy.max_tunnels must not refuse it."""
    cr, _ = small_front
    tunnels = []
    try:
        for _ in range(8):
            sock, head = tunnel_request(cr)
            assert sock is not None, head
            tunnels.append(sock)
        answer = proxy_plain(cr, b"GET /ca.crt HTTP/1.1")
    finally:
        for sock in tunnels:
            sock.close()
    assert answer.status == 200
    assert answer.body == cr.ca_cert.read_bytes()


# --- the CA key ---------------------------------------------------------------------------


def test_ca_key_is_never_served_and_keys_are_private(hostile: Hostile) -> None:
    cr = hostile.cr
    answer = proxy_plain(cr, b"GET /ca.crt HTTP/1.1")
    assert answer.status == 200
    assert answer.body == cr.ca_cert.read_bytes()
    assert b"PRIVATE KEY" not in answer.body
    for target in ("/ca.key", "/ca.crt", "/certs/ca.key", "/../certs/ca.key",
                   "/v2/../../certs/ca.key"):
        for a in (proxy_plain(cr, f"GET {target} HTTP/1.1"), mirror_raw(cr, target),
                  proxy_tls(cr, FAKE, target)):
            assert a.status != 200 or target == "/ca.crt", (target, a)
            assert b"PRIVATE KEY" not in a.body and hostile.ca_key not in a.body
    certs_dir = cr.dir / "certs"
    keys = [certs_dir / "ca.key", certs_dir / "mirror.key", *(certs_dir / "hosts").glob("*.key")]
    assert certs_dir / "hosts" / f"{FAKE}.key" in keys
    # The CA key is cr-proxy's alone; a leaf key nginx's workers may read
    # (their group: privsep.py), nobody else.
    assert (certs_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    for key in keys:
        assert key.stat().st_mode & 0o777 in (0o600, 0o640), f"{key} is {oct(key.stat().st_mode)}"


# --- credentials ----------------------------------------------------------------------------


@pytest.fixture
def private_upstream(tmp_path: Path) -> Iterator[Upstream]:
    secret = "S3cr3t-" + os.urandom(8).hex()
    with Upstream(tmp_path / "private", credentials=("u", secret)) as up:
        yield up


def test_credentials_never_leak(private_upstream: Upstream, tmp_path: Path) -> None:
    up = private_upstream
    assert up.credentials is not None
    user, secret = up.credentials
    image = build_image(tmp_path / "layout", layers=[tar_layer({"p": b"private\n"})], tag="v1")
    up.push(tmp_path / "layout", "v1", "private/app", "v1")
    leaks = [secret.encode(), base64.b64encode(f"{user}:{secret}".encode()),
             base64.b64encode(secret.encode())]
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(up),
                 registries={"registry.test": {"username": user, "password": secret}}) as cr:
        result = skopeo_pull(f"{cr.http}/registry.test/private/app:v1", tmp_path / "out")
        assert result.returncode == 0, result.stderr
        assert image.manifest_digest in layout_blobs(tmp_path / "out")
        assert any(t.user == user and t.status == 200 for t in up.token_log), \
            "the pull must have used the configured credentials"
        errors = [
            http(f"http://{cr.http}/v2/registry.test/private/none/manifests/v1"),
            http(f"http://{cr.http}/v2/registry.test/private/app/blobs/{DIGEST}"),
            http(f"http://{cr.http}/v2/registry.test/private/app/manifests/bad..tag"),
            http(f"http://{cr.http}/v2/registry.test/private/app/tags/list"),
        ]
        assert all(e.status is not None and e.status >= 400 for e in errors[:3])
        printed = subprocess.run(
            [sys.executable, "-m", "cr_proxy", "config", "--config", str(cr.config_path)],
            capture_output=True, text=True, env=clean_env(), cwd=cr.dir, timeout=60, check=True,
        )
        assert user in printed.stdout  # the entry is there, its password masked
        config_printed = (printed.stdout + printed.stderr).encode()
        # nginx's access log is buffered (flush=1s): wait for the pull in it.
        wait_until(lambda: b"/v2/registry.test/private/app/manifests/v1" in
                   cr.access_log.read_bytes(), 30, "the pull in nginx's access log")
    log = cr.log_text().encode()
    assert b"DEBUG" in log, "the test runs serve at log_level debug"
    files = {p: p.read_bytes() for p in cr.dir.rglob("*")
             if p.is_file() and p != cr.config_path and not p.is_socket()}
    for leak in leaks:
        assert leak not in log
        assert leak not in config_printed
        assert leak not in cr.access_log.read_bytes()
        for e in errors:
            assert leak not in e.body and leak not in json.dumps(e.headers).encode()
        assert [p for p, data in files.items() if leak in data] == []
