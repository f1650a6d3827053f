"""skopeo through cr-proxy in the production-like bed (testbed/realnames.py):
Docker Hub by its real names over TLS on 443, no `endpoints`, everything in
namespaces of the test's own. Online, then with the cable out (packets
dropped: connect timeouts, not refusals), bytes verified each time."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.crproxy import layout_blobs
from testbed.netns import in_netns
from testbed.realnames import ADDRESSES, REGISTRY
from tests.conftest import Bed
from tests.test_e2e_mirror import expected_digests

IMAGE = "docker.io/library/app:v1"
NEVER = "docker.io/library/never:v1"
REASON = f"library/never:v1 is not in the cache, and {REGISTRY} is unreachable"


def trust_dir(bed: Bed, tmp_path: Path) -> Path:
    """A cert dir holding cr-proxy's CA (never the bed's root)."""
    certs = tmp_path / "trust"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(bed.cr.ca_cert.read_bytes())
    return certs


def skopeo(bed: Bed, mode: str, image: str, dest: Path, trust: Path
           ) -> subprocess.CompletedProcess[str]:
    """skopeo copy in the clients' namespace: `mirror` names the image
    with cr-proxy's plain-HTTP mirror as a path prefix, `proxy` names it
    unchanged and goes through the https_proxy."""
    args = ["skopeo", "copy", "--preserve-digests", "--retry-times", "0"]
    env: dict[str, str] = {}
    if mode == "mirror":
        args += ["--src-tls-verify=false", f"docker://{bed.mirror}/{image}"]
    else:
        args += ["--src-cert-dir", str(trust), f"docker://{image}"]
        env = {"HTTPS_PROXY": bed.proxy_url, "HTTP_PROXY": bed.proxy_url, "NO_PROXY": ""}
    return bed.net.client(*args, f"oci:{dest}:pulled", env=env)


def stale_tags(bed: Bed) -> None:
    """Every cached tag due for revalidation: the fetcher, not nginx,
    answers it, and must reach the upstream or fall back."""
    for digest_file in (bed.cr.cache / "docker-content-digest").rglob("*"):
        if digest_file.is_file():
            os.utime(digest_file, (1, 1))


def connect_from(ns: str, address: str) -> str:
    """What a TCP connect from namespace `ns` to address:443 meets."""
    def attempt() -> str:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            try:
                sock.connect((address, 443))
            except TimeoutError:
                return "timeout"
            except ConnectionRefusedError:
                return "refused"
            return "connected"
    return in_netns(ns, attempt)


def test_the_bed_is_sealed_and_the_cable_drops(bed: Bed) -> None:
    """The clients cannot reach the upstream (no route, no resolver), and
    cable_out drops the upstream's packets: a connect times out."""
    direct = bed.net.client("skopeo", "inspect", "--retry-times", "0", f"docker://{IMAGE}")
    assert direct.returncode != 0
    cr = bed.net.cr.name
    assert connect_from(cr, ADDRESSES[REGISTRY]) == "connected"
    bed.net.cable_out()
    try:
        assert connect_from(cr, ADDRESSES[REGISTRY]) == "timeout"
    finally:
        bed.net.cable_in()
    assert connect_from(cr, ADDRESSES[REGISTRY]) == "connected"


@pytest.mark.parametrize("mode", ["mirror", "proxy"])
def test_skopeo_online_then_cable_out(bed: Bed, mode: str, tmp_path: Path) -> None:
    """Online, then the cable out (cr-proxy's connections from before the
    cut gone: each request connects, and the connect times out): the cached
    image, its tag due for revalidation, comes byte for byte the same; an
    image never cached fails with a 404 whose message skopeo prints."""
    trust = trust_dir(bed, tmp_path)
    online = skopeo(bed, mode, IMAGE, tmp_path / "online", trust)
    assert online.returncode == 0, online.stderr + bed.cr.log_text()[-3000:]
    blobs = layout_blobs(tmp_path / "online")
    assert expected_digests(bed.image) <= set(blobs)
    assert (bed.cr.cache / f"content/{REGISTRY}/v2/library/app/manifests/v1").is_file()

    stale_tags(bed)
    bed.net.cable_out()
    try:
        bed.net.forget_connections()
        offline = skopeo(bed, mode, IMAGE, tmp_path / "offline", trust)
        assert offline.returncode == 0, offline.stderr + bed.cr.log_text()[-3000:]
        assert layout_blobs(tmp_path / "offline") == blobs
        never = skopeo(bed, mode, NEVER, tmp_path / "never", trust)
        assert never.returncode != 0
        assert f"manifest unknown: {REASON}" in never.stderr, (
            never.stderr + bed.cr.log_text()[-3000:])
    finally:
        bed.net.cable_in()


DOWN_LINE = re.compile(rf"WARNING .*upstream {re.escape(REGISTRY)} unreachable \(")
UP_LINE = re.compile(rf"WARNING .*upstream {re.escape(REGISTRY)} reachable again")
RECOVERY = 60.0  # seconds: a bound on the probe's finding the upstream back (1 s apart here)


def said(bed: Bed, pattern: re.Pattern[str], since: int = 0) -> list[str]:
    return [line for line in bed.cr.output[since:] if pattern.search(line)]


def wait_until(bed: Bed, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + RECOVERY
    while not done():
        assert time.monotonic() < deadline, bed.cr.log_text()[-3000:]
        threading.Event().wait(0.1)


def wait_up(bed: Bed) -> None:
    """Until every outage serve warned of has its "reachable again" (the
    background probe's), bounded: the next case starts with the upstream up."""
    wait_until(bed, lambda: len(said(bed, UP_LINE)) >= len(said(bed, DOWN_LINE)))


@pytest.mark.parametrize("outage", ["cable", "dns"])
def test_an_outage_is_one_warning_and_the_stale_pull_comes_from_the_cache(
    bed: Bed, outage: str, tmp_path: Path
) -> None:
    """Fast offline (issue 12): the tag due for revalidation, the cable out
    (packets dropped, cr-proxy's open connections gone) or the names no
    longer resolving (cr-proxy restarted meanwhile, so nothing is cached in
    its resolver: every lookup goes to a resolver that never answers), a
    skopeo pull through the mirror comes from the cache byte for byte; the
    registry's outage is one warning, however many of its hosts a pull
    would use, and the probe brings it back with one more once the upstream
    answers."""
    trust = trust_dir(bed, tmp_path)
    wait_up(bed)
    online = skopeo(bed, "mirror", IMAGE, tmp_path / "online", trust)
    assert online.returncode == 0, online.stderr + bed.cr.log_text()[-3000:]
    stale_tags(bed)
    if outage == "cable":
        bed.net.cable_out()
        bed.net.forget_connections()
    else:
        bed.net.dns_out()
        bed.cr.stop()
        bed.cr.start()
    mark = len(bed.cr.output)
    try:
        offline = skopeo(bed, "mirror", IMAGE, tmp_path / "offline", trust)
        assert offline.returncode == 0, offline.stderr + bed.cr.log_text()[-3000:]
        assert layout_blobs(tmp_path / "offline") == layout_blobs(tmp_path / "online")
        wait_until(bed, lambda: bool(said(bed, DOWN_LINE, mark)))
        again = skopeo(bed, "mirror", IMAGE, tmp_path / "again", trust)
        assert again.returncode == 0, again.stderr
    finally:
        if outage == "cable":
            bed.net.cable_in()
        else:
            bed.net.dns_in()
    wait_up(bed)
    warnings = [line for line in bed.cr.output[mark:] if " WARNING " in line]
    assert len(said(bed, DOWN_LINE, mark)) == 1, warnings
    assert len(said(bed, UP_LINE, mark)) == 1, warnings
    assert all(DOWN_LINE.search(w) or UP_LINE.search(w) for w in warnings), warnings
