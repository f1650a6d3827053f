"""cr_proxy.serve: the pure parts (the rest runs through `cr-proxy serve` in
the e2e tests)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cr_proxy import serve


@pytest.mark.parametrize(("somaxconn", "warned"), [("128\n", True), ("4096\n", False),
                                                    ("65535\n", False), ("junk", False)])
def test_a_kernel_cap_below_the_fetcher_backlog_is_warned_about(
    somaxconn: str, warned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "somaxconn"
    path.write_text(somaxconn)
    monkeypatch.setattr(serve, "SOMAXCONN", path)
    with caplog.at_level(logging.WARNING, logger="cr_proxy.serve"):
        serve._warn_if_backlog_capped()
    assert ("net.core.somaxconn is 128" in caplog.text) is warned


def test_no_somaxconn_file_is_no_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(serve, "SOMAXCONN", tmp_path / "absent")
    with caplog.at_level(logging.WARNING, logger="cr_proxy.serve"):
        serve._warn_if_backlog_capped()
    assert caplog.text == ""
