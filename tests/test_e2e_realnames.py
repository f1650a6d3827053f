"""skopeo through cr-proxy in the production-like bed (testbed/realnames.py):
Docker Hub by its real names over TLS on 443, no `endpoints`, everything in
namespaces of the test's own. Online, then with the cable out (packets
dropped: connect timeouts, not refusals), bytes verified each time."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed.crproxy import layout_blobs
from testbed.netns import in_netns
from testbed.realnames import ADDRESSES, REGISTRY
from tests.conftest import Bed
from tests.faulty import wait_until
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


@contextmanager
def outage(bed: Bed) -> Iterator[None]:
    """The cable out, cached tags due for revalidation (the fetcher, not
    nginx, answers them and must fall back), and cr-proxy's connections from
    before the cut gone (each request connects, and the connect times out:
    RealNamesBed.forget_connections); the cable back in afterwards."""
    stale_tags(bed)
    bed.net.cable_out()
    try:
        bed.net.forget_connections()
        yield
    finally:
        bed.net.cable_in()


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
            except OSError as err:
                if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    return "unreachable"
                raise
            return "connected"
    return in_netns(ns, attempt)


def test_the_bed_is_sealed_and_the_cable_drops(bed: Bed) -> None:
    """The clients cannot reach the upstream (no route, a resolver that
    refuses at once), nothing in the bed reaches beyond it, and cable_out
    drops the upstream's packets: a connect times out, it is not refused."""
    direct = bed.net.client("skopeo", "inspect", "--retry-times", "0", f"docker://{IMAGE}")
    assert direct.returncode != 0
    assert "lookup registry-1.docker.io on 127.0.0.1:53" in direct.stderr, direct.stderr
    cl, cr = bed.net.cl.name, bed.net.cr.name
    assert connect_from(cl, ADDRESSES[REGISTRY]) == "unreachable"
    public = "9.9.9.9"  # any global address: the bed has no way out
    assert connect_from(cl, public) == "unreachable"
    assert connect_from(cr, public) == "unreachable"
    assert connect_from(cr, ADDRESSES[REGISTRY]) == "connected"
    bed.net.cable_out()
    try:
        assert connect_from(cr, ADDRESSES[REGISTRY]) == "timeout"
    finally:
        bed.net.cable_in()
    assert connect_from(cr, ADDRESSES[REGISTRY]) == "connected"


@pytest.mark.parametrize("mode", ["mirror", "proxy"])
def test_skopeo_online_then_cable_out(bed: Bed, mode: str, tmp_path: Path) -> None:
    """Online, then the cable out (`outage`): the cached
    image, its tag due for revalidation, comes byte for byte the same; an
    image never cached fails with a 404 whose message skopeo prints."""
    trust = trust_dir(bed, tmp_path)
    if mode == "proxy":  # without cr-proxy's CA: the system's roots only
        (tmp_path / "no-trust").mkdir()
        refused = skopeo(bed, mode, IMAGE, tmp_path / "refused", tmp_path / "no-trust")
        assert refused.returncode != 0
        # skopeo logs through logrus: the quotes come escaped.
        assert ('pinging container registry registry-1.docker.io: Get '
                '\\"https://registry-1.docker.io/v2/\\": x509: certificate signed by unknown '
                'authority') in refused.stderr, refused.stderr
    online = skopeo(bed, mode, IMAGE, tmp_path / "online", trust)
    assert online.returncode == 0, online.stderr + bed.cr.log_text()[-3000:]
    blobs = layout_blobs(tmp_path / "online")
    assert expected_digests(bed.image) <= set(blobs)
    assert (bed.cr.cache / f"content/{REGISTRY}/v2/library/app/manifests/v1").is_file()

    with outage(bed):
        offline = skopeo(bed, mode, IMAGE, tmp_path / "offline", trust)
        assert offline.returncode == 0, offline.stderr + bed.cr.log_text()[-3000:]
        assert layout_blobs(tmp_path / "offline") == blobs
        never = skopeo(bed, mode, NEVER, tmp_path / "never", trust)
        assert never.returncode != 0
        assert f"manifest unknown: {REASON}" in never.stderr, (
            never.stderr + bed.cr.log_text()[-3000:])


def test_skopeo_with_the_names_gone(bed: Bed, tmp_path: Path) -> None:
    """Names stop resolving (dns_out: no hosts entry, a resolver that
    drops every query) and cr-proxy restarts meanwhile (nothing cached in
    its memory: no address, no connection): a cached image whose tag is due
    for revalidation comes byte for byte the same, in both modes; one never
    cached fails naming the reason."""
    trust = trust_dir(bed, tmp_path)
    online = skopeo(bed, "proxy", IMAGE, tmp_path / "online", trust)
    assert online.returncode == 0, online.stderr
    blobs = layout_blobs(tmp_path / "online")
    stale_tags(bed)
    bed.net.dns_out()
    try:
        bed.cr.stop()
        bed.cr.start()
        for mode in ("mirror", "proxy"):
            offline = skopeo(bed, mode, IMAGE, tmp_path / f"offline-{mode}", trust)
            assert offline.returncode == 0, offline.stderr + bed.cr.log_text()[-3000:]
            assert layout_blobs(tmp_path / f"offline-{mode}") == blobs
            never = skopeo(bed, mode, NEVER, tmp_path / f"never-{mode}", trust)
            assert never.returncode != 0
            assert f"manifest unknown: {REASON}" in never.stderr, (
                never.stderr + bed.cr.log_text()[-3000:])
    finally:
        bed.net.dns_in()


def list_tags(bed: Bed, mode: str, trust: Path) -> subprocess.CompletedProcess[str]:
    """skopeo list-tags of docker.io/library/app, as skopeo() pulls."""
    args = ["skopeo", "list-tags", "--retry-times", "0"]
    env: dict[str, str] = {}
    if mode == "mirror":
        args += ["--tls-verify=false", f"docker://{bed.mirror}/library/app"]
    else:
        args += ["--cert-dir", str(trust), "docker://docker.io/library/app"]
        env = {"HTTPS_PROXY": bed.proxy_url, "HTTP_PROXY": bed.proxy_url, "NO_PROXY": ""}
    return bed.net.client(*args, env=env)


def test_tag_lists_and_referrers_online_then_cable_out(bed: Bed, tmp_path: Path) -> None:
    """Issue 13: `skopeo list-tags` in both modes and a referrers query
    (Docker Hub's distribution has no API: the tag schema, here no tag, so
    an empty index) online, then with the cable out (connect timeouts):
    the same answers, stale and saying so."""
    trust = trust_dir(bed, tmp_path)
    # A case before may have left the upstream remembered as down
    # (timeouts.down_host): wait until cr-proxy reaches it again.
    probe = ["curl", "-sS", "--max-time", "60",
             f"http://{bed.mirror}/v2/library/never/manifests/v1"]
    wait_until(lambda: "unreachable" not in bed.net.client(*probe).stdout, 60,
               "cr-proxy reaching the upstream again")
    referrers = ["curl", "-sS", "-i", "--max-time", "60",
                 f"http://{bed.mirror}/v2/library/app/referrers/{bed.image.manifest_digest}"]
    answers = {}
    for mode in ("mirror", "proxy"):
        online = list_tags(bed, mode, trust)
        assert online.returncode == 0, online.stderr + bed.cr.log_text()[-3000:]
        answers[mode] = json.loads(online.stdout)["Tags"]
        assert answers[mode] == ["v1"]
    empty = bed.net.client(*referrers)
    assert "HTTP/1.1 200" in empty.stdout and '"manifests": []' in empty.stdout, empty

    for tree in ("lists", "docker-content-digest"):
        for path in (bed.cr.cache / tree).rglob("*"):
            if path.is_file():
                os.utime(path, (1, 1))
    bed.net.cable_out()
    try:
        bed.net.forget_connections()
        for mode in ("mirror", "proxy"):
            offline = list_tags(bed, mode, trust)
            assert offline.returncode == 0, offline.stderr + bed.cr.log_text()[-3000:]
            assert json.loads(offline.stdout)["Tags"] == answers[mode]
        stale = bed.net.client(*referrers)
        assert "HTTP/1.1 200" in stale.stdout and '"manifests": []' in stale.stdout, stale
        assert "X-Cache: STALE" in stale.stdout and "Age: " in stale.stdout, stale
    finally:
        bed.net.cable_in()


DOWN_LINE = re.compile(rf"WARNING .*upstream {re.escape(REGISTRY)} unreachable \(")
UP_LINE = re.compile(rf"WARNING .*upstream {re.escape(REGISTRY)} reachable again")
RECOVERY = 60.0  # seconds: a bound on the probe's finding the upstream back (1 s apart here)


def said(bed: Bed, pattern: re.Pattern[str], since: int = 0) -> list[str]:
    return [line for line in bed.cr.output[since:] if pattern.search(line)]


def wait_said(bed: Bed, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + RECOVERY
    while not done():
        assert time.monotonic() < deadline, bed.cr.log_text()[-3000:]
        threading.Event().wait(0.1)


def wait_up(bed: Bed) -> None:
    """Until every outage serve warned of has its "reachable again" (the
    background probe's), bounded: the next case starts with the upstream up."""
    wait_said(bed, lambda: len(said(bed, UP_LINE)) >= len(said(bed, DOWN_LINE)))


@pytest.mark.parametrize("cut", ["cable", "dns"])
def test_an_outage_is_one_warning_and_the_stale_pull_comes_from_the_cache(
    bed: Bed, cut: str, tmp_path: Path
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
    if cut == "cable":
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
        wait_said(bed, lambda: bool(said(bed, DOWN_LINE, mark)))
        again = skopeo(bed, "mirror", IMAGE, tmp_path / "again", trust)
        assert again.returncode == 0, again.stderr
    finally:
        if cut == "cable":
            bed.net.cable_in()
        else:
            bed.net.dns_in()
    wait_up(bed)
    warnings = [line for line in bed.cr.output[mark:] if " WARNING " in line]
    assert len(said(bed, DOWN_LINE, mark)) == 1, warnings
    assert len(said(bed, UP_LINE, mark)) == 1, warnings
    assert all(DOWN_LINE.search(w) or UP_LINE.search(w) for w in warnings), warnings


@pytest.mark.parametrize("mode", ["mirror", "proxy"])
def test_a_fresh_cut_with_connections_open(bed: Bed, mode: str, tmp_path: Path) -> None:
    """The cable cut right after an online pull, cr-proxy's connections to
    the upstream still open (they hang: nothing answers, nothing closes
    them): a stale tag is still served and a never-cached image still gets
    the 404 naming the reason, in both modes. (A request with no answer
    within timeouts.stale_budget has its registry probed on a new
    connection; found down, the requests riding the hung connections give
    up then, not at timeouts.read: in https_proxy mode skopeo's own /v2/
    ping and token request among them.)"""
    trust = trust_dir(bed, tmp_path)
    wait_up(bed)
    online = skopeo(bed, mode, IMAGE, tmp_path / "online", trust)
    assert online.returncode == 0, online.stderr
    blobs = layout_blobs(tmp_path / "online")
    stale_tags(bed)
    mark = len(bed.cr.output)
    bed.net.cable_out()
    try:
        offline = skopeo(bed, mode, IMAGE, tmp_path / "offline", trust)
        assert offline.returncode == 0, offline.stderr + bed.cr.log_text()[-3000:]
        assert layout_blobs(tmp_path / "offline") == blobs
        never = skopeo(bed, mode, NEVER, tmp_path / "never", trust)
        assert never.returncode != 0
        assert f"manifest unknown: {REASON}" in never.stderr, (
            never.stderr + bed.cr.log_text()[-3000:])
    finally:
        bed.net.cable_in()
    wait_up(bed)
    assert len(said(bed, DOWN_LINE, mark)) == 1, bed.cr.log_text()[-3000:]
