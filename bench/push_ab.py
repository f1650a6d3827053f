"""Pushes through two cr-proxy code trees and straight to the registry, in
one sitting, interleaved: a change to the push path judged side by side.

`make bench`'s push rows compare cr-proxy with pushing directly; on a
shared 2-core machine their ratios drift with the load more than a change
to the push path moves them, between one run and the next. Here the base
(a git revision, exported to a temp directory and run with PYTHONPATH
pointing there) and the working tree serve at the same time, against one
test registry (behind the byte-counting relay, as in bench.run), and each
round pushes a new image through each of them and directly, the order
reversed every other round. Per push: wall time, and the serve process's
CPU (utime+stime).

    python -m bench.push_ab [--base REV] [--floor] [--rounds N] [--mib N | --first]

--first: the first image of a build (2 x 32 MiB base layers and a small
one) instead of one --mib layer. Without --base, only the working tree and
directly. --floor adds two sides that run no cr-proxy code
(bench.procs.PushFloor): a plain nginx configured as cr-proxy's fetch
location in front of a bare aiohttp relay ("floor"), and the same relay
hashing every body as the fetcher does ("floor+hash"). They are what the
architecture (nginx's hop; the SHA-256 of a verified copy) costs on this
machine before any of the fetcher's own work: a ratio no push through
cr-proxy can beat here.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from bench.cases import PUSH_BASE_MIB
from bench.measure import cpu_seconds, tree_cpu
from bench.procs import PushFloor
from bench.report import MIB
from bench.run import ROOT, big_layer, in_turn, settle_disk
from testbed.counting import CountingRelay
from testbed.crproxy import CrProxy
from testbed.oci_layout import build_image
from testbed.pushbatch import Batch, build_batch, push_batch
from testbed.registry import REGISTRY_NAME, Upstream

PUSH_SETTINGS = {"enabled": True, "allow_clients": ["127.0.0.1/32"]}
FLOORS = {"floor": False, "floor+hash": True}  # side -> whether its relay hashes


def export(rev: str, dest: Path) -> Path:
    """cr_proxy/ and nginx/ (its templates) of `rev`, for PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "cr_proxy", "nginx"],
                             capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


class Rounds:
    def __init__(self, work: Path, first: bool, mib: int, sides: tuple[str, ...]) -> None:
        self.work, self.first, self.mib, self.sides = work, first, mib, sides
        self.walls: dict[str, list[float]] = {side: [] for side in sides}
        # side -> CPU-s per push of its relay (serve; the floor's relay), and of its nginx
        self.cpus: dict[str, list[float]] = {s: [] for s in sides if s != "direct"}
        self.nginx_cpus: dict[str, list[float]] = {s: [] for s in sides if s != "direct"}
        self._serial = 0

    def image(self, seed: int) -> Batch:
        """A new image (random layers no registry has seen)."""
        self._serial += 1
        layout = self.work / f"image-{self._serial}"
        if self.first:
            return build_batch(layout, 1, PUSH_BASE_MIB * MIB, seed=seed)
        info = build_image(layout, layers=[big_layer(self.mib * MIB, seed)], tag="i0")
        return Batch(layout, [info], 0)

    def push(self, side: str, round_: int, up: Upstream, relay: CountingRelay,
             proxies: dict[str, CrProxy], floors: dict[str, PushFloor]) -> None:
        batch = self.image(seed=1000 * round_ + self.sides.index(side))
        settle_disk()
        creds = ("--dest-creds", ":".join(up.credentials)) if up.credentials else ()
        try:
            if side == "direct":
                with _through_relay(up, relay):
                    started = time.perf_counter()
                    push_batch(batch, lambda _: f"{REGISTRY_NAME}/ab/direct-{round_}:v1", 1,
                               env=up.skopeo_env(), extra=creds)
                    self.walls[side].append(time.perf_counter() - started)
                return
            if side in floors:
                # skopeo logs in itself, as directly (the registry's token
                # service is reached through the name proxy; Go never
                # proxies the floor's loopback address).
                floor = floors[side]
                assert floor.proc is not None and floor.front.proc is not None
                relay_pid, nginx_cpu = floor.proc.pid, partial(tree_cpu, floor.front.proc.pid)
                dest = f"{floor.http}/ab/{side.replace('+', '')}-{round_}:v1"
                push = partial(push_batch, batch, lambda _: dest, 1, env=up.skopeo_env(),
                               extra=creds)
            else:
                proxy = proxies[side]
                assert proxy.proc is not None
                relay_pid, nginx_cpu = proxy.proc.pid, partial(tree_cpu, proxy.proc.pid, "nginx")
                dest = f"{proxy.http}/{REGISTRY_NAME}/ab/{side}-{round_}:v1"
                push = partial(push_batch, batch, lambda _: dest, 1)
            cpu, nginx = cpu_seconds(relay_pid), nginx_cpu()
            started = time.perf_counter()
            push()
            self.walls[side].append(time.perf_counter() - started)
            self.cpus[side].append(cpu_seconds(relay_pid) - cpu)
            self.nginx_cpus[side].append(nginx_cpu() - nginx)
        finally:
            subprocess.run(["rm", "-rf", str(batch.layout)], check=False)

    def report(self) -> list[str]:
        walls = {side: statistics.median(v) for side, v in self.walls.items()}
        lines = [f"{side}: wall median {walls[side]:.2f} s ("
                 + ", ".join(f"{w:.2f}" for w in self.walls[side]) + ")"
                 + (f", {'relay' if side in FLOORS else 'serve'} CPU median "
                    f"{statistics.median(self.cpus[side]):.2f} s ("
                    + ", ".join(f"{c:.2f}" for c in self.cpus[side]) + ")"
                    f", nginx CPU median {statistics.median(self.nginx_cpus[side]):.2f} s"
                    if side in self.cpus else "")
                 for side in self.sides]
        for side in self.sides:
            if side == "direct":
                continue
            if self.first:
                lines.append(f"{side}: wall {walls[side] / walls['direct']:.2f}x direct's")
            else:
                lines.append(f"{side}: throughput {walls['direct'] / walls[side]:.2f}x direct's "
                             f"({self.mib / walls[side]:.0f} vs {self.mib / walls['direct']:.0f}"
                             " MiB/s)")
        return lines


@contextlib.contextmanager
def _through_relay(up: Upstream, relay: CountingRelay) -> Iterator[None]:
    """skopeo straight to the registry, through the same relay as cr-proxy."""
    real = up.endpoints[REGISTRY_NAME]
    up.endpoints[REGISTRY_NAME] = relay.url
    try:
        yield
    finally:
        up.endpoints[REGISTRY_NAME] = real


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.push_ab",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="git revision of the base side (none: no base side)")
    parser.add_argument("--floor", action="store_true",
                        help="add the floor sides: plain nginx + a bare relay, and hashing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="the big layer's size")
    parser.add_argument("--first", action="store_true",
                        help=f"push 2 x {PUSH_BASE_MIB} MiB base layers + a small one instead")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-push-ab-") as tmp:
        work = Path(tmp)
        sides = (*(("base",) if args.base else ()), "new", "direct",
                 *(FLOORS if args.floor else ()))
        rounds = Rounds(work, args.first, args.mib, sides)
        with Upstream(work / "upstream") as up:
            host, port = up.registry_url.removeprefix("http://").rsplit(":", 1)
            with CountingRelay(host, int(port)) as relay, contextlib.ExitStack() as stack:
                endpoints = {**up.endpoints, REGISTRY_NAME: relay.url}
                proxies = {"new": stack.enter_context(CrProxy(work / "new", endpoints,
                                                              push=PUSH_SETTINGS))}
                if args.base:
                    base = export(args.base, work / "base-tree")
                    proxies["base"] = stack.enter_context(CrProxy(
                        work / "base", endpoints, env={"PYTHONPATH": str(base)},
                        push=PUSH_SETTINGS))
                floors = {side: stack.enter_context(PushFloor(work / f"floor{i}", relay.url,
                                                              hashes))
                          for i, (side, hashes) in enumerate(FLOORS.items()) if side in sides}
                for round_ in range(args.rounds):
                    for side in in_turn(sides, round_ + 1):
                        rounds.push(side, round_, up, relay, proxies, floors)
                    print(f"round {round_}: " + ", ".join(
                        f"{side} {rounds.walls[side][-1]:.2f} s" for side in sides), flush=True)
    print("\n".join(rounds.report()))


if __name__ == "__main__":
    main()
