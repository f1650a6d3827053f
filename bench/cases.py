"""What the bench measures and how each row of its table reads: data, not code.

`Series` names every sampled quantity once, with its unit; the rounds in
run.py add samples to them. `CASES` lists the table's rows in order: a
`Ratio` compares cr-proxy's series with a reference's by median against a
bar (or none: a row for context), an `Absolute` judges a tally the rounds
keep (upstream GETs, peak RSS, the front's CPU) against a fixed bar. `rows`
and `sample_lines` derive the table and the samples section from them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from bench.report import (
    MIB,
    Bar,
    Row,
    absolute,
    compare,
    fmt_mib,
    fmt_rate,
    fmt_rps,
    fmt_secs,
    info,
    median,
)

CLIENTS = 16  # concurrent clients of the concurrent-miss rows
LINK_NAME = "~1 Gbit/s"  # testbed.registry.LINK_RATE, the CDN's rate-limited port
CONN_WORKERS = 8  # bench.connload threads, each one request after another
RSS_LIMIT = 100 * MIB
GIB = 1 << 30
MQTT_DEVICES = 50  # devices asking for one module at once over MQTT
MQTT_MODULE_MIB = 5
# Bytes the broker sends the devices, over the floor (the module once per
# device): base64 is 4/3, the JSON fields and the checksum add little; a
# chunk sent twice in one wave would show as 2.7x.
MQTT_BYTES_LIMIT = 1.4
FRONT_CPU_LIMIT = 0.4  # CPU-seconds of the serve process per GiB through the front
PUSH_IMAGES = 20  # the kolla-like push batch: images, one repository each...
PUSHERS = 4  # ...pushed this many at once
PUSH_BASE_MIB = 32  # each of the two base layers the batch's images share
# Bytes the registry may receive through cr-proxy over the batch's distinct
# blobs: request heads and tokens; one base layer sent twice is far more.
PUSH_BYTES_LIMIT = 1.05


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} us"


@dataclass(frozen=True)
class Unit:
    """How a series' samples are shown: in the table (fmt), and in the
    samples section (divided by scale, named by label)."""

    label: str
    scale: float
    fmt: Callable[[float], str]


RATE = Unit("MiB/s", MIB, fmt_rate)  # bytes per second
RPS = Unit("req/s", 1, fmt_rps)
SECS = Unit("s", 1, fmt_secs)
MS = Unit("ms", 1e-3, fmt_ms)  # samples in seconds, shown in milliseconds
US = Unit("us", 1e-6, fmt_us)  # samples in seconds, shown in microseconds


class Series(Enum):
    """A sampled quantity; its name (lower-cased) heads its samples line."""

    unit: Unit

    def __new__(cls, unit: Unit) -> Series:
        member = object.__new__(cls)
        member._value_ = len(cls.__members__)  # units repeat: the value only tells apart
        member.unit = unit
        return member

    @property
    def key(self) -> str:
        return self.name.lower()

    HIT_HTTP_OURS = RATE
    HIT_HTTP_PLAIN = RATE
    HIT_HTTPS_OURS = RATE
    HIT_HTTPS_PLAIN = RATE
    HIT_FRONT_OURS = RATE
    ARTIFACT_OURS = RATE  # the same layer as a module, /artifacts/ (edge/http.py)
    MANIFEST_OURS = RPS
    MANIFEST_PLAIN = RPS
    HEAD_OURS = RPS
    HEAD_PLAIN = RPS
    CONN_PLAIN = RPS
    CONN_FRONT = RPS
    CONN1_PLAIN = MS  # seconds per request, one at a time
    CONN1_FRONT = MS
    CONCURRENT_WALL = SECS
    CONCURRENT_PLAIN_HIT_WALL = SECS
    COLD_CURL_OURS = SECS
    COLD_CURL_DIRECT = SECS
    COLD_CURL_PEER = SECS
    LINK_COLD_OURS = SECS
    LINK_COLD_DIRECT = SECS
    LINK_CONCURRENT_WALL = SECS
    COLD_SKOPEO_OURS = SECS
    COLD_SKOPEO_DIRECT = SECS
    COLD_SKOPEO_PEER = SECS
    WARM_OURS = SECS
    WARM_PEER = SECS
    WARM_CURL_OURS = SECS
    WARM_CURL_PEER = SECS
    ONLINE_STALE = SECS
    OFFLINE_STALE = SECS
    OFFLINE_DROP_FIRST = SECS  # the first pull after the cable went: pays the stale budget
    OFFLINE_DROP = SECS  # the next: the registry is known down, nothing dialled
    PUSH_FIRST_OURS = SECS  # one image of the batch's shape, alone, through cr-proxy
    PUSH_FIRST_DIRECT = SECS
    PUSH_BATCH_OURS = SECS  # the push batch through cr-proxy, wall time
    PUSH_BATCH_DIRECT = SECS  # the same batch pushed straight to the registry
    PUSH_BIG_OURS = RATE  # one big layer pushed through cr-proxy: its bytes per second
    PUSH_BIG_DIRECT = RATE
    # The big layer just pushed, pulled back through cr-proxy by curl: the
    # first hit reads it from the disk (pushes write around the page cache,
    # cache/direct.py), the next from memory.
    PUSH_PULLBACK_FIRST = SECS
    PUSH_PULLBACK_AGAIN = SECS
    # Manifest hits through the front, one kept-alive tunnel (issue 14): of a
    # private repository (the fetcher checks the credential: a cached verdict),
    # and of a public one (nginx alone).
    PRIVATE_HIT = MS
    PUBLIC_HIT = MS
    # Public hits on the mirror port with mirror_auth on (anonymous, a rule
    # for a user) and off, measured in turn in one case (issue 14).
    MANIFEST_AUTH_ON = RPS
    MANIFEST_AUTH_OFF = RPS
    HEAD_AUTH_ON = RPS
    HEAD_AUTH_OFF = RPS
    # nginx's CPU (its processes' utime+stime) per blob HEAD of those runs:
    # steadier than the request rate on a busy machine, and it counts the
    # kernel's share (a stat's path walk) that callgrind does not.
    HEAD_AUTH_ON_CPU = US
    HEAD_AUTH_OFF_CPU = US


@dataclass
class Results:
    """Everything the rounds record: samples per series, in the order first
    measured, and the tallies the absolute rows judge."""

    samples: dict[Series, list[float]] = field(default_factory=lambda: defaultdict(list))
    upstream_gets: list[int] = field(default_factory=list)  # big-blob GETs per concurrent round
    rss: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # cold proxies
    front_cpu: list[tuple[float, int]] = field(default_factory=list)  # (CPU-s, bytes) per transfer
    conn_cpu: list[tuple[float, int]] = field(default_factory=list)  # (CPU-s, connections) per run
    # (wall seconds, payload bytes the devices received, the floor) per MQTT wave
    mqtt: list[tuple[float, int, int]] = field(default_factory=list)
    # (bytes the registry received through cr-proxy, pushing directly, the
    # batch's distinct blobs) per push batch
    push_bytes: list[tuple[int, int, int]] = field(default_factory=list)
    # (CPU-s of the serve process, bytes of the layer) per big-layer push
    push_cpu: list[tuple[float, int]] = field(default_factory=list)

    def add(self, series: Series, value: float) -> None:
        self.samples[series].append(value)

    def __getitem__(self, series: Series) -> list[float]:
        return self.samples.get(series, [])


@dataclass(frozen=True)
class Ratio:
    """A row: the median of `ours` over the median of `ref` (same unit),
    held to `bar`, or to none (a row for context). `case` may name {mib}."""

    case: str
    ours: Series
    ref: Series
    ref_name: str
    bar: Bar | None

    def row(self, results: Results, mib: int) -> Row:
        case, fmt = self.case.format(mib=mib), self.ours.unit.fmt
        ours, ref = results[self.ours], results[self.ref]
        if self.bar is None:
            return info(case, ours, ref, self.ref_name, fmt)
        return compare(case, ours, ref, self.ref_name, self.bar, fmt)


@dataclass(frozen=True)
class Judged:
    """What an absolute row shows: the value, its context, and whether the
    bar is met (None: no bar, a row for context)."""

    value: str
    context: str
    met: bool | None


NOT_RUN = Judged("-", "no samples (case not run)", None)


@dataclass(frozen=True)
class Absolute:
    """A row judging a tally against a fixed bar ("(info)": none)."""

    case: str
    bar: str
    judge: Callable[[Results], Judged]

    def row(self, results: Results, mib: int) -> Row:
        judged = self.judge(results)
        if judged is NOT_RUN:  # as a Ratio row without samples (bench.run --only)
            return Row(self.case, "-", judged.context, "-", self.bar, "n/a (no samples)")
        if judged.met is None:
            return Row(self.case, judged.value, judged.context, "-", self.bar, "-")
        return absolute(self.case, judged.value, judged.context, judged.met, self.bar)


def _upstream_gets(r: Results) -> Judged:
    gets = r.upstream_gets
    if not gets:
        return NOT_RUN
    return Judged(", ".join(str(g) for g in gets), "-", all(g == 1 for g in gets))


def _peak_rss(r: Results) -> Judged:
    if not r.rss:
        return NOT_RUN
    peak = max(v for vs in r.rss.values() for v in vs)
    worst = max(r.rss, key=lambda k: max(r.rss[k]))
    return Judged(fmt_mib(peak), f"worst in: {worst}", 0 < peak <= RSS_LIMIT)


def _front_cpu_per_gib(r: Results) -> Judged:
    if not r.front_cpu:
        return NOT_RUN
    cpu = sum(c for c, _ in r.front_cpu)
    moved = sum(b for _, b in r.front_cpu) / GIB
    per_gib = cpu / moved if moved else float("nan")
    return Judged(f"{per_gib:.3f} s/GiB" if moved else "-",
                  f"{cpu:.2f} s over {moved:.2f} GiB, {len(r.front_cpu)} transfers",
                  bool(moved) and per_gib <= FRONT_CPU_LIMIT)


def _front_cpu_per_connection(r: Results) -> Judged:
    conns = sum(n for _, n in r.conn_cpu)
    if not conns:
        return Judged("-", "no connections", None)
    conn_ms = 1000 * sum(c for c, _ in r.conn_cpu) / conns
    return Judged(f"{conn_ms:.2f} ms", f"over {conns:,} connections", None)


def _mqtt_wall(r: Results) -> Judged:
    if not r.mqtt:
        return NOT_RUN
    walls = [w for w, _, _ in r.mqtt]
    return Judged(fmt_secs(median(walls)), f"median of {len(walls)} waves: "
                  + ", ".join(fmt_secs(w) for w in walls), None)


def _mqtt_bytes(r: Results) -> Judged:
    if not r.mqtt:
        return NOT_RUN
    ratios = [sent / floor for _, sent, floor in r.mqtt]
    worst = max(ratios)
    _, sent, floor = r.mqtt[ratios.index(worst)]
    return Judged(f"{worst:.2f}x", f"{sent / MIB:,.1f} MiB vs {floor / MIB:,.1f} MiB "
                  f"({MQTT_DEVICES} x the module), worst wave", worst <= MQTT_BYTES_LIMIT)


def _push_bytes(r: Results) -> Judged:
    if not r.push_bytes:
        return NOT_RUN
    ratios = [ours / distinct for ours, _, distinct in r.push_bytes]
    worst = max(ratios)
    ours, direct, distinct = r.push_bytes[ratios.index(worst)]
    return Judged(f"{worst:.3f}x", f"{ours / MIB:,.1f} MiB vs {distinct / MIB:,.1f} MiB distinct "
                  f"(direct: {direct / MIB:,.1f} MiB), worst batch", worst <= PUSH_BYTES_LIMIT)


def _push_cpu_per_gib(r: Results) -> Judged:
    if not r.push_cpu:
        return NOT_RUN
    cpu = sum(c for c, _ in r.push_cpu)
    moved = sum(b for _, b in r.push_cpu) / GIB
    return Judged(f"{cpu / moved:.2f} s/GiB", f"{cpu:.2f} s over {moved:.2f} GiB, "
                  f"{len(r.push_cpu)} pushes", None)


S = Series
FASTER = Bar("<", 1.0, "< 1x (faster)")
CASES: tuple[Ratio | Absolute, ...] = (
    Ratio("blob hit, mirror over HTTP (curl, {mib} MiB)", S.HIT_HTTP_OURS, S.HIT_HTTP_PLAIN,
          "plain nginx sendfile", Bar(">=", 0.95)),
    Ratio("blob hit, mirror over HTTPS (curl, {mib} MiB)", S.HIT_HTTPS_OURS, S.HIT_HTTPS_PLAIN,
          "plain nginx TLS", Bar(">=", 0.95)),
    Ratio("module over HTTP, /artifacts/<ref> (curl, the {mib} MiB layer)", S.ARTIFACT_OURS,
          S.HIT_HTTP_PLAIN, "plain nginx sendfile", Bar(">=", 0.95)),
    Ratio("manifest hit (wrk -t2 -c32)", S.MANIFEST_OURS, S.MANIFEST_PLAIN,
          "plain nginx static", Bar(">=", 0.5)),
    Ratio("blob HEAD hit (ab -i -k -c32)", S.HEAD_OURS, S.HEAD_PLAIN,
          "plain nginx HEAD", Bar(">=", 0.9)),
    Ratio("cold pull, skopeo", S.COLD_SKOPEO_OURS, S.COLD_SKOPEO_DIRECT,
          "upstream direct", Bar("<=", 1.15)),
    Ratio("cold pull, skopeo", S.COLD_SKOPEO_OURS, S.COLD_SKOPEO_PEER,
          "distribution proxy cold", FASTER),
    Ratio("cold blob, curl", S.COLD_CURL_OURS, S.COLD_CURL_DIRECT,
          "upstream direct (token + redirect)", Bar("<=", 1.15)),
    Ratio("cold blob, curl", S.COLD_CURL_OURS, S.COLD_CURL_PEER,
          "distribution proxy cold", FASTER),
    Ratio("warm pull, skopeo", S.WARM_OURS, S.WARM_PEER,
          "distribution proxy warm", Bar("<=", 0.6)),
    Ratio("warm blob, curl", S.WARM_CURL_OURS, S.WARM_CURL_PEER,
          "distribution proxy warm", None),
    Absolute(f"{CLIENTS} clients miss one blob: upstream GETs", "exactly 1", _upstream_gets),
    Ratio(f"{CLIENTS} clients miss one blob: wall time", S.CONCURRENT_WALL, S.COLD_CURL_OURS,
          "one client alone", Bar("<=", 1.3)),
    Ratio(f"cold blob, curl, upstream CDN at {LINK_NAME}", S.LINK_COLD_OURS,
          S.LINK_COLD_DIRECT, "upstream direct, same link", Bar("<=", 1.15)),
    Ratio(f"{CLIENTS} clients miss one blob, upstream CDN at {LINK_NAME}: wall time",
          S.LINK_CONCURRENT_WALL, S.LINK_COLD_OURS, "one client alone, same link",
          Bar("<=", 1.3)),
    Ratio(f"{CLIENTS} clients miss one blob: wall time vs the same as hits",
          S.CONCURRENT_WALL, S.CONCURRENT_PLAIN_HIT_WALL,
          f"{CLIENTS} clients, plain nginx hits", None),
    Ratio("offline pull (stale tag, upstream stopped)", S.OFFLINE_STALE, S.ONLINE_STALE,
          "same pull online", Bar("<=", 1.1)),
    Ratio("offline pull, timeouts (stale tag, upstream drops packets)", S.OFFLINE_DROP,
          S.ONLINE_STALE, "same pull online", Bar("<=", 1.1)),
    Ratio("first offline pull, timeouts (waits timeouts.stale_budget once)",
          S.OFFLINE_DROP_FIRST, S.ONLINE_STALE, "same pull online", None),
    Absolute("fetcher peak RSS (cold + concurrent)", f"<= {RSS_LIMIT // MIB} MiB", _peak_rss),
    Ratio("blob hit through https_proxy (CONNECT front, curl, {mib} MiB)", S.HIT_FRONT_OURS,
          S.HIT_HTTPS_PLAIN, "plain nginx TLS", Bar(">=", 0.85)),
    Absolute("front CPU per GiB (serve process, utime+stime)",
             f"<= {FRONT_CPU_LIMIT:g} s/GiB", _front_cpu_per_gib),
    Ratio(f"new connection per request through CONNECT (manifest, {CONN_WORKERS} threads)",
          S.CONN_FRONT, S.CONN_PLAIN, "plain nginx TLS, new connection each", Bar(">=", 0.8)),
    Ratio("new connection per request, one at a time: latency", S.CONN1_FRONT, S.CONN1_PLAIN,
          "plain nginx TLS", None),
    Absolute("front CPU per new connection (serve process)", "(info)",
             _front_cpu_per_connection),
    Ratio("manifest hit, mirror_auth on (anonymous, public; wrk -t2 -c32)", S.MANIFEST_AUTH_ON,
          S.MANIFEST_AUTH_OFF, "mirror_auth off", Bar(">=", 0.9)),
    Ratio("blob HEAD hit, mirror_auth on (anonymous, public; ab -i -k -c32)", S.HEAD_AUTH_ON,
          S.HEAD_AUTH_OFF, "mirror_auth off", Bar(">=", 0.9)),
    Ratio("blob HEAD hit, mirror_auth on: nginx CPU per request (utime+stime)",
          S.HEAD_AUTH_ON_CPU, S.HEAD_AUTH_OFF_CPU, "mirror_auth off", None),
    Ratio("private manifest hit through https_proxy, verdict cached: latency", S.PRIVATE_HIT,
          S.PUBLIC_HIT, "public manifest hit, same tunnel", None),
    Absolute(f"{MQTT_DEVICES} devices ask for one {MQTT_MODULE_MIB} MiB module at once "
             "over MQTT: wall time", "(info)", _mqtt_wall),
    Ratio(f"push one image (2 x {PUSH_BASE_MIB} MiB base layers + a small one), skopeo: "
          "wall time", S.PUSH_FIRST_OURS, S.PUSH_FIRST_DIRECT, "pushing directly",
          Bar("<=", 1.1)),
    Ratio(f"push {PUSH_IMAGES} images sharing 2 x {PUSH_BASE_MIB} MiB base layers, "
          f"{PUSHERS} skopeo pushers: wall time", S.PUSH_BATCH_OURS, S.PUSH_BATCH_DIRECT,
          "pushing directly", FASTER),
    Absolute(f"push {PUSH_IMAGES} images sharing base layers: bytes the registry received "
             "through cr-proxy", f"<= {PUSH_BYTES_LIMIT:g}x the distinct blobs", _push_bytes),
    Ratio("push one {mib} MiB layer, skopeo: throughput", S.PUSH_BIG_OURS, S.PUSH_BIG_DIRECT,
          "pushing directly", Bar(">=", 0.9)),
    Absolute("push one big layer: serve process CPU per GiB (utime+stime)", "(info)",
             _push_cpu_per_gib),
    Ratio("pull the just-pushed {mib} MiB layer back, curl: first hit (from the disk)",
          S.PUSH_PULLBACK_FIRST, S.PUSH_PULLBACK_AGAIN, "the same hit again (page cache)",
          None),
    Absolute(f"{MQTT_DEVICES} devices, one {MQTT_MODULE_MIB} MiB module over MQTT: "
             "payload bytes the broker sent", f"<= {MQTT_BYTES_LIMIT:g}x the floor", _mqtt_bytes),
)


def rows(results: Results, mib: int) -> list[Row]:
    """The table, one row per case, in CASES' order."""
    return [case.row(results, mib) for case in CASES]


def sample_lines(results: Results) -> list[str]:
    """Every sample, series by series in the order first measured, then the tallies."""
    lines = []
    for series, values in results.samples.items():
        scale, label = series.unit.scale, series.unit.label
        shown = ", ".join(f"{v / scale:,.2f}" for v in values)
        lines.append(f"{series.key} ({label}, median {median(values) / scale:,.2f}): {shown}")
    if results.front_cpu:
        lines.append("front CPU per transfer (s, serve process): "
                     + ", ".join(f"{c:.2f}" for c, _ in results.front_cpu))
    if results.push_cpu:
        lines.append("serve CPU per big-layer push (s, serve process): "
                     + ", ".join(f"{c:.2f}" for c, _ in results.push_cpu))
    if results.conn_cpu:
        lines.append("front CPU per new-connection run (s / connections): "
                     + ", ".join(f"{c:.2f}/{n}" for c, n in results.conn_cpu))
    for label, values in results.rss.items():
        lines.append(f"peak RSS {label} (MiB): " + ", ".join(f"{v / MIB:.1f}" for v in values))
    return lines
