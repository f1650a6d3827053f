"""`make profile`: where the time goes in the cases where `make bench` misses
its bar. The same set-up as the bench (bench.run.Bench: the Docker-Hub-like
upstream, a warm cr-proxy with its CONNECT front, a plain nginx, the peer),
then each case once more under two profilers:

* `perf record -a` (the whole machine): the share of CPU samples per process
  name (nginx, python = cr-proxy's serve, curl, skopeo, swapper = idle) and
  the hottest symbols, kernel ones included (copies show as _copy_to_iter /
  _copy_from_iter);
* `py-spy record --gil` on the `cr-proxy serve` process: only samples where
  a thread holds the GIL, so the functions listed are Python CPU time.

    python -m bench.profile [--blob-mib N] [--write docs/profiles.md] [--work DIR]

Needs perf (Debian: linux-perf) and py-spy (pip), and root or
kernel.perf_event_paranoid <= 0 for `perf -a`. Loopback only, like the bench.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import measure
from bench.cases import CLIENTS, CONN_WORKERS
from bench.run import DEFAULT_WORK, WORK_MARK, Bench, Plan, machine_facts
from testbed.registry import Upstream

ROOT = Path(__file__).resolve().parent.parent
PY_SPY = Path(sys.executable).parent / "py-spy"
SPY_RATE = 500  # samples per second
PERF_FREQ = 999  # samples per second per CPU
TOP = 12  # lines per listing
STARTUP = 0.5  # seconds a profiler gets to attach before the workload starts


@dataclass
class Profile:
    case: str
    command: str  # what ran, in words
    seconds: float
    comms: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    python: list[str] = field(default_factory=list)


@contextlib.contextmanager
def recording(cmd: list[str]) -> Iterator[None]:
    """A profiler running around the block; SIGINT makes it write its file."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(STARTUP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def perf_all(out: Path) -> contextlib.AbstractContextManager[None]:
    return recording(["perf", "record", "-a", "-F", str(PERF_FREQ), "-o", str(out)])


def py_spy(pid: int, out: Path) -> contextlib.AbstractContextManager[None]:
    return recording([str(PY_SPY), "record", "-p", str(pid), "-r", str(SPY_RATE), "--gil",
                      "--nonblocking", "-f", "raw", "-o", str(out)])


def perf_lines(data: Path, sort: str, limit: float) -> list[str]:
    """perf report's listing as CPU-seconds (samples / PERF_FREQ), idle
    (swapper) left out: the recording also spans the profilers' start."""
    proc = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "-n",
         "--sort", sort, "--percent-limit", str(limit)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    lines = []
    for line in proc.stdout.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 3 or not fields[1].isdigit() or fields[2].startswith("swapper"):
            continue
        lines.append(f"{int(fields[1]) / PERF_FREQ:7.2f} CPU-s  {fields[2]}")
    return lines[:TOP]


def spy_lines(raw: Path) -> list[str]:
    """py-spy's raw output (one `frame;frame;... count` per line): the
    functions with the most samples of their own, then the most inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return ["(py-spy wrote nothing)"]
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    if not total:
        return ["(no samples held the GIL)"]
    out = [f"{total} samples holding the GIL ({total / SPY_RATE:.2f} s of Python CPU)",
           "own:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(TOP)]
    out.append("inclusive (outside asyncio's own loop frames):")
    skip = ("run_forever", "run_until_complete", "_run_once", "Handle._run", "cmd_serve",
            "main (", "<module>", "_run_code", "_run_module_as_main", "Runner.run", "run (")
    shown = [(f, n) for f, n in inclusive.most_common() if not any(s in f for s in skip)]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in shown[:TOP]]
    return out


class Profiler:
    def __init__(self, bench: Bench, work: Path) -> None:
        self.bench = bench
        self.work = work
        self.profiles: list[Profile] = []

    def run(self, case: str, command: str, pid: int, workload: Callable[[], None]) -> None:
        name = str(len(self.profiles))
        perf_data, spy_raw = self.work / f"{name}.perf", self.work / f"{name}.spy"
        os.sync()
        with perf_all(perf_data), py_spy(pid, spy_raw):
            t0 = time.perf_counter()
            workload()
            seconds = time.perf_counter() - t0
        self.profiles.append(Profile(
            case, command, seconds,
            comms=perf_lines(perf_data, "comm", 0.2),
            # By object too: libcrypto (sha256) has no symbols to add up.
            objects=perf_lines(perf_data, "comm,dso", 0.5),
            symbols=perf_lines(perf_data, "comm,dso,sym", 0.3),
            python=spy_lines(spy_raw),
        ))
        print(f"profiled: {case} ({seconds:.2f} s)", flush=True)

    def all_cases(self) -> None:
        b = self.bench
        size = b.image.big_size
        hot_pid = _pid(b.hot.proc)

        with b._cold_crproxy("profile") as proxy:
            self.run("cold blob, one client", f"curl of the {b.plan.blob_mib} MiB blob through "
                     "a cold cr-proxy (mirror, HTTP)", _pid(proxy.proc),
                     lambda: measure.curl(b._mirror_blob(proxy), expect_size=size))
        with b._cold_crproxy("profile") as proxy:
            self.run(f"{CLIENTS} clients miss one blob", f"{CLIENTS} curls of the blob at once "
                     "through a cold cr-proxy", _pid(proxy.proc),
                     lambda: measure.curl_many(b._mirror_blob(proxy), CLIENTS, size))
        path = b._manifest_path()
        self.run("new connection per request through the front",
                 f"bench.connload, {CONN_WORKERS} threads, 1500 GETs of the manifest, each a "
                 "new TCP connection + CONNECT + TLS handshake", hot_pid,
                 lambda: measure.connload(
                     f"127.0.0.1:{b.hot.proxy_port}", Upstream.registry_name, path,
                     b.hot.ca_cert, proxy=True, count=1500, workers=CONN_WORKERS,
                     expect_size=b.manifest_size))
        manifest = f"http://{b.hot.http}/v2/registry.test/bench/big/manifests/v1"
        self.run("manifest hits", "wrk -t2 -c32 -d3s on the manifest by tag (nginx + njs)",
                 hot_pid, lambda: measure.wrk(manifest, 3))
        self.run("blob hits through the front", f"3 curls of the {b.plan.blob_mib} MiB blob "
                 "through the CONNECT front", hot_pid,
                 lambda: [measure.curl(b._front_blob(), "--cacert", str(b.hot.ca_cert),
                                       proxy=b.front, expect_size=size) for _ in range(3)])
        self.run("warm pull, skopeo", "skopeo copy of the image from the warm cr-proxy",
                 hot_pid, lambda: b._timed_pull(f"{b.hot.http}/registry.test/bench/big:v1"))


def _pid(proc: subprocess.Popen[bytes] | None) -> int:
    assert proc is not None
    return proc.pid


def markdown(profiles: list[Profile], facts: dict[str, str], started: str) -> str:
    lines = [
        "# Profiles",
        "",
        f"Made {started} by `make profile` (`python -m bench.profile`), on the `make bench` "
        "set-up; what each case ran is under its heading. Read with docs/benchmarks.md, "
        "whose \"What limits the misses\" section draws on these.",
        "",
        f"Machine: {facts['cpu']}, {facts['memory']}, kernel {facts['kernel']}.",
        "",
        "`perf record -a` samples every CPU, so the first listing is the machine's CPU "
        "time per process name while the case ran (idle left out; `cr-proxy` is `cr-proxy "
        "serve`, `python` the bench's own clients such as bench.connload; `py-spy` is "
        "the profiler). "
        "`py-spy --gil` samples the serve process only while a thread holds the GIL: "
        "Python CPU time, by function.",
        "",
    ]
    for p in profiles:
        lines += [
            f"## {p.case}", "",
            f"{p.command}; {p.seconds:.2f} s.", "",
            "CPU-seconds by process (perf):", "", "```", *p.comms, "```", "",
            "By process and object (perf; the kernel is [kernel.kallsyms], sha256 is in "
            "libcrypto):", "", "```", *p.objects, "```", "",
            "Hottest symbols (perf, process / object / symbol):", "", "```", *p.symbols,
            "```", "",
            "Python in the serve process (py-spy --gil):", "", "```", *p.python, "```", "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--blob-mib", type=int, default=256)
    parser.add_argument("--write", metavar="FILE", help="write the profiles as Markdown")
    parser.add_argument("--work", metavar="DIR", default=str(DEFAULT_WORK) + "-profile")
    args = parser.parse_args(argv)
    for tool, hint in (("perf", "apt-get install linux-perf"), (str(PY_SPY), "pip install py-spy")):
        if not shutil.which(tool):
            print(f"{tool} not found: {hint}", file=sys.stderr)
            return 2
    work = Path(args.work).resolve()
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARK).exists():
        print(f"{work} is not empty and not a bench work directory: not touching it")
        return 2
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARK).touch()
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    plan = Plan(blob_mib=args.blob_mib, reps=1, hit_inner=1, wrk_seconds=3, conn_count=500)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with contextlib.ExitStack() as stack:
            bench = Bench(plan, work, stack)
            bench.setup()
            profiler = Profiler(bench, work)
            profiler.all_cases()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(profiler.profiles, machine_facts(), started)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
