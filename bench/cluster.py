"""`make bench-cluster`: many clients pulling one image through three
sibling nodes (cluster.peers) against through one node alone.

It builds testbed/cluster.py's bed (network namespaces made here and
removed again, also on an error or Ctrl-C: Docker Hub by its real names as
the upstream, the nodes on a bridge, the clients in a namespace of their
own; nothing leaves the machine), pushes one image of incompressible
layers, then for each setup, on fresh caches:

* one node: one `cr-proxy serve`, no cluster; every client pulls through it;
* three nodes: three `cr-proxy serve` listing each other; client i pulls
  through node i % 3.

Each setup runs a cold round (empty caches, every client at once) and a
warm one. Clients are skopeo (`copy --preserve-digests`, every blob
verified by skopeo itself), all started together; the table shows the
round's wall time, the aggregate throughput (image bytes x clients / wall
time) and the upstream's GETs per blob (its CDN's access log: a cold round
must cost exactly one per blob, a warm one none). The exit status is 1 if
a pull failed or a blob's count is off.

    python -m bench.cluster [--clients 48] [--layers 4] [--layer-mib 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from testbed.cluster import ClusterBed
from testbed.crproxy import CrProxy
from testbed.oci_layout import ImageInfo, big_file_layer, build_image

MIB = 1 << 20
REPO = "library/bench"
PULL_TIMEOUT = 900.0


@dataclass
class Round:
    setup: str
    round: str
    seconds: float
    mib_per_s: float
    gets_per_blob: tuple[int, int]  # min, max over the image's blobs
    failed: int

    @property
    def ok(self) -> bool:
        want = 1 if self.round == "cold" else 0
        return self.failed == 0 and self.gets_per_blob == (want, want)


class Bench:
    def __init__(self, net: ClusterBed, work: Path, image: ImageInfo, image_bytes: int,
                 clients: int) -> None:
        self.net = net
        self.work = work
        self.image = image
        self.image_bytes = image_bytes
        self.clients = clients

    @property
    def blobs(self) -> list[str]:
        return [self.image.config_digest, *self.image.layer_digests]

    def pull(self, proxy: CrProxy, dest: Path) -> bool:
        result = self.net.client(
            "skopeo", "copy", "--preserve-digests", "--retry-times", "0",
            "--src-tls-verify=false", f"docker://{proxy.http}/docker.io/{REPO}:v1",
            f"oci:{dest}:pulled", timeout=PULL_TIMEOUT)
        if result.returncode != 0:
            print(f"  a pull through {proxy.http} failed: {result.stderr.strip()[-500:]}")
        return result.returncode == 0

    def round(self, setup: str, name: str, proxies: list[CrProxy]) -> Round:
        before = {d: self.net.cdn_gets(d) for d in self.blobs}
        (self.work / "pulls").mkdir(exist_ok=True)
        dests = [self.work / "pulls" / f"{setup.replace(' ', '-')}-{name}-{i}"
                 for i in range(self.clients)]
        start = time.monotonic()
        with ThreadPoolExecutor(self.clients) as pool:
            done = list(pool.map(lambda i: self.pull(proxies[i % len(proxies)], dests[i]),
                                 range(self.clients)))
        seconds = time.monotonic() - start
        gets = [self.net.cdn_gets(d) - before[d] for d in self.blobs]
        shutil.rmtree(self.work / "pulls", ignore_errors=True)
        pulled = self.image_bytes * done.count(True)
        row = Round(setup, name, seconds, pulled / MIB / seconds,
                    (min(gets), max(gets)), done.count(False))
        print(f"  {setup}, {name}: {seconds:.1f} s, {row.mib_per_s:.0f} MiB/s, "
              f"upstream GETs per blob {gets}")
        return row

    def setup(self, name: str, proxies: list[CrProxy]) -> list[Round]:
        for proxy in proxies:
            proxy.start()
        try:
            return [self.round(name, "cold", proxies), self.round(name, "warm", proxies)]
        finally:
            for proxy in proxies:
                proxy.stop()


def table(rows: list[Round], clients: int, image_bytes: int) -> str:
    lines = [f"{clients} clients (skopeo) pulling one image of {image_bytes / MIB:.1f} MiB",
             "",
             "| setup | round | wall time | aggregate | upstream GETs per blob | |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row.gets_per_blob
        gets = str(low) if low == high else f"{low}..{high}"
        verdict = ("ok" if row.ok else f"WRONG ({row.failed} pulls failed)" if row.failed
                   else "WRONG")
        lines.append(f"| {row.setup} | {row.round} | {row.seconds:.1f} s | "
                     f"{row.mib_per_s:.0f} MiB/s | {gets} | {verdict} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path, say: Callable[[str], None] = print) -> bool:
    with ClusterBed(work / "bed") as net:
        layout = work / "layout"
        image = build_image(layout, layers=[big_file_layer(args.layer_mib * MIB, seed)
                                            for seed in range(args.layers)], tag="v1")
        net.push(layout, "v1", REPO, "v1")
        blobs = layout / "blobs" / "sha256"
        image_bytes = sum(f.stat().st_size for f in blobs.iterdir())
        bench = Bench(net, work, image, image_bytes, args.clients)
        say(f"bench-cluster: {args.clients} clients, {len(bench.blobs)} blobs, "
            f"{image_bytes / MIB:.1f} MiB, work in {work}")
        single = net.crproxy(work / "single", ns=net.node_ns[0],
                             address=net.node_addresses[0])
        rows = bench.setup("one node", [single])
        rows += bench.setup("three nodes", net.nodes(work / "cluster"))
    say("")
    say(table(rows, args.clients, image_bytes))
    return all(row.ok for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=int, default=8)
    parser.add_argument("--work", type=Path, help="kept afterwards (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the bed's namespaces and processes go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return 0 if run(args, args.work.resolve()) else 1
    with tempfile.TemporaryDirectory(prefix="cr-bench-cluster-") as tmp:
        return 0 if run(args, Path(tmp)) else 1


if __name__ == "__main__":
    sys.exit(main())
