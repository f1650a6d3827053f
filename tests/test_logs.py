"""cr_proxy.logs: the access log renamed past its size, nginx told to reopen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cr_proxy.ops.logs import rotate_if_larger


def reopen_counter() -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []
    return calls, lambda: calls.append(1)


def test_a_log_under_the_limit_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"x" * 99)
    calls, reopen = reopen_counter()
    assert rotate_if_larger(log, 100, reopen) is None
    assert log.read_bytes() == b"x" * 99
    assert not (tmp_path / "access.log.1").exists()
    assert calls == []


def test_a_log_at_the_limit_becomes_dot_1_and_nginx_reopens(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    (tmp_path / "access.log.1").write_bytes(b"the generation before")
    log.write_bytes(b"y" * 100)
    calls, reopen = reopen_counter()
    assert rotate_if_larger(log, 100, reopen) == tmp_path / "access.log.1"
    assert (tmp_path / "access.log.1").read_bytes() == b"y" * 100  # the older one is gone
    assert not log.exists()  # nginx makes the new one when it reopens
    assert calls == [1]


def test_no_log_yet_is_not_an_error(tmp_path: Path) -> None:
    calls, reopen = reopen_counter()
    assert rotate_if_larger(tmp_path / "access.log", 100, reopen) is None
    assert calls == []
