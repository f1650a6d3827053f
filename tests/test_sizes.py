"""cr_proxy.cache.sizes: the one size formatter (ls/du/rm/verify and warm)."""

from __future__ import annotations

import pytest

from cr_proxy.cache.sizes import human_size


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (1024 ** 2, "1.0 MiB"),
     (3 * 1024 ** 4, "3.0 TiB"), (5 * 1024 ** 5, "5120.0 TiB"), (1023.4, "1023 B")],
)
def test_human_size(size: float, text: str) -> None:
    assert human_size(size) == text
