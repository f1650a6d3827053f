"""Quiet logs (issue 12, item 4), through the real `cr-proxy serve`: a clean
start, a pull and a stop print no error and no warning; an outage prints one
warning when a registry goes down and one when it comes back, and counts
the stale answers in between instead of logging each; the start-up hint
names the address serve listens on."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.test_e2e_metrics import scrape, value
from tests.test_e2e_mirror import expected_digests
from tests.test_e2e_proxy import ca_dir, skopeo_via_proxy

# What a clean run must not print. nginx writes `<date> <time> [<level>] ...`
# to serve's output (error_log stderr); cr-proxy's own lines are
# `<date> <time>,<ms> <LEVEL> <logger>: ...` (cli.py). A notice or info line
# (nginx's start and stop, debug lines at log_level debug) is fine.
NGINX_ALARM = re.compile(r"\[(emerg|alert|crit|error|warn)\]")
PYTHON_ALARM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")
WARNING = re.compile(r"^\S+ \S+ WARNING ")
# Tests run as root under /tmp/pytest-of-root (0700), where nginx.user auto
# rightly warns that its workers cannot enter; a setup without that warning.
QUIET_NGINX = {"user": ""}
RECOVERY_TIMEOUT = 30.0  # seconds: timeouts.down_host (1 s here, the probes) and then some


def alarms(output: list[str]) -> list[str]:
    return [line for line in output
            if NGINX_ALARM.search(line) or PYTHON_ALARM.search(line) or "Traceback" in line]


def get_manifest(proxy: CrProxy, domain: str, name: str, tag: str) -> str:
    """GET a tag through the mirror; its X-Cache."""
    request = urllib.request.Request(
        f"http://{proxy.http}/v2/{name}/manifests/{tag}?ns={domain}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json,"
                           "application/vnd.oci.image.index.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return response.headers["X-Cache"]


def test_clean_start_pull_and_stop_print_no_error_or_warning(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    """Both modes on (the https_proxy's internal TLS listener is what serve's
    readiness probe used to trip: nginx logged `broken header` at every
    start), one pull through each, then SIGTERM: not one alarm line."""
    (proxy_port,) = free_ports(1)
    proxy = CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream),
                    listen_proxy=f"127.0.0.1:{proxy_port}", nginx=QUIET_NGINX)
    with proxy:
        mirrored = skopeo_pull(f"{proxy.http}/registry.test/small:v1", tmp_path / "mirror")
        assert mirrored.returncode == 0, mirrored.stderr
        proxied = skopeo_via_proxy(proxy, "registry.test/other/app:v1", tmp_path / "proxied",
                                   ca_dir(proxy, tmp_path))
        assert proxied.returncode == 0, proxied.stderr
        output = proxy.output
        assert proxy.stop() == 0
    assert expected_digests(images.small) <= set(layout_blobs(tmp_path / "mirror"))
    assert expected_digests(images.other) <= set(layout_blobs(tmp_path / "proxied"))
    assert "cr-proxy stopped" in output
    assert alarms(output) == [], "\n".join(output)


def test_an_outage_warns_once_per_registry_and_counts_stale_answers(
    upstream: Upstream, images: Images, tmp_path: Path
) -> None:
    """tag_ttl 0: every tag asks the upstream; down_host 1 s: a registry
    marked down is tried again soon. Offline, a skopeo pull, then the tags of
    two registries asked for again and again, each served stale, until each
    registry was tried and marked down again: one "unreachable" warning per
    registry all the same (the old code logged a WARNING per stale answer,
    and another at each new try), and crproxy_stale_served counts every
    stale answer, by registry. Back online, one "reachable again" line when
    the background probe finds it, and the next request goes upstream."""
    tags = {"registry.test": [("small", "v1"), ("other/app", "v1"), ("multi", "latest")],
            "registry-1.docker.io": [("library/small", "v1")]}
    timeouts = {"connect": 2, "read": 10, "down_host": 1}
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream), tag_ttl=0,
                 timeouts=timeouts, nginx=QUIET_NGINX) as proxy:
        for domain, names in tags.items():
            for name, tag in names:
                assert get_manifest(proxy, domain, name, tag) == "MISS"
        assert skopeo_pull(f"{proxy.http}/registry.test/small:v1",
                           tmp_path / "online").returncode == 0
        assert [line for line in proxy.output if WARNING.search(line)] == []

        with upstream.stopped():
            offline = skopeo_pull(f"{proxy.http}/registry.test/small:v1", tmp_path / "offline")
            assert offline.returncode == 0, offline.stderr
            assert layout_blobs(tmp_path / "offline") == layout_blobs(tmp_path / "online")
            before = scrape(proxy)
            stale = dict.fromkeys(tags, 0)

            def ask_all() -> None:
                for domain, names in tags.items():
                    for name, tag in names:
                        assert get_manifest(proxy, domain, name, tag) == "STALE"
                        stale[domain] += 1

            for _ in range(3):
                ask_all()
            # Every timeouts.down_host each registry is probed again and
            # fails again (a line at log_level debug; in older code a client
            # request tried again, with a second warning): one warning each.
            def tried_again(domain: str) -> bool:
                failed = re.compile(rf"upstream {re.escape(domain)} (still )?unreachable \(")
                return sum(bool(failed.search(line)) for line in proxy.output) >= 2

            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while not all(tried_again(domain) for domain in tags):
                assert time.monotonic() < deadline, "no registry was tried again"
                ask_all()
                threading.Event().wait(0.1)
            warnings = [line for line in proxy.output if WARNING.search(line)]
            assert len(warnings) == len(tags), "\n".join(warnings)
            for domain in tags:
                assert sum(f"upstream {domain} unreachable" in w for w in warnings) == 1, warnings
            # Each stale answer is a debug line, its path whole.
            assert "serving stale registry.test/v2/small/manifests/v1: " in proxy.log_text()
            after = scrape(proxy)
            assert value(before, "crproxy_stale_served_total", registry="registry.test") >= 1
            for domain, count in stale.items():
                counted = [value(samples, "crproxy_stale_served_total", registry=domain)
                           for samples in (before, after)]
                assert counted[1] - counted[0] == count, (domain, counted)

        # A registry stays down until its background probe (every
        # timeouts.down_host) finds it answering; one line says so, and the
        # next request goes upstream.
        proxy.wait_for_output("upstream registry.test reachable again", RECOVERY_TIMEOUT)
        assert get_manifest(proxy, "registry.test", "small", "v1") == "REVALIDATED"
        assert get_manifest(proxy, "registry.test", "other/app", "v1") == "REVALIDATED"
        again = [line for line in proxy.output if "reachable again" in line]
        # registry-1.docker.io's too, if its probe found it before this line
        for domain in tags:
            mine = [line for line in again if f"upstream {domain} reachable again" in line]
            assert len(mine) <= 1 and all(WARNING.search(line) for line in mine), again
        assert len(again) >= 1
    assert alarms(proxy.output) == [line for line in proxy.output if WARNING.search(line)]


def test_start_up_hint_names_the_address_serve_listens_on(
    upstream: Upstream, tmp_path: Path
) -> None:
    """serve listens on 127.0.0.1 only: the hint must not send clients to
    this machine's host name, where nothing listens."""
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream)) as proxy:
        hints = proxy.output[:proxy.output.index(next(
            line for line in proxy.output if "cr-proxy ready" in line))]
    assert any(f"http://127.0.0.1:{proxy.http_port}" in line for line in hints), hints
    assert any(f"https://127.0.0.1:{proxy.https_port}" in line for line in hints), hints
    assert not any(f"//{socket.gethostname()}:" in line for line in hints), hints
