"""A cold blob miss through two cr-proxy code trees and through CNCF
distribution's proxy, in one sitting, interleaved: a change to the miss
path judged side by side.

`make bench`'s cold rows compare cr-proxy with distribution's proxy, one
case after another; on a shared 2-core machine their ratios drift with the
load and with which memory the kernel hands out (docs/performance.md,
"Session 10") more than a change to the miss path moves them. Here each
round starts a cold cr-proxy of the base (a git revision, exported and run
with PYTHONPATH pointing there), a cold one of the working tree and a cold
distribution proxy, one after another (the order reversed every other
round), and has `--clients` curls fetch the 256 MiB blob through each.
Per miss: wall time, and the CPU-seconds of the server's process tree
(cr-proxy serve and its nginx; the registry process).

    python -m bench.miss_ab --base REV [--rounds N] [--clients N]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import measure
from bench.procs import PeerRegistry
from bench.push_ab import export
from bench.report import MIB
from bench.run import REPO, TAG, big_layer, in_turn, settle_disk
from testbed.crproxy import CrProxy
from testbed.oci_layout import build_image, tar_layer
from testbed.registry import Upstream

SIDES = ("base", "new", "distribution")


class Rounds:
    def __init__(self, work: Path, up: Upstream, base: Path, digest: str, size: int,
                 clients: int) -> None:
        self.work, self.up, self.base = work, up, base
        self.digest, self.size, self.clients = digest, size, clients
        self.walls: dict[str, list[float]] = {side: [] for side in SIDES}
        self.cpus: dict[str, list[float]] = {side: [] for side in SIDES}
        self._serial = 0

    @contextlib.contextmanager
    def _server(self, side: str) -> Iterator[tuple[str, int]]:
        """A cold server of `side`: (the blob's URL, the pid whose tree to count)."""
        self._serial += 1
        where = self.work / f"{side}-{self._serial}"
        try:
            if side == "distribution":
                with PeerRegistry(where, self.up.proxy_url,
                                  f"http://{Upstream.registry_name}") as peer:
                    assert peer.proc is not None
                    yield f"http://{peer.http}/v2/{REPO}/blobs/{self.digest}", peer.proc.pid
            else:
                env = {"PYTHONPATH": str(self.base)} if side == "base" else {}
                with CrProxy(where, self.up.endpoints, env=env, log_level="info") as proxy:
                    assert proxy.proc is not None
                    yield (f"http://{proxy.http}/v2/{Upstream.registry_name}/{REPO}/blobs/"
                           f"{self.digest}", proxy.proc.pid)
        finally:
            shutil.rmtree(where, ignore_errors=True)

    def miss(self, side: str) -> None:
        with self._server(side) as (url, pid):
            settle_disk()
            cpu = measure.tree_cpu(pid)
            wall, _ = measure.curl_many(url, self.clients, self.size)
            self.cpus[side].append(measure.tree_cpu(pid) - cpu)
            self.walls[side].append(wall)

    def report(self) -> list[str]:
        walls = {side: statistics.median(v) for side, v in self.walls.items()}
        lines = [f"{side}: wall median {walls[side]:.3f} s ("
                 + ", ".join(f"{w:.2f}" for w in self.walls[side])
                 + f"), server CPU median {statistics.median(self.cpus[side]):.2f} s ("
                 + ", ".join(f"{c:.2f}" for c in self.cpus[side]) + ")"
                 for side in SIDES]
        for side in ("base", "new"):
            lines.append(f"{side}: {walls[side] / walls['distribution']:.2f}x "
                         "distribution's wall")
        lines.append(f"new vs base: {walls['new'] / walls['base']:.2f}x wall")
        return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.miss_ab",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the base side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--mib", type=int, default=256, help="the blob's size")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-miss-ab-") as tmp:
        work = Path(tmp)
        base = export(args.base, work / "base-tree")
        with Upstream(work / "upstream") as up:
            info = build_image(work / "layout", tag=TAG, layers=[
                big_layer(args.mib * MIB, seed=args.mib), tar_layer({"etc/ab.txt": b"ab\n"})])
            up.push(work / "layout", TAG, REPO, TAG)
            digest = info.layer_digests[0]
            rounds = Rounds(work, up, base, digest, info.sizes[digest], args.clients)
            for round_ in range(args.rounds):
                for side in in_turn(SIDES, round_ + 1):
                    rounds.miss(side)
                print(f"round {round_}: " + ", ".join(
                    f"{side} {rounds.walls[side][-1]:.3f} s / {rounds.cpus[side][-1]:.2f} CPU-s"
                    for side in SIDES), flush=True)
    print("\n".join(rounds.report()))


if __name__ == "__main__":
    main()
