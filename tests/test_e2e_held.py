"""A miss whose download is verified while its client waits (download.hold)
is sent by nginx from the verified file (fetch/flight.py, the held
location in nginx/locations.conf); a longer one is streamed as it arrives.

Each case pins the hold so its path does not depend on the machine's speed:
a long hold (every download here ends within it) or a short one with an
upstream held mid-body until the client has bytes."""

from __future__ import annotations

import http.client as http_client
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from testbed.crproxy import CrProxy, skopeo_pull
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import FaultyRegistry, http, wait_until
from tests.test_e2e_mirror import assert_pulled, expected_digests, request

MIB = 1 << 20
LONG_HOLD = 120  # seconds: longer than any download of these tests
SHORT_HOLD = 0.2


@pytest.fixture(scope="module")
def holding(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    with CrProxy(tmp_path_factory.mktemp("held"), proxy_endpoints(upstream),
                 download={"hold": LONG_HOLD}) as running:
        yield running


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def held_names(cr: CrProxy) -> set[str]:
    return {entry.name for entry in (cr.cache / "held").iterdir()}


def fresh_layer(upstream: Upstream, work: Path, repo: str, size: int) -> tuple[str, bytes]:
    """A layer no test has pulled: (digest, bytes), pushed to `repo`."""
    image = build_image(work / repo, layers=[tar_layer({"data.bin": os.urandom(size)})],
                        tag="v1")
    upstream.push(work / repo, "v1", repo, "v1")
    digest = image.layer_digests[0]
    return digest, image.blob_bytes(digest)


def test_a_miss_within_the_hold_is_sent_by_nginx_from_the_verified_file(
    holding: CrProxy, images: Images, tmp_path: Path
) -> None:
    digest = images.small.layer_digests[1]
    data = images.small.blob_bytes(digest)
    url = f"http://{holding.http}/v2/registry.test/small/blobs/{digest}"
    status, headers, body = request(url)
    assert (status, body) == (200, data)
    assert headers["X-CR-Request-Type"] == "blob-held"  # nginx's file, not the fetcher's relay
    assert (headers["X-Cache"], headers["Docker-Content-Digest"]) == ("MISS", digest)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(len(data))
    # The held name is a second link of the stored file: the same bytes.
    (stored,) = holding.wait_committed("registry.test", "small", digest)
    (name,) = held_names(holding)
    assert os.path.samefile(holding.cache / "held" / name, stored)
    # nginx's own Range on a miss: the part asked for, of the verified file.
    other = images.big.layer_digests[0]
    big = images.big.blob_bytes(other)
    status, headers, body = request(
        f"http://{holding.http}/v2/registry.test/big/blobs/{other}",
        headers={"Range": "bytes=1000-1999"})
    assert (status, body, headers["X-CR-Request-Type"]) == (206, big[1000:2000], "blob-held")
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(big)}"


def test_skopeo_pulls_an_image_of_held_misses(
    holding: CrProxy, images: Images, tmp_path: Path
) -> None:
    result = skopeo_pull(f"{holding.http}/registry.test/other/app:v1", tmp_path / "out")
    assert_pulled(result, tmp_path / "out", expected_digests(images.other))
    # Its layers and config were misses (small's shared layer may be a hit).
    holding.access_lines(re.compile(r"/other/app/blobs/\S+ HTTP/1\.1\" 200 .*type=blob-held"), 1)


def test_sixteen_clients_of_one_held_miss_get_it_from_one_download(
    holding: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    digest, data = fresh_layer(upstream, tmp_path, "held/sixteen", 8 * MIB)
    url = f"http://{holding.http}/v2/registry.test/held/sixteen/blobs/{digest}"
    before = upstream.cdn_blob_gets(digest)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: request(url), range(16)))
    assert all((status, body) == (200, data) for status, _, body in answers)
    assert {headers["X-CR-Request-Type"] for _, headers, _ in answers} == {"blob-held"}
    assert upstream.cdn_blob_gets_settled(digest) == before + 1


def test_the_held_location_is_nginx_internal(
    holding: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    digest, data = fresh_layer(upstream, tmp_path, "held/internal", 4096)
    before = held_names(holding)
    request(f"http://{holding.http}/v2/registry.test/held/internal/blobs/{digest}")
    names = held_names(holding) - before
    assert len(names) == 1
    for name in names:
        for base in (f"http://{holding.http}", f"http://{holding.http}/v2/registry.test"):
            status, headers, body = request(f"{base}/_cr/held/{digest}/{name}")
            assert status >= 400 and body != data, (status, headers)
            assert headers.get("X-CR-Request-Type") != "blob-held"


def test_a_download_failing_within_the_hold_is_a_clean_registry_error(
    fake: FaultyRegistry, tmp_path: Path
) -> None:
    """Before the hold, a download that failed after the client's 200 could
    only be told by cutting the connection; within it, the client gets the
    error itself."""
    data = os.urandom(2 * MIB)
    (digest,) = fake.add_image("wrong", "v1", [data]).layer_digests
    fake.set_fault(digest, "wrong")
    with CrProxy(tmp_path / "cr", fake.endpoints, download={"hold": LONG_HOLD}) as cr:
        answer = http(f"http://{cr.http}/v2/faulty.test/wrong/blobs/{digest}")
        assert answer.status == 502 and answer.complete, answer
        assert [e["code"] for e in answer.json_errors()] == ["DIGEST_INVALID"]
        assert not (cr.cache / "blobs/sha256" / digest.split(":", 1)[1]).exists()
        assert held_names(cr) == set()


class Progress:
    """A GET read in a thread, its bytes counted as they arrive."""

    def __init__(self, url: str) -> None:
        self.received = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        parts = urlsplit(url)
        conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            conn.request("GET", parts.path)
            response = conn.getresponse()
            self.headers = dict(response.headers)
            while chunk := response.read1(64 << 10):
                self.body += chunk
                self.received = len(self.body)
        except (OSError, http_client.HTTPException) as err:
            self.error = err
        finally:
            conn.close()

    def join(self) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive()


def test_a_download_longer_than_the_hold_is_streamed_as_it_arrives(
    fake: FaultyRegistry, tmp_path: Path
) -> None:
    """The upstream sends half the blob and waits: the client has bytes
    before the download can end, so it was streamed, not held."""
    data = os.urandom(4 * MIB)
    (digest,) = fake.add_image("slow", "v1", [data]).layer_digests
    fake.set_fault(digest, "hold", cut_at=2 * MIB, gated=True)
    with CrProxy(tmp_path / "cr", fake.endpoints, download={"hold": SHORT_HOLD},
                 timeouts={"connect": 2, "read": 60, "down_host": 1}) as cr:
        client = Progress(f"http://{cr.http}/v2/faulty.test/slow/blobs/{digest}")
        try:
            wait_until(lambda: client.received > 0 or client.error is not None, 60,
                       "the client's first bytes")
        finally:
            fake.release()
        client.join()
        assert client.error is None
        assert bytes(client.body) == data
        assert client.headers["X-CR-Request-Type"] == "blob-fetch"
