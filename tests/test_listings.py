"""Tag list queries and pages, referrers indexes (oci/tags.py,
oci/referrers.py): pure checks, no I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cr_proxy.cache.layout import Kind, RegistryPath, Tree, parse_v2_path
from cr_proxy.errors import BadRequest, UpstreamError
from cr_proxy.oci.reference import is_tag
from cr_proxy.oci.referrers import (
    INDEX_TYPE,
    MAX_REFERRERS,
    check_artifact_type,
    legacy_tags,
    next_artifacts,
    next_query,
    parse_referrers,
    referrers_body,
    tag_schema_tag,
)
from cr_proxy.oci.tags import (
    MAX_TAGS_N,
    TagQuery,
    listed_name,
    next_page,
    parse_stored,
    parse_tag_list,
)


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


DIGEST = "sha256:" + "a" * 64
GOOD = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
        "size": 5, "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"}


def index(*descriptors: object, **extra: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE,
                       "manifests": list(descriptors), **extra}).encode()


def test_the_tag_schema_tag_is_at_most_a_tag_long() -> None:
    assert tag_schema_tag(DIGEST) == "sha256-" + "a" * 64
    long_one = tag_schema_tag("sha512:" + "b" * 128)
    assert long_one == "sha512-" + "b" * 64 and is_tag(long_one)


def test_referrers_are_rebuilt_and_filtered() -> None:
    other = {**GOOD, "digest": "sha256:" + "c" * 64, "artifactType": "application/x+json",
             "annotations": {"k": "v"}, "urls": ["http://evil"]}
    descriptors = parse_referrers(index(GOOD, other, annotations={"x": "y"}), "r")
    assert descriptors == [GOOD, {k: v for k, v in other.items() if k != "urls"}]
    assert json.loads(referrers_body(descriptors, GOOD["artifactType"]))["manifests"] == [GOOD]
    assert json.loads(referrers_body([]))["manifests"] == []
    assert parse_referrers(index(), "r") == []


@pytest.mark.parametrize("body", [
    b"[]", b"<html>", json.dumps({"schemaVersion": 2, "manifests": []}).encode(),
    json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "manifests": []}).encode(),
    index(manifests="x"), index("x"), index({**GOOD, "digest": "sha256:x"}),
    index({**GOOD, "size": -1}), index({**GOOD, "size": True}), index({**GOOD, "size": 1.5}),
    index({**GOOD, "mediaType": "x"}), index({**GOOD, "artifactType": "a b/c"}),
    index({**GOOD, "annotations": {"a": 1}}), b" " * (MAX_REFERRERS + 1),
])
def test_a_bad_referrers_index_is_an_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_referrers(body, "r")


@pytest.mark.parametrize("value", ["", "a", "a/b/c", "a b/c", "/b", "text/html\r\nX: y"])
def test_a_bad_artifact_type_filter_is_a_400(value: str) -> None:
    with pytest.raises(BadRequest):
        check_artifact_type(value)
    assert check_artifact_type(None) is None
    assert check_artifact_type("application/vnd.in-toto+json") == "application/vnd.in-toto+json"


def test_a_referrers_path_parses_and_round_trips() -> None:
    rpath = parse_v2_path(f"/v2/a/b/referrers/{DIGEST}")
    assert rpath == RegistryPath(Kind.REFERRERS, "a/b", DIGEST)
    assert rpath.path == f"v2/a/b/referrers/{DIGEST}"
    with pytest.raises(BadRequest):
        parse_v2_path("/v2/a/referrers/latest")


@pytest.mark.parametrize("name, kind, query", [
    ("a", Kind.TAGS, ".."), ("a", Kind.TAGS, ".x"), ("a", Kind.TAGS, ""),
    ("a", Kind.TAGS, "a/b"), ("a", Kind.MANIFEST, "list"), ("../a", Kind.TAGS, "list"),
    ("A", Kind.REFERRERS, "sha256-aa"),
])
def test_a_listing_path_takes_checked_names_only(
    tmp_path: Path, name: str, kind: Kind, query: str
) -> None:
    with pytest.raises(BadRequest):
        Tree(tmp_path).listing("registry.test", name, kind, query)


def test_listings_live_where_no_repository_can() -> None:
    tree = Tree(Path("/c"))
    assert tree.listing("r.test", "a/b", Kind.TAGS, TagQuery(5, "v1").file_name) \
        == Path("/c/lists/r.test/a/b/_tags/list,n=5,last=v1")
    assert tree.listing("r.test", "a", Kind.REFERRERS, tag_schema_tag(DIGEST)) \
        == Path(f"/c/lists/r.test/a/_referrers/sha256-{'a' * 64}")


@pytest.mark.parametrize("path, name", [
    ("/v2/a/b/tags/list", "a/b"), ("/v2/tags/list", None), ("/v2/A/tags/list", None),
    ("/v2/a/tags/list/x", None), ("/x/a/tags/list", None), ("/v2/../tags/list", None),
])
def test_a_redirect_target_names_its_repository(path: str, name: str | None) -> None:
    assert listed_name(path) == name


@pytest.mark.parametrize("link, query", [
    (f'</v2/a/referrers/{DIGEST}?last=sha256:x&n=2>; rel="next"', "last=sha256:x&n=2"),
    (f'<https://r.test/v2/a/referrers/{DIGEST}?t=abc%3D>; rel="next"', "t=abc%3D"),
    (f'</v2/b/referrers/{DIGEST}?last=x>; rel="next"', None),
    (f'</v2/a/referrers/{DIGEST}>; rel="next"', None),
    (f'</v2/a/referrers/{DIGEST}?a=b c>; rel="next"', None),
    (f'</v2/a/referrers/{DIGEST}?a=b>; rel="prev"', None),
    (None, None),
])
def test_only_this_paths_next_page_is_followed(link: str | None, query: str | None) -> None:
    assert next_query(link, f"/v2/a/referrers/{DIGEST}") == query


def test_the_referrers_walk_takes_each_artifact_once_within_its_budget() -> None:
    a, b, c = ("sha256:" + x * 64 for x in "abc")
    answers = [[{"digest": a}, {"digest": b}], [{"digest": b}, {"digest": c}]]
    seen = {c}  # a subject already walked
    assert next_artifacts(answers, seen, 5) == ([a, b], False)
    assert next_artifacts(answers, set(), 2) == ([a, b], True)
    assert legacy_tags(a) == [f"sha256-{'a' * 64}{s}" for s in (".sig", ".att", ".sbom")]
