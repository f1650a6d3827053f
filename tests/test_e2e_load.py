"""Bounded load: 24 concurrent clients pull a mix of cached and uncached
manifests and blobs through the mirror; every answer is whole and
digest-correct, the serve process keeps no file descriptors once the load is
over, and its memory stays well below one large layer (blobs are streamed,
never held in memory).

Peak RSS (VmHWM) of serve and of the nginx workers and the descriptor counts
are printed (`pytest -s`) for docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cr_proxy.cache.layout import LOCK_FILE
from testbed.crproxy import CrProxy
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from testbed.registry import Upstream
from tests.conftest import BIG_LAYER, Images, proxy_endpoints
from tests.faulty import children, fd_count, proc_status, vm_hwm_kib, wait_until

CLIENTS = 24
FRESH_IMAGES = 4
BIG_CLIENTS = 4  # clients that also pull the 100 MiB layer
READ_CHUNK = 1 << 20
FD_MARGIN = 8  # descriptors above the baseline tolerated after the load


@dataclass(frozen=True)
class Item:
    path: str  # under /v2/registry.test/
    digest: str  # what the body must hash to


@dataclass
class Result:
    item: Item
    status: int | None
    length: int
    digest: str
    content_length: str | None
    error: str | None = None


def image_items(repo: str, image: ImageInfo, tag: str) -> list[Item]:
    items = [Item(f"{repo}/manifests/{tag}", image.digest)]
    platforms = image.platforms.values() if image.platforms else [image]
    for info in platforms:
        items.append(Item(f"{repo}/manifests/{info.manifest_digest}", info.manifest_digest))
        items += [Item(f"{repo}/blobs/{d}", d) for d in (info.config_digest, *info.layer_digests)]
    return items


def pull(host: str, item: Item) -> Result:
    """GET one item, streaming and hashing the body (a 100 MiB layer is never
    held in memory here either)."""
    import http.client

    address = urlsplit(f"http://{host}")
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    hasher = hashlib.sha256()
    length = 0
    try:
        conn.request("GET", f"/v2/registry.test/{item.path}")
        response = conn.getresponse()
        while chunk := response.read(READ_CHUNK):
            hasher.update(chunk)
            length += len(chunk)
        return Result(item, response.status, length, f"sha256:{hasher.hexdigest()}",
                      response.getheader("Content-Length"))
    except (OSError, http.client.HTTPException) as err:
        return Result(item, None, length, "", None, repr(err))
    finally:
        conn.close()


@pytest.fixture
def load_proxy(upstream: Upstream, tmp_path: Path) -> Iterator[CrProxy]:
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as running:
        yield running


def stored(cr: CrProxy, item: Item) -> bool:
    return (cr.cache / "blobs/sha256" / item.digest.split(":")[1]).is_file()


def cache_files_open(cr: CrProxy, pid: int) -> list[str]:
    """serve's descriptors on files in the cache (downloads, readers), but
    its lock on the cache (serve.lock, held for its life)."""
    lock = str(cr.cache / LOCK_FILE)
    return [t for t in non_sockets(pid) if t.startswith(str(cr.cache)) and t != lock]


def nginx_workers(cr: CrProxy) -> list[int]:
    return children(int((cr.run_dir / "nginx.pid").read_text()))


def test_concurrent_clients_get_whole_verified_content(
    load_proxy: CrProxy, upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    cr = load_proxy
    assert cr.proc is not None
    serve_pid = cr.proc.pid

    # Fresh images nobody has pulled: misses, many clients at once.
    fresh: list[Item] = []
    for i in range(FRESH_IMAGES):
        rng = random.Random(i)
        layers = [tar_layer({f"f{i}-{j}.bin": rng.randbytes(rng.randint(256 << 10, 3 << 20))})
                  for j in range(2)]
        image = build_image(tmp_path / f"fresh{i}", layers=layers, tag="v1")
        upstream.push(tmp_path / f"fresh{i}", "v1", f"load/fresh{i}", "v1")
        fresh += image_items(f"load/fresh{i}", image, "v1")
    cached = (image_items("small", images.small, "v1")
              + image_items("other/app", images.other, "v1")
              + image_items("multi", images.multi, "latest"))
    big = [Item(f"big/blobs/{images.big.layer_digests[0]}", images.big.layer_digests[0]),
           Item(f"big/manifests/{images.big.manifest_digest}", images.big.manifest_digest)]

    # Warm: the "cached" half is in the cache before the load starts (a
    # client may have its last byte a moment before the commit: polled).
    for item in cached:
        result = pull(cr.http, item)
        assert (result.status, result.digest) == (200, item.digest), result
    wait_until(lambda: all(stored(cr, item) for item in cached)
               and not list((cr.cache / "temp").iterdir())
               and not cache_files_open(cr, serve_pid), 30, "the warm-up to be committed")
    for item in fresh + big[:1]:
        hex_part = item.digest.split(":")[1]
        assert not (cr.cache / "blobs/sha256" / hex_part).exists(), "must be a miss"
    fds_before = fd_count(serve_pid)
    files_before = non_sockets(serve_pid)
    rss_before = vm_hwm_kib(serve_pid)
    big_fetches_before = upstream.cdn_blob_gets(big[0].digest)

    def client(index: int) -> list[Result]:
        work = cached + fresh + (big if index < BIG_CLIENTS else [])
        random.Random(1000 + index).shuffle(work)
        return [pull(cr.http, item) for item in work]

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for batch in pool.map(client, range(CLIENTS)) for r in batch]

    bad = [r for r in results
           if r.error or r.status != 200 or r.digest != r.item.digest
           or (r.content_length is not None and int(r.content_length) != r.length)]
    assert bad == [], f"{len(bad)} of {len(results)} answers were not whole and right: {bad[:3]}"
    assert len(results) == CLIENTS * (len(cached) + len(fresh)) + BIG_CLIENTS * len(big)
    big_result = next(r for r in results if r.item == big[0])
    assert big_result.length == images.big.sizes[big[0].digest] > BIG_LAYER
    # Four clients missed the big layer at once: one upstream download.
    assert upstream.cdn_blob_gets_settled(big[0].digest) == (
        big_fetches_before + 1)
    # temp/: no download left (link.* strays of racing links are the subject
    # of test_e2e_faults.py::test_racing_links_of_one_name_leave_nothing_in_temp).
    def downloads_in_temp() -> list[str]:
        return [p.name for p in (cr.cache / "temp").iterdir() if not p.name.startswith("link.")]

    try:
        wait_until(lambda: all(stored(cr, item) for item in fresh + big)
                   and not downloads_in_temp(), 30, "every download to be committed")
    except AssertionError as err:
        missing = [item.path for item in fresh + big if not stored(cr, item)]
        temp = [(p.name, p.stat().st_size) for p in (cr.cache / "temp").iterdir()]
        raise AssertionError(f"{err}: not stored {missing}, temp/ {temp}, "
                             f"log tail {cr.output[-20:]}") from None
    assert [line for line in cr.output if " ERROR " in line] == []

    rss_serve = vm_hwm_kib(serve_pid)
    workers = nginx_workers(cr)
    rss_workers = {pid: vm_hwm_kib(pid) for pid in workers}
    # Streaming, not buffering: the serve process grew by less than the one
    # 100 MiB layer that four clients pulled (while it was being downloaded).
    assert (rss_serve - rss_before) * 1024 < BIG_LAYER, (rss_before, rss_serve)

    # Descriptors. Files in the cache (temp files, blob readers) are all
    # closed at once; other files and pipes come back at once too. Sockets
    # are idle keep-alive connections (nginx -> fetcher: keepalive 32 per
    # worker, closed by nginx after 60 s; fetcher -> upstream: aiohttp's
    # pool, 15 s), so the total comes back once those expire: polled, bounded.
    wait_until(lambda: not cache_files_open(cr, serve_pid), 30,
               "serve to close every file in the cache")
    # Others (log files read back periodically, pipes): the count, +2 for one
    # caught open at either look.
    wait_until(lambda: len(non_sockets(serve_pid)) <= len(files_before) + 2, 30,
               f"serve's other files and pipes to return near {files_before}")
    fds_peak = fd_count(serve_pid)
    wait_until(lambda: fd_count(serve_pid) <= fds_before + FD_MARGIN, 120,
               f"serve's descriptors to return near {fds_before}")
    fds_after = fd_count(serve_pid)
    threads = proc_status(serve_pid).get("Threads", "?")
    print(f"\nload: {len(results)} answers, {CLIENTS} clients; serve VmHWM {rss_before} -> "
          f"{rss_serve} KiB; nginx workers VmHWM {sorted(rss_workers.values())} KiB; "
          f"serve fds {fds_before} before, {fds_peak} right after, {fds_after} once idle; "
          f"serve threads {threads}")


def non_sockets(pid: int) -> list[str]:
    """What serve's descriptors that are not sockets point at, sorted."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if not target.startswith("socket:"):
            out.append(target)
    return sorted(out)
