"""Fast offline (issue 12, item 1), through the real `cr-proxy serve`, with
the upstream's ports DROPPING packets (testbed.blackhole: connects time
out, as with a cut cable) rather than refusing them:

- a stale tag waits `timeouts.stale_budget` at most, then is served stale
  while its revalidation goes on in the background, and that revalidation's
  connect timeout marks the registry down (one warning);
- while down no request dials (stale tags at once, a never-cached manifest
  is a 404 saying why), and a background probe brings the registry back up
  as soon as it answers, so the next revalidation goes upstream;
- the registry's CDN shares its outage: a CDN that drops packets takes the
  registry down with it, and the registry (itself up) sees no request until
  the CDN answers again.

Nothing here measures time: the assertions are on the order of serve's log
lines, the registry's own request log, X-Cache and the metrics."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.blackhole import BlackHole, cable_out
from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.test_e2e_metrics import scrape, value
from tests.test_e2e_quiet import WARNING

WAIT = 60.0  # seconds: a bound on every wait, never reached when all is well
# A connect timeout long next to the budget (0.3 s, the default): the stale
# answer comes first, then the failed connect marks the registry down.
TIMEOUTS = {"connect": 2, "read": 10, "down_host": 1, "stale_budget": 0.3}
DOWN = "upstream registry.test unreachable ("
UP = "upstream registry.test reachable again"
LATE = ("serving stale registry.test/v2/small/manifests/v1: no answer within 0.3s; "
        "revalidating in the background")
REQUEST_DIALLED = re.compile(r"upstream registry\.test still unreachable \(.*; request\)$")
PROBED = re.compile(r"upstream registry\.test still unreachable \(.*; probe\)$")


@pytest.fixture(scope="module")
def offline_proxy(
    upstream: Upstream, images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CrProxy]:
    """tag_ttl 0: every tag is due for revalidation; small:v1 and
    other/app:v1 pulled online."""
    work = tmp_path_factory.mktemp("offline-timeouts")
    with CrProxy(work / "crproxy", proxy_endpoints(upstream), tag_ttl=0,
                 timeouts=TIMEOUTS) as proxy:
        for n, image in enumerate(("small:v1", "other/app:v1")):
            pulled = skopeo_pull(f"{proxy.http}/registry.test/{image}", work / f"online-{n}")
            assert pulled.returncode == 0, pulled.stderr
        yield proxy


def get(proxy: CrProxy, path: str) -> tuple[int, str, dict]:
    """GET a registry path of registry.test through the mirror: (status,
    X-Cache, JSON errors of an error answer)."""
    request = urllib.request.Request(
        f"http://{proxy.http}/v2/{path}?ns=registry.test",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.headers.get("X-Cache", ""), {}
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("X-Cache", ""), json.loads(err.read() or b"{}")


def lines_after(proxy: CrProxy, mark: int, pattern: re.Pattern[str] | str) -> list[str]:
    found = proxy.output[mark:]
    if isinstance(pattern, str):
        return [line for line in found if pattern in line]
    return [line for line in found if pattern.search(line)]


def wait_lines(proxy: CrProxy, mark: int, pattern: re.Pattern[str] | str, count: int) -> None:
    """Until serve printed `count` lines matching since `mark` (bounded)."""
    deadline = time.monotonic() + WAIT
    while len(lines_after(proxy, mark, pattern)) < count:
        assert time.monotonic() < deadline, f"never {count} lines of {pattern!r}"
        threading.Event().wait(0.1)


def registry_saw(upstream: Upstream, method: str, uri: str) -> int:
    """Requests cr-proxy made that the registry answered (its own log)."""
    text = upstream.registry_log.read_text(errors="replace")
    return sum(1 for line in text.splitlines()
               if 'msg="response completed"' in line and f"http.request.method={method} " in line
               and f"http.request.uri={uri} " in line and "useragent=cr-proxy/" in line)


def registry_saw_at_least(upstream: Upstream, method: str, uri: str, count: int) -> int:
    """registry_saw once it reaches `count` (the registry logs a request
    just after answering it), bounded."""
    deadline = time.monotonic() + WAIT
    while (seen := registry_saw(upstream, method, uri)) < count and time.monotonic() < deadline:
        threading.Event().wait(0.1)
    return seen


def test_cable_out_stale_at_once_no_dial_while_down_and_the_probe_brings_it_back(
    offline_proxy: CrProxy, upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    proxy = offline_proxy
    start = len(proxy.output)
    before = scrape(proxy)
    with cable_out(upstream):
        # Due for revalidation, the upstream silent: the stale copy comes
        # while the revalidation still waits for its connect...
        assert get(proxy, "small/manifests/v1")[:2] == (200, "STALE")
        wait_lines(proxy, start, DOWN, 1)
        late = proxy.output.index(next(line for line in proxy.output[start:] if LATE in line))
        down = proxy.output.index(next(line for line in proxy.output[start:] if DOWN in line))
        assert late < down, "the stale answer waited for the connect timeout"
        # ...and the suspect probe (a new connection) has failed as well.
        wait_lines(proxy, start, PROBED, 1)

        # Down: a whole pull and more tags are served with no dial at all,
        # and what was never cached is a 404 that says why.
        mark = len(proxy.output)
        offline = skopeo_pull(f"{proxy.http}/registry.test/small:v1", tmp_path / "offline")
        assert offline.returncode == 0, offline.stderr
        assert expected_blobs(images) <= set(layout_blobs(tmp_path / "offline"))
        for path in ("small/manifests/v1", "other/app/manifests/v1"):
            assert get(proxy, path)[:2] == (200, "STALE"), path
        status, _, body = get(proxy, "never-cached/manifests/v1")
        assert (status, body["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN"), body
        assert "is not in the cache, and registry.test is unreachable" in (
            body["errors"][0]["message"])
        # A dial made by any of those would fail after timeouts.connect; two
        # probes started after them have failed since, each after as long.
        probes = len(lines_after(proxy, mark, PROBED))
        wait_lines(proxy, mark, PROBED, probes + 2)
        assert lines_after(proxy, start, REQUEST_DIALLED) == []
        during = scrape(proxy)
        skipped = [value(samples, "crproxy_upstream_skipped_total", registry="registry.test")
                   for samples in (before, during)]
        assert skipped[1] - skipped[0] >= 4, skipped  # the pull's tag, two tags, the 404
        assert value(during, "crproxy_upstream_down", registry="registry.test") == 1
        assert value(during, "crproxy_revalidations_total", result="late") >= 1
        mark = len(proxy.output)
    # The servers are back: the probe finds them before any client asks,
    # and the next revalidation goes upstream (no retry, no wait).
    wait_lines(proxy, start, UP, 1)
    heads = registry_saw(upstream, "HEAD", "/v2/small/manifests/v1")
    assert get(proxy, "small/manifests/v1")[:2] == (200, "REVALIDATED")
    assert registry_saw_at_least(upstream, "HEAD", "/v2/small/manifests/v1", heads + 1) == heads + 1
    warnings = [line for line in proxy.output[start:] if WARNING.search(line)]
    assert [DOWN in w for w in warnings] == [True, False] and UP in warnings[1], warnings
    assert value(scrape(proxy), "crproxy_upstream_down", registry="registry.test") == 0


def test_a_cdn_that_drops_takes_its_registry_down_and_the_registry_sees_nothing_until_it_answers(
    offline_proxy: CrProxy, upstream: Upstream, images: Images
) -> None:
    """The registry itself is up; only its CDN (learned from its redirect)
    drops packets. A blob miss redirected there marks the registry down;
    the registry's log then shows no revalidation until the CDN answers."""
    proxy = offline_proxy
    start = len(proxy.output)
    big = images.big.layer_digests[0]  # never pulled: a miss, redirected to the CDN
    upstream.stop_cdn()
    try:
        with BlackHole(upstream.cdn_port):
            status, _, body = get(proxy, f"big/blobs/{big}")
            assert (status, body["errors"][0]["code"]) == (404, "BLOB_UNKNOWN"), body
            wait_lines(proxy, start, DOWN, 1)
            (down,) = lines_after(proxy, start, DOWN)
            assert "(cdn.test: " in down, down
            heads = registry_saw(upstream, "HEAD", "/v2/small/manifests/v1")
            mark = len(proxy.output)
            assert get(proxy, "small/manifests/v1")[:2] == (200, "STALE")
            # Probes of the CDN fail meanwhile; the registry was not asked.
            wait_lines(proxy, mark, re.compile(r"\(cdn\.test: .*; probe\)$"), 2)
            assert registry_saw(upstream, "HEAD", "/v2/small/manifests/v1") == heads
    finally:
        upstream.start_cdn()
    wait_lines(proxy, start, UP, 1)
    assert get(proxy, "small/manifests/v1")[:2] == (200, "REVALIDATED")
    assert registry_saw_at_least(upstream, "HEAD", "/v2/small/manifests/v1", heads + 1) == heads + 1


def expected_blobs(images: Images) -> set[str]:
    return {images.small.config_digest, *images.small.layer_digests}
