"""cache/pins.py: what `cr-proxy pin` / `unpin` keep, and the set serve reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cr_proxy.cache.pins import Pins, pin_key
from cr_proxy.cache.store import Store
from cr_proxy.errors import BadRequest

HOSTS = {"docker.io": "registry-1.docker.io"}
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "cache")
    store.prepare()
    return store


def pins(store: Store, declared: tuple[str, ...] = ()) -> Pins:
    return Pins(store, declared, "docker.io", HOSTS)


@pytest.mark.parametrize(("text", "key"), [
    ("alpine", "registry-1.docker.io/library/alpine:latest"),
    ("docker.io/library/alpine:3.20", "registry-1.docker.io/library/alpine:3.20"),
    ("ghcr.io/org/app:v1", "ghcr.io/org/app:v1"),
    (f"ghcr.io/org/app@{DIGEST}", f"ghcr.io/org/app@{DIGEST}"),
])
def test_a_pin_is_the_image_key_ls_shows(text: str, key: str) -> None:
    assert pin_key(text, "docker.io", HOSTS) == key


def test_pin_then_unpin(store: Store) -> None:
    p = pins(store)
    assert p.pin(["alpine:3.20", "ghcr.io/org/app:v1"]) == [
        "registry-1.docker.io/library/alpine:3.20", "ghcr.io/org/app:v1"]
    assert json.loads(store.tree.pins_file.read_text()) == {
        "pins": ["ghcr.io/org/app:v1", "registry-1.docker.io/library/alpine:3.20"]}
    # Another reader (serve) sees them, with no shared state.
    assert pins(store).keys() == {"registry-1.docker.io/library/alpine:3.20",
                                  "ghcr.io/org/app:v1"}
    done = p.unpin(["alpine:3.20", "busybox"])
    assert (done.removed, done.declared, done.absent) == (
        ("registry-1.docker.io/library/alpine:3.20",), (),
        ("registry-1.docker.io/library/busybox:latest",))
    assert p.keys() == {"ghcr.io/org/app:v1"}
    assert list(store.tree.temp.iterdir()) == []  # written by rename, nothing left over


def test_the_configurations_pins_stay(store: Store) -> None:
    p = pins(store, declared=("alpine:3.20",))
    assert p.keys() == {"registry-1.docker.io/library/alpine:3.20"}
    done = p.unpin(["alpine:3.20"])
    assert (done.removed, done.declared) == ((), ("registry-1.docker.io/library/alpine:3.20",))
    assert p.keys() == {"registry-1.docker.io/library/alpine:3.20"}


def test_a_bad_reference_pins_nothing(store: Store) -> None:
    with pytest.raises(BadRequest):
        pins(store).pin(["alpine:3.20", "UPPER/Case"])
    assert not store.tree.pins_file.exists()


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"pins": "one"}'])
def test_a_hand_broken_file_pins_nothing_and_says_so(
    store: Store, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.tree.pins_file.write_text(text)
    assert pins(store, declared=("alpine",)).keys() == {
        "registry-1.docker.io/library/alpine:latest"}
    if text.startswith("{not"):
        assert "is not JSON" in caplog.text
