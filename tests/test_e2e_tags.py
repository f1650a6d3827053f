"""Tag lists end to end (issue 13, item 3): `skopeo list-tags` and raw
paging through `cr-proxy serve`, in mirror mode and through the https_proxy,
against the real registry (token auth), online and then with the registry,
its token server and its CDN stopped.

Before: the mirror relayed tags/list uncached and without logging in, so
skopeo got the upstream's 401 (a realm it cannot reach) even online, and
nothing answered offline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, clean_env
from testbed.oci_layout import build_image, tar_layer
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints
from tests.faulty import http, wait_until
from tests.test_e2e_proxy import ca_dir, proxied_env

REPO = "tagged/app"
TAGS = ["a", "b", "c"]
MIRROR_PATH = f"/v2/registry.test/{REPO}/tags/list"


@pytest.fixture(scope="module")
def tagged(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("tagged") / "app"
    build_image(layout, layers=[tar_layer({"tagged.txt": b"tagged\n"})], tag="v1")
    for tag in TAGS:
        upstream.push(layout, "v1", REPO, tag)
    return REPO


@pytest.fixture(scope="module")
def cr(upstream: Upstream, tagged: str,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    (port,) = free_ports(1)
    with CrProxy(tmp_path_factory.mktemp("tags") / "crproxy", proxy_endpoints(upstream),
                 listen_proxy=f"127.0.0.1:{port}") as running:
        yield running


@contextmanager
def offline(cr: CrProxy, upstream: Upstream) -> Iterator[None]:
    """The registry, its token server and its CDN stopped; after, started
    again and answering through cr-proxy (whose down-host memory lasts
    timeouts.down_host: polled, bounded)."""
    try:
        with upstream.stopped():
            yield
    finally:
        probe = f"http://{cr.http}/v2/registry.test/{REPO}/manifests/never"
        wait_until(lambda: b"unreachable" not in http(probe).body, 30,
                   "cr-proxy reaching the upstream again")


def list_tags(cr: CrProxy, tmp_path: Path, via_proxy: bool) -> subprocess.CompletedProcess[str]:
    if via_proxy:
        args = ["--cert-dir", str(ca_dir(cr, tmp_path)), f"docker://registry.test/{REPO}"]
        env = proxied_env(cr)
    else:
        args = ["--tls-verify=false", f"docker://{cr.http}/registry.test/{REPO}"]
        env = clean_env()
    return subprocess.run(["skopeo", "list-tags", "--retry-times", "0", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def listed(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return sorted(json.loads(result.stdout)["Tags"])


def stored_lists(cr: CrProxy) -> dict[str, bytes]:
    root = cr.cache / "lists"
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


def age_everything(cr: CrProxy) -> None:
    """Every stored listing and tag older than tag_ttl: the fetcher must
    go upstream (and, offline, fall back)."""
    for tree in ("lists", "docker-content-digest"):
        for path in (cr.cache / tree).rglob("*"):
            if path.is_file():
                os.utime(path, (1, 1))


def stale_served(cr: CrProxy, registry: str = "registry.test") -> float:
    """crproxy_stale_served for one registry, scraped."""
    url = f"http://127.0.0.1:{cr.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    pattern = rf'^crproxy_stale_served_total\{{registry="{re.escape(registry)}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def page(cr: CrProxy, query: str) -> tuple[list[str], str | None, dict[str, str]]:
    answer = http(f"http://{cr.http}{MIRROR_PATH}{query}")
    assert answer.status == 200, answer
    doc = json.loads(answer.body)
    assert doc["name"] == REPO
    return doc["tags"], answer.header("Link"), answer.headers


def test_list_tags_online_then_offline_in_both_modes(
    cr: CrProxy, upstream: Upstream, tmp_path: Path
) -> None:
    # Online: skopeo in both modes; the fetcher logged in itself.
    assert listed(list_tags(cr, tmp_path, via_proxy=False)) == TAGS
    assert listed(list_tags(cr, tmp_path, via_proxy=True)) == TAGS
    assert f"registry.test/{REPO}/_tags/list" in stored_lists(cr)
    # A page query is its own cache entry. Debian's registry (distribution
    # 2.8) ignores n and sends every tag, unsorted, with no Link: the list
    # is the upstream's as it sent it (Links: test_e2e_trust_manifests).
    first, link, headers = page(cr, "?n=2")
    assert (sorted(first), link, headers["X-Cache"]) == (TAGS, None, "MISS")
    assert f"registry.test/{REPO}/_tags/list,n=2" in stored_lists(cr)
    assert page(cr, "?n=2")[2]["X-Cache"] == "HIT"

    before = stale_served(cr)
    with offline(cr, upstream):
        age_everything(cr)
        assert listed(list_tags(cr, tmp_path, via_proxy=False)) == TAGS
        assert listed(list_tags(cr, tmp_path, via_proxy=True)) == TAGS
        tags, link, headers = page(cr, "?n=2")
        assert (tags, link, headers["X-Cache"]) == (first, None, "STALE")
        assert int(headers["Age"]) > 10**9  # fetched "in 1970" (age_everything)
        assert stale_served(cr) >= before + 3
        # A query never asked online: cut from the stored whole list as the
        # spec pages one (lexical order, a Link when more are left), stale
        # (docs/reliability.md, bug 40).
        tags, link, headers = page(cr, "?n=1")
        first_tag = sorted(TAGS)[0]
        assert (tags, headers["X-Cache"]) == ([first_tag], "STALE")
        assert link == f'<{MIRROR_PATH}?n=1&last={first_tag}>; rel="next"'


@pytest.mark.parametrize("query, code", [
    ("?n=abc", "PAGINATION_NUMBER_INVALID"),
    ("?n=-1", "PAGINATION_NUMBER_INVALID"),
    ("?n=10001", "PAGINATION_NUMBER_INVALID"),
    ("?n=1%2F..", "PAGINATION_NUMBER_INVALID"),
    ("?last=..%2Fx", "TAG_INVALID"),
    ("?last=a%2Cn%3D1", "TAG_INVALID"),
])
def test_bad_paging_is_a_400_and_stores_nothing(cr: CrProxy, query: str, code: str) -> None:
    before = stored_lists(cr)
    answer = http(f"http://{cr.http}{MIRROR_PATH}{query}")
    assert answer.status == 400, answer
    assert answer.json_errors()[0]["code"] == code
    assert stored_lists(cr) == before


def test_a_stale_manifest_says_how_old(cr: CrProxy, upstream: Upstream) -> None:
    """Item 7: a tag served stale says so (X-Cache: STALE, Age: the seconds
    since the upstream last confirmed it), and is counted per registry."""
    path = f"/v2/registry.test/{REPO}/manifests/a"
    online = http(f"http://{cr.http}{path}")
    assert online.status == 200, online
    assert online.header("Age") is None
    before = stale_served(cr)
    with offline(cr, upstream):
        stamp = cr.cache / f"docker-content-digest/registry.test/v2/{REPO}/manifests/a"
        os.utime(stamp, (1000, 1000))
        for method in ("GET", "HEAD"):
            stale = http(f"http://{cr.http}{path}", method=method)
            assert stale.status == 200, stale
            assert stale.header("X-Cache") == "STALE"
            assert stale.header("Docker-Content-Digest") == online.header("Docker-Content-Digest")
            assert int(stale.header("Age") or 0) >= int(time.time()) - 1000
        assert stale_served(cr) == before + 2
    status = f"http://127.0.0.1:{cr.metrics_port}/"
    with urllib.request.urlopen(status, timeout=30) as answer:
        assert f"<th>stale answers served</th><td>{before + 2:.0f}</td>" in answer.read().decode()
