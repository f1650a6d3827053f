"""download.hold, A/B: one cold cr-proxy after another, held (`--hold`,
default 1 s) against streamed (hold 0), on one 256 MiB blob of the testbed
upstream on loopback; one client, then 16 at once, `--rounds` times,
interleaved. Prints each round's wall time, the CPU-seconds of the
cr-proxy process tree (serve and its nginx) and of the curls, and how the
blob's answers went out (the access log's types: blob-fetch streamed,
blob-held sent by nginx from the verified file), then the medians.

CPU-seconds say more than wall time on a busy machine: they are what a
held answer saves (nginx's copy of the fetcher's stream per client).

    python -m bench.hold_ab [--rounds 3] [--hold 1] [--clients 16]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import measure
from bench.report import MIB
from bench.run import REPO, TAG, big_layer
from testbed.crproxy import CrProxy
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream


def answer_types(cr: CrProxy, at_least: int) -> dict[str, int]:
    lines = cr.access_lines("/blobs/", at_least)
    return dict(collections.Counter(line.split("type=")[1].split()[0] for line in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cr-proxy-hold-ab-"))
    results: dict[tuple[float, int], list[tuple[float, float, float]]] = {}
    try:
        with Upstream(work / "upstream") as up:
            endpoints = {**up.endpoints, "registry-1.docker.io": up.registry_url}
            info = build_image(work / "layout", tag=TAG, layers=[
                big_layer(256 * MIB, seed=256), tar_layer({"etc/bench.txt": b"hold\n"})])
            up.push(work / "layout", TAG, REPO, TAG)
            big = info.layer_digests[0]
            for n in range(args.rounds):
                for hold in (0.0, args.hold):
                    for clients in (1, args.clients):
                        cr = CrProxy(work / f"cr-{n}-{hold}-{clients}", endpoints,
                                     download={"hold": hold}, log_level="info")
                        with cr:
                            assert cr.proc is not None
                            url = f"http://{cr.http}/v2/registry.test/{REPO}/blobs/{big}"
                            cpu0 = measure.tree_cpu(cr.proc.pid)
                            kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                            wall, _ = measure.curl_many(url, clients, info.sizes[big])
                            cpu = measure.tree_cpu(cr.proc.pid) - cpu0
                            kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                            curls = (kids1.ru_utime + kids1.ru_stime
                                     - kids0.ru_utime - kids0.ru_stime)
                            results.setdefault((hold, clients), []).append((wall, cpu, curls))
                            print(f"round {n + 1}: hold {hold:g} s, {clients} client(s): wall "
                                  f"{wall:.2f} s, cr-proxy {cpu:.2f} CPU-s, curls {curls:.2f} "
                                  f"CPU-s, {answer_types(cr, clients)}, load "
                                  f"{os.getloadavg()[0]:.1f}", flush=True)
                        shutil.rmtree(cr.dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for (hold, clients), samples in sorted(results.items()):
        wall, cpu, curls = (statistics.median(s[i] for s in samples) for i in range(3))
        print(f"median, hold {hold:g} s, {clients} client(s): wall {wall:.2f} s, "
              f"cr-proxy {cpu:.2f} CPU-s, curls {curls:.2f} CPU-s")


if __name__ == "__main__":
    main()
