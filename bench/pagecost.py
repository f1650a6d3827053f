"""What a copy into the page cache costs on this machine, now: `--files`
new files of `--mib` MiB written one after the other (1 MiB writes through
the page cache, nothing read back), each file's CPU-seconds and wall time;
then the same bytes with O_DIRECT from one reused buffer (how pushed
layers are written, cr_proxy/cache/direct.py).

On the VM the benches run on, the first few hundred MiB land in pages the
kernel freed a moment ago (0.07 CPU-s per 256 MiB) and the rest in pages
the host took back (free page reporting: 0.5-1.2 CPU-s per 256 MiB), so a
bench row whose case writes a copy moves with this (docs/performance.md,
"Session 10"). Run it beside a surprising bench result.

    python -m bench.pagecost [--dir DIR] [--files 6] [--mib 256]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import tempfile
import time
from pathlib import Path

from bench.report import MIB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_file(path: Path, mib: int, direct: bool) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) to write mib MiB of one 1 MiB buffer."""
    buffer = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
    buffer.write(os.urandom(MIB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0),
                 0o600)
    try:
        cpu, wall = cpu_seconds(), time.perf_counter()
        for _ in range(mib):
            os.write(fd, buffer)
        return cpu_seconds() - cpu, time.perf_counter() - wall
    finally:
        os.close(fd)
        buffer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pagecost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a temp directory under /work or /tmp)")
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-pagecost-", dir=args.dir) as tmp:
        for direct in (False, True):
            label = "O_DIRECT" if direct else "page cache"
            for n in range(args.files):
                cpu, wall = write_file(Path(tmp) / f"{label[:1]}{n}", args.mib, direct)
                print(f"{label:10} file {n}: {args.mib} MiB in {wall:.3f} s, "
                      f"{cpu:.3f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
