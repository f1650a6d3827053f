"""Faults: the cache serves only whole, verified content, and keeps serving.

A misbehaving upstream (tests/faulty.py, `faulty.test`) resets, closes
early, sends wrong bytes or stalls on demand; the disk fills; serve is
SIGKILLed in the middle of a download. In every case the client gets an
error (never a complete wrong blob), nothing half-written is visible in
the cache, and the next pull succeeds.

(nginx crashing under serve: tests/test_e2e_mirror.py::test_serve_exits_non_zero_when_nginx_dies;
what it leaves behind: test_nginx_crash_leaves_no_orphan_workers here.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy
from tests.faulty import (
    Answer,
    FaultyRegistry,
    alive,
    children,
    http,
    split_response,
    wait_until,
)

MIB = 1 << 20
READ_TIMEOUT = 2  # timeouts.read of this module's cr-proxy: stalls end quickly
# Misses streamed (download.hold 0) in this module: its tests are about what
# a client sees when a download breaks after its 200 went out (a miss that
# fails while its client waits gets the error itself: test_e2e_held.py).
STREAMED = {"hold": 0}


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def cr(fake: FaultyRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    with CrProxy(
        tmp_path_factory.mktemp("faults"), fake.endpoints,
        timeouts={"connect": 2, "read": READ_TIMEOUT, "down_host": 5}, download=STREAMED,
    ) as running:
        yield running


def blob_url(cr: CrProxy, repo: str, digest: str) -> str:
    return f"http://{cr.http}/v2/{FaultyRegistry.name}/{repo}/blobs/{digest}"


def temp_files(cr: CrProxy) -> list[Path]:
    return sorted((cr.cache / "temp").iterdir())


def assert_not_cached(cr: CrProxy, repo: str, digest: str) -> None:
    """Nothing of this digest anywhere in the tree, and no temp leftovers
    once the failed download has been cleaned up (polled, bounded)."""
    hex_part = digest.split(":", 1)[1]
    wait_until(lambda: temp_files(cr) == [], 10, "temp/ to be empty")
    assert not (cr.cache / "blobs/sha256" / hex_part).exists()
    assert not (cr.cache / f"content/{FaultyRegistry.name}/v2/{repo}/blobs/{digest}").exists()
    assert [p for p in (cr.cache / "content").rglob("*") if hex_part in p.name] == []


def assert_whole(answer: Answer, data: bytes) -> None:
    assert answer.status == 200, answer
    assert answer.complete, answer.error
    assert answer.body == data


def wait_committed(cr: CrProxy, repo: str, digest: str) -> Path:
    """The blob's stored file, once committed (CrProxy.wait_committed)."""
    return cr.wait_committed(FaultyRegistry.name, repo, digest)[0]


def assert_pulls_again(cr: CrProxy, fake: FaultyRegistry, repo: str, digest: str,
                       data: bytes) -> None:
    """The upstream behaves again: the next pull goes upstream once more,
    succeeds, and fills the cache (the pull after is nginx's hit)."""
    gets = fake.blob_gets(repo, digest)
    assert_whole(http(blob_url(cr, repo, digest)), data)
    assert fake.blob_gets(repo, digest) == gets + 1
    stored = wait_committed(cr, repo, digest)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest.split(":", 1)[1]
    hit = http(blob_url(cr, repo, digest), method="HEAD")
    assert (hit.status, hit.header("X-CR-Request-Type")) == (200, "blob")


def temp_has_bytes(cr: CrProxy, at_least: int):
    def check() -> bool:
        return any(p.stat().st_size >= at_least for p in temp_files(cr) if p.exists())
    return check


# --- the upstream dies in the middle of a blob -----------------------------------------


@pytest.mark.parametrize("fault", ["reset", "close"])
def test_upstream_dying_mid_blob_leaves_nothing_and_next_pull_succeeds(
    fault: str, cr: CrProxy, fake: FaultyRegistry
) -> None:
    """(a) TCP reset, (b) clean close before Content-Length, each after 2 of
    3 MiB, once the cache's temp file proves the download is under way, on
    every answer: faulty.test ignores Range, so the resume reads it again
    from the start (once), breaks again, and the download fails (a link
    that breaks now and then is resumed: tests/test_e2e_resume.py)."""
    data = os.urandom(3 * MIB)
    repo = f"mid-{fault}"
    (digest,) = fake.add_image(repo, "v1", [data]).layer_digests
    fake.set_fault(digest, fault, cut_at=2 * MIB, gated=True)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http, blob_url(cr, repo, digest))
        try:
            wait_until(temp_has_bytes(cr, MIB), 30, "the download to be under way")
        finally:
            fake.release()
        answer = pending.result(60)
    assert not answer.complete, "a cut upstream body must reach the client as an error"
    assert len(answer.body) < len(data)
    assert_not_cached(cr, repo, digest)
    fake.behave(digest)
    assert_pulls_again(cr, fake, repo, digest, data)


# --- the upstream sends the wrong bytes ---------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_wrong_bytes_are_an_error_never_stored_and_logged(
    chunked: bool, cr: CrProxy, fake: FaultyRegistry
) -> None:
    data = os.urandom(3 * MIB)
    repo = "wrong-chunked" if chunked else "wrong-length"
    (digest,) = fake.add_image(repo, "v1", [data]).layer_digests
    fake.set_fault(digest, "wrong", chunked=chunked)
    answer = http(blob_url(cr, repo, digest))
    assert not answer.complete, "wrong bytes must never reach the client as a whole blob"
    assert len(answer.body) < len(data)
    assert_not_cached(cr, repo, digest)

    def logged() -> bool:
        return any(
            "ERROR" in line and FaultyRegistry.name in line and digest in line
            for line in cr.output
        )

    wait_until(logged, 10, "an ERROR line naming the registry and the digest")
    fake.behave(digest)
    assert_pulls_again(cr, fake, repo, digest, data)


def test_upstream_without_content_length_is_served_whole_and_cached(
    cr: CrProxy, fake: FaultyRegistry
) -> None:
    """The control for the chunked case above: an upstream that answers a
    blob in chunked encoding (no Content-Length) and sends the right bytes."""
    data = os.urandom(3 * MIB)
    (digest,) = fake.add_image("chunked-ok", "v1", [data]).layer_digests
    fake.set_fault(digest, "ok", chunked=True)
    assert_whole(http(blob_url(cr, "chunked-ok", digest)), data)
    wait_committed(cr, "chunked-ok", digest)
    hit = http(blob_url(cr, "chunked-ok", digest))
    assert_whole(hit, data)
    assert hit.header("X-CR-Request-Type") == "blob"
    assert fake.blob_gets("chunked-ok", digest) == 1


def test_manifest_with_wrong_bytes_is_a_502_and_not_stored(
    cr: CrProxy, fake: FaultyRegistry
) -> None:
    image = fake.add_image("wrong-manifest", "v1", [os.urandom(1000)])
    fake.set_fault(image.manifest_digest, "wrong")
    url = f"http://{cr.http}/v2/{FaultyRegistry.name}/wrong-manifest/manifests/"
    answer = http(url + image.manifest_digest)
    assert answer.status == 502
    assert answer.json_errors()[0]["code"] == "DIGEST_INVALID"
    content = cr.cache / f"content/{FaultyRegistry.name}/v2/wrong-manifest"
    assert not content.exists()
    assert not (cr.cache / "blobs/sha256" / image.manifest_digest.split(":")[1]).exists()
    fake.behave(image.manifest_digest)
    answer = http(url + image.manifest_digest)
    assert (answer.status, answer.body) == (200, image.manifest)


# --- the upstream stalls ------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["stall", "stall_body"],
                         ids=["no-answer", "headers-one-byte-then-silence"])
def test_stalled_upstream_is_an_error_and_nothing_is_stuck(
    fault: str, cr: CrProxy, fake: FaultyRegistry
) -> None:
    """timeouts.read (2 s here) ends a silent upstream: the client gets an
    error (a 504 when no header came; a cut body once a 200 was sent), the
    upstream connection is let go, and the fetcher serves on."""
    data = os.urandom(MIB)
    repo = f"stalled-{fault.replace('_', '-')}"
    image = fake.add_image(repo, "v1", [data])
    (digest,) = image.layer_digests
    fake.set_fault(digest, fault)
    answer = http(blob_url(cr, repo, digest))
    if fault == "stall":
        assert answer.status == 504, answer
    else:
        assert answer.status == 200 and not answer.complete
    assert answer.body != data
    wait_until(lambda: fake.open_connections == 0, 30,
               "the fetcher to close the stalled upstream connection")
    assert_not_cached(cr, repo, digest)
    # No worker stuck: the same blob and a manifest are served at once.
    fake.behave(digest)
    assert_pulls_again(cr, fake, repo, digest, data)
    manifest = http(f"http://{cr.http}/v2/{FaultyRegistry.name}/{repo}/manifests/v1")
    assert (manifest.status, manifest.body) == (200, image.manifest)


@pytest.mark.parametrize("kind", ["blobs", "manifests"])
def test_stalled_upstream_answer_is_a_registry_error(
    kind: str, cr: CrProxy, fake: FaultyRegistry
) -> None:
    """The error for a silent upstream is registry JSON, 504 UPSTREAM_TIMEOUT,
    not aiohttp's bare text/plain 504 nor any other 5xx."""
    image = fake.add_image(f"stalled-json-{kind}", "v1", [os.urandom(1000)])
    digest = image.layer_digests[0] if kind == "blobs" else image.manifest_digest
    fake.set_fault(digest, "stall")
    try:
        answer = http(f"http://{cr.http}/v2/{FaultyRegistry.name}/stalled-json-{kind}/"
                      f"{kind}/{digest}")
    finally:
        fake.behave(digest)
    assert answer.status == 504, answer
    assert answer.header("Content-Type") == "application/json"
    assert answer.json_errors()[0]["code"] == "UPSTREAM_TIMEOUT"


# --- the client goes away in the middle of a miss ------------------------------------------


def test_client_hanging_up_mid_miss_does_not_stop_the_download(
    cr: CrProxy, fake: FaultyRegistry
) -> None:
    """Flights are detached from clients: the download completes into the
    cache after the only client has gone, and the next request is a hit."""
    data = os.urandom(8 * MIB)
    repo = "hangup"
    (digest,) = fake.add_image(repo, "v1", [data]).layer_digests
    fake.set_fault(digest, "hold", cut_at=3 * MIB, gated=True)
    try:
        with socket.create_connection(("127.0.0.1", cr.http_port), timeout=30) as sock:
            sock.sendall(f"GET /v2/{FaultyRegistry.name}/{repo}/blobs/{digest} HTTP/1.1\r\n"
                         f"Host: {cr.http}\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received or len(split_response(received)[2]) < 1000:
                chunk = sock.recv(65536)
                assert chunk, "cr-proxy closed before sending any of the blob"
                received += chunk
            assert split_response(received)[0] == 200
        # The client is gone; only now may the upstream send the rest, so the
        # download can only complete after its one client hung up.
        assert not (cr.cache / "blobs/sha256" / digest.split(":")[1]).exists()
    finally:
        fake.release()
    stored = cr.cache / "blobs/sha256" / digest.split(":")[1]
    wait_until(stored.exists, 60, "the download to complete into the cache")
    wait_committed(cr, repo, digest)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest.split(":")[1]
    head = http(blob_url(cr, repo, digest), method="HEAD")
    assert (head.status, head.header("X-CR-Request-Type")) == (200, "blob")
    assert head.header("Content-Length") == str(len(data))
    hit = http(blob_url(cr, repo, digest))
    assert_whole(hit, data)
    assert hit.header("X-CR-Request-Type") == "blob"
    assert fake.blob_gets(repo, digest) == 1
    # nginx's record of the hung-up client: a partial body (or 499). The
    # access log is buffered (flush=1s): polled.
    request_line = f"GET /v2/{FaultyRegistry.name}/{repo}/blobs/{digest} "

    def logged() -> list[str]:
        return [line for line in cr.access_log.read_text().splitlines() if request_line in line]

    wait_until(lambda: len(logged()) >= 2, 30, "nginx to log both GETs")
    # Which line comes first depends on when nginx noticed the hang-up (on
    # its next write, which may follow the hit), so look at both.
    answers = [line.split('" ', 1)[1].split()[:2] for line in logged()]
    assert any(status == "499" or int(sent) < len(data) for status, sent in answers), logged()


# --- the disk fills -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (we run as root in CI and here)."""
    mount_point = tmp_path / "cache"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the ENOSPC test: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_is_an_error_cleans_temp_and_keeps_serving(
    small_disk: Path, fake: FaultyRegistry, tmp_path: Path
) -> None:
    small = [os.urandom(20_000), os.urandom(30_000)]
    image = fake.add_image("disk-small", "v1", small)
    big = os.urandom(6 * MIB)
    (big_digest,) = fake.add_image("disk-big", "v1", [big]).layer_digests
    with CrProxy(tmp_path / "crproxy", fake.endpoints, cache_dir=str(small_disk)) as cr:
        for digest, data in zip(image.layer_digests, small, strict=True):
            assert_whole(http(blob_url(cr, "disk-small", digest)), data)
            wait_committed(cr, "disk-small", digest)
        # Leave 2 MiB free: the 6 MiB download starts, then hits ENOSPC.
        filler = small_disk / "filler"
        stat = os.statvfs(small_disk)
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 2 * MIB))

        # The upstream holds after 1.5 MiB, so the partial file is seen in temp/.
        fake.set_fault(big_digest, "hold", cut_at=3 * MIB // 2, gated=True)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http, blob_url(cr, "disk-big", big_digest))
            try:
                wait_until(temp_has_bytes(cr, MIB), 30, "a partial download in temp/")
            finally:
                fake.release()
            answer = pending.result(60)
        fake.behave(big_digest)
        assert answer.status is None or answer.status >= 500 or not answer.complete, answer
        assert answer.body != big
        assert_not_cached(cr, "disk-big", big_digest)
        wait_until(lambda: "No space left on device" in cr.log_text(), 10,
                   "the log to say the disk is full")

        # Hits of what is cached are still served by nginx, while the disk is full.
        for digest, data in zip(image.layer_digests, small, strict=True):
            hit = http(blob_url(cr, "disk-small", digest))
            assert_whole(hit, data)
            assert hit.header("X-CR-Request-Type") == "blob"
        manifest = http(f"http://{cr.http}/v2/{FaultyRegistry.name}/disk-small/manifests/v1")
        assert (manifest.status, manifest.body) == (200, image.manifest)

        filler.unlink()
        answer = http(blob_url(cr, "disk-big", big_digest))
        assert_whole(answer, big)
        assert wait_committed(cr, "disk-big", big_digest).stat().st_size == len(big)
        wait_until(lambda: temp_files(cr) == [], 30, "temp/ to be empty")


# --- serve is SIGKILLed in the middle of a download ----------------------------------------


def test_sigkill_mid_download_leaves_nothing_visible_and_restart_recovers(
    fake: FaultyRegistry, tmp_path: Path
) -> None:
    data = os.urandom(8 * MIB)
    repo = "killed"
    (digest,) = fake.add_image(repo, "v1", [data]).layer_digests
    hex_part = digest.split(":")[1]
    # stop() in the finally kills whatever nginx of it is left, should it
    # outlive serve's SIGKILL.
    cr = CrProxy(tmp_path / "crproxy", fake.endpoints, download=STREAMED)
    cr.start()
    try:
        fake.set_fault(digest, "hold", cut_at=3 * MIB, gated=True)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http, blob_url(cr, repo, digest))
            try:
                wait_until(temp_has_bytes(cr, MIB), 30, "the download to be under way")
                assert cr.proc is not None
                master = int((cr.run_dir / "nginx.pid").read_text())
                nginx_pids = [master, *children(master)]
                assert len(nginx_pids) >= 2, "nginx master and at least one worker"
                cr.proc.send_signal(signal.SIGKILL)
                assert cr.proc.wait(30) == -signal.SIGKILL
                # PR_SET_PDEATHSIG: nginx goes with serve, workers included.
                wait_until(lambda: not any(alive(pid) for pid in nginx_pids), 30,
                           "nginx (master and workers) to exit after serve was killed")
            finally:
                fake.release()
            answer = pending.result(60)
        assert not answer.complete
        cr.stop()
        # What a crash leaves: the partial download in temp/, nothing else.
        assert [p.name.split(".")[0] for p in temp_files(cr)] == [f"sha256-{hex_part}"]
        assert not (cr.cache / "blobs/sha256" / hex_part).exists()
        assert [p for p in (cr.cache / "content").rglob("*") if hex_part in p.name] == []

        fake.behave(digest)
        cr.start()  # same configuration, same ports
        assert temp_files(cr) == [], "serve must empty temp/ at start"
        assert_pulls_again(cr, fake, repo, digest, data)
    finally:
        cr.stop()


# --- racing commits -------------------------------------------------------------------------


def test_racing_links_of_one_name_leave_nothing_in_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, deterministic: the second link() is made to miss the
    'already linked' shortcut, as it does when another thread links the name
    between its check and its rename."""
    from cr_proxy.cache import store as store_mod

    store = store_mod.Store(tmp_path / "cache")
    store.prepare()
    data = os.urandom(468)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put_bytes(data, digest)
    name = f"v2/app/blobs/{digest}"
    store.link(digest, FaultyRegistry.name, name)
    monkeypatch.setattr(store_mod.os.path, "samefile", lambda a, b: False)
    store.link(digest, FaultyRegistry.name, name)
    assert (store.tree.content(FaultyRegistry.name, name).read_bytes()) == data
    assert list(store.tree.temp.iterdir()) == []


# --- nginx crashes under serve ---------------------------------------------------------------


def test_nginx_crash_leaves_no_orphan_workers(fake: FaultyRegistry, tmp_path: Path) -> None:
    """When the nginx master dies, serve exits 1 and nginx's workers go too:
    no orphan keeps the mirror's listening sockets, answering hits with no
    fetcher behind it."""
    # (stop(), at the with's end, kills whatever nginx of it is left.)
    with CrProxy(tmp_path / "crproxy", fake.endpoints) as cr:
        master = int((cr.run_dir / "nginx.pid").read_text())
        # "ready" is nginx listening, which it does before forking workers.
        wait_until(lambda: children(master), 10, "nginx's workers")
        workers = children(master)
        os.kill(master, signal.SIGKILL)
        assert cr.proc is not None
        assert cr.proc.wait(30) == 1
        wait_until(lambda: not any(alive(pid) for pid in workers), 10,
                   "nginx's workers to exit with their master")
