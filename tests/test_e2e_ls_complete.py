"""`cr-proxy ls` says whether each cached image is complete (issue 12, item
5), and `cr-proxy check` whether it would pull with no network (issue 13,
item 6), on a cr-proxy of its own filled by real skopeo pulls through `serve`:
an image pulled whole says `complete`; one platform pulled of a two-platform
index says `complete, 1 of 2 platforms` (a mirror holds what its clients
asked for); a layer `cr-proxy verify` quarantined, or a blob file removed
from blobs/ by hand, makes the image `1 missing` and `complete: false`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.crproxy import CrProxy, skopeo_pull
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.faulty import wait_until

SMALL = "registry.test/small:v1"
OTHER = "registry.test/other/app:v1"
MULTI = "registry.test/multi:latest"
COMMIT_WAIT = 60  # seconds for the fetcher to commit what a finished pull streamed


def cr_proxy(proxy: CrProxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cr_proxy", *args, "--config", str(proxy.config_path)],
        capture_output=True, text=True, timeout=120,
    )


def listed(proxy: CrProxy) -> dict[str, dict[str, Any]]:
    result = cr_proxy(proxy, "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {image["key"]: image for image in json.loads(result.stdout)["images"]}


def states(proxy: CrProxy) -> dict[str, str]:
    """Image name -> its STATE cell in the human table (cells are separated
    by two spaces or more, and hold no two in a row)."""
    result = cr_proxy(proxy, "ls")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    column = re.split(r"\s{2,}", header).index("STATE")
    rows = [re.split(r"\s{2,}", line) for line in lines]
    return {cells[0]: cells[column] for cells in rows}


def blob_file(proxy: CrProxy, digest: str) -> Path:
    return proxy.cache / "blobs/sha256" / digest.split(":")[1]


def wait_pulled(proxy: CrProxy, wanted: dict[str, set[str]]) -> None:
    """A finished pull's last blob may still be committing: wait until each
    image's pulled digests are all in blobs/."""
    def committed() -> bool:
        now = listed(proxy)
        return all(key in now and not digests & set(now[key]["missing"])
                   for key, digests in wanted.items())

    wait_until(committed, COMMIT_WAIT, "the pulls' commits")


@pytest.fixture
def own_proxy(upstream: Upstream, tmp_path: Path) -> Iterator[CrProxy]:
    """A cache of this test's alone: it damages blobs the session's shares."""
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as running:
        yield running


def test_ls_says_complete_then_missing(own_proxy: CrProxy, images: Images, tmp_path: Path) -> None:
    proxy = own_proxy
    for ref in (SMALL, OTHER, MULTI):  # multi: this machine's platform only (linux/amd64)
        result = skopeo_pull(f"{proxy.http}/{ref}", tmp_path / ref.replace("/", "_"))
        assert result.returncode == 0, result.stderr
    small, other = images.small, images.other
    amd64 = images.multi.platforms[("linux", "amd64")]
    wanted = {
        SMALL: set(small.sizes), OTHER: set(other.sizes),
        MULTI: {images.multi.digest, amd64.manifest_digest, amd64.config_digest,
                *amd64.layer_digests},
    }
    wait_pulled(proxy, wanted)

    assert states(proxy) == {
        SMALL: "complete", OTHER: "complete", MULTI: "complete, 1 of 2 platforms",
    }
    before = listed(proxy)
    assert all(before[key]["complete"] for key in wanted)
    assert before[MULTI]["cached_platforms"] == ["linux/amd64"]
    assert before[MULTI]["not_pulled"] == [images.multi.platforms[("linux", "arm64")]
                                           .manifest_digest]

    # small's own layer rots on disk; verify quarantines it.
    own = small.layer_digests[1]
    path = blob_file(proxy, own)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = cr_proxy(proxy, "verify")
    assert result.returncode == 1 and f"CORRUPT {own}" in result.stdout, result.stdout
    # other's own layer is removed from blobs/ by hand (its content/ name stays).
    gone = other.layer_digests[1]
    blob_file(proxy, gone).unlink()

    assert states(proxy) == {SMALL: "1 missing", OTHER: "1 missing",
                             MULTI: "complete, 1 of 2 platforms"}
    after = listed(proxy)
    assert (after[SMALL]["complete"], after[SMALL]["missing"]) == (False, [own])
    assert (after[OTHER]["complete"], after[OTHER]["missing"]) == (False, [gone])
    assert after[SMALL]["missing_bytes"] == small.sizes[own]
    assert after[SMALL]["size"] == sum(small.sizes.values()) - small.sizes[own]
    assert after[MULTI]["complete"]


def in_no_network(proxy: CrProxy, *args: str) -> subprocess.CompletedProcess[str]:
    """`cr-proxy ARGS` in a network namespace of its own with nothing in
    it: whatever it says, it said from the disk alone."""
    return subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "cr_proxy", *args,
         "--config", str(proxy.config_path)],
        capture_output=True, text=True, timeout=120,
    )


def test_check_says_what_would_pull_with_the_cable_out(
    own_proxy: CrProxy, images: Images, tmp_path: Path
) -> None:
    """Issue 13, item 6: `cr-proxy check` with no network at all."""
    proxy = own_proxy
    for ref in (SMALL, MULTI):  # multi: linux/amd64 only
        result = skopeo_pull(f"{proxy.http}/{ref}", tmp_path / ref.replace("/", "_"))
        assert result.returncode == 0, result.stderr
    small, amd64 = images.small, images.multi.platforms[("linux", "amd64")]
    wait_pulled(proxy, {SMALL: set(small.sizes), MULTI: {
        amd64.manifest_digest, amd64.config_digest, *amd64.layer_digests}})
    proxy.stop()  # the cache alone

    result = in_no_network(proxy, "check", SMALL, MULTI)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == [f"complete    {SMALL} (linux/amd64)",
                                          f"complete    {MULTI} (linux/amd64)"]
    result = in_no_network(proxy, "check", "--json", MULTI, "--platform", "linux/amd64")
    doc = json.loads(result.stdout)
    assert result.returncode == 0 and doc["complete"], doc
    assert doc["images"][0]["digest"] == images.multi.digest

    arm64 = images.multi.platforms[("linux", "arm64")].manifest_digest
    result = in_no_network(proxy, "check", "--json", MULTI, "--platform", "linux/arm64",
                           "--platform", "windows/amd64")
    assert result.returncode == 1, result.stdout
    assert json.loads(result.stdout)["images"][0]["missing"] == [
        {"what": "platform", "name": "windows/amd64", "reason": "not in the index"},
        {"what": "platform", "name": "linux/arm64", "reason": f"never pulled (manifest {arm64})"},
    ]
    result = in_no_network(proxy, "check", "registry.test/never:v1", SMALL)
    assert result.returncode == 1
    assert result.stdout.splitlines()[:2] == [
        "INCOMPLETE  registry.test/never:v1: 1 missing",
        "  manifest registry.test/never:v1: registry.test/never:v1 is not in the cache",
    ]

    # small's layers: one removed from blobs/, one cut short on disk.
    removed, cut = small.layer_digests[1], small.layer_digests[0]
    blob_file(proxy, removed).unlink()
    with blob_file(proxy, cut).open("r+b") as f:
        f.truncate(small.sizes[cut] - 1)
    result = in_no_network(proxy, "check", SMALL)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"INCOMPLETE  {SMALL} (linux/amd64): 2 missing",
        f"  blob {cut}: {small.sizes[cut] - 1} bytes stored, the manifest states "
        f"{small.sizes[cut]}",
        f"  blob {removed}: not in the cache",
    ]
