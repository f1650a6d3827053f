"""A model of what a power loss (or kernel crash) leaves on ext4, default
options (data=ordered, delalloc, auto_da_alloc), for files cr-proxy writes.

- Metadata (names, renames, links, utime, unlinks) is journaled in order:
  whatever the test did to names survives (the worst case: every rename
  made it to the journal).
- A file's data survives only if it was fsynced (os.fsync / os.fdatasync
  on a descriptor of it), or if the file was renamed over an existing
  name (auto_da_alloc flushes it before that rename commits).
- Any other file created during the watched window is found zero-length
  under its final name, with its (journaled) timestamps.

Usage: pl = PowerLoss(monkeypatch, root, ...); <do the writes>; pl.crash()
returns the paths it truncated. Files that existed before PowerLoss was
made are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _files(root: Path):
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if os.path.isfile(path) and not os.path.islink(path):
                yield path, st


class PowerLoss:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, *roots: Path) -> None:
        self.roots = [Path(r) for r in roots]
        self.before = {_key(st) for r in self.roots if r.exists() for _, st in _files(r)}
        self.durable: set[tuple[int, int]] = set()
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        real_replace, real_rename = os.replace, os.rename

        def fsync(fd):
            real_fsync(fd)
            self.durable.add(_key(os.fstat(fd if isinstance(fd, int) else fd.fileno())))

        def fdatasync(fd):
            real_fdatasync(fd)
            self.durable.add(_key(os.fstat(fd if isinstance(fd, int) else fd.fileno())))

        def renaming(real):
            def rename(src, dst, *args, **kwargs):
                try:
                    over = os.path.isfile(dst) and not os.path.islink(dst)
                    src_key = _key(os.lstat(src))
                except OSError:
                    over, src_key = False, None
                real(src, dst, *args, **kwargs)
                if over and src_key is not None:
                    self.durable.add(src_key)  # auto_da_alloc: replace-via-rename
            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "replace", renaming(real_replace))
        monkeypatch.setattr(os, "rename", renaming(real_rename))

    def crash(self) -> list[Path]:
        """Truncate every file written in the window whose data was never
        made durable; keep its timestamps (journaled metadata)."""
        lost = []
        for root in self.roots:
            for path, st in list(_files(root)):
                key = _key(st)
                if key in self.before or key in self.durable or st.st_size == 0:
                    continue
                os.truncate(path, 0)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
                lost.append(path)
        return sorted(lost)
