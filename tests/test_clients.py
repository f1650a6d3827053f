"""tests/clients.py's daemons leave nothing behind: whatever a daemon
started is stopped with it, after a failed start too. A shell stands in for
dockerd (which starts containerd): fast, and its child outlives it when
only the shell is terminated."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.clients
from testbed.crproxy import clean_env
from tests.clients import Daemon
from tests.faulty import alive, wait_until

# The stand-in's child writes its pid and waits: a "daemon" with a child.
WITH_CHILD = 'sleep 600 & echo $! > "$0"; wait'
GONE_WAIT = 10.0  # seconds for a SIGKILLed process to be gone


class StandIn(Daemon):
    """`sh -c SCRIPT PIDFILE`, ready when `ready_check` says so."""

    name = "stand-in"

    def __init__(self, workdir: Path, script: str, ready_check: str) -> None:
        super().__init__(workdir, "crsi-")
        self.script = script
        self.ready_check = ready_check
        self.pidfile = workdir / "child.pid"

    def start(self) -> None:
        self._spawn(["sh", "-c", self.script, str(self.pidfile)], clean_env(), self.ready_check)

    def child(self) -> int:
        wait_until(lambda: self.pidfile.is_file() and self.pidfile.read_text().strip(),
                   GONE_WAIT, "the stand-in's child to start")
        return int(self.pidfile.read_text())


def assert_gone(pid: int) -> None:
    wait_until(lambda: not alive(pid), GONE_WAIT, f"process {pid} to be gone")


def test_a_stopped_daemon_takes_its_children_along(tmp_path: Path) -> None:
    """SIGTERM ends the shell, not its child: stop() must end that too."""
    with StandIn(tmp_path, WITH_CHILD, "true") as daemon:
        child = daemon.child()
        assert alive(child)
    assert_gone(child)


def test_a_daemon_never_ready_is_stopped_with_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tests.clients, "READY_TIMEOUT", 0.5)
    daemon = StandIn(tmp_path, WITH_CHILD, "false")
    with pytest.raises(RuntimeError, match=r"did not start \(not ready\)"):
        daemon.start()
    assert daemon.proc is not None and daemon.proc.poll() is not None
    assert_gone(daemon.child())


def test_a_daemon_dying_at_start_fails_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    """Dead during the readiness wait: said at once (not after the whole
    READY_TIMEOUT), and the child it left is ended."""
    script = 'sleep 600 & echo $! > "$0"; exit 3'
    daemon = StandIn(tmp_path, script, "false")
    with pytest.raises(RuntimeError, match=r"did not start \(exited 3\)"):
        daemon.start()
    assert_gone(daemon.child())
