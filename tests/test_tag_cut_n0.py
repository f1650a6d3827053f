"""Bug 40 (found by the review of session 14): _cut_from_whole takes any
stored page asked without `last` whose answer had no next as the whole
list. A registry answers `?n=0` with no tags and no Link (distribution:
limit 0 -> moreEntries false), so a stored `list,n=0` is taken for a whole
list of no tags: offline every query never asked is cut from it, `{"tags":
[]}` 200 STALE ("no tags"), though the real whole list is stored beside it
(older by a moment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_tag_pages_offline import BASE, Registry, _mirror


@pytest.mark.parametrize("whole_first", [True, False], ids=["whole-then-n0", "n0-only"])
async def test_an_n0_answer_is_no_whole_list(
    aiohttp_server, aiohttp_client, tmp_path: Path, whole_first: bool,
) -> None:
    server, client = await _mirror(aiohttp_server, aiohttp_client, tmp_path, Registry())
    if whole_first:
        assert (await client.get(BASE)).status == 200  # a..e, no Link: the whole list
    zero = await client.get(BASE + "?n=0")
    assert zero.status == 200 and await zero.json() == {"name": "lib/app", "tags": []}
    assert "Link" not in zero.headers
    await server.close()
    page = await client.get(BASE + "?n=2")
    if whole_first:
        assert page.status == 200
        assert await page.json() == {"name": "lib/app", "tags": ["a", "b"]}
    else:
        body = await page.text()
        assert page.status == 404, body  # no whole list stored: the usual offline miss
