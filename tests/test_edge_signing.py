"""Tokens of signed module URLs (cr_proxy/edge/signing.py); end to end:
test_e2e_artifacts_signed.py."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from cr_proxy.edge import signing
from cr_proxy.edge.signing import Forbidden, Grant, ensure_key, sign, verify

DIGEST = "sha256:" + "ab" * 32


def test_a_token_round_trips_until_it_expires(tmp_path: Path) -> None:
    key = ensure_key(tmp_path / "certs" / "url-signing.key")
    grant = Grant("registry.test/wasm/hello:v1", DIGEST, True, 2000)
    token = sign(key, grant)
    assert verify(key, token, now=1999) == grant
    with pytest.raises(Forbidden):
        verify(key, token, now=2000)
    with pytest.raises(Forbidden):
        verify(b"another key of at least thirty-two bytes", token, now=0)


def test_the_key_is_made_once_0600(tmp_path: Path) -> None:
    path = tmp_path / "url-signing.key"
    key = ensure_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_key(path) == key
    assert ensure_key(tmp_path / "other.key") != key


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1], lambda t: t + "A", lambda t: t.replace(".", ""),
    lambda t: t.split(".")[0], lambda t: "." + t, lambda t: t * 20,
])
def test_mangled_tokens_are_refused(tmp_path: Path, mangle) -> None:
    key = ensure_key(tmp_path / "k")
    token = sign(key, Grant("r.test/a:v1", DIGEST, False, 2000))
    with pytest.raises(Forbidden):
        verify(key, mangle(token), now=0)


def test_two_starters_at_once_share_one_whole_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first starter is held after writing its key, before naming it;
    the second meanwhile makes and names its own. Both end with the same
    key (the second's), and no empty key file is ever there to read."""
    path = tmp_path / "url-signing.key"
    written, second_done = threading.Event(), threading.Event()
    real_link = os.link
    calls = 0

    def held_link(src: str | Path, dst: str | Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first starter
            written.set()
            assert second_done.wait(10)
        real_link(src, dst)

    monkeypatch.setattr(signing.os, "link", held_link)
    first: list[bytes] = []
    thread = threading.Thread(target=lambda: first.append(ensure_key(path)))
    thread.start()
    try:
        assert written.wait(10)
        assert not path.exists()
        second = ensure_key(path)
    finally:
        second_done.set()
        thread.join(10)
    assert first == [second] and len(second) >= 32
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
