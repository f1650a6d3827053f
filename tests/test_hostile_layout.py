"""Hostile names against layout.py, the only code that turns wire names
into paths: every accepted input maps strictly inside the tree root, and
every rejected one raises errors.BadRequest, never another exception.

The alphabets are wide on purpose: path separators and dots in ASCII and as
unicode look-alikes ('\\u2024' ONE DOT LEADER, '\\uff0e' FULLWIDTH FULL STOP,
'\\u2215' DIVISION SLASH, ...), percent-escapes, NUL, backslashes, ':', '@',
'?', whitespace that str.strip() eats, a lone surrogate, and the tokens the
tree itself uses (v2, manifests, blobs, _index, sha256:...).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from cr_proxy.cache.layout import (
    SEGMENT_RE,
    SIDECARS,
    Kind,
    Tree,
    check_domain,
    check_path,
    mirror_target,
    proxy_target,
)
from cr_proxy.errors import BadRequest

ROOT = Path("/srv/cr-proxy/cache")
HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
PROPS = settings(max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

LOOK_ALIKES = [
    "\u2024", "\u2025", "\u2026", "\uff0e", "\u3002", "\ufe52",  # dots
    "\u2215", "\u2044", "\uff0f", "\u29f8", "\u2571",  # slashes
    "\uff3c", "\u29f9", "\u2216",  # backslashes
    "\u212a", "\u0130", "\u017f", "\u0430",  # K->k, I-dot, long s, Cyrillic a
    "\u00a0", "\u3000", "\u2028", "\u200b", "\ufeff", "\x0b", "\x1c",  # spaces, zero-width
    "\udc80",  # a lone surrogate: not encodable as a file name
]
CHARS = [*"/\\.%\x00:@?#&;=+,~_-[] \t\r\n", *"aAzZ09fF", *LOOK_ALIKES]
HEX64 = "0123456789abcdef" * 4
TOKENS = [
    "/", "//", ".", "..", "...", "%2e", "%2E%2e", "%2f", "%2F", "%00", "%5c", "..%2f", "%252e",
    "\\", "..\\", "v2", "v2/", "manifests", "blobs", "uploads", "_index", "_catalog",
    "library", "registry.test", "docker.io", "localhost", "localhost:5000", "[::1]", "[..]",
    "127.0.0.1:80", "a", "b-c", "x.y", "latest", "v1.0",
    f"sha256:{HEX64}", f"sha256:{HEX64[:-1]}/", f"sha512:{HEX64 * 2}", "sha256:..",
]
PIECE = st.one_of(st.sampled_from(TOKENS), st.text(alphabet=CHARS, min_size=1, max_size=6))
TEXT = st.lists(PIECE, max_size=12).map("".join)
WIRE_PATH = st.one_of(
    TEXT,
    TEXT.map(lambda t: "/" + t),
    TEXT.map(lambda t: "/v2/" + t),
    st.lists(PIECE, max_size=8).map(lambda p: "/v2/" + "/".join(p)),
    st.tuples(TEXT, st.sampled_from(["manifests", "blobs"]), PIECE).map(
        lambda t: f"/v2/{t[0]}/{t[1]}/{t[2]}"),
)
# Mostly valid shapes with hostile parts mixed in, so that accepted inputs
# (the ones whose paths are checked) are common, not just refusals.
COMPONENT = st.from_regex(r"[a-z0-9]{1,6}(?:(?:[._]|__|-+)[a-z0-9]{1,4}){0,2}", fullmatch=True)
HOST = st.from_regex(r"[a-z0-9]{1,6}(?:\.[a-z0-9-]{0,4}[a-z0-9]){0,2}(?::[0-9]{1,5})?",
                     fullmatch=True)
TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
DIGEST = st.one_of(st.just(f"sha256:{HEX64}"), st.just(f"sha512:{HEX64 * 2}"),
                   st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
                   .map(lambda h: f"sha256:{h}"))
MIXED_HOST = st.one_of(HOST, HOST, HOST, PIECE, st.tuples(HOST, PIECE).map("".join))
NAME = st.lists(st.one_of(COMPONENT, COMPONENT, COMPONENT, PIECE), min_size=1, max_size=4)
REGISTRY_PATH = st.builds(
    lambda prefix, name, kind, ref: f"/v2/{prefix}{'/'.join(name)}/{kind}/{ref}",
    st.one_of(st.just(""), MIXED_HOST.map(lambda h: h + "/")),
    NAME,
    st.sampled_from(["manifests", "blobs"]),
    st.one_of(TAG, DIGEST, PIECE),
)
SEGMENT = st.one_of(st.from_regex(r"[A-Za-z0-9._~:@+=,-]{1,10}", fullmatch=True), PIECE)
GENERIC_PATH = st.lists(SEGMENT, min_size=1, max_size=6).map(lambda p: "/" + "/".join(p))
WIRE_PATH = st.one_of(WIRE_PATH, REGISTRY_PATH, REGISTRY_PATH, GENERIC_PATH)
WIRE_HOST = st.one_of(TEXT, st.sampled_from(TOKENS), st.tuples(PIECE, PIECE).map("".join),
                      MIXED_HOST, MIXED_HOST)
HOSTISH = st.one_of(HOST, HOST, WIRE_HOST)  # where a host must mostly pass to go further


def _without_prefix(path: str) -> str:
    """A registry path as an https_proxy client sends it (the Host names the registry)."""
    head, _, rest = path[len("/v2/"):].partition("/")
    return f"/v2/{rest}" if "." in head and rest.count("/") >= 2 else path


def assert_inside(path: Path) -> None:
    """Strictly under ROOT, however it is normalised or encoded."""
    text = str(path)
    assert "\x00" not in text
    os.fsencode(text)  # a name the filesystem can take (no lone surrogates)
    rel = PurePosixPath(path).relative_to(ROOT)  # raises if not under ROOT
    assert rel.parts and not rel.is_absolute()
    assert ".." not in rel.parts and "." not in rel.parts
    normalised = os.path.normpath(text)
    assert normalised == text, "the path must already be normal"
    assert normalised.startswith(str(ROOT) + os.sep)
    assert all(SEGMENT_RE.fullmatch(part) or part.startswith("[") for part in rel.parts), rel


def assert_tree_paths(tree: Tree, domain: str, path: str) -> None:
    """content/ and every sidecar for (domain, path): inside, or BadRequest."""
    try:
        assert_inside(tree.content(domain, path))
    except BadRequest:
        return
    for kind in SIDECARS:
        assert_inside(tree.sidecar(kind, domain, path))


@PROPS
@given(WIRE_PATH, st.one_of(st.none(), st.none(), WIRE_HOST),
       st.sampled_from(["docker.io", "quay.io"]))
@example("/v2/../../etc/passwd/manifests/v1", None, "docker.io")
@example("/v2/registry.test/a/blobs/sha256:..", "..", "docker.io")
@example("/v2/x/manifests/v1", "[..]", "docker.io")
@example("/v2/x/manifests/v1", "reg\u2024test", "docker.io")
def test_mirror_target_stays_inside_or_raises_bad_request(path, ns, default) -> None:
    tree = Tree(ROOT)
    try:
        target = mirror_target(path, ns, default, HOSTS)
    except BadRequest:
        event("refused")
        return
    event(f"accepted: {target.rpath.kind.name}")
    assert_tree_paths(tree, target.domain, target.rpath.path)
    if target.rpath.kind in (Kind.MANIFEST, Kind.BLOB):
        # What the fetcher stores for these must be storable.
        assert_inside(tree.content(target.domain, target.rpath.path))
        if target.rpath.by_digest:
            assert_inside(tree.blob(target.rpath.ref))


@PROPS
@given(HOSTISH, st.one_of(REGISTRY_PATH.map(_without_prefix), WIRE_PATH))
@example("registry.test", "/v2/../../../etc/passwd")
@example("registry.test\u2215..", "/v2/")
@example("..", "/token")
@example("cdn.test", "/a/%2e%2e/b")
def test_proxy_target_stays_inside_or_raises_bad_request(host, path) -> None:
    tree = Tree(ROOT)
    try:
        domain, rpath = proxy_target(host, path)
    except BadRequest:
        event("refused")
        return
    event(f"accepted: {rpath.kind.name if rpath else 'generic path'}")
    stored = path if rpath is None else rpath.path
    if rpath is None or rpath.kind in (Kind.MANIFEST, Kind.BLOB, Kind.PING):
        assert_inside(tree.content(domain, stored))
    assert_tree_paths(tree, domain, stored)


@PROPS
@given(WIRE_PATH)
@example("/v2/")
@example("/a/./b")
@example("/a/\u2024\u2024/b")
@example("a\\..\\b")
@example("/a%2f..%2fb")
def test_check_path_gives_plain_relative_paths_or_raises_bad_request(path) -> None:
    try:
        checked = check_path(path)
    except BadRequest:
        event("refused")
        return
    event("accepted")
    assert checked.isascii()
    assert not checked.startswith("/")
    segments = checked.split("/")
    assert all(s not in ("", ".", "..") and SEGMENT_RE.fullmatch(s) for s in segments)
    assert_inside(ROOT / checked)


@PROPS
@given(HOSTISH, st.one_of(GENERIC_PATH, WIRE_PATH), st.sampled_from(SIDECARS))
def test_tree_content_and_sidecar_stay_inside_or_raise_bad_request(host, path, kind) -> None:
    tree = Tree(ROOT)
    for make in (lambda: tree.content(host, path), lambda: tree.sidecar(kind, host, path)):
        try:
            assert_inside(make())
        except BadRequest:
            event("refused")
            continue
        event("accepted")


@PROPS
@given(st.one_of(TEXT, st.sampled_from(TOKENS), DIGEST,
                 st.tuples(DIGEST, PIECE).map("".join), st.tuples(PIECE, DIGEST).map("".join),
                 st.tuples(st.sampled_from(["sha256:", "sha512:", "SHA256:", ""]), TEXT)
                 .map("".join)))
@example(f"sha256:{HEX64}/../../x")
@example(f"sha256:{HEX64}\n")
@example(f"sha256:{HEX64.upper()}")
def test_tree_blob_stays_inside_or_raises_bad_request(digest) -> None:
    try:
        path = Tree(ROOT).blob(digest)
    except BadRequest:
        event("refused")
        return
    event("accepted")
    assert_inside(path)
    assert path.parent.parent == ROOT / "blobs"


# --- look-alikes are refused, never folded into ASCII ----------------------------------


@pytest.mark.parametrize("host", ["\u212a.test", "registry.test\u3000", "\u00a0registry.test",
                                  "registry.test\u2028", "\u212aube.io"])
def test_non_ascii_hosts_are_refused_not_folded(host: str) -> None:
    """str.lower()/strip() would fold these into a valid ASCII host."""
    with pytest.raises(BadRequest):
        check_domain(host)


@pytest.mark.parametrize("host", ["registry.te\u017ft", "\u0130o.test", "r\u0430.test",
                                  "reg\u2024test", "reg\uff0etest", "a\u2215b"])
def test_non_ascii_hosts_that_do_not_fold_are_refused(host: str) -> None:
    with pytest.raises(BadRequest):
        check_domain(host)
