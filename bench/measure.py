"""One measurement each: curl, wrk, skopeo, peak RSS. Every client is a real
tool run as a subprocess with a timeout, against 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from testbed.crproxy import clean_env, skopeo_pull

CURL_TIMEOUT = 300
WRK_GRACE = 30
CURL_FORMAT = "%{http_code} %{size_download} %{speed_download} %{time_total}"


class BenchError(RuntimeError):
    pass


@dataclass
class Curl:
    status: int
    size: int
    speed: float  # bytes/s as curl measured it (body bytes / transfer time)
    time_total: float
    wall: float  # seconds around the whole process


def _route(proxy: str | None) -> list[str]:
    """Straight to the server, or (proxy: "http://host:port") through an
    http proxy, which curl asks with CONNECT for an https:// URL."""
    return ["--proxy", proxy] if proxy else ["--noproxy", "*"]


def _curl_cmd(url: str, extra: list[str], proxy: str | None = None) -> list[str]:
    return ["curl", "-s", "-o", "/dev/null", *_route(proxy), "-w", CURL_FORMAT,
            *extra, url]


def _parse_curl(out: str, wall: float, url: str) -> Curl:
    try:
        status, size, speed, total = out.split()[:4]
        return Curl(int(status), int(size), float(speed), float(total), wall)
    except ValueError as err:
        raise BenchError(f"curl {url}: unexpected output {out!r}") from err


def curl(url: str, *extra: str, expect_size: int | None = None, proxy: str | None = None,
         request_type: str | None = None) -> Curl:
    """GET url into /dev/null; fails unless 200 (and the size, if given; and,
    if given, cr-proxy's X-CR-Request-Type: `blob` is an nginx hit, `blob-fetch`
    a miss handed to the fetcher)."""
    cmd = _curl_cmd(url, list(extra), proxy)
    if request_type is not None:
        cmd[cmd.index(CURL_FORMAT)] = CURL_FORMAT + " [%header{x-cr-request-type}]"
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=CURL_TIMEOUT,
        env=clean_env(), stdin=subprocess.DEVNULL, check=False,
    )
    wall = time.perf_counter() - t0
    result = _parse_curl(proc.stdout, wall, url)
    _check(result, url, expect_size, proc.stderr)
    if request_type is not None:
        got = proc.stdout.rpartition("[")[2].rstrip("]")
        if got != request_type:
            raise BenchError(f"curl {url}: X-CR-Request-Type {got!r}, wanted {request_type!r}")
    return result


def _check(result: Curl, url: str, expect_size: int | None, stderr: str = "") -> None:
    if result.status != 200 or (expect_size is not None and result.size != expect_size):
        raise BenchError(
            f"curl {url}: status {result.status}, {result.size} bytes "
            f"(wanted 200, {expect_size}) {stderr.strip()}"
        )


def curl_many(url: str, clients: int, expect_size: int) -> tuple[float, list[Curl]]:
    """`clients` curls of url started together; (wall time until the last is
    done, each one's result). Every one must get the whole body."""
    procs: list[subprocess.Popen[str]] = []
    t0 = time.perf_counter()
    try:
        for _ in range(clients):
            procs.append(subprocess.Popen(
                _curl_cmd(url, []), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=clean_env(), stdin=subprocess.DEVNULL,
            ))
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=CURL_TIMEOUT)
            outs.append((out, err))
        wall = time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
    results = []
    for out, err in outs:
        result = _parse_curl(out, wall, url)
        _check(result, url, expect_size, err)
        results.append(result)
    return wall, results


def headers(url: str, *extra: str, proxy: str | None = None) -> dict[str, str]:
    """The response headers of a HEAD (lower-case names)."""
    proc = subprocess.run(
        ["curl", "-s", "-I", *_route(proxy), *extra, url], capture_output=True, text=True,
        timeout=60, env=clean_env(), stdin=subprocess.DEVNULL, check=False,
    )
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    status = proc.stdout.split(" ", 2)[1] if proc.stdout.startswith("HTTP/") else "?"
    out[":status"] = status
    return out


def curl_latencies(url: str, count: int, *extra: str, proxy: str | None = None) -> list[float]:
    """`count` GETs of url by one curl, which keeps its connection (its
    CONNECT tunnel too) between them: each one's seconds. Each must be a 200."""
    cmd = ["curl", "-s", *_route(proxy), "-w", "%{http_code} %{time_total}\n", *extra]
    for _ in range(count):
        cmd += ["-o", "/dev/null", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CURL_TIMEOUT,
                          env=clean_env(), stdin=subprocess.DEVNULL, check=False)
    answers = [line.split() for line in proc.stdout.splitlines()]
    if len(answers) != count or any(status != "200" for status, _ in answers):
        raise BenchError(f"curl {url} x{count}: {proc.stdout[-300:]!r} {proc.stderr.strip()}")
    return [float(seconds) for _, seconds in answers]


def bearer_token(token_url: str, repo: str) -> str:
    """An anonymous pull token from the upstream's token server (loopback)."""
    query = urllib.parse.urlencode({"service": "registry.test", "scope": f"repository:{repo}:pull"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{token_url}?{query}", timeout=30) as resp:
        return json.load(resp)["token"]


@dataclass
class Wrk:
    rps: float
    requests: int
    bad: int  # non-2xx/3xx answers plus socket errors


def _load(cmd: list[str], url: str, duration: float, rps_pattern: str,
          total_pattern: str) -> tuple[str, float, int]:
    """Run a load tool on url; (its output, requests/s, requests), or BenchError."""
    proc = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=duration + WRK_GRACE,
        env=clean_env(), stdin=subprocess.DEVNULL, check=False,
    )
    out = proc.stdout
    rps, total = re.search(rps_pattern, out), re.search(total_pattern, out)
    if proc.returncode != 0 or rps is None or total is None:
        raise BenchError(f"{' '.join(cmd)} {url} failed:\n{out}\n{proc.stderr}")
    return out, float(rps.group(1)), int(total.group(1))


def wrk(url: str, duration: float, threads: int = 2, connections: int = 32) -> Wrk:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s"]
    out, rps, total = _load(cmd, url, duration, r"Requests/sec:\s+([\d.]+)",
                            r"(\d+) requests in")
    bad = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        bad += int(non2xx.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        bad += sum(int(n) for n in errors.groups())
    return Wrk(rps, total, bad)


def ab_head(url: str, duration: float, connections: int = 32) -> Wrk:
    """HEAD requests per second with ApacheBench (`ab -i -k`).

    Not wrk: wrk 4.1 (Debian's) has no on_headers_complete callback, so its
    parser waits for the body a HEAD answer's Content-Length announces and
    never counts a single HEAD of a non-empty blob (0 requests/s against any
    server). ab is single-threaded: one client core, for both sides alike.
    """
    # -t alone caps at 50000 requests; a large -n after it lifts that.
    cmd = ["ab", "-q", "-i", "-k", "-c", str(connections), "-t", f"{duration:g}", "-n", "100000000"]
    out, rps, total = _load(cmd, url, duration, r"Requests per second:\s+([\d.]+)",
                            r"Complete requests:\s+(\d+)")
    bad = sum(int(m) for m in re.findall(r"(?:Failed requests|Non-2xx responses):\s+(\d+)", out))
    return Wrk(rps, total, bad)


def skopeo_time(source: str, dest: Path, cert_dir: Path | None = None) -> float:
    """Seconds for `skopeo copy docker://source oci:dest` (testbed.crproxy.skopeo_pull);
    the pulled layout is deleted afterwards by the caller."""
    t0 = time.perf_counter()
    result = skopeo_pull(source, dest, cert_dir=cert_dir)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(f"skopeo pull of {source} failed:\n{result.stderr[-2000:]}")
    return elapsed


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a live process, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM for pid {pid}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, all its threads (the exited ones too),
    in seconds; resolution 1/CLK_TCK (10 ms), so sum many transfers."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def tree_cpu(root: int, child: str | None = None) -> float:
    """utime + stime of `root` and every live process below it, in seconds;
    with `child`, of root's children of that name (nginx, under `cr-proxy
    serve`) and every process below them."""
    children: dict[int, list[tuple[int, str, float]]] = defaultdict(list)
    own = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name, _, rest = text.partition("(")[2].rpartition(")")
        fields = rest.split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if int(entry) == root:
            own = cpu
        children[int(fields[1])].append((int(entry), name, cpu))
    if child is None:
        total, todo = own, [root]
    else:
        tops = [(pid, cpu) for pid, name, cpu in children[root] if name == child]
        total, todo = sum(cpu for _, cpu in tops), [pid for pid, _ in tops]
    while todo:
        for pid, _, cpu in children.get(todo.pop(), []):
            total += cpu
            todo.append(pid)
    return total


@dataclass
class ConnLoad:
    rps: float
    count: int
    wall: float
    request_type: str


def connload(connect: str, host: str, path: str, cafile: Path, *, proxy: bool, count: int,
             workers: int, expect_size: int | None = None) -> ConnLoad:
    """bench.connload in its own process: `count` GETs, a new TCP connection
    (and CONNECT, through a proxy) and a full TLS handshake each."""
    cmd = [sys.executable, "-m", "bench.connload", "--connect", connect, "--host", host,
           "--path", path, "--cafile", str(cafile), "--count", str(count),
           "--workers", str(workers)]
    if proxy:
        cmd.append("--proxy")
    if expect_size is not None:
        cmd += ["--expect-size", str(expect_size)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=CURL_TIMEOUT, env=clean_env(),
        stdin=subprocess.DEVNULL, check=False, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        out = json.loads(proc.stdout)
    except ValueError as err:
        raise BenchError(
            f"connload {connect} {path}: {proc.stdout!r} {proc.stderr[-2000:]}"
        ) from err
    if proc.returncode != 0 or out["bad"]:
        raise BenchError(f"connload {connect} {path}: {out['bad']} of {out['count']} failed, "
                         f"first: {out['first_error']}")
    return ConnLoad(out["rps"], out["ok"], out["wall"], out["request_type"])
