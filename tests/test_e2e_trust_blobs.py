"""The blob miss path as a hostile registry or client would use it (issue 10).

Through the real `cr-proxy serve`, with hostile servers on loopback
(tests/hostile_blobs.py, tests/faulty.py):

- a redirect chain through another host's URLs stores nothing for that
  host: its URLs, any query, still reach it (finding 1);
- a registry trickling a digest does not hold up another registry's pull
  of the same digest (finding 5);
- a blob download never writes more than its Content-Length, or
  limits.max_blob_size without one, and downloads count toward
  cache.max_size (finding 7);
- a cached digest gets a new name only when that name's upstream confirms
  it: invented names create no file (finding 9).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from testbed.crproxy import CrProxy
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import (
    Answer,
    FaultyRegistry,
    connect_tunnel,
    http,
    raw_exchange,
    split_response,
    tree_snapshot,
    wait_until,
)
from tests.hostile_blobs import Routes, victim, victim_file

MIB = 1 << 20
CAP = 1 * MIB  # limits.max_blob_size of the size-limit tests


def blob_url(cr: CrProxy, registry: str, repo: str, digest: str) -> str:
    return f"http://{cr.http}/v2/{registry}/{repo}/blobs/{digest}"


def proxy_get(cr: CrProxy, host: str, target: str) -> Answer:
    """GET https://<host><target> through the CONNECT front, TLS checked
    against our CA."""
    sock, answer = connect_tunnel(cr.proxy_port, f"{host}:443", sni=host, cafile=str(cr.ca_cert))
    with sock:
        assert answer.startswith(b"HTTP/1.1 200"), answer
        raw = raw_exchange(sock, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                                 "Connection: close\r\n\r\n".encode())
    return Answer(*split_response(raw))


def files_under(cache: Path, host: str) -> list[Path]:
    """Every file of the cache tree kept for `host` (content/, sidecars)."""
    return [p for p in cache.rglob("*") if host in p.parts and p.is_file()]


def temp_files(cr: CrProxy) -> list[Path]:
    return list((cr.cache / "temp").iterdir())


def assert_nothing_stored(cr: CrProxy, digest: str) -> None:
    hexpart = digest.split(":", 1)[1]
    assert not (cr.cache / "blobs/sha256" / hexpart).exists()
    assert not [p for p in (cr.cache / "content").rglob(f"*{hexpart}*")]


def assert_registry_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.header("Content-Type") == "application/json", answer
    assert answer.json_errors()[0]["code"] == code, answer.body


# --- 1: redirect hops ------------------------------------------------------------------


@pytest.fixture
def redirecting(tmp_path: Path) -> Iterator[tuple[CrProxy, Routes, Routes]]:
    with victim() as site, Routes("hostile.test") as hostile:
        (proxy_port,) = free_ports(1)
        endpoints = {**site.endpoints, **hostile.endpoints}
        with CrProxy(tmp_path / "cr", endpoints, listen_proxy=f"127.0.0.1:{proxy_port}") as cr:
            yield cr, site, hostile


def test_redirect_hops_never_poison_another_host(
    redirecting: tuple[CrProxy, Routes, Routes],
) -> None:
    """A hostile registry's blob redirects through victim.test's open
    redirect and its download page to its own content-addressed URL. The
    pull works; victim.test's URLs, any query, still answer victim.test's
    own content through the https_proxy, and the cache holds nothing of it."""
    cr, site, hostile = redirecting
    data = os.urandom(64 << 10)
    digest = hostile.add_blob(data)
    hexpart = digest.split(":", 1)[1]
    cdn_path = f"/cdn/sha256/{hexpart[:2]}/{hexpart}/data"
    hostile.serve(cdn_path, data)
    final = f"http://hostile.test{cdn_path}?sig=s3cr3t"
    via_download = f"http://victim.test/download?file=1&mirror={quote(final, safe='')}"
    hostile.redirect_blob(digest, f"http://victim.test/go?to={quote(via_download, safe='')}")

    pulled = http(blob_url(cr, "hostile.test", "app", digest))
    assert pulled.status == 200 and pulled.complete and pulled.body == data
    # Every hop was really taken: victim.test's two redirects, then the CDN.
    assert site.count("GET", "/go") == 1 and site.count("GET", "/download") == 1
    assert hostile.count("GET", cdn_path) == 1
    # Clients get the last byte before the commit names anything: the
    # requested path is named last, so once it is there every name is.
    wait_until((cr.cache / f"content/hostile.test/v2/app/blobs/{digest}").exists, 30,
               "the blob to be committed")

    for target, status, body in (("/go?to=anything", 302, b"moved\n"),
                                 ("/go", 404, None),
                                 ("/download?file=2", 200, victim_file({"file": ["2"]})),
                                 ("/download?file=1", 200, victim_file({"file": ["1"]}))):
        answer = proxy_get(cr, "victim.test", target)
        assert answer.status == status, (target, answer)
        assert data not in answer.body and answer.header("X-Cache") != "HIT", (target, answer)
        if body is not None:
            assert answer.body == body, (target, answer)
    assert site.count("GET", "/go") == 3 and site.count("GET", "/download") == 3
    assert files_under(cr.cache, "victim.test") == []

    # Only the last hop is kept: under the host that served it, at its
    # digest-named path, served from disk for any query; the registry path's
    # redirect record points at it.
    stored = cr.cache / "content/hostile.test" / cdn_path[1:]
    assert stored.stat().st_ino == (cr.cache / "blobs/sha256" / hexpart).stat().st_ino
    record = (cr.cache / f"redirect/hostile.test/v2/app/blobs/{digest}").read_text().split()
    assert record == ["307", final]
    hit = proxy_get(cr, "hostile.test", f"{cdn_path}?sig=other")
    assert hit.status == 200 and hit.header("X-Cache") == "HIT" and hit.body == data
    assert hostile.count("GET", cdn_path) == 1
    # Any other URL of the hostile host itself is not served from disk either.
    other = proxy_get(cr, "hostile.test", "/cdn/anything?x=1")
    assert other.status == 404 and data not in other.body


# --- 5: one download per source ----------------------------------------------------------


def test_a_trickling_registry_does_not_hold_up_another_registrys_pull(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    with FaultyRegistry() as slow, FaultyRegistry() as legit:
        slow.name, legit.name = "slow.test", "legit.test"
        digest = slow.add_blob(data)
        legit.add_blob(data)
        slow.set_fault(digest, "hold", cut_at=len(data) // 2, gated=True)
        with CrProxy(tmp_path / "cr", {**slow.endpoints, **legit.endpoints}) as cr, \
                ThreadPoolExecutor(1) as pool:
            trickled = pool.submit(http, blob_url(cr, "slow.test", "app", digest))
            wait_until(lambda: any(f.stat().st_size >= len(data) // 2 for f in temp_files(cr)),
                       30, "the slow registry's download to be half-way")

            other = http(blob_url(cr, "legit.test", "lib/app", digest), timeout=30)
            assert other.status == 200 and other.complete and other.body == data, other.error
            assert legit.blob_gets("lib/app", digest) == 1
            assert not trickled.done() and slow.open_connections == 1  # still trickling

            slow.release()
            first = trickled.result(timeout=60)
            assert first.status == 200 and first.complete and first.body == data
            wait_until(lambda: not temp_files(cr), 30, "temp/ to be empty")
        # The first verified copy is the one stored; both names link to it.
        blob = cr.cache / "blobs/sha256" / digest.split(":", 1)[1]
        names = [cr.cache / f"content/{host}/v2/{repo}/blobs/{digest}"
                 for host, repo in (("legit.test", "lib/app"), ("slow.test", "app"))]
        assert {p.stat().st_ino for p in names} == {blob.stat().st_ino}


# --- 7: size limits ---------------------------------------------------------------------


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[tuple[CrProxy, Routes]]:
    with Routes("faulty.test") as registry, CrProxy(
        tmp_path / "cr", registry.endpoints, limits={"max_blob_size": "1MiB"},
        download={"hold": 0},  # streamed: the cut after the 200 is the case
    ) as cr:
        yield cr, registry


def test_an_endless_chunked_blob_stops_at_max_blob_size(
    capped: tuple[CrProxy, Routes],
) -> None:
    cr, registry = capped
    digest = "sha256:" + "e" * 64
    registry.endless(digest)
    answer = http(blob_url(cr, "faulty.test", "app", digest))
    assert answer.status == 200 and not answer.complete  # headers were sent: a cut body
    assert len(answer.body) <= CAP
    assert registry.endless_done.wait(30)
    # The fetcher hung up at the cap: what the upstream got into the socket
    # before it noticed is the cap plus the kernel's buffers, far from the end.
    assert registry.endless_sent < 64 * MIB
    wait_until(lambda: not temp_files(cr), 30, "temp/ to be empty")
    assert_nothing_stored(cr, digest)
    assert "limits.max_blob_size" not in answer.body.decode(errors="replace")
    cr.wait_for_output("upstream sent more than 1048576 bytes", 10)


def test_a_content_length_over_max_blob_size_is_refused_before_reading(
    capped: tuple[CrProxy, Routes],
) -> None:
    cr, registry = capped
    too_big = registry.add_blob(os.urandom(CAP + 1))
    answer = http(blob_url(cr, "faulty.test", "app", too_big))
    assert_registry_error(answer, 502, "SIZE_INVALID")
    assert "limits.max_blob_size" in answer.json_errors()[0]["message"]
    assert not temp_files(cr)
    assert_nothing_stored(cr, too_big)
    # The cap itself is allowed, with or without a Content-Length.
    at_cap = registry.add_blob(os.urandom(CAP))
    chunked = registry.add_blob(os.urandom(CAP - 1))
    registry.set_fault(chunked, "ok", chunked=True)
    for digest in (at_cap, chunked):
        whole = http(blob_url(cr, "faulty.test", "app", digest))
        assert whole.status == 200 and whole.complete and len(whole.body) in (CAP, CAP - 1)


def test_downloads_in_progress_count_toward_cache_max_size(tmp_path: Path) -> None:
    """An old image fills most of the cache; a download held before its end
    takes the cache (stored + in temp/) past max_size: the old image is
    evicted while the download is still held, not only at its commit."""
    old, new = os.urandom(3 * MIB), os.urandom(4 * MIB + MIB // 2)
    with FaultyRegistry() as registry:
        image = registry.add_image("old", "v1", [old])
        digest = registry.add_blob(new)
        registry.set_fault(digest, "hold", cut_at=4 * MIB, gated=True)
        settings = {"cache": {"max_size": 5 * MIB, "low_water": 1.0, "min_age": 0,
                              "check_interval": 3600}}
        with CrProxy(tmp_path / "cr", registry.endpoints, **settings) as cr, \
                ThreadPoolExecutor(1) as pool:
            assert http(f"http://{cr.http}/v2/faulty.test/old/manifests/v1").status == 200
            for layer in (image.config_digest, *image.layer_digests):
                assert http(blob_url(cr, "faulty.test", "old", layer)).status == 200
            old_blob = cr.cache / "blobs/sha256" / image.layer_digests[0].split(":", 1)[1]
            # Clients get the last byte before the commit's fsync and rename.
            wait_until(old_blob.exists, 30, "the old layer to be committed")

            held = pool.submit(http, blob_url(cr, "faulty.test", "new", digest))
            try:
                # 3 MiB stored + up to 4 MiB in temp/: over 5 MiB, so the
                # evictor (which sleeps an hour between checks) is woken.
                wait_until(lambda: not old_blob.exists(), 30,
                           "the old image to be evicted during the download")
                assert not held.done() and registry.open_connections == 1
            finally:
                registry.release()
            answer = held.result(timeout=60)
            assert answer.status == 200 and answer.complete and answer.body == new
            new_blob = cr.cache / "blobs/sha256" / digest.split(":", 1)[1]
            wait_until(new_blob.exists, 30, "the new blob to be committed")


# --- 9: a name only once its upstream confirms it -------------------------------------


def test_a_cached_digest_gets_no_name_its_upstream_does_not_confirm(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    layer = images.shared_layer
    data = images.small.blob_bytes(layer)
    (closed_port,) = free_ports(1)
    with FaultyRegistry() as empty:
        empty.name = "empty.test"  # a registry that has nothing: 404 for every blob
        endpoints = {**proxy_endpoints(upstream), **empty.endpoints,
                     "down.test": f"http://127.0.0.1:{closed_port}"}  # nobody listens
        with CrProxy(tmp_path / "cr", endpoints) as cr:
            assert http(blob_url(cr, "registry.test", "small", layer)).body == data
            # Clients get the last byte before the commit (until then, a miss
            # of the digest from the same registry joins that download).
            blob = cr.cache / "blobs/sha256" / layer.split(":", 1)[1]
            wait_until(lambda: (cr.cache / f"content/registry.test/v2/small/blobs/{layer}"
                                ).exists(), 30, "the layer to be committed")
            # held/: the second names of files being sent (emptied at start,
            # never a name a client can ask for).
            before = tree_snapshot(cr.cache, skip=("temp", "held", "usage.json"))

            invented = [("registry.test", f"no-such-{i}") for i in range(5)]
            invented += [("empty.test", "app"), ("empty.test", "library/small")]
            for registry, repo in invented:
                for method in ("GET", "HEAD"):
                    answer = http(blob_url(cr, registry, repo, layer), method=method)
                    assert answer.status == 404, (registry, repo, method, answer)
                    assert answer.header("Content-Type") == "application/json"
                    if method == "GET":
                        assert answer.json_errors()[0]["code"] == "BLOB_UNKNOWN"
            assert empty.count("HEAD", f"/v2/app/blobs/{layer}") == 2  # asked, every time

            # An upstream that cannot be asked: the verified copy is served,
            # for this request only, under no name.
            offline = http(blob_url(cr, "down.test", "app", layer))
            assert offline.status == 200 and offline.complete and offline.body == data
            assert tree_snapshot(cr.cache, skip=("temp", "held", "usage.json")) == before

            # A repository the upstream confirms gets its name (one copy).
            confirmed = http(blob_url(cr, "registry.test", "other/app", layer))
            assert confirmed.status == 200 and confirmed.body == data
            name = cr.cache / f"content/registry.test/v2/other/app/blobs/{layer}"
            assert name.stat().st_ino == blob.stat().st_ino
