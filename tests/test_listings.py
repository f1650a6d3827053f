"""Tag list queries and pages, referrers indexes (oci/tags.py,
oci/referrers.py): pure checks, no I/O."""

from __future__ import annotations

import json

import pytest

from cr_proxy.errors import BadRequest, UpstreamError
from cr_proxy.oci.tags import MAX_TAGS_N, TagQuery, next_page, parse_stored, parse_tag_list


@pytest.mark.parametrize("n, last, name", [
    (None, None, "list"),
    ("10", None, "list,n=10"),
    ("010", None, "list,n=10"),
    ("0", "v1.2-rc_1", "list,n=0,last=v1.2-rc_1"),
    (None, "latest", "list,last=latest"),
])
def test_a_query_names_its_file(n: str | None, last: str | None, name: str) -> None:
    assert TagQuery.parse(n, last).file_name == name


@pytest.mark.parametrize("n, last", [
    ("", None), ("-1", None), ("+1", None), (" 1", None), ("1e3", None), ("0x10", None),
    (str(MAX_TAGS_N + 1), None), ("999999", None), ("\u0661", None),
    (None, ""), (None, ".x"), (None, "../x"), (None, "a,n=1"), (None, "a=b"), (None, "a/b"),
    (None, "x" * 129),
])
def test_a_bad_query_is_a_400(n: str | None, last: str | None) -> None:
    with pytest.raises(BadRequest):
        TagQuery.parse(n, last)


def test_a_page_is_rebuilt_from_its_checked_fields() -> None:
    body = json.dumps({"name": "a/b", "tags": ["v1", "v2"], "extra": "<script>"}).encode()
    page = parse_tag_list(body, "a/b", '</v2/a/b/tags/list?n=2&last=v2>; rel="next"')
    assert json.loads(page.list_body()) == {"name": "a/b", "tags": ["v1", "v2"]}
    assert page.next == TagQuery(2, "v2")
    assert parse_stored(page.stored(), "a/b") == page
    # The stored next page is ours, never a body's own "next".
    assert parse_tag_list(page.stored(), "a/b", None).next is None
    empty = parse_tag_list(b'{"name": "a/b", "tags": null}', "a/b", None)
    assert empty.tags == ()


@pytest.mark.parametrize("body", [
    b"<html>", b"[]", b'{"name": "other", "tags": []}', b'{"tags": []}',
    b'{"name": "a/b", "tags": "v1"}', b'{"name": "a/b", "tags": [1]}',
    b'{"name": "a/b", "tags": ["../x"]}', b"\xff\xfe",
])
def test_a_bad_page_is_an_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_tag_list(body, "a/b", None)


@pytest.mark.parametrize("link", [
    None, "", "garbage", '</v2/a/tags/list?n=2&last=..>; rel="next"',
    '</v2/a/tags/list?n=-2>; rel="next"', '</v2/a/tags/list?n=2>; rel="prev"',
])
def test_a_link_we_would_refuse_ends_paging(link: str | None) -> None:
    assert next_page(link) is None
