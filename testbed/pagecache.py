"""How much of a file the page cache holds (util-linux's fincore): what
tests of writes around the page cache (cr_proxy/cache/direct.py) check."""

from __future__ import annotations

import subprocess
from pathlib import Path


def resident_bytes(path: Path) -> int:
    """Bytes of the file's pages in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())
