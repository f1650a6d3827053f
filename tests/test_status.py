"""The status page's image rows (ops/status.py): incomplete and stale
images named, at most MAX_SHOWN of each; the tree scanned at most once an
interval."""

from __future__ import annotations

import asyncio

import pytest

from cr_proxy import config as config_mod
from cr_proxy.cache.image import Image
from cr_proxy.ops import status
from cr_proxy.ops.status import MAX_SHOWN, ImageStatus, status_rows

NOW = 1_000_000.0


def image(name: str, validated_at: float | None, missing: frozenset[str] = frozenset()) -> Image:
    return Image(domain="registry.test", registry="registry.test", repository=name, tag="v1",
                 digest="sha256:" + "a" * 64, media_type="", platforms=(),
                 digests=frozenset(), manifests=frozenset(), missing=missing, size=0,
                 validated_at=validated_at, stored_at=0.0, read_at=None)


def test_incomplete_and_stale_images_are_named_oldest_first() -> None:
    rows = status_rows([image("fresh", NOW - 10), image("old", NOW - 900),
                        image("older", NOW - 5000, frozenset({"sha256:" + "b" * 64})),
                        image("bydigest", None)], tag_ttl=300, now=NOW)
    assert rows == [
        ("incomplete images", "1"),
        ("incomplete", "registry.test/older:v1: 1 missing"),
        ("stale images", "2 (tags not validated for over 300 s)"),
        ("stale", "registry.test/older:v1: validated 5000 s ago"),
        ("stale", "registry.test/old:v1: validated 900 s ago"),
    ]


def test_at_most_max_shown_of_a_kind_are_named() -> None:
    rows = status_rows([image(f"i{n}", NOW - 900) for n in range(MAX_SHOWN + 3)], 300, NOW)
    stale = [value for kind, value in rows if kind == "stale"]
    assert len(stale) == MAX_SHOWN + 1
    assert stale[-1] == "... and 3 more (cr-proxy ls)"


def test_the_tree_is_scanned_at_most_once_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    scans: list[int] = []

    def images(self: object) -> list[Image]:
        scans.append(1)
        return []

    monkeypatch.setattr(status.Inventory, "images", images)
    page = ImageStatus(config_mod.load(None), interval=3600)  # images() is stubbed

    async def twice() -> None:
        await asyncio.gather(page.rows(), page.rows())
        await page.rows()

    asyncio.run(twice())
    assert len(scans) == 1
