"""Resource limits (issue 10, findings 6, 11 and 14), through `cr-proxy serve`.

- A registry that trickles (tests/hostile_limits.py) cannot hold the
  mirror's upstream connections: it gets at most
  `limits.upstream_connections_per_host` of them, a miss waits at most
  `timeouts.pool` for one (then a registry-style 504), and a download slower
  than `limits.min_rate` is cut. A pull from another registry meanwhile
  completes, and the trickling downloads end.
- More misses than the per-host limit wait their turn and all complete.
- 300 simultaneous misses are all answered by the fetcher: no nginx 502.
- Registry names a client invents do not grow the metrics' series.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import http, split_response, wait_until
from tests.hostile_limits import TricklingRegistry

PER_HOST = 4  # limits.upstream_connections_per_host of the limited mirror
POOL_WAIT = 2  # timeouts.pool of the limited mirror
READ_TIMEOUT = 2  # timeouts.read: also the window min_rate is judged over
MIN_RATE = 1024  # bytes/s; the trickle sends 10
ABANDONED = 300  # more than aiohttp's whole pool (256) held before the fix
CLIENTS_AT_ONCE = 100  # below the old fetcher backlog: every miss reaches it
HANG_UP_AFTER = 8.0  # seconds a client waits for a head before hanging up
SIMULTANEOUS = 300
INVENTED = 500


@pytest.fixture(scope="module")
def hostile() -> Iterator[TricklingRegistry]:
    with TricklingRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def plain(hostile: TricklingRegistry, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[CrProxy]:
    """A mirror with the default limits (loopback allowed as a destination,
    for the invented registry names)."""
    with CrProxy(tmp_path_factory.mktemp("plain"), hostile.endpoints,
                 proxy={"allow_private": ["127.0.0.0/8"]}) as running:
        yield running


def limited_proxy(workdir: Path, endpoints: dict[str, str]) -> CrProxy:
    return CrProxy(
        workdir, endpoints,
        timeouts={"connect": 2, "read": READ_TIMEOUT, "down_host": 5, "pool": POOL_WAIT},
        limits={"upstream_connections_per_host": PER_HOST, "min_rate": MIN_RATE},
    )


def blob_path(registry: str, repo: str, digest: str) -> str:
    return f"/v2/{registry}/{repo}/blobs/{digest}"


async def _exchange(port: int, path: str, head_only: bool) -> tuple[int | None, bytes]:
    """GET path from the mirror; with head_only, hang up once the status line
    came (or after HANG_UP_AFTER), as a client that went away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        if head_only:
            try:
                async with asyncio.timeout(HANG_UP_AFTER):
                    line = await reader.readline()
            except TimeoutError:
                return None, b""
            status, _, _ = split_response(line + b"\r\n")
            if status == 200:
                return status, b""  # the body trickles: hang up
            raw = line + await reader.read()
        else:
            raw = await reader.read()
        status, _, body = split_response(raw)
        return status, body
    except ConnectionError:
        return None, b""
    finally:
        writer.close()


async def _many(port: int, paths: list[str], at_once: int, head_only: bool
                ) -> list[tuple[int | None, bytes]]:
    gate = asyncio.Semaphore(at_once)

    async def one(path: str) -> tuple[int | None, bytes]:
        async with gate:
            return await _exchange(port, path, head_only)

    return await asyncio.gather(*(one(p) for p in paths))


def error_codes(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


# --- finding 6: a trickling registry and the upstream connection pool ---------------------


def test_trickling_registry_cannot_starve_a_pull_from_another_registry(
    hostile: TricklingRegistry, upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    endpoints = {**proxy_endpoints(upstream), **hostile.endpoints}
    trickling = hostile.add_trickling(ABANDONED)
    with limited_proxy(tmp_path / "limited", endpoints) as cr:
        paths = [blob_path(hostile.name, "held", d) for d in trickling]
        answers = asyncio.run(_many(cr.http_port, paths, CLIENTS_AT_ONCE, head_only=True))

        # Every client has hung up; the trickling downloads may go on. A pull
        # from the other registry still gets an upstream connection.
        small = images.small
        manifest = http(f"http://{cr.http}/v2/registry.test/small/manifests/v1", timeout=30)
        assert manifest.status == 200 and manifest.complete, manifest
        for digest in [small.config_digest, *small.layer_digests]:
            blob = http(f"http://{cr.http}{blob_path('registry.test', 'small', digest)}",
                        timeout=30)
            assert (blob.status, blob.complete) == (200, True), blob
            assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == digest

        # The trickles are cut (min_rate) and the queued ones give up
        # (timeouts.pool): the hostile registry is left with no connection.
        wait_until(lambda: hostile.open_connections == 0, 60,
                   "the trickling downloads to end")
        # A miss that found no free connection was told so, registry-style.
        statuses = Counter(status for status, _ in answers)
        assert statuses[504] > 0, statuses
        assert all(error_codes(body) == ["UPSTREAM_TIMEOUT"]
                   for status, body in answers if status == 504)
        cr.wait_for_output("limits.min_rate", 30)  # the reason, in the log


def test_more_misses_than_the_per_host_limit_wait_their_turn(
    hostile: TricklingRegistry, tmp_path: Path
) -> None:
    """16 concurrent layer downloads from one registry with a limit of 4:
    the others wait for a free connection and every one completes."""
    blobs = {hostile.add_blob(os.urandom(2 << 20)): None for _ in range(16)}
    hostile.peak_connections = 0
    with limited_proxy(tmp_path / "turns", hostile.endpoints) as cr:
        def get(digest: str) -> tuple[int | None, str]:
            answer = http(f"http://{cr.http}{blob_path(hostile.name, 'turns', digest)}",
                          timeout=60)
            return answer.status, "sha256:" + hashlib.sha256(answer.body).hexdigest()

        with ThreadPoolExecutor(len(blobs)) as pool:
            results = list(pool.map(get, blobs))
    assert results == [(200, d) for d in blobs]
    # Seen from the registry: never more than the limit at once. (Counted
    # here, where a connection is let go before the mirror can free its
    # slot: it closes each once the whole body is written.)
    assert hostile.peak_connections <= PER_HOST


def test_a_trickling_manifest_is_cut_by_min_rate_and_stores_nothing(
    hostile: TricklingRegistry, tmp_path: Path
) -> None:
    """A manifest sent a byte at a time never trips timeouts.read, and stays
    under the manifest size cap for hours: limits.min_rate cuts it as it
    cuts a blob, with a registry-style 504, and nothing is stored."""
    (digest,) = hostile.add_trickling(1)
    hostile.manifests[("slow", "v1")] = digest
    with limited_proxy(tmp_path / "slow-manifest", hostile.endpoints) as cr:
        answer = http(f"http://{cr.http}/v2/{hostile.name}/slow/manifests/v1", timeout=60)
        assert answer.status == 504, answer
        assert error_codes(answer.body) == ["UPSTREAM_TIMEOUT"]
        cr.wait_for_output("limits.min_rate", 30)  # the reason, in the log
        assert not list((cr.cache / "content").rglob("slow"))


# --- finding 11: the fetcher's listen backlog ---------------------------------------------


def test_simultaneous_misses_get_no_502(plain: CrProxy, hostile: TricklingRegistry) -> None:
    """300 misses sent at once (each goes to the fetcher and upstream, which
    has no such blob): every one gets the registry's 404, none a 502."""
    paths = [blob_path(hostile.name, "burst", "sha256:" + os.urandom(32).hex())
             for _ in range(SIMULTANEOUS)]
    answers = asyncio.run(_many(plain.http_port, paths, SIMULTANEOUS, head_only=False))
    statuses = Counter(status for status, _ in answers)
    assert statuses == {404: SIMULTANEOUS}
    assert all(error_codes(body) == ["BLOB_UNKNOWN"] for _, body in answers)


# --- finding 14: invented registry names and the metrics ----------------------------------


def upstream_error_series(cr: CrProxy) -> dict[tuple[str, str], float]:
    url = f"http://127.0.0.1:{cr.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.labels["registry"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples if s.name == "crproxy_upstream_errors_total"
    }


def test_invented_registry_names_do_not_grow_metric_series(plain: CrProxy) -> None:
    """500 registry names nobody configured, each an upstream error, all
    counted under one label. The names are loopback addresses (allowed in
    this mirror's proxy.allow_private) at the default ports, where nothing
    listens: each fails at once, with no DNS lookup a resolver could
    throttle."""
    for port in (80, 443):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.1.0.1", port), timeout=5).close()
    names = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(INVENTED)]
    statuses = Counter(
        http(f"http://{plain.http}/v2/{name}/app/manifests/latest", timeout=30).status
        for name in names
    )
    # Never cached and unreachable: a 404 saying so, still an upstream error.
    assert statuses == {404: INVENTED}
    series = upstream_error_series(plain)
    assert {registry for registry, _ in series} == {"other"}
    assert sum(series.values()) == INVENTED
