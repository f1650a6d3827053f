"""cr_proxy.oci.manifest: the one reading of manifests and indexes that the
fetcher, warm and the inventory share (kinds, what they name, platforms,
attestations, foreign layers), by value and on any JSON."""

from __future__ import annotations

import ast
import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.errors import BadRequest, CrProxyError, ManifestInvalid
from cr_proxy.oci.manifest import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_INDEX_DEPTH,
    Blob,
    Entry,
    Platform,
    config_platform,
    is_attestation,
    manifest_media_type,
    parse,
)
from cr_proxy.oci.reference import digest_of

SHA256 = "sha256:" + "0123456789abcdef" * 4
PROPS = settings(max_examples=300, deadline=None)
OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST = MANIFEST_MEDIA_TYPES
D = {name: digest_of(name.encode()) for name in
     ("amd64", "arm64", "armv7", "att1", "att2", "att3", "config", "l1", "win", "l2")}


def as_body(doc: object) -> bytes:
    return json.dumps(doc).encode()


# --- what a manifest names -------------------------------------------------------------

INDEX_DOC = {
    "schemaVersion": 2, "mediaType": OCI_INDEX,
    "manifests": [
        {"digest": D["amd64"], "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": D["arm64"], "platform": {"os": "linux", "architecture": "arm64",
                                            "variant": "v8"}},
        {"digest": D["armv7"], "platform": {"os": "linux", "architecture": "arm",
                                            "variant": "v7"}},
        # buildx writes both markers; either one alone is an attestation too.
        {"digest": D["att1"], "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        {"digest": D["att2"], "platform": {"os": "unknown", "architecture": "unknown"}},
        {"digest": D["att3"], "platform": {"os": "linux", "architecture": "amd64"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        {"platform": {"os": "linux", "architecture": "amd64"}},  # no digest: names nothing
        {"digest": "not-a-digest"},
        "not an object",
    ],
}


def test_an_index_names_its_entries_with_platforms_and_attestations() -> None:
    index = parse(as_body(INDEX_DOC))
    assert index.is_index and index.media_type == OCI_INDEX
    assert [e.digest for e in index.entries] == [
        D[n] for n in ("amd64", "arm64", "armv7", "att1", "att2", "att3")]
    assert [e.attestation for e in index.entries] == [False] * 3 + [True] * 3
    assert [str(p) for p in index.platforms] == ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]
    assert index.blobs == ()


def chosen(*platforms: str) -> list[str]:
    picked = parse(as_body(INDEX_DOC)).select([Platform.parse(p) for p in platforms])
    return [name for name, digest in D.items() if digest in {e.digest for e in picked}]


def test_select_takes_every_platform_or_those_wanted_never_attestations() -> None:
    assert chosen() == ["amd64", "arm64", "armv7"]
    assert chosen("linux/arm64") == ["arm64"]  # any variant when none is asked for
    assert chosen("linux/arm/v7", "linux/amd64") == ["amd64", "armv7"]
    assert chosen("linux/arm/v6") == []
    assert chosen("unknown/unknown") == []


def test_is_attestation_by_platform_or_annotation() -> None:
    unknown = {"os": "unknown", "architecture": "unknown"}
    mark = {"vnd.docker.reference.type": "attestation-manifest"}
    assert is_attestation({"platform": unknown, "annotations": mark})
    assert is_attestation({"platform": unknown})
    assert is_attestation({"platform": {**unknown, "variant": "v1"}})
    assert is_attestation({"annotations": mark})
    assert not is_attestation({"platform": {"os": "linux", "architecture": "amd64"}})
    assert not is_attestation({"annotations": {"vnd.docker.reference.type": "sbom"}})
    assert not is_attestation({"annotations": ["attestation-manifest"]})


def test_an_image_names_config_and_layers_and_foreign_layers_are_not_blobs() -> None:
    image = parse(as_body({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"digest": D["config"], "size": 10},
        "layers": [{"digest": D["l1"], "size": 20},
                   {"digest": D["win"], "size": 30, "urls": ["https://mcr.microsoft.com/x"]},
                   {"digest": D["l2"], "size": True}, {"digest": "sha256:short"}, 7],
    }))
    assert not image.is_index and image.entries == ()
    assert image.config == Blob(D["config"], 10)
    assert image.layers == (Blob(D["l1"], 20), Blob(D["win"], 30, foreign=True), Blob(D["l2"]))
    assert [b.digest for b in image.blobs] == [D["config"], D["l1"], D["l2"]]


def test_parse_understands_docker_lists_and_shape_without_media_type() -> None:
    # Was tests/test_inventory.py's test of inventory.parse_manifest.
    child = digest_of(b"child")
    listed = parse(json.dumps({"mediaType": DOCKER_LIST, "manifests": [
        {"digest": child, "platform": {"os": "windows", "architecture": "amd64"}},
        {"digest": "not-a-digest"},
    ]}).encode())
    assert listed.is_index and [(c.digest, str(c.platform)) for c in listed.entries] == [
        (child, "windows/amd64")
    ]
    bare = parse(json.dumps({"config": {"digest": child}, "layers": []}).encode())
    assert (bare.media_type, bare.config and bare.config.digest) == (OCI_MANIFEST, child)
    assert parse(b"{}", "text/plain").media_type == "text/plain"
    assert parse(as_body({"manifests": []}), DOCKER_LIST).media_type == DOCKER_LIST
    assert parse(as_body({"manifests": []})).media_type == OCI_INDEX


def test_an_unknown_kind_names_nothing() -> None:
    doc = {"mediaType": "application/vnd.example+json", "config": {"digest": SHA256},
           "manifests": [{"digest": SHA256}]}
    parsed = parse(as_body(doc))
    assert (parsed.media_type, parsed.entries, parsed.config, parsed.layers) == (
        "application/vnd.example+json", (), None, ())


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b'"text"',
                                  b"[" * 100_000 + b"]" * 100_000])
def test_parse_refuses_what_is_no_json_object(body: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="not a JSON object"):
        parse(body)


def test_the_nesting_limit_is_one_value() -> None:
    # index -> index -> index -> manifest: OCI allows it, warm and ls alike.
    assert MAX_INDEX_DEPTH == 3


# --- platforms -----------------------------------------------------------------------------


def test_platform_parse_and_text() -> None:
    assert Platform.parse(" Linux/ARM/v7 ") == Platform("linux", "arm", "v7")
    assert str(Platform.parse("linux/amd64")) == "linux/amd64"


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_bad_platform_is_refused(text: str) -> None:
    with pytest.raises(BadRequest, match="os/arch"):
        Platform.parse(text)


def test_platform_of_a_document() -> None:
    assert Platform.of({"os": "linux", "architecture": "arm", "variant": "v6"}) == Platform(
        "linux", "arm", "v6")
    assert Platform.of({"os": "linux", "architecture": "amd64", "variant": ""}) == Platform(
        "linux", "amd64")
    assert Platform.of({"os": "linux"}) is None
    assert Platform.of({"os": "", "architecture": "amd64"}) is None
    assert Platform.of({"os": 1, "architecture": "amd64"}) is None
    assert Platform.of(["linux", "amd64"]) is None


def test_platform_matches_with_any_variant_unless_named() -> None:
    arm7 = Platform("linux", "arm", "v7")
    assert Platform.parse("linux/arm").matches(arm7)
    assert Platform.parse("linux/arm/v7").matches(arm7)
    assert not Platform.parse("linux/arm/v6").matches(arm7)
    assert not Platform.parse("linux/arm").matches(None)


def test_config_platform() -> None:
    assert config_platform(b'{"os": "linux", "architecture": "amd64"}') == Platform(
        "linux", "amd64")
    assert config_platform(b'{"os": "unknown", "architecture": "unknown"}') is None
    assert config_platform(b"not json") is None
    assert config_platform(b"[]") is None


# --- on any JSON: only the project's error ----------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from([SHA256, "unknown", "attestation-manifest", *MANIFEST_MEDIA_TYPES]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["mediaType", "manifests", "config", "layers", "digest", "size", "urls",
                         "platform", "os", "architecture", "variant", "annotations",
                         "vnd.docker.reference.type", "schemaVersion", "x"]),
        inner, max_size=6),
    max_leaves=30,
)


@given(JSON, st.sampled_from(["", "application/json", *MANIFEST_MEDIA_TYPES]))
@PROPS
def test_parse_on_any_json_raises_only_manifest_invalid(doc: object, content_type: str) -> None:
    try:
        parsed = parse(as_body(doc), content_type)
    except ManifestInvalid:
        assert not isinstance(doc, dict)
        return
    assert all(isinstance(e, Entry) for e in parsed.entries)
    assert all(b.digest and not b.foreign for b in parsed.blobs)
    assert parsed.is_index == (parsed.media_type in INDEX_MEDIA_TYPES)
    assert all(not e.attestation for e in parsed.select())


@given(JSON, st.sampled_from(["", "text/html", *MANIFEST_MEDIA_TYPES]))
@PROPS
def test_manifest_media_type_on_any_json_raises_only_the_projects_error(
    doc: object, content_type: str
) -> None:
    try:
        got = manifest_media_type(as_body(doc), content_type)
    except CrProxyError:
        return
    assert got in MANIFEST_MEDIA_TYPES


@given(st.binary(max_size=200))
@PROPS
def test_parse_on_any_bytes_raises_only_manifest_invalid(body: bytes) -> None:
    with contextlib.suppress(ManifestInvalid):
        parse(body)


# --- manifest media types (issue 10: stored header values) ---------------------------

IMAGE = {"schemaVersion": 2, "config": {"mediaType": "c", "digest": SHA256, "size": 1},
         "layers": []}
INDEX = {"schemaVersion": 2, "manifests": []}


@pytest.mark.parametrize("media_type", MANIFEST_MEDIA_TYPES)
@pytest.mark.parametrize("header", ["", "application/json", "text/plain",
                                    "application/octet-stream", "SAME", "SAME; charset=utf-8"])
def test_manifest_media_type_of_each_known_kind(media_type, header):
    doc = {**(INDEX if media_type in INDEX_MEDIA_TYPES else IMAGE), "mediaType": media_type}
    header = header.replace("SAME", media_type)
    assert manifest_media_type(as_body(doc), header) == media_type


@pytest.mark.parametrize(("doc", "header", "expected"), [
    (IMAGE, "", OCI_MANIFEST),  # mediaType is optional in OCI: the shape decides
    (INDEX, "application/json", OCI_INDEX),
    (IMAGE, DOCKER_MANIFEST, DOCKER_MANIFEST),  # or a known header
    (INDEX, DOCKER_LIST.upper(), DOCKER_LIST),
    ({**IMAGE, "artifactType": "application/vnd.example+json"}, OCI_MANIFEST, OCI_MANIFEST),
])
def test_manifest_media_type_without_a_media_type_in_the_body(doc, header, expected):
    assert manifest_media_type(as_body(doc), header) == expected


@pytest.mark.parametrize(("body", "header", "says"), [
    (as_body({**IMAGE, "mediaType": OCI_MANIFEST + "\r\nSet-Cookie: x=y"}), "application/json",
     r"\r\n"),
    (as_body({**IMAGE, "mediaType": "text/html"}), "", "text/html"),
    (as_body({**IMAGE, "mediaType": 7}), "", "mediaType 7"),
    (as_body({**IMAGE, "mediaType": OCI_MANIFEST}), "text/html", "text/html"),
    (as_body({**IMAGE, "mediaType": OCI_MANIFEST}), "image/svg+xml", "svg"),
    (as_body({**IMAGE, "mediaType": OCI_MANIFEST}), DOCKER_MANIFEST, "but mediaType"),
    (as_body({**IMAGE, "mediaType": "application/vnd.oci.artifact.manifest.v1+json"}), "",
     "artifact"),
    (as_body({**IMAGE, "schemaVersion": 1}), "", "schema 1"),
    (as_body({"schemaVersion": 1, "fsLayers": []}),
     "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
    (as_body({**IMAGE, "schemaVersion": True}), "", "schemaVersion True"),
    (as_body({**IMAGE, "schemaVersion": "2"}), "", "schemaVersion '2'"),
    (as_body({k: v for k, v in IMAGE.items() if k != "schemaVersion"}), "", "schemaVersion"),
    (as_body({**IMAGE, "layers": None}), "", "not a whole"),
    (as_body({**IMAGE, "config": []}), "", "not a whole"),
    (as_body({**INDEX, "mediaType": OCI_INDEX, "manifests": {}}), "", "not a whole"),
    (as_body({"schemaVersion": 2}), "", "not a whole"),
    (as_body([IMAGE]), "", "not a JSON object"),
    (b"<html><script>alert(1)</script>", "", "not a JSON object"),
    (as_body(IMAGE)[:-1], "", "not a JSON object"),  # cut short
    (b"\xff\xfe garbage", "", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "", "not a JSON object"),  # too deep for json
])
def test_manifest_media_type_refuses(body, header, says):
    with pytest.raises(ManifestInvalid) as err:
        manifest_media_type(body, header)
    assert says in err.value.message
    assert "\r" not in err.value.message and "\n" not in err.value.message


@given(st.text(max_size=60))
@PROPS
def test_manifest_media_type_returns_only_the_closed_list(media_type):
    try:
        got = manifest_media_type(as_body({**IMAGE, "mediaType": media_type}), media_type)
    except ManifestInvalid:
        return
    assert got in MANIFEST_MEDIA_TYPES


# --- one owner ----------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "cr_proxy"
OWNED = {"MAX_MANIFEST", "MAX_INDEX_DEPTH", "MAX_DEPTH", "MANIFEST_MEDIA_TYPES",
         "INDEX_MEDIA_TYPES", "IMAGE_MEDIA_TYPES", "MANIFEST_ACCEPT", "ATTESTATION"}


def test_manifest_knowledge_is_defined_in_manifest_py_only() -> None:
    """Issue 11: MAX_MANIFEST was defined twice and the nesting limit and
    the attestation rule thrice, and they disagreed."""
    defined = {
        (path.relative_to(PACKAGE).as_posix(), target.id)
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id in OWNED
    }
    assert {where for where, _ in defined} == {"oci/manifest.py"}
