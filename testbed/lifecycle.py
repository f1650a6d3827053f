"""A test process group as a context manager: start() in __enter__, and
stop() both on exit and when start() fails half-way (what it began is
stopped). Classes define start() and stop()."""

from __future__ import annotations

from typing import Self


class Started:
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
