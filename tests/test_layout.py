"""cr_proxy.layout: wire names -> paths in the cache tree, and nothing outside it."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.cache.layout import (
    INDEX_FILE,
    MAX_PATH_LEN,
    SIDECARS,
    TOP_DIRS,
    Key,
    Kind,
    RegistryPath,
    Sidecar,
    Target,
    Tree,
    blob_digest,
    check_domain,
    check_name,
    check_path,
    digest_url_path,
    key_of,
    mirror_target,
    nginx_arg,
    parse_v2_path,
    proxy_target,
    resolve_domain,
    split_prefix,
)
from cr_proxy.errors import BadRequest

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8
HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
ROOT = Path("/srv/cr-proxy/cache")
PROPS = settings(max_examples=300, deadline=None)


def M(name: str, ref: str) -> RegistryPath:
    return RegistryPath(Kind.MANIFEST, name, ref)


def B(name: str, ref: str = SHA256) -> RegistryPath:
    return RegistryPath(Kind.BLOB, name, ref)


# --- parse_v2_path -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2", RegistryPath(Kind.PING)),
        ("/v2/", RegistryPath(Kind.PING)),
        ("/v2/library/alpine/manifests/latest", M("library/alpine", "latest")),
        ("/v2/alpine/manifests/3.19", M("alpine", "3.19")),
        (f"/v2/org/app/manifests/{SHA256}", M("org/app", SHA256)),
        (f"/v2/org/app/blobs/{SHA256}", B("org/app", SHA256)),
        (f"/v2/org/app/blobs/{SHA512}", B("org/app", SHA512)),
        # A registry prefix is still part of the name here (split_prefix's job).
        ("/v2/ghcr.io/org/app/manifests/v1", M("ghcr.io/org/app", "v1")),
        ("/v2/library/alpine/tags/list", RegistryPath(Kind.TAGS, "library/alpine")),
        ("/v2/_catalog", RegistryPath(Kind.OTHER, "_catalog")),
        ("/v2/x/blobs/uploads/", RegistryPath(Kind.OTHER, "x/blobs/uploads/")),
        ("/v2/x/blobs/uploads/abc", RegistryPath(Kind.OTHER, "x/blobs/uploads/abc")),
    ],
)
def test_parse_v2_path(path, expected):
    assert parse_v2_path(path) == expected


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v3/", "NAME_INVALID"),
        ("v2/", "NAME_INVALID"),
        ("", "NAME_INVALID"),
        ("/", "NAME_INVALID"),
        ("/v2x", "NAME_INVALID"),
        ("/v2/" + "a" * MAX_PATH_LEN, "NAME_INVALID"),
        ("/v2/a/manifests/", "TAG_INVALID"),
        ("/v2/a/manifests/..", "TAG_INVALID"),
        ("/v2/a/manifests/.hidden", "TAG_INVALID"),
        ("/v2/a/manifests/ta%67", "TAG_INVALID"),
        ("/v2/a/manifests/a\\b", "TAG_INVALID"),
        ("/v2/a/manifests/sha256:abc", "TAG_INVALID"),
        ("/v2/a/blobs/latest", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/a/blobs/uploads", "DIGEST_INVALID"),
        ("/v2/a/blobs/", "DIGEST_INVALID"),
    ],
)
def test_parse_v2_path_rejects(path, code):
    with pytest.raises(BadRequest) as info:
        parse_v2_path(path)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("rpath", "path"),
    [
        (RegistryPath(Kind.PING), "v2/"),
        (M("library/alpine", "latest"), "v2/library/alpine/manifests/latest"),
        (B("org/app"), f"v2/org/app/blobs/{SHA256}"),
    ],
)
def test_registry_path_path_is_the_url_path_without_leading_slash(rpath, path):
    assert rpath.path == path


def test_registry_path_path_of_other_is_the_url_path():
    assert parse_v2_path("/v2/library/alpine/tags/list").path == "v2/library/alpine/tags/list"


@pytest.mark.parametrize(
    ("rpath", "by_digest"),
    [(M("a", "latest"), False), (M("a", SHA256), True), (B("a", SHA512), True)],
)
def test_registry_path_by_digest(rpath, by_digest):
    assert rpath.by_digest is by_digest


# --- split_prefix, check_name, resolve_domain --------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ghcr.io/org/app", ("ghcr.io", "org/app")),
        ("localhost:5000/x", ("localhost:5000", "x")),
        ("localhost/x", ("localhost", "x")),
        ("library/alpine", (None, "library/alpine")),
        ("alpine", (None, "alpine")),
        ("ghcr.io", (None, "ghcr.io")),
    ],
)
def test_split_prefix(name, expected):
    assert split_prefix(name) == expected


@pytest.mark.parametrize("name", ["", "A", "a/../b", "a//b", "a\x00", "../etc"])
def test_check_name_rejects_invalid_names(name):
    with pytest.raises(BadRequest) as info:
        check_name(name)
    assert info.value.code == "NAME_INVALID"


@pytest.mark.parametrize(
    ("registry", "domain"),
    [
        ("docker.io", "registry-1.docker.io"),
        ("DOCKER.IO", "registry-1.docker.io"),
        ("docker.io:443", "registry-1.docker.io"),
        ("index.docker.io", "registry-1.docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
    ],
)
def test_resolve_domain_maps_aliases_and_normalises(registry, domain):
    assert resolve_domain(registry, HOSTS) == domain


# --- mirror_target -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ns", "default", "expected"),
    [
        # Docker's registry-mirrors: no registry named, the default one.
        (
            "/v2/library/alpine/manifests/latest", None, "docker.io",
            Target("docker.io", "registry-1.docker.io", M("library/alpine", "latest")),
        ),
        # Docker's library/ rule for official images.
        (
            "/v2/alpine/manifests/latest", None, "docker.io",
            Target("docker.io", "registry-1.docker.io", M("library/alpine", "latest")),
        ),
        (
            f"/v2/alpine/blobs/{SHA256}", None, "docker.io",
            Target("docker.io", "registry-1.docker.io", B("library/alpine")),
        ),
        (
            "/v2/user/repo/manifests/v1", None, "docker.io",
            Target("docker.io", "registry-1.docker.io", M("user/repo", "v1")),
        ),
        # Another default registry: no alias, no library/ rule.
        (
            "/v2/alpine/manifests/latest", None, "registry.test",
            Target("registry.test", "registry.test", M("alpine", "latest")),
        ),
        # containerd's ?ns=
        (
            "/v2/org/app/manifests/v1", "ghcr.io", "docker.io",
            Target("ghcr.io", "ghcr.io", M("org/app", "v1")),
        ),
        (
            "/v2/alpine/manifests/latest", "docker.io", "registry.test",
            Target("docker.io", "registry-1.docker.io", M("library/alpine", "latest")),
        ),
        (
            "/v2/app/manifests/latest", "ghcr.io", "docker.io",
            Target("ghcr.io", "ghcr.io", M("app", "latest")),
        ),
        ("/v2/", "ghcr.io", "docker.io", Target("ghcr.io", "ghcr.io", RegistryPath(Kind.PING))),
        # A path prefix names the registry, and wins over ns.
        (
            "/v2/ghcr.io/org/app/manifests/v1", None, "docker.io",
            Target("ghcr.io", "ghcr.io", M("org/app", "v1")),
        ),
        (
            "/v2/ghcr.io/org/app/manifests/v1", "quay.io", "docker.io",
            Target("ghcr.io", "ghcr.io", M("org/app", "v1")),
        ),
        (
            f"/v2/localhost:5000/x/blobs/{SHA256}", None, "docker.io",
            Target("localhost:5000", "localhost:5000", B("x")),
        ),
        (
            "/v2/docker.io/alpine/manifests/latest", None, "registry.test",
            Target("docker.io", "registry-1.docker.io", M("library/alpine", "latest")),
        ),
        # registry_hosts alias
        (
            "/v2/", None, "docker.io",
            Target("docker.io", "registry-1.docker.io", RegistryPath(Kind.PING)),
        ),
        (
            "/v2/library/alpine/tags/list", None, "docker.io",
            Target(
                "docker.io", "registry-1.docker.io",
                RegistryPath(Kind.TAGS, "library/alpine"),
            ),
        ),
    ],
)
def test_mirror_target(path, ns, default, expected):
    assert mirror_target(path, ns, default, HOSTS) == expected


@pytest.mark.parametrize(
    "ns",
    [
        "index.docker.io",
        "DOCKER.IO",
        "docker.io:443",
        "docker.io",
    ],
)
def test_mirror_target_applies_library_rule_to_every_spelling_of_docker_hub(ns):
    target = mirror_target("/v2/alpine/manifests/latest", ns, "docker.io", HOSTS)
    assert target.domain == "registry-1.docker.io"
    assert target.rpath == M("library/alpine", "latest")


@pytest.mark.parametrize(
    ("path", "ns"),
    [
        ("/v2/Alpine/manifests/latest", None),
        ("/v2/a/../b/manifests/latest", None),
        ("/v2/manifests/latest", None),
        ("/v2/manifests/latest", "ghcr.io"),
        ("/v2/alpine/manifests/latest", "../../etc"),
        ("/v2/alpine/manifests/latest", "a/b"),
        ("/v2/alpine/manifests/latest", "%2e%2e"),
        ("/v2/", "evil\x00.test"),
        ("/v2/ghcr.io/Org/app/manifests/v1", None),
        ("/v2/bad_host.io/x/manifests/v1", None),
        ("/v2/x/manifests/..", None),
        ("/etc/passwd", None),
    ],
)
def test_mirror_target_rejects(path, ns):
    with pytest.raises(BadRequest):
        mirror_target(path, ns, "docker.io", HOSTS)


# --- proxy_target --------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        (
            "registry-1.docker.io", "/v2/library/alpine/manifests/latest",
            ("registry-1.docker.io", M("library/alpine", "latest")),
        ),
        # No library/ rule in proxy mode: the client already spoke to the real host.
        ("ghcr.io", "/v2/app/manifests/latest", ("ghcr.io", M("app", "latest"))),
        ("GHCR.IO:443", f"/v2/o/a/blobs/{SHA256}", ("ghcr.io", B("o/a"))),
        ("ghcr.io", "/v2/", ("ghcr.io", RegistryPath(Kind.PING))),
        ("ghcr.io", "/v2", ("ghcr.io", RegistryPath(Kind.PING))),
        ("ghcr.io", "/v2/o/a/tags/list", ("ghcr.io", RegistryPath(Kind.TAGS, "o/a"))),
        ("auth.docker.io", "/token", ("auth.docker.io", None)),
        ("cdn.test:8443", "/sha256/ab/abcdef", ("cdn.test:8443", None)),
        ("cdn.test", "/a/b/", ("cdn.test", None)),
    ],
)
def test_proxy_target(host, path, expected):
    assert proxy_target(host, path) == expected


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("", "/v2/"),
        ("evil/../x", "/v2/"),
        ("a b", "/token"),
        ("ghcr.io", "/v2/Org/app/manifests/v1"),
        ("ghcr.io", "/v2/manifests/v1"),
        ("ghcr.io", "/v2/a/manifests/bad%20tag"),
        ("cdn.test", "/../etc/passwd"),
        ("cdn.test", "/a/%2e%2e/b"),
        ("cdn.test", "/a\\b"),
        ("cdn.test", "/a\x00b"),
        ("cdn.test", "//etc/passwd"),
        ("cdn.test", ""),
    ],
)
def test_proxy_target_rejects(host, path):
    with pytest.raises(BadRequest):
        proxy_target(host, path)


# --- check_domain, check_path --------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("ghcr.io", "ghcr.io"),
        ("GHCR.IO", "ghcr.io"),
        ("  ghcr.io\t", "ghcr.io"),
        ("ghcr.io:443", "ghcr.io"),
        ("ghcr.io:80", "ghcr.io"),
        ("ghcr.io:8443", "ghcr.io:8443"),
        ("ghcr.io:4430", "ghcr.io:4430"),
        ("localhost:5000", "localhost:5000"),
        ("[::1]:443", "[::1]"),
        ("[::1]:5000", "[::1]:5000"),
    ],
)
def test_check_domain_lower_cases_and_drops_default_ports(host, expected):
    assert check_domain(host) == expected


@pytest.mark.parametrize(
    "host",
    [
        "", ".", "..", ":443", "a/b", "../x", "a\\b", "a\x00b", "%2e%2e", "a..b",
        "user@host", "a_b", "host:port", "d\u043eck\u0435r.io", "x" * 300,
    ],
)
def test_check_domain_rejects(host):
    with pytest.raises(BadRequest) as info:
        check_domain(host)
    assert info.value.code == "NAME_INVALID"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/library/alpine/manifests/latest", "v2/library/alpine/manifests/latest"),
        ("v2/a/blobs/x", "v2/a/blobs/x"),
        ("/v2/", f"v2/{INDEX_FILE}"),
        ("/token", "token"),
        ("/a/b/", f"a/b/{INDEX_FILE}"),
        (f"/v2/a/blobs/{SHA256}", f"v2/a/blobs/{SHA256}"),
        ("/a/~user/x@y+z=1,2:3", "a/~user/x@y+z=1,2:3"),
        ("/a/...", "a/..."),
    ],
)
def test_check_path_strips_leading_slash_and_maps_directories_to_index(path, expected):
    assert check_path(path) == expected


def test_check_path_maps_the_root_path_to_index():
    assert check_path("/") == INDEX_FILE


@pytest.mark.parametrize(
    "path", ["/v2/x/blobs/../../etc/passwd", "/v2/%2e%2e/_catalog", "/v2/a\\b/tags/list"]
)
def test_mirror_target_refuses_hostile_paths_it_would_relay(path):
    """Uncached paths are relayed upstream as checked, so they are checked."""
    with pytest.raises(BadRequest):
        mirror_target(path, None, "docker.io", HOSTS)


@pytest.mark.parametrize(
    "path",
    [
        "", "//", "/a//b", "/./a", "/a/./b", "/a/..", "/../a", "..", ".", "/a/../../etc",
        "/a%2fb", "/%2e%2e/x", "/a\\b", "/a\x00", "/a b", "/a?b=c", "/a#b", "/a;b",
        "/a\nb", "/\u0430", "/a\uff0fb", "/" + "a" * 256,
        "/" + "a/" * (MAX_PATH_LEN // 2 + 1),
    ],
)
def test_check_path_rejects(path):
    with pytest.raises(BadRequest) as info:
        check_path(path)
    assert info.value.code == "NAME_INVALID"


# --- Tree ---------------------------------------------------------------------


def test_tree_content_is_under_content_domain_path():
    tree = Tree(ROOT)
    assert tree.content("GHCR.io:443", "/v2/a/manifests/v1") == (
        ROOT / "content" / "ghcr.io" / "v2" / "a" / "manifests" / "v1"
    )


def test_tree_content_of_a_directory_path_is_its_index_file():
    assert Tree(ROOT).content("ghcr.io", "/v2/") == ROOT / "content" / "ghcr.io" / "v2" / "_index"


@pytest.mark.parametrize("kind", SIDECARS)
def test_tree_sidecar_mirrors_content_under_its_kind(kind):
    assert Tree(ROOT).sidecar(kind, "ghcr.io", "/v2/a/manifests/v1") == (
        ROOT / kind / "ghcr.io" / "v2/a/manifests/v1"
    )


@pytest.mark.parametrize("kind", ["content", "blobs", "temp", "../x", ""])
def test_tree_sidecar_rejects_unknown_kinds(kind):
    with pytest.raises(ValueError) as info:
        Tree(ROOT).sidecar(kind, "ghcr.io", "/x")
    assert str(info.value) == kind


@pytest.mark.parametrize(
    ("digest", "expected"),
    [
        (SHA256, ROOT / "blobs" / "sha256" / SHA256.split(":")[1]),
        (SHA512, ROOT / "blobs" / "sha512" / SHA512.split(":")[1]),
    ],
)
def test_tree_blob_is_algorithm_then_hex(digest, expected):
    assert Tree(ROOT).blob(digest) == expected


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:abc", "", "../x"])
def test_tree_blob_rejects_invalid_digests(digest):
    with pytest.raises(BadRequest) as info:
        Tree(ROOT).blob(digest)
    assert info.value.code == "DIGEST_INVALID"


def test_tree_temp_is_under_root():
    assert Tree(ROOT).temp == ROOT / "temp"


@pytest.mark.parametrize(
    ("domain", "path"),
    [("ghcr.io", "v2/a/manifests/v1"), ("localhost:5000", "v2/_index"), ("a", "x")],
)
def test_tree_parse_content_inverts_content(domain, path):
    tree = Tree(ROOT)
    assert tree.parse_content(tree.content(domain, path)) == (domain, path)


def test_tree_parse_content_rejects_paths_outside_content():
    with pytest.raises(ValueError):
        Tree(ROOT).parse_content(ROOT / "blobs" / "sha256" / "x")


def test_tree_repr_names_the_root():
    assert repr(Tree(ROOT)) == f"Tree({str(ROOT)!r})"


# --- properties: no name from the wire leaves the tree --------------------------

WIRE_CHARS = st.one_of(
    st.sampled_from([*"./\\%\x00:@?#~ -_", "..", "%2e", "%2f", "\u2024", "\uff0e"]),
    st.sampled_from("abcxyz0189"),
    st.characters(codec="utf-8"),
)
WIRE_TEXT = st.lists(WIRE_CHARS, max_size=24).map("".join)
SEGMENT = st.one_of(
    WIRE_TEXT,
    st.sampled_from(["", ".", "..", "...", "_index", "library", "alpine", "ghcr.io",
                     "localhost:5000", "manifests", "blobs", "latest", SHA256, "%2e%2e"]),
)
# Mostly well-formed registry paths with a hostile piece here and there, so the
# properties also see requests that pass the parsers.
NAME_SEGMENT = st.one_of(
    st.sampled_from(["library", "alpine", "org", "a.b", "a__b", "x-y", "ghcr.io",
                     "localhost:5000", "docker.io", "index.docker.io"]),
    SEGMENT,
)
V2_PATH = st.builds(
    "/v2/{}/{}/{}".format,
    st.lists(NAME_SEGMENT, min_size=1, max_size=4).map("/".join),
    st.sampled_from(["manifests", "blobs", "tags", "manifests/"]),
    st.one_of(st.sampled_from(["latest", "v1.0", "_x", SHA256, SHA512]), SEGMENT),
)
WIRE_PATH = st.one_of(
    WIRE_TEXT,
    V2_PATH,
    V2_PATH,
    st.lists(SEGMENT, max_size=6).map(lambda segs: "/v2/" + "/".join(segs)),
    st.lists(SEGMENT, max_size=6).map(lambda segs: "/" + "/".join(segs)),
)
WIRE_HOST = st.one_of(
    WIRE_TEXT,
    st.sampled_from(["cdn.test", "auth.docker.io", "quay.io", "registry-1.docker.io:443"]),
    st.sampled_from(["docker.io", "DOCKER.IO", "ghcr.io:443", "localhost:5000", "[::1]",
                     "..", ".", "a/..", "[..]", "x:80"]),
)


def assert_inside(root: Path, path: Path) -> None:
    rel = PurePosixPath(path).relative_to(root)  # raises if not under root
    assert ".." not in rel.parts and rel.parts
    normalised = os.path.normpath(path)
    assert normalised.startswith(str(root) + os.sep)
    assert ".." not in PurePosixPath(normalised).parts
    assert "\x00" not in str(path)


@PROPS
@given(
    WIRE_PATH,
    st.one_of(st.none(), st.none(), WIRE_HOST),
    st.sampled_from(["docker.io", "quay.io"]),
)
def test_mirror_target_never_leaves_the_tree(path, ns, default):
    tree = Tree(ROOT)
    try:
        target = mirror_target(path, ns, default, HOSTS)
    except BadRequest:
        return
    if target.rpath.kind is Kind.OTHER:
        # Passed through uncached; if anyone ever stores it, it must be safe.
        try:
            stored = tree.content(target.domain, target.rpath.path)
        except BadRequest:
            return
    else:
        stored = tree.content(target.domain, target.rpath.path)
    assert_inside(ROOT, stored)
    for kind in SIDECARS:
        assert_inside(ROOT, tree.sidecar(kind, target.domain, target.rpath.path))
    if target.rpath.kind in (Kind.MANIFEST, Kind.BLOB) and target.rpath.by_digest:
        assert_inside(ROOT, tree.blob(target.rpath.ref))


@PROPS
@given(WIRE_HOST, WIRE_PATH)
def test_proxy_target_never_leaves_the_tree(host, path):
    tree = Tree(ROOT)
    try:
        domain, rpath = proxy_target(host, path)
    except BadRequest:
        return
    if rpath is None:
        stored = tree.content(domain, path)
    elif rpath.kind is Kind.OTHER:
        try:
            stored = tree.content(domain, rpath.path)
        except BadRequest:
            return
    else:
        stored = tree.content(domain, rpath.path)
    assert_inside(ROOT, stored)


@PROPS
@given(WIRE_HOST, WIRE_PATH, st.sampled_from(SIDECARS))
def test_tree_content_and_sidecar_raise_or_stay_inside(host, path, kind):
    tree = Tree(ROOT)
    for make in (lambda: tree.content(host, path), lambda: tree.sidecar(kind, host, path)):
        try:
            stored = make()
        except BadRequest:
            continue
        assert_inside(ROOT, stored)


ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
LABEL = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(ALNUM),
    st.text(ALNUM + "-", max_size=6),
    st.sampled_from(ALNUM),
)
VALID_DOMAIN = st.builds(
    lambda labels, port: ".".join(labels) + port,
    st.lists(LABEL, min_size=1, max_size=4),
    st.one_of(st.just(""), st.integers(1, 65535).filter(lambda p: p not in (80, 443))
              .map(":{}".format)),
)
VALID_SEGMENT = st.text("abcxyzABCZ0189._~:@+=,-", min_size=1, max_size=12)
VALID_PATH = st.lists(VALID_SEGMENT.filter(lambda s: s not in (".", "..")),
                      min_size=1, max_size=6).map("/".join)


@PROPS
@given(VALID_DOMAIN, VALID_PATH)
def test_tree_parse_content_round_trips_valid_names(domain, path):
    tree = Tree(ROOT)
    assert tree.parse_content(tree.content(domain, path)) == (domain, path)
    # Canonical names pass the checks unchanged, with or without the leading slash.
    assert tree.content(domain, "/" + path) == tree.content(domain, path)
    assert check_domain(domain) == domain
    assert check_path(path) == path


# --- redirect targets -------------------------------------------------------------------

HEX = "ab" * 32
BLOB = f"sha256:{HEX}"


@pytest.mark.parametrize(("path", "stored"), [
    # Docker Hub's CDN and the test CDN: .../sha256/<2>/<hex>/data
    (f"/registry-v2/docker/registry/v2/blobs/sha256/ab/{HEX}/data",
     f"registry-v2/docker/registry/v2/blobs/sha256/ab/{HEX}/data"),
    (f"/ghcr1/blobs/{BLOB}", f"ghcr1/blobs/{BLOB}"),  # the whole digest as a segment
    (f"/sha256/ab/{HEX}", f"sha256/ab/{HEX}"),
])
def test_a_digest_named_redirect_target_is_stored_under_its_path(path: str, stored: str) -> None:
    assert digest_url_path(path, BLOB) == stored


@pytest.mark.parametrize("path", [
    "/go",  # an open redirect: never
    "/download",
    f"/blobs/{'cd' * 32}/data",  # another digest
    f"/blobs/x{HEX}/data",  # the hex inside a segment, not as one
    f"/blobs/{HEX[:-1]}/data",
    f"/blobs/{HEX}/../../go",  # dot segments
    f"/blobs/%2e%2e/{HEX}",  # nothing percent-encoded
    "/",
])
def test_any_other_redirect_target_is_never_stored(path: str) -> None:
    assert digest_url_path(path, BLOB) is None


# --- keys: where a cached answer lives (a table, as distribution's paths_test.go) ---------

KEY_TABLE = [
    # key, its path under content/<domain>/
    (Key.manifest("ghcr.io", "org/app", "v1"), "v2/org/app/manifests/v1"),
    (Key.manifest("registry-1.docker.io", "library/alpine", SHA256),
     f"v2/library/alpine/manifests/{SHA256}"),
    (Key.blob("localhost:5000", "a/b/c", SHA512), f"v2/a/b/c/blobs/{SHA512}"),
    # A repository whose name holds the kind's word is still one key.
    (Key.manifest("ghcr.io", "x/manifests/y", "latest"), "v2/x/manifests/y/manifests/latest"),
    (Key("ghcr.io", "", Kind.OTHER, "v2/_index"), "v2/_index"),
    (Key("cdn.test", "", Kind.OTHER, f"registry-v2/blobs/sha256/ab/{SHA256[7:]}/data"),
     f"registry-v2/blobs/sha256/ab/{SHA256[7:]}/data"),
    # Not a manifest: an invalid tag, or a blob path without a digest, stays a plain path.
    (Key("ghcr.io", "", Kind.OTHER, "v2/a/manifests/-x"), "v2/a/manifests/-x"),
    (Key("ghcr.io", "", Kind.OTHER, "v2/a/blobs/latest"), "v2/a/blobs/latest"),
]


@pytest.mark.parametrize(("key", "path"), KEY_TABLE)
def test_key_path_table(key: Key, path: str) -> None:
    tree = Tree(ROOT)
    assert key.path == path
    assert tree.at(key) == ROOT / "content" / key.domain / path
    assert tree.at(key) == tree.content(key.domain, path)
    for kind in Sidecar:
        assert tree.at(key, kind) == ROOT / kind.value / key.domain / path
        assert tree.at(key, kind) == tree.sidecar(kind.value, key.domain, path)
    assert key_of(key.domain, path) == key
    assert key_of(key.domain, "/" + path) == key
    assert tree.key_at(tree.at(key)) == key


@pytest.mark.parametrize(
    "make",
    [
        lambda: Key.manifest("GHCR.io", "a", "v1"),  # not canonical: one key per name
        lambda: Key.manifest("ghcr.io:443", "a", "v1"),
        lambda: Key.manifest("ghcr.io", "A", "v1"),
        lambda: Key.manifest("ghcr.io", "a", "-x"),
        lambda: Key.manifest("ghcr.io", "../a", "v1"),
        lambda: Key.blob("ghcr.io", "a", "latest"),
        lambda: Key.blob("ghcr.io", "a", "sha256:../../x"),
        lambda: Key("ghcr.io", "", Kind.OTHER, "/v2/_index"),
        lambda: Key("ghcr.io", "", Kind.OTHER, "a/../b"),
        lambda: Key("ghcr.io", "", Kind.OTHER, "v2/a/manifests/v1"),  # that is a MANIFEST key
        lambda: Key("ghcr.io", "a", Kind.OTHER, "x"),
    ],
)
def test_key_refuses_what_the_tree_cannot_hold_or_names_twice(make) -> None:
    with pytest.raises(BadRequest):
        make()


@pytest.mark.parametrize("kind", [Kind.PING, Kind.TAGS])
def test_key_kinds_are_what_the_cache_stores(kind: Kind) -> None:
    with pytest.raises(ValueError):
        Key("ghcr.io", "a", kind, "")


def test_sidecar_kinds_are_the_trees_names() -> None:
    assert SIDECARS == ("content-type", "docker-content-digest", "www-authenticate", "redirect")
    assert tuple(Sidecar) == SIDECARS  # StrEnum: a member is its name
    assert set(TOP_DIRS) == {"content", "blobs", "temp", "held", "lists", *SIDECARS}


def test_tree_names_the_quarantine_and_the_usage_file() -> None:
    tree = Tree(ROOT)
    assert tree.quarantined(SHA256) == ROOT / "quarantine" / SHA256.replace(":", "-")
    assert tree.uses_file == ROOT / "usage.json"
    assert tree.top("blobs") == ROOT / "blobs"
    with pytest.raises(ValueError):
        tree.top("..")
    with pytest.raises(BadRequest):
        tree.quarantined("sha256:../../etc")


@pytest.mark.parametrize(
    ("algorithm", "name", "digest"),
    [("sha256", SHA256[7:], SHA256), ("sha512", SHA512[7:], SHA512),
     ("sha256", "abc", None), ("md5", SHA256[7:], None), ("sha256", SHA256[7:].upper(), None)],
)
def test_blob_digest_inverts_tree_blob(algorithm: str, name: str, digest: str | None) -> None:
    assert blob_digest(algorithm, name) == digest
    if digest is not None:
        assert Tree(ROOT).blob(digest) == ROOT / "blobs" / algorithm / name


# --- keys: properties -------------------------------------------------------------

ALNUM_RUN = st.text("abcxyz0189", min_size=1, max_size=6)
REPO_COMPONENT = st.builds(
    lambda a, sep, b: a + sep + b if sep else a,
    ALNUM_RUN, st.sampled_from(["", ".", "_", "__", "-", "---"]), ALNUM_RUN,
)
REPOSITORY = st.lists(REPO_COMPONENT, min_size=1, max_size=4).map("/".join)
TAG = st.builds(str.__add__, st.sampled_from("aZ9_"), st.text("abcXYZ019_.-", max_size=12))
DIGEST = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
    st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"),
)
REGISTRY_KEY = st.one_of(
    st.builds(Key.manifest, VALID_DOMAIN, REPOSITORY, st.one_of(TAG, DIGEST)),
    st.builds(Key.blob, VALID_DOMAIN, REPOSITORY, DIGEST),
)


@PROPS
@given(REGISTRY_KEY)
def test_key_round_trips_through_its_path(key: Key) -> None:
    tree = Tree(ROOT)
    assert key_of(key.domain, key.path) == key
    assert tree.key_at(tree.at(key)) == key
    assert_inside(ROOT, tree.at(key))
    for kind in Sidecar:
        assert_inside(ROOT, tree.at(key, kind))
    # The request that names it (https_proxy mode) maps to the same name.
    domain, rpath = proxy_target(key.domain, "/" + key.path)
    assert rpath is not None and (domain, rpath.path) == (key.domain, key.path)


@PROPS
@given(VALID_DOMAIN, VALID_PATH)
def test_any_storable_name_has_one_key_and_back(domain: str, path: str) -> None:
    key = key_of(domain, path)
    assert key.path == path
    assert key_of(key.domain, key.path) == key
    assert Key(key.domain, key.repository, key.kind, key.reference) == key
    assert Tree(ROOT).at(key) == Tree(ROOT).content(domain, path)


@pytest.mark.parametrize(("query", "value"), [
    ("ns=ghcr.io", "ghcr.io"),
    ("n=5&ns=ghcr.io", "ghcr.io"),
    ("NS=docker.io&ns=ghcr.io", "docker.io"),  # the first, in any case
    ("n%73=ghcr.io", None),  # names are not decoded
    ("ns=ghcr%2Eio", "ghcr%2Eio"),  # nor values
    ("ns", None),
    ("", None),
])
def test_ns_is_read_as_nginx_reads_its_arg(query: str, value: str | None) -> None:
    assert nginx_arg(query, "ns") == value
