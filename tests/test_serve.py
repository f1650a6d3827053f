"""cr_proxy.serve: the pure parts (the rest runs through `cr-proxy serve` in
the e2e tests)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from cr_proxy import serve
from cr_proxy.config import build, default_data


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


@pytest.mark.parametrize(("listen", "named"), [
    ("5000", "{hostname}:5000"), ("0.0.0.0:5000", "{hostname}:5000"),
    ("[::]:5000", "{hostname}:5000"), ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("10.0.0.7:5000", "10.0.0.7:5000"), ("[::1]:5000", "[::1]:5000"),
])
def test_the_hint_names_the_address_a_mirror_listens_on(listen: str, named: str) -> None:
    """A wildcard listener is reached by this machine's name; one bound to
    one address only there (the e2e test: tests/test_e2e_quiet.py)."""
    data = default_data()
    data["listen"].update(mirror_http=listen, mirror_https=0, proxy=0)
    hints = serve.client_hints(build(data, environ={}))
    at = named.format(hostname=socket.gethostname())
    assert hints[0] == f"mirror (HTTP)  http://{at}"
    assert f'"registry-mirrors": ["http://{at}"]' in hints[-1]
    assert f"docker://{at}/docker.io/library/alpine" in hints[-1]
