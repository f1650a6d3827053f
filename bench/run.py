"""`make bench`: does cr-proxy serve hits at nginx's own speed, and how does it
compare with the alternatives? One command, everything on 127.0.0.1.

It starts, and stops again (also on an error, Ctrl-C or SIGTERM):

* the tests' Docker-Hub-like upstream (testbed.registry.Upstream: distribution
  with token auth and blob redirects to a CDN nginx), with one image pushed:
  a 256 MiB layer plus a small one; the CDN also on a second port limited to
  about 1 Gbit/s per connection, for the cold cases over a real link;
* cr-proxy (`cr-proxy serve`, mirror mode, HTTP and HTTPS ports): one warm
  instance for the hit cases, which also runs the https_proxy CONNECT front
  (the same cache: registry.test is its cache domain both ways), a fresh one
  (empty cache) for every cold case;
* a plain nginx serving the very same files (the warm cache's content tree)
  over HTTP with sendfile and over TLS: the physical reference;
* CNCF distribution in proxy mode (bench.procs.PeerRegistry): the peer
  pull-through cache, warm, and fresh (empty storage) for every cold case.
* for edge devices over MQTT: mosquitto (testbed.mqtt.Broker), a 5 MiB
  Wasm artifact, and a cr-proxy answering on the broker (the module cached
  before the rounds); 50 proplet-like devices (testbed.mqtt.Device, aiomqtt,
  one process) ask for it at once.
* for pushes (`push`): a cr-proxy taking pushes, fresh each round, and a
  relay counting the bytes the registry receives (testbed.counting); a
  kolla-like batch (testbed.pushbatch: 20 images sharing two base layers)
  pushed by 4 skopeo at once, one image of that shape alone (the first of
  a build), and one big layer, through cr-proxy and
  straight to the registry (through the upstream's name proxy), new random
  layers for each side.

Every case runs `--reps` times, interleaved (A B C, A B C, ...); the table
shows medians and the ratio of medians next to the bar it must meet. What is
sampled, and each row's reference and bar, are data in bench/cases.py; the
rounds here only measure. Clients
are real tools: curl, wrk, skopeo, and ab for the HEAD rows (Debian's wrk 4.1
never counts a HEAD answer whose Content-Length announces a body); the
new-connection rows use bench.connload (Python threads, a new TCP connection
and a full TLS handshake per request, as container clients do), the same
driver for both sides.

    python -m bench.run [--quick] [--reps N] [--write docs/benchmarks.md] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench import cases, measure
from bench.cases import (
    CLIENTS,
    CONN_WORKERS,
    LINK_NAME,
    MQTT_DEVICES,
    MQTT_MODULE_MIB,
    PUSH_BASE_MIB,
    PUSH_IMAGES,
    PUSHERS,
    Results,
    Series,
)
from bench.procs import PeerRegistry, PlainNginx
from bench.report import MIB, Row, markdown_table, text_table
from testbed.blackhole import cable_out
from testbed.counting import CountingRelay
from testbed.crproxy import CrProxy, layout_blobs
from testbed.mqtt import Broker, Device
from testbed.oci_layout import (
    MT_MANIFEST,
    MT_WASM_LAYER,
    big_file_layer,
    build_artifact,
    build_image,
    tar_layer,
    wasm_module,
)
from testbed.ports import free_ports
from testbed.pushbatch import Batch, build_batch, push_batch
from testbed.registry import REGISTRY_NAME, Upstream

ROOT = Path(__file__).resolve().parent.parent
REPO = "bench/big"
TAG = "v1"
CONN_SERIAL = 200  # requests one at a time (a single thread): the latency rows
# cr-proxy settings for the warm instance: tags stay fresh for the whole run,
# so every hit is nginx's (by tag too).
HIT_SETTINGS = {"tag_ttl": 3600, "log_level": "info"}
# ...and for the offline case: tag_ttl 0 makes every pull by tag ask the
# upstream (a HEAD), and, the upstream gone, fall back to the stale copy:
# the path an offline pull takes once a tag has aged.
STALE_SETTINGS = {"tag_ttl": 0, "log_level": "info"}
# What it says when the upstream goes and comes back (upstream/health.py).
WENT_DOWN = "upstream registry.test unreachable ("
UP_AGAIN = "upstream registry.test reachable again"
# The round's cases, in order; --only picks some (the set-up then starts
# only what they need).
CASE_NAMES = ("blob_hits", "small_hits", "new_connections", "concurrent", "cold_curl",
              "over_link", "cold_skopeo", "warm", "offline", "mqtt_devices", "private_hits",
              "push", "auth_hits")
# Cases that need neither the warm cr-proxy, plain nginx nor the peer.
OWN_SETUP = frozenset({"offline", "mqtt_devices", "push"})
# cr-proxy for the push case: pushes from loopback, tags fresh.
PUSH_SETTINGS = {**HIT_SETTINGS, "push": {"enabled": True, "allow_clients": ["127.0.0.1/32"]}}
# The edge-over-MQTT case: a broker, a Wasm artifact, a cr-proxy answering on it.
# The private-content case (issue 14): a user of the token server, and the
# repository only that user may pull.
PRIVATE_USER, PRIVATE_PASSWORD = "bench", "bench-password"
PRIVATE_REPO, PUBLIC_REPO = "bench/private", "bench/public"
PRIVATE_HITS = 200  # manifest requests per sample
MQTT_USERS = {"cr-proxy": "bench-broker-key", "device": "bench-device-key"}
MQTT_IDS = ("bench-domain", "bench-channel")
MQTT_REF = "registry.test/bench/wasm:v1"
MQTT_DEADLINE = 120.0


@dataclass
class Plan:
    blob_mib: int
    reps: int
    hit_inner: int  # blob-hit downloads per side per round (each is short)
    wrk_seconds: float
    conn_count: int  # new-connection requests per side per round
    cases: tuple[str, ...] = CASE_NAMES  # Bench methods each round runs

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            plan = cls(blob_mib=32, reps=1, hit_inner=1, wrk_seconds=1, conn_count=300)
        else:
            plan = cls(blob_mib=256, reps=5, hit_inner=5, wrk_seconds=5, conn_count=1000)
        if args.reps is not None:
            plan.reps = args.reps
        if args.blob_mib is not None:
            plan.blob_mib = args.blob_mib
        if args.only:
            plan.cases = tuple(name for name in CASE_NAMES if name in args.only)
        return plan

    @property
    def hits_and_peers(self) -> bool:
        """Whether any case needs the warm cr-proxy, plain nginx and the peer."""
        return any(name not in OWN_SETUP for name in self.cases)


@dataclass
class Image:
    big: str  # the big layer's digest
    big_size: int
    digests: set[str]  # manifest, config, layers


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- machine


def _version(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "?"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_facts() -> dict[str, str]:
    return {
        "cpu": f"{_cpu_model()}, nproc {os.cpu_count()}",
        "memory": _mem_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": ", ".join(
            _version(["dpkg-query", "-W", "-f", f"{pkg} ${{Version}}", pkg])
            for pkg in ("nginx", "curl", "wrk", "apache2-utils", "skopeo", "docker-registry")
        ),
    }


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, plan: Plan, work: Path, stack: contextlib.ExitStack) -> None:
        self.plan = plan
        self.work = work
        self.stack = stack
        self.results = Results()
        self.round_loads: list[str] = []
        self.certs = work / "certs"
        (work / "pulled").mkdir(exist_ok=True)
        self._serial = 0
        self._round = 1  # round() sets it
        self.auth_rounds = 0  # auth_hits' calls: which side goes first

    # ---- set-up

    def setup(self) -> None:
        plan = self.plan
        say(f"upstream: registry + token server + CDN on loopback ({self.work})")
        self.up = self.stack.enter_context(Upstream(self.work / "upstream"))
        self.endpoints = {**self.up.endpoints, "registry-1.docker.io": self.up.registry_url}
        # The same upstream with its CDN behind a ~1 Gbit/s link (limit_rate).
        self.link_endpoints = {**self.endpoints,
                               Upstream.cdn_name: f"http://127.0.0.1:{self.up.cdn_link_port}"}
        say(f"image: one {plan.blob_mib} MiB layer + a small one, pushed to registry.test/{REPO}")
        layout = self.work / "layout"
        info = build_image(
            layout,
            layers=[big_layer(plan.blob_mib * MIB, seed=256),
                    tar_layer({"etc/bench.txt": b"cr-proxy bench\n" * 64})],
            tag=TAG,
        )
        self.up.push(layout, TAG, REPO, TAG)
        big = info.layer_digests[0]
        self.image = Image(big, info.sizes[big],
                           {info.manifest_digest, info.config_digest, *info.layer_digests})
        shutil.rmtree(layout)

        say("cr-proxy: a stale-tag instance (offline case)")
        self.stale = self._crproxy("stale", STALE_SETTINGS)
        self._verified_pull(f"{self.stale.http}/registry.test/{REPO}:{TAG}")
        if plan.hits_and_peers:
            self._setup_hits_and_peers()
        if "mqtt_devices" in plan.cases:
            self._setup_mqtt()
        if "push" in plan.cases:
            # Every push to the registry, ours and direct, crosses this relay:
            # the bytes it received.
            host, port = self.up.registry_url.removeprefix("http://").rsplit(":", 1)
            self.relay = self.stack.enter_context(CountingRelay(host, int(port)))

    def _setup_mqtt(self) -> None:
        say(f"mosquitto, a {MQTT_MODULE_MIB} MiB Wasm artifact ({MQTT_REF}) and a cr-proxy "
            "answering devices over MQTT (module cached first)")
        self.broker = self.stack.enter_context(Broker(self.work / "broker", MQTT_USERS))
        layout = self.work / "wasm"
        self.module = wasm_module(MQTT_MODULE_MIB * MIB, seed=50)
        build_artifact(layout, [(MT_WASM_LAYER, self.module)], tag=TAG)
        self.up.push(layout, TAG, "bench/wasm", TAG)
        shutil.rmtree(layout)
        domain, channel = MQTT_IDS
        self.edge = self._crproxy("edge", {**HIT_SETTINGS, "mqtt": {
            "broker": self.broker.url, "username": "cr-proxy",
            "password": MQTT_USERS["cr-proxy"], "domain_id": domain, "channel_id": channel}})
        self.edge.wait_for_output("mqtt: subscribed", MQTT_DEADLINE)
        asyncio.run(self._mqtt_wave(1))

    def _setup_hits_and_peers(self) -> None:
        say("cr-proxy: warm instance (hits, and the CONNECT front)")
        (front_port,) = free_ports(1)
        self.hot = self._crproxy("hot", {**HIT_SETTINGS,
                                         "listen_proxy": f"127.0.0.1:{front_port}"})
        self._verified_pull(f"{self.hot.http}/registry.test/{REPO}:{TAG}")
        self._check_hits()
        self._fill_front()
        if "private_hits" in self.plan.cases:
            self._setup_private()
        if "auth_hits" in self.plan.cases:
            say("cr-proxy: a warm instance with mirror_auth on (a rule, anonymous pull-public)")
            self.hot_auth = self._crproxy("hot-auth", {**HIT_SETTINGS, "mirror_auth": {
                "rules": [{"users": ["bench"], "repositories": ["registry.test/bench/*"],
                           "allow": "pull"}]}})
            self._verified_pull(f"{self.hot_auth.http}/registry.test/{REPO}:{TAG}")

        say("plain nginx over the warm cache's files (HTTP sendfile, TLS EC P-256)")
        self.plain = self.stack.enter_context(
            PlainNginx(self.work / "plain", self.hot.cache / "content" / "registry.test")
        )
        for url, extra in ((f"http://{self.plain.http}{self._plain_path()}", []),
                           (f"https://{self.plain.https}{self._plain_path()}",
                            ["--cacert", str(self.plain.ca_cert)])):
            measure.curl(url, *extra, expect_size=self.image.big_size)

        say("distribution proxy (peer): warm instance, remote http://registry.test "
            f"through the name proxy {self.up.proxy_url}")
        self.peer = self.stack.enter_context(self._peer("peer-warm"))
        self._verified_pull(f"{self.peer.http}/{REPO}:{TAG}")

    def _setup_private(self) -> None:
        """A repository only PRIVATE_USER may pull (the token server's rule),
        beside a public one holding the same image; both cached through the
        front with that user's token, so the private one is marked."""
        say(f"a private repository ({PRIVATE_REPO}) beside a public one, cached through "
            "the front")
        tokens = self.up.token_server
        tokens.users[PRIVATE_USER] = PRIVATE_PASSWORD
        tokens.private[PRIVATE_REPO] = {PRIVATE_USER}
        layout = self.work / "private-image"
        build_image(layout, layers=[tar_layer({"app/private": b"private bench\n" * 4096})],
                    tag=TAG)
        for repo in (PRIVATE_REPO, PUBLIC_REPO):
            self.up.push(layout, TAG, repo, TAG, user=PRIVATE_USER)
        shutil.rmtree(layout)
        for repo in (PRIVATE_REPO, PUBLIC_REPO):
            url, extra = self._private_request(repo)
            measure.curl_latencies(url, 2, *extra, proxy=self.front)  # the miss, then a hit
        if not (self.hot.cache / "lists" / Upstream.registry_name / PRIVATE_REPO
                / "_private").is_file():
            raise measure.BenchError(f"{PRIVATE_REPO} was not marked private")

    def _crproxy(self, name: str, settings: dict[str, object]) -> CrProxy:
        proxy = CrProxy(self.work / name, self.endpoints, certs_dir=str(self.certs), **settings)
        proxy.start()
        self.stack.callback(proxy.stop)
        return proxy

    def _peer(self, name: str) -> PeerRegistry:
        return PeerRegistry(self.work / name, self.up.proxy_url, f"http://{Upstream.registry_name}")

    def _dest(self) -> Path:
        self._serial += 1
        return self.work / "pulled" / str(self._serial)

    def _verified_pull(self, source: str) -> None:
        """A pull whose every blob is hashed against its digest (set-up only)."""
        dest = self._dest()
        measure.skopeo_time(source, dest)
        blobs = layout_blobs(dest)
        missing = self.image.digests - set(blobs)
        if missing:
            raise measure.BenchError(f"pull of {source} lacks {missing}")
        shutil.rmtree(dest)

    def _timed_pull(self, source: str) -> float:
        dest = self._dest()
        settle_disk()
        try:
            return measure.skopeo_time(source, dest)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _plain_path(self) -> str:
        return f"/v2/{REPO}/blobs/{self.image.big}"

    def _mirror_blob(self, proxy: CrProxy, https: bool = False) -> str:
        host = proxy.https if https else proxy.http
        scheme = "https" if https else "http"
        return f"{scheme}://{host}/v2/registry.test/{REPO}/blobs/{self.image.big}"

    @property
    def front(self) -> str:
        """The hot cr-proxy's CONNECT front, as an https_proxy URL."""
        return f"http://127.0.0.1:{self.hot.proxy_port}"

    def _front_blob(self) -> str:
        """The big blob as an https_proxy client asks for it: the registry's
        own name (registry.test, mapped by `endpoints`), through the front."""
        return f"https://{Upstream.registry_name}/v2/{REPO}/blobs/{self.image.big}"

    def _manifest_path(self) -> str:
        return f"/v2/{REPO}/manifests/{TAG}"

    def _fill_front(self) -> None:
        """A first GET through the front (it fills the cache domain
        registry.test if the mirror pull has not), then both the blob and the
        manifest must be nginx hits there."""
        ca = ["--cacert", str(self.hot.ca_cert)]
        measure.curl(self._front_blob(), *ca, proxy=self.front, expect_size=self.image.big_size)
        manifest = f"https://{Upstream.registry_name}{self._manifest_path()}"
        for url, kind in ((self._front_blob(), "blob"), (manifest, "manifest")):
            got = measure.headers(url, *ca, proxy=self.front)
            if got.get(":status") != "200" or got.get("x-cr-request-type") != kind:
                raise measure.BenchError(f"{url} through the front is not an nginx hit: {got}")
        self.manifest_size = (self.hot.cache / "content" / Upstream.registry_name
                              / self._manifest_path().lstrip("/")).stat().st_size

    def _check_hits(self) -> None:
        """The hit cases must measure nginx's hit path, not the fetcher."""
        base = f"http://{self.hot.http}/v2/registry.test/{REPO}"
        for url, kind in ((f"{base}/blobs/{self.image.big}", "blob"),
                          (f"{base}/manifests/{TAG}", "manifest")):
            got = measure.headers(url)
            if got.get(":status") != "200" or got.get("x-cr-request-type") != kind:
                raise measure.BenchError(f"{url} is not an nginx hit: {got}")

    @contextlib.contextmanager
    def _cold_crproxy(self, label: str, link: bool = False) -> Iterator[CrProxy]:
        """A cr-proxy with an empty cache (its CDN over the slow link if
        asked); its peak RSS is kept; gone after."""
        self._serial += 1
        proxy = CrProxy(self.work / f"cold-{self._serial}",
                        self.link_endpoints if link else self.endpoints,
                        certs_dir=str(self.certs), **HIT_SETTINGS)
        proxy.start()
        try:
            yield proxy
            assert proxy.proc is not None
            self.results.rss[label].append(measure.vm_hwm(proxy.proc.pid))
        finally:
            proxy.stop()
            shutil.rmtree(proxy.dir, ignore_errors=True)

    @contextlib.contextmanager
    def _cold_peer(self) -> Iterator[PeerRegistry]:
        self._serial += 1
        peer = self._peer(f"peer-cold-{self._serial}")
        try:
            with peer:
                yield peer
        finally:
            shutil.rmtree(peer.dir, ignore_errors=True)

    # ---- the cases, one round each

    def round(self, n: int) -> None:
        self._round = n
        t0 = time.monotonic()
        for name in self.plan.cases:
            getattr(self, name)()
        self.round_loads.append(load())
        say(f"round {n}/{self.plan.reps} done in {time.monotonic() - t0:.0f} s, "
            f"load {self.round_loads[-1]}")

    def blob_hits(self) -> None:
        size = self.image.big_size
        ours, plain = self._mirror_blob(self.hot), f"http://{self.plain.http}{self._plain_path()}"
        # The layer again as a module (issue 15): the fetcher resolves the
        # reference, nginx sends the file (X-Accel-Redirect).
        module = f"http://{self.hot.http}/artifacts/registry.test/{REPO}:{TAG}"
        for _ in range(self.plan.hit_inner):
            self.results.add(Series.HIT_HTTP_OURS, measure.curl(ours, expect_size=size).speed)
            self.results.add(Series.HIT_HTTP_PLAIN, measure.curl(plain, expect_size=size).speed)
            self.results.add(Series.ARTIFACT_OURS, measure.curl(module, expect_size=size).speed)
        ours = self._mirror_blob(self.hot, https=True)
        plain = f"https://{self.plain.https}{self._plain_path()}"
        ca_ours = ["--cacert", str(self.hot.ca_cert)]
        ca_plain = ["--cacert", str(self.plain.ca_cert)]
        front = self._front_blob()
        assert self.hot.proc is not None
        pid = self.hot.proc.pid
        for _ in range(self.plan.hit_inner):
            self.results.add(Series.HIT_HTTPS_OURS,
                             measure.curl(ours, *ca_ours, expect_size=size).speed)
            self.results.add(Series.HIT_HTTPS_PLAIN,
                             measure.curl(plain, *ca_plain, expect_size=size).speed)
            # The same bytes through the CONNECT front (TLS still ended by
            # nginx); the serve process's CPU around it is the front's cost.
            cpu0 = measure.cpu_seconds(pid)
            result = measure.curl(front, *ca_ours, proxy=self.front, expect_size=size,
                                  request_type="blob")
            self.results.front_cpu.append((measure.cpu_seconds(pid) - cpu0, result.size))
            self.results.add(Series.HIT_FRONT_OURS, result.speed)

    def small_hits(self) -> None:
        secs = self.plan.wrk_seconds
        ours = f"http://{self.hot.http}/v2/registry.test/{REPO}/manifests/{TAG}"
        plain = f"http://{self.plain.http}/v2/{REPO}/manifests/{TAG}"
        head_ours = self._mirror_blob(self.hot)
        head_plain = f"http://{self.plain.http}{self._plain_path()}"
        for series, url, tool in (
            (Series.MANIFEST_OURS, ours, measure.wrk),
            (Series.MANIFEST_PLAIN, plain, measure.wrk),
            (Series.HEAD_OURS, head_ours, measure.ab_head),
            (Series.HEAD_PLAIN, head_plain, measure.ab_head),
        ):
            result = tool(url, secs)
            if result.bad:
                raise measure.BenchError(f"{url}: {result.bad} bad answers")
            self.results.add(series, result.rps)

    def auth_hits(self) -> None:
        """small_hits' manifest and blob HEAD hits on two warm instances, one
        with mirror_auth on (an anonymous client, public content), in turn:
        off first in one round, on first in the next, so that a machine
        slowing down (or warming up) within a round favours neither."""
        secs = self.plan.wrk_seconds
        sides = [(self.hot, Series.MANIFEST_AUTH_OFF, Series.HEAD_AUTH_OFF,
                  Series.HEAD_AUTH_OFF_CPU),
                 (self.hot_auth, Series.MANIFEST_AUTH_ON, Series.HEAD_AUTH_ON,
                  Series.HEAD_AUTH_ON_CPU)]
        self.auth_rounds += 1
        if self.auth_rounds % 2 == 0:
            sides.reverse()
        for proxy, manifest_series, head_series, cpu_series in sides:
            assert proxy.proc is not None
            manifest = f"http://{proxy.http}/v2/registry.test/{REPO}/manifests/{TAG}"
            for series, url, tool in ((manifest_series, manifest, measure.wrk),
                                      (head_series, self._mirror_blob(proxy), measure.ab_head)):
                cpu0 = measure.tree_cpu(proxy.proc.pid, "nginx")
                result = tool(url, secs)
                cpu = measure.tree_cpu(proxy.proc.pid, "nginx") - cpu0
                if result.bad:
                    raise measure.BenchError(f"{url}: {result.bad} bad answers")
                self.results.add(series, result.rps)
                if series is head_series and result.requests:
                    self.results.add(cpu_series, cpu / result.requests)

    def new_connections(self) -> None:
        """A small manifest GET on a new connection every time (TCP, CONNECT,
        full TLS handshake), as container clients open them: straight to plain
        nginx's TLS port, then through the front; the same driver. First
        CONN_WORKERS threads at once (rate, and the serve process's CPU per
        connection), then one request at a time (latency)."""
        plain = self._conns(False, self.plan.conn_count, CONN_WORKERS)
        self.results.add(Series.CONN_PLAIN, plain.rps)
        assert self.hot.proc is not None
        pid = self.hot.proc.pid
        cpu0 = measure.cpu_seconds(pid)
        ours = self._conns(True, self.plan.conn_count, CONN_WORKERS)
        self.results.conn_cpu.append((measure.cpu_seconds(pid) - cpu0, ours.count))
        self.results.add(Series.CONN_FRONT, ours.rps)
        for series, through_front in ((Series.CONN1_PLAIN, False), (Series.CONN1_FRONT, True)):
            one = self._conns(through_front, CONN_SERIAL, 1)
            self.results.add(series, one.wall / one.count)  # seconds per request

    def _conns(self, through_front: bool, count: int, workers: int) -> measure.ConnLoad:
        path = self._manifest_path()
        if not through_front:
            return measure.connload(self.plain.https, "localhost", path, self.plain.ca_cert,
                                    proxy=False, count=count, workers=workers,
                                    expect_size=self.manifest_size)
        result = measure.connload(f"127.0.0.1:{self.hot.proxy_port}", Upstream.registry_name,
                                  path, self.hot.ca_cert, proxy=True, count=count,
                                  workers=workers, expect_size=self.manifest_size)
        if result.request_type != "manifest":
            raise measure.BenchError(f"manifest through the front: X-CR-Request-Type "
                                     f"{result.request_type!r}, not an nginx hit")
        return result

    def concurrent(self, link: bool = False) -> None:
        up, digest = self.up, self.image.big
        label = "concurrent, link" if link else "concurrent"
        with self._cold_crproxy(label, link) as proxy:
            before = up.cdn_blob_gets(digest)
            settle_disk()
            wall, _ = measure.curl_many(self._mirror_blob(proxy), CLIENTS, self.image.big_size)
            series = Series.LINK_CONCURRENT_WALL if link else Series.CONCURRENT_WALL
            self.results.add(series, wall)
            gets = _settled(lambda: up.cdn_blob_gets(digest)) - before
            self.results.upstream_gets.append(gets)
        if not link:
            # The floor on this machine: the same 16 downloads as hits of a
            # plain nginx (sendfile), the clients sharing its cores.
            plain = f"http://{self.plain.http}{self._plain_path()}"
            wall, _ = measure.curl_many(plain, CLIENTS, self.image.big_size)
            self.results.add(Series.CONCURRENT_PLAIN_HIT_WALL, wall)

    def _in_turn(self, *sides: Callable[[], None]) -> None:
        """The sides of a cold case, in_turn: the first to write 256 MiB
        after another case pays for the memory that case left
        (docs/performance.md, "Session 10"), and no side should always be
        that one."""
        for side in in_turn(sides, self._round):
            side()

    def cold_curl(self) -> None:
        self._in_turn(self._cold_curl_ours, self._cold_curl_direct, self._cold_curl_peer)

    def _cold_curl_ours(self) -> None:
        with self._cold_crproxy("cold curl") as proxy:
            settle_disk()
            self.results.add(Series.COLD_CURL_OURS, measure.curl(
                self._mirror_blob(proxy), expect_size=self.image.big_size).wall)

    def _cold_curl_direct(self) -> None:
        self.results.add(Series.COLD_CURL_DIRECT, self._direct_blob(self.up.cdn_port))

    def _cold_curl_peer(self) -> None:
        with self._cold_peer() as peer:
            url = f"http://{peer.http}/v2/{REPO}/blobs/{self.image.big}"
            settle_disk()
            self.results.add(Series.COLD_CURL_PEER,
                             measure.curl(url, expect_size=self.image.big_size).wall)

    def _direct_blob(self, cdn_port: int) -> float:
        """Seconds to get the big blob from the upstream directly, as a client
        does: a token, then the registry, following its redirect to the CDN
        (cdn.test pinned to the given loopback port)."""
        settle_disk()
        t0 = time.perf_counter()
        token = measure.bearer_token(self.up.token_url, REPO)
        measure.curl(
            f"{self.up.registry_url}/v2/{REPO}/blobs/{self.image.big}",
            "-L", "-H", f"Authorization: Bearer {token}",
            "--connect-to", f"{Upstream.cdn_name}:80:127.0.0.1:{cdn_port}",
            expect_size=self.image.big_size,
        )
        return time.perf_counter() - t0

    def over_link(self) -> None:
        """The cold cases again with the CDN behind a ~1 Gbit/s link (nginx
        limit_rate), the way a mirror meets a real upstream: one client
        through a cold cr-proxy, the same directly, and 16 clients at once."""
        with self._cold_crproxy("cold curl, link", link=True) as proxy:
            settle_disk()
            self.results.add(Series.LINK_COLD_OURS, measure.curl(
                self._mirror_blob(proxy), expect_size=self.image.big_size).wall)
        self.results.add(Series.LINK_COLD_DIRECT, self._direct_blob(self.up.cdn_link_port))
        self.concurrent(link=True)

    def cold_skopeo(self) -> None:
        self._in_turn(self._cold_skopeo_ours, self._cold_skopeo_direct, self._cold_skopeo_peer)

    def _cold_skopeo_ours(self) -> None:
        with self._cold_crproxy("cold skopeo") as proxy:
            self.results.add(Series.COLD_SKOPEO_OURS,
                             self._timed_pull(f"{proxy.http}/registry.test/{REPO}:{TAG}"))

    def _cold_skopeo_direct(self) -> None:
        dest = self._dest()
        settle_disk()
        t0 = time.perf_counter()
        try:
            self.up.pull_direct(REPO, TAG, dest)
            self.results.add(Series.COLD_SKOPEO_DIRECT, time.perf_counter() - t0)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _cold_skopeo_peer(self) -> None:
        with self._cold_peer() as peer:
            self.results.add(Series.COLD_SKOPEO_PEER,
                             self._timed_pull(f"{peer.http}/{REPO}:{TAG}"))

    def warm(self) -> None:
        ours = f"{self.hot.http}/registry.test/{REPO}:{TAG}"
        self.results.add(Series.WARM_OURS, self._timed_pull(ours))
        self.results.add(Series.WARM_PEER, self._timed_pull(f"{self.peer.http}/{REPO}:{TAG}"))
        # The same warm blob by curl: what the servers do when skopeo is not the limit.
        size = self.image.big_size
        settle_disk()
        self.results.add(Series.WARM_CURL_OURS,
                         measure.curl(self._mirror_blob(self.hot), expect_size=size).wall)
        peer_blob = f"http://{self.peer.http}/v2/{REPO}/blobs/{self.image.big}"
        self.results.add(Series.WARM_CURL_PEER, measure.curl(peer_blob, expect_size=size).wall)

    def offline(self) -> None:
        """A pull by stale tag online, then offline: with the upstream
        stopped (connects refused at once), and with its ports dropping
        packets (connects time out, a cut cable): the first pull after the
        cable went (it waits timeouts.stale_budget for the tag), and one
        once the registry is known down (nothing is dialled). After each
        outage, the upstream answers again before anything else runs."""
        source = f"{self.stale.http}/registry.test/{REPO}:{TAG}"
        self.results.add(Series.ONLINE_STALE, self._timed_pull(source))
        mark = len(self.stale.output)
        with self.up.stopped():
            self.results.add(Series.OFFLINE_STALE, self._timed_pull(source))
        self._stale_says(mark, UP_AGAIN)
        mark = len(self.stale.output)
        with cable_out(self.up):
            self.results.add(Series.OFFLINE_DROP_FIRST, self._timed_pull(source))
            self._stale_says(mark, WENT_DOWN)
            self.results.add(Series.OFFLINE_DROP, self._timed_pull(source))
        self._stale_says(mark, UP_AGAIN)

    def private_hits(self) -> None:
        """PRIVATE_HITS manifest hits over one tunnel, of the private
        repository (through the fetcher: its verdict for this token is
        cached after the first) and of the public one (nginx alone)."""
        for repo, series in ((PRIVATE_REPO, Series.PRIVATE_HIT), (PUBLIC_REPO, Series.PUBLIC_HIT)):
            url, extra = self._private_request(repo)
            times = measure.curl_latencies(url, PRIVATE_HITS, *extra, proxy=self.front)
            # The first opens the tunnel (and has the new token checked).
            self.results.add(series, statistics.median(times[1:]))

    def _private_request(self, repo: str) -> tuple[str, list[str]]:
        """The manifest's URL and curl's options, with a new token: one
        minted at set-up would expire (the upstream's token_ttl, 300 s)
        before the last round of a full run."""
        token = self.up.issue_token([f"repository:{repo}:pull"], PRIVATE_USER)
        url = f"https://{Upstream.registry_name}/v2/{repo}/manifests/{TAG}"
        return url, ["--cacert", str(self.hot.ca_cert), "-H", f"Authorization: Bearer {token}",
                     "-H", f"Accept: {MT_MANIFEST}"]

    def mqtt_devices(self) -> None:
        """MQTT_DEVICES devices, connected and subscribed first, ask for one
        cached module at the same moment: wall time until the last has it
        whole (checksum checked), and the payload bytes the broker sent them
        against the floor, the module once per device."""
        wall, received = asyncio.run(self._mqtt_wave(MQTT_DEVICES))
        self.results.mqtt.append((wall, received, MQTT_DEVICES * len(self.module)))

    def push(self) -> None:
        """Pushes through cr-proxy (a fresh one: it knows nothing the
        registry holds) against straight to the registry, each side with
        new random layers (nothing the registry or skopeo's blob cache has
        seen): the kolla-like batch, PUSHERS at a time (wall time, and the
        bytes the registry received), then one big layer (its rate)."""
        self._serial += 1
        n = self._serial
        batches = [build_batch(self.work / f"push-{n}-{side}", PUSH_IMAGES, PUSH_BASE_MIB * MIB,
                               seed=2 * n + side) for side in (0, 1)]
        # The first image of a build, alone: layers of its own (seeds apart
        # from the batches'), nothing to share yet.
        firsts = [build_batch(self.work / f"push-{n}-first-{side}", 1, PUSH_BASE_MIB * MIB,
                              seed=10_000 + 2 * n + side) for side in (0, 1)]
        bigs = [self._big_layout(f"push-{n}-big-{side}", seed=1000 + 2 * n + side)
                for side in (0, 1)]
        direct_env = self.up.skopeo_env()
        creds = ("--dest-creds", ":".join(self.up.credentials)) if self.up.credentials else ()
        try:
            with self._push_crproxy() as proxy:
                ours = f"{proxy.http}/{REGISTRY_NAME}"
                first, _ = self._pushed(lambda: push_batch(
                    firsts[0], lambda _: f"{ours}/push{n}/first-ours:v1", 1))
                self.results.add(Series.PUSH_FIRST_OURS, first)
                wall, sent = self._pushed(lambda: push_batch(
                    batches[0], lambda i: f"{ours}/push{n}/ours-{i}:v1", PUSHERS))
                self.results.add(Series.PUSH_BATCH_OURS, wall)
                assert proxy.proc is not None
                cpu0 = measure.cpu_seconds(proxy.proc.pid)
                big_wall, _ = self._pushed(lambda: push_batch(
                    bigs[0], lambda _: f"{ours}/push{n}/big-ours:v1", 1))
                big_cpu = measure.cpu_seconds(proxy.proc.pid) - cpu0
                self._pull_back(proxy, f"push{n}/big-ours", bigs[0])
            direct = REGISTRY_NAME
            with self._direct_through_relay():
                first_direct, _ = self._pushed(lambda: push_batch(
                    firsts[1], lambda _: f"{direct}/push{n}/first-direct:v1", 1,
                    env=direct_env, extra=creds))
                self.results.add(Series.PUSH_FIRST_DIRECT, first_direct)
                direct_wall, direct_sent = self._pushed(lambda: push_batch(
                    batches[1], lambda i: f"{direct}/push{n}/direct-{i}:v1", PUSHERS,
                    env=direct_env, extra=creds))
                big_direct, _ = self._pushed(lambda: push_batch(
                    bigs[1], lambda _: f"{direct}/push{n}/big-direct:v1", 1,
                    env=direct_env, extra=creds))
            self.results.add(Series.PUSH_BATCH_DIRECT, direct_wall)
            self.results.push_bytes.append((sent, direct_sent, batches[0].distinct_bytes))
            size = self.plan.blob_mib * MIB
            self.results.add(Series.PUSH_BIG_OURS, size / big_wall)
            self.results.add(Series.PUSH_BIG_DIRECT, size / big_direct)
            self.results.push_cpu.append((big_cpu, size))
        finally:
            for batch in (*batches, *firsts, *bigs):
                shutil.rmtree(batch.layout, ignore_errors=True)

    def _pull_back(self, proxy: CrProxy, repository: str, pushed: Batch) -> None:
        """The big layer just pushed, by curl through cr-proxy: a hit (nginx),
        first as the push left it, then again."""
        image = pushed.images[0]
        digest = image.layer_digests[0]
        url = f"http://{proxy.http}/v2/{REGISTRY_NAME}/{repository}/blobs/{digest}"
        size = image.sizes[digest]
        for series in (Series.PUSH_PULLBACK_FIRST, Series.PUSH_PULLBACK_AGAIN):
            self.results.add(series, measure.curl(url, expect_size=size,
                                                  request_type="blob").wall)

    def _big_layout(self, name: str, seed: int) -> Batch:
        layout = self.work / name
        info = build_image(layout, layers=[big_layer(self.plan.blob_mib * MIB, seed=seed)],
                           tag="i0")
        return Batch(layout, [info], 0)

    def _pushed(self, push: Callable[[], None]) -> tuple[float, int]:
        """(wall seconds, bytes the registry received) of a push."""
        settle_disk()
        before = self.relay.sent
        t0 = time.perf_counter()
        push()
        return time.perf_counter() - t0, self.relay.sent - before

    @contextlib.contextmanager
    def _direct_through_relay(self) -> Iterator[None]:
        """skopeo straight to the registry goes through the upstream's name
        proxy: for a while, it maps registry.test to the counting relay."""
        real = self.up.endpoints[REGISTRY_NAME]
        self.up.endpoints[REGISTRY_NAME] = self.relay.url
        try:
            yield
        finally:
            self.up.endpoints[REGISTRY_NAME] = real

    @contextlib.contextmanager
    def _push_crproxy(self) -> Iterator[CrProxy]:
        self._serial += 1
        endpoints = {**self.endpoints, REGISTRY_NAME: self.relay.url}
        proxy = CrProxy(self.work / f"push-{self._serial}", endpoints,
                        certs_dir=str(self.certs), **PUSH_SETTINGS)
        proxy.start()
        try:
            yield proxy
        finally:
            proxy.stop()
            shutil.rmtree(proxy.dir, ignore_errors=True)

    def _device(self, name: str) -> Device:
        return Device(self.broker, "device", MQTT_USERS["device"], *MQTT_IDS, name)

    async def _mqtt_wave(self, count: int) -> tuple[float, int]:
        self._serial += 1
        devices = [self._device(f"bench-{self._serial}-{i}") for i in range(count)]
        async with contextlib.AsyncExitStack() as stack:
            for dev in devices:
                await stack.enter_async_context(dev)
            t0 = time.monotonic()
            got = await asyncio.gather(*(dev.fetch(MQTT_REF, MQTT_DEADLINE) for dev in devices))
            wall = time.monotonic() - t0
        if any(g.data != self.module for g in got):
            raise RuntimeError("a device reassembled another module")
        return wall, sum(dev.received for dev in devices)

    def _stale_says(self, mark: int, needle: str, timeout: float = 60.0) -> None:
        """Wait (bounded, outside every timed span) until the stale-tag
        cr-proxy has printed `needle` since output line `mark`."""
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.stale.output[mark:]):
            if time.monotonic() > deadline:
                raise measure.BenchError(f"the stale-tag cr-proxy never said {needle!r}")
            time.sleep(0.1)


T = TypeVar("T")


def in_turn(sides: Sequence[T], round_: int) -> list[T]:
    """A case's sides in their order in odd rounds (counted from 1),
    reversed in even ones: side-by-side runs (here, bench.miss_ab,
    bench.push_ab) give no side the same place every round."""
    return list(sides) if round_ % 2 else list(reversed(sides))


# MiB of memory freed just before each timed span that writes (settle_disk):
# more than any one span writes (a cold skopeo pull: the cache's copy of the
# 256 MiB layer and skopeo's own).
FRESH_PAGES_MIB = 768
_FRESH_PIECE = os.urandom(MIB)


def settle_disk() -> None:
    """Write back what earlier cases left dirty, so a case never pays for the
    one before it (cold caches, pulled layouts and deleted trees are hundreds
    of MiB each); then fresh_pages(). Outside every timed span."""
    os.sync()
    fresh_pages()


def fresh_pages(mib: int = FRESH_PAGES_MIB) -> None:
    """Free `mib` MiB of page cache right now, so the span that follows
    writes into pages the kernel has just freed, whichever side it is.

    Why: on a VM with free page reporting (virtio_balloon), memory left free
    for more than about 3 s goes back to the host, and writing a file into
    it costs 14 times the CPU (256 MiB: 0.55 against 0.04 CPU-s, measured
    by delay in docs/performance.md, "Session 12"). Without this, a side
    whose server starts slowly (cr-proxy: nginx and the fetcher) wrote its
    copy into such memory and one that starts at once (distribution's
    proxy) into what the side before it had just freed: the order, not the
    code, decided the cold rows. A long-running cache's memory is full of
    page cache it reclaims from, never handed back, so this is also the
    state that a mirror in service writes in."""
    with tempfile.TemporaryFile() as scratch:
        for _ in range(mib):
            scratch.write(_FRESH_PIECE)
    # Closed: the file and its pages are gone, never written back.


def big_layer(size: int, seed: int) -> bytes:
    """testbed.oci_layout.big_file_layer for any size: a tar of one file of
    pseudo-random bytes. (big_file_layer draws them in one getrandbits call,
    which Python refuses from 256 MiB on: more than 2**31 bits.)"""
    if size < 1 << 28:
        return big_file_layer(size, seed)
    rng = random.Random(seed)
    chunk = 1 << 26
    payload = b"".join(rng.randbytes(min(chunk, size - at)) for at in range(0, size, chunk))
    return tar_layer({f"big-{seed}.bin": payload})


def _settled(count, timeout: float = 3.0) -> int:
    """nginx logs a request just after its last byte: read until stable (bounded)."""
    deadline = time.monotonic() + timeout
    value = count()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        again = count()
        if again == value:
            return value
        value = again
    return value


# --------------------------------------------------------------------------- main


def markdown(plan: Plan, bench: Bench, rows: list[Row], facts: dict[str, str], started: str,
             loads: tuple[str, str], wall: float, command: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured {started} with `{command}` ({wall / 60:.1f} min wall time), "
        f"{plan.reps} interleaved repetition(s) per case; medians, and the ratio of medians.",
        "",
        markdown_table(rows),
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in facts.items()),
        f"- load average (1/5/15 min) at start: {loads[0]}; after each round: "
        f"{'; '.join(bench.round_loads)}; at end: {loads[1]}",
        *([f"- {BUSY_NOTE}"] if _busy(loads[0]) else []),
        "",
        "## How",
        "",
        "Everything runs on 127.0.0.1 (see `bench/run.py`): the tests' Docker-Hub-like "
        "upstream (distribution with token auth, blob redirects to a CDN nginx); cr-proxy "
        "in mirror mode; a plain nginx serving the same files from the warm cache "
        "(`sendfile on`, `output_buffers 2 1m`, TLS with an EC P-256 certificate); "
        "and CNCF distribution in proxy mode as the peer cache, reaching the upstream's "
        "names through the upstream's name-mapping forward proxy. The image is one "
        f"{plan.blob_mib} MiB layer plus a small one. Cold means an empty cache: a new "
        "cr-proxy and a new peer for each cold repetition. The `upstream CDN at "
        f"{LINK_NAME}` rows repeat the cold blob and the {CLIENTS}-client case with the "
        "CDN's second port, the same nginx with `limit_rate 119m` per connection: an "
        "upstream met over a network link rather than at loopback memory speed (the "
        "upstream-GET count covers both). skopeo tops out near 100-150 "
        "MiB/s here (it writes and hashes every layer itself), so the curl rows are the "
        "byte-rate rows. skopeo straight from the upstream and the peer's own upstream "
        "traffic pass through the test upstream's name-mapping proxy (Python, in the bench "
        "process); cr-proxy reaches the loopback ports through its `endpoints` setting. "
        "HEAD rates are measured with `ab -i -k`, as Debian's wrk 4.1 cannot count a HEAD "
        "answer whose Content-Length announces a body. The https_proxy rows go through the "
        "warm cr-proxy's CONNECT front (`listen.proxy`) to `registry.test` (its `endpoints` "
        "name), TLS ended by cr-proxy's nginx with its leaf for that host, every answer "
        "checked to be an nginx hit (`X-CR-Request-Type`); the blob row's reference is the "
        "plain nginx TLS samples of the same rounds, and the front's CPU is the `cr-proxy "
        "serve` process's utime+stime (/proc/<pid>/stat: every thread, the exited ones "
        "too) around each transfer, summed over all of them and divided by the GiB moved. "
        "The new-connection rows run `bench.connload` (its own process, Python threads): "
        "per request a new TCP connection, through the front a CONNECT, a full TLS "
        "handshake verified against the CA and never resumed (Go's client default), and "
        "one GET of the image's manifest with `Connection: close`; "
        f"{CONN_WORKERS} threads for {plan.conn_count} requests per side per round, then "
        f"{CONN_SERIAL} one at a time for the latency row; the reference is the same driver "
        "against plain nginx's TLS port. The offline rows pull through a "
        "cr-proxy with `tag_ttl: 0`, so the tag is stale and the upstream would be asked: "
        "with the upstream stopped (connects refused), and with its ports dropping packets "
        "(`testbed.blackhole`: a full accept queue, connects time out as with a cut cable), "
        "the first pull after the cable went (it waits `timeouts.stale_budget` for the tag, "
        "then gets the stale copy) and the next, once the registry is known down; after "
        "each outage the bench waits for the probe to find the upstream back; "
        "the other hit rows use a cr-proxy whose tags stay fresh for the whole run. "
        "Wall times include the client's process start; curl byte rates are curl's own "
        "`speed_download`. Before each timed pull, push or cold download the bench runs "
        "`sync`, so no case pays for the disk writes of the one before, and then writes "
        "and deletes 768 MiB, so every side writes its copy into memory the kernel has "
        "just freed (on this kind of VM, memory free for a few seconds goes back to the "
        "host and costs 14x the CPU to write into again: docs/performance.md, "
        "\"Session 12\"). The push rows push new "
        "random layers on each side (nothing the registry or skopeo's blob cache has "
        "seen) through a fresh cr-proxy and straight to the registry; skopeo's direct "
        "pushes pass through the test upstream's name-mapping proxy (Python), cr-proxy's "
        "through its `endpoints`; a relay in front of the registry counts the bytes it "
        "received.",
        "",
        "## Samples",
        "",
        *(f"- {line}" for line in cases.sample_lines(bench.results)),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 32 MiB blob, 1 s wrk runs")
    parser.add_argument("--reps", type=int, help="repetitions of every case (default 5)")
    parser.add_argument("--blob-mib", type=int, help="size of the big layer (default 256)")
    parser.add_argument("--write", metavar="FILE", help="also write the table as Markdown")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("--only", nargs="+", choices=CASE_NAMES, metavar="CASE",
                        help=f"run only these cases of each round ({', '.join(CASE_NAMES)}); "
                             "the other rows show no samples")
    parser.add_argument("--work", metavar="DIR", default=str(DEFAULT_WORK),
                        help="work directory, emptied first (default bench-work/; give "
                             "another one to run two benches side by side)")
    return parser.parse_args(argv)


DEFAULT_WORK = ROOT / "bench-work"
WORK_MARK = ".cr-proxy-bench"  # only a directory holding this is ever emptied

BUSY_NOTE = ("the machine was busy with other work when the run started (1-minute load "
             "above half the cores): expect noisy numbers")


def _busy(load_text: str) -> bool:
    return float(load_text.split()[0]) > (os.cpu_count() or 1) / 2


def _sigterm(_signum: int, _frame: object) -> None:
    say("\nSIGTERM: stopping every process the bench started")
    raise SystemExit(143)  # unwinds the ExitStack


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args)
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_start = load()
    facts = machine_facts()
    say(f"cr-proxy bench, {started}: {facts['cpu']}, load {load_start}")
    say(f"plan: {plan.reps} round(s), {plan.blob_mib} MiB blob, wrk {plan.wrk_seconds:g} s")
    if _busy(load_start):
        say(f"warning: {BUSY_NOTE}")
    signal.signal(signal.SIGTERM, _sigterm)
    # The upstream's name proxy (in this process) logs a traceback whenever a
    # client hangs up mid-body, as the peer does when it is stopped: noise here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    work = Path(args.work).resolve()
    if (work != DEFAULT_WORK and work.exists() and any(work.iterdir())
            and not (work / WORK_MARK).exists()):
        say(f"{work} is not empty and not a bench work directory: not touching it")
        return 2
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARK).touch()
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            bench = Bench(plan, work, stack)
            bench.setup()
            say(f"set-up done in {time.monotonic() - t0:.0f} s")
            for n in range(1, plan.reps + 1):
                bench.round(n)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - t0
    load_end = load()
    rows = cases.rows(bench.results, plan.blob_mib)
    say("")
    say(text_table(rows))
    say("")
    for line in cases.sample_lines(bench.results):
        say(f"  {line}")
    say(f"\nload average at start {load_start}, at end {load_end} (nproc {os.cpu_count()}); "
        f"wall time {wall / 60:.1f} min")
    if args.write:
        out = Path(args.write)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(plan, bench, rows, facts, started, (load_start, load_end),
                                wall, command))
        say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("\ninterrupted: every process the bench started is stopped")
        sys.exit(130)
