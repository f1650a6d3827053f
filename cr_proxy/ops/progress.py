"""What `cr-proxy warm` shows while it runs, on stderr: a byte bar on a
terminal (tqdm: rate, ETA, a total that grows as blobs to fetch are
found), plain lines otherwise (one per image and per blob fetched)."""

from __future__ import annotations

import os
from typing import TextIO

from cr_proxy.cache.sizes import human_size
from cr_proxy.ops.warm import ImageResult, Progress


def make_progress(stream: TextIO, images: int) -> Progress:
    return BarProgress(stream, images) if _terminal_width(stream) > 0 else LineProgress(stream)


def _terminal_width(stream: TextIO) -> int:
    """0 unless a terminal: a pty of no size (`script` without one) would
    show tqdm's bar as nothing at all, so it gets plain lines too."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError):
        return 0


def _done_line(result: ImageResult) -> str:
    if result.error is not None:
        return f"cr-proxy warm: {result.image}: {result.error}"
    return (f"warm: {result.image}: done: {result.blobs_fetched} blobs fetched "
            f"({human_size(result.bytes_fetched)}), {result.blobs_cached} already cached")


class LineProgress:
    """Not a terminal: one line per image and per blob fetched."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def _say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def note(self, image: str, text: str) -> None:
        self._say(f"warm: {image}: {text}")

    def expect(self, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None:
        self._say(f"warm: {image}: fetched {digest} ({human_size(nbytes)})")

    def image_done(self, result: ImageResult) -> None:
        self._say(_done_line(result))

    def close(self) -> None:
        pass


class BarProgress:
    """A terminal: one byte bar (rate, ETA) whose total grows as blobs to
    fetch are found; image lines are written above it."""

    def __init__(self, stream: TextIO, images: int) -> None:
        from tqdm import tqdm  # only a terminal needs it

        self.images, self.done = images, 0
        self.stream = stream
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=stream,
                        dynamic_ncols=True, desc=self._desc())

    def _desc(self) -> str:
        return f"warm {self.done}/{self.images} images"

    def note(self, image: str, text: str) -> None:
        self.bar.write(f"warm: {image}: {text}", file=self.stream)

    def expect(self, nbytes: int) -> None:
        self.bar.total += nbytes
        self.bar.refresh()

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None:
        pass

    def image_done(self, result: ImageResult) -> None:
        self.done += 1
        self.bar.set_description(self._desc())
        self.bar.write(_done_line(result), file=self.stream)

    def close(self) -> None:
        self.bar.close()
