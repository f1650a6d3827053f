"""ops/report.py: the `cr-proxy ls` table's STATE and SIZE columns and the
JSON's completeness keys, from Image values (cache/image.py)."""

from __future__ import annotations

import dataclasses
import re

from cr_proxy.cache.image import Image
from cr_proxy.ops import report

LAYER, CONFIG, MANIFEST = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
ARM = "sha256:" + "d" * 64
KIB = 1024

WHOLE = Image(
    domain="registry.test", registry="registry.test", repository="small", tag="v1",
    digest=MANIFEST, media_type="application/vnd.oci.image.manifest.v1+json",
    platforms=("linux/amd64",), digests=frozenset({MANIFEST, CONFIG, LAYER}),
    manifests=frozenset({MANIFEST}), missing=frozenset(), size=3 * KIB,
    validated_at=None, stored_at=0.0, read_at=None, cached_platforms=("linux/amd64",),
)
# verify quarantined its layer, whose manifest states 2 MiB.
BROKEN = dataclasses.replace(WHOLE, tag="broken", missing=frozenset({LAYER}),
                             missing_bytes=2 << 20)
# An index of two platforms, linux/amd64 pulled.
HALF = dataclasses.replace(WHOLE, tag="half", platforms=("linux/amd64", "linux/arm64"),
                           missing=frozenset({ARM}), unpulled=frozenset({ARM}))
# Its platform manifest lost: what it named is not known.
HALF_BROKEN = dataclasses.replace(HALF, tag="half-broken", missing=frozenset({ARM, MANIFEST}),
                                  missing_bytes=None)


def rows(*images: Image) -> dict[str, list[str]]:
    """Cells by image name; a cell has no two spaces in a row, columns do."""
    header, *lines = report.images_table(images).splitlines()
    assert re.split(r"\s{2,}", header) == ["IMAGE", "DIGEST", "PLATFORMS", "SIZE", "STATE",
                                            "LAST USED"]
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines)}


def test_the_state_column_says_complete_or_how_many_are_missing() -> None:
    table = rows(WHOLE, BROKEN, HALF, HALF_BROKEN)
    state = {name.split(":")[1]: row[4] for name, row in table.items()}
    assert state == {
        "v1": "complete",
        "broken": "1 missing",
        "half": "complete, 1 of 2 platforms",
        "half-broken": "1 missing, 1 of 2 platforms",
    }


def test_the_size_of_an_incomplete_image_says_what_it_lacks() -> None:
    table = rows(WHOLE, BROKEN, HALF_BROKEN)
    size = {name.split(":")[1]: row[3] for name, row in table.items()}
    assert size == {"v1": "3.0 KiB", "broken": "3.0 KiB of 2.0 MiB",
                    "half-broken": "3.0 KiB of ?"}


def test_json_says_complete_and_what_was_never_pulled() -> None:
    doc = report.images_document([WHOLE, BROKEN, HALF, HALF_BROKEN])["images"]
    assert [(i["complete"], i["missing"], i["not_pulled"], i["missing_bytes"]) for i in doc] == [
        (True, [], [], 0),
        (False, [LAYER], [], 2 << 20),
        (True, [ARM], [ARM], 0),
        (False, sorted([MANIFEST, ARM]), [ARM], None),
    ]
    assert doc[2]["cached_platforms"] == ["linux/amd64"]
    assert doc[2]["platforms"] == ["linux/amd64", "linux/arm64"]
