"""cr_proxy.reference: Docker's reference grammar and short-name rules."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.errors import BadRequest
from cr_proxy.oci.reference import (
    MAX_NAME_LEN,
    Reference,
    check_digest,
    digest_of,
    hasher,
    is_digest,
    is_host,
    is_name,
    is_tag,
    names_registry,
    parse_reference,
)

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8
# Characters that attack paths, URLs, shells and C strings, plus look-alikes.
HOSTILE = "./\\%\x00:@?#;&$`'\" \t\n\r~*[]{}<>|!=+,AZ"
LOOKALIKES = "\u0430\u0435\u043e\u0440\u0441\u0455\u0456\u2024\uff0e\u2215\uff0f\u212a\u0131\u00df"
PROPS = settings(max_examples=300, deadline=None)


LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
TAG_FIRST = LOWER_ALNUM + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
# Built by hand: st.from_regex on these grammars is far too slow.
COMPONENTS = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    st.text(LOWER_ALNUM, min_size=1, max_size=6),
    st.lists(
        st.tuples(
            st.sampled_from([".", "_", "__", "-", "--", "---"]),
            st.text(LOWER_ALNUM, min_size=1, max_size=6),
        ),
        max_size=3,
    ),
)
NAMES = st.lists(COMPONENTS, min_size=1, max_size=6).map("/".join)
TAGS = st.builds(
    str.__add__, st.sampled_from(TAG_FIRST), st.text(TAG_FIRST + ".-", max_size=127)
)
DIGESTS = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:{}".format),
    st.text("0123456789abcdef", min_size=128, max_size=128).map("sha512:{}".format),
)
LABELS = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(LOWER_ALNUM),
    st.text(LOWER_ALNUM + "-", max_size=20),
    st.sampled_from(LOWER_ALNUM),
)
HOSTS = st.builds(
    lambda labels, port: ".".join(labels) + port,
    st.lists(LABELS, min_size=1, max_size=4),
    st.one_of(st.just(""), st.integers(1, 65535).map(":{}".format)),
)


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(
        st.one_of(
            st.sampled_from(HOSTILE + LOOKALIKES + "abcxyz019-_"),
            st.characters(codec="utf-8"),
        ),
        max_size=max_size,
    )


# --- parse_reference: Docker's rules -----------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "name", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("  alpine  ", "docker.io", "library/alpine", "latest", None),
        ("library/alpine", "docker.io", "library/alpine", "latest", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", None),
        ("user/repo", "docker.io", "user/repo", "latest", None),
        ("foo.bar", "docker.io", "library/foo.bar", "latest", None),
        ("a/b/c/d:_", "docker.io", "a/b/c/d", "_", None),
        (f"alpine@{SHA256}", "docker.io", "library/alpine", None, SHA256),
        (f"alpine:3.19@{SHA256}", "docker.io", "library/alpine", "3.19", SHA256),
        (f"ghcr.io/org/app@{SHA256}", "ghcr.io", "org/app", None, SHA256),
        (f"ghcr.io/org/app@{SHA512}", "ghcr.io", "org/app", None, SHA512),
        (f"ghcr.io/org/app:v2@{SHA256}", "ghcr.io", "org/app", "v2", SHA256),
        ("localhost:5000/x:tag", "localhost:5000", "x", "tag", None),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("registry.test/a/b:v1", "registry.test", "a/b", "v1", None),
        ("registry.test:5000/a/b", "registry.test:5000", "a/b", "latest", None),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
        # No slash: "localhost:5000" is the official image localhost, tag 5000.
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
    ],
)
def test_parse_reference_follows_docker_rules(text, registry, name, tag, digest):
    assert parse_reference(text) == Reference(registry, name, tag, digest)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        (f"alpine@{SHA256}", f"docker.io/library/alpine@{SHA256}"),
        (f"ghcr.io/o/a:v1@{SHA256}", f"ghcr.io/o/a:v1@{SHA256}"),
        ("localhost:5000/x:tag", "localhost:5000/x:tag"),
    ],
)
def test_reference_str_is_fully_qualified(text, expected):
    assert str(parse_reference(text)) == expected


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("alpine", "latest"),
        ("alpine:3", "3"),
        (f"alpine@{SHA256}", SHA256),
        (f"alpine:3@{SHA256}", SHA256),
    ],
)
def test_reference_ref_prefers_the_digest(text, ref):
    assert parse_reference(text).ref == ref


def test_reference_ref_defaults_to_latest_without_tag_or_digest():
    assert Reference("docker.io", "library/alpine").ref == "latest"


def test_parse_reference_uses_the_given_default_registry_without_library_prefix():
    assert parse_reference("alpine", default_registry="registry.test") == Reference(
        "registry.test", "alpine", "latest", None
    )


def test_parse_reference_adds_library_when_default_registry_is_docker_io():
    assert parse_reference("alpine", default_registry="docker.io").name == "library/alpine"


def test_parse_reference_normalises_legacy_index_docker_io():
    assert parse_reference("index.docker.io/alpine") == Reference(
        "docker.io", "library/alpine", "latest", None
    )


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "NAME_INVALID"),
        ("Alpine", "NAME_INVALID"),
        ("a b", "NAME_INVALID"),
        (":tag", "NAME_INVALID"),
        ("alpine:latest:x", "NAME_INVALID"),
        ("UPPER.io/x", "NAME_INVALID"),
        ("ex ample.com/x", "NAME_INVALID"),
        ("exa_mple.com/x", "NAME_INVALID"),
        ("a..b", "NAME_INVALID"),
        ("a/../b", "NAME_INVALID"),
        ("../x", "NAME_INVALID"),
        ("./x", "NAME_INVALID"),
        ("/x", "NAME_INVALID"),
        ("x/", "NAME_INVALID"),
        ("x//y", "NAME_INVALID"),
        ("-x", "NAME_INVALID"),
        ("x-", "NAME_INVALID"),
        ("a%2e%2e/b", "NAME_INVALID"),
        ("a\\b", "NAME_INVALID"),
        ("a\x00b", "NAME_INVALID"),
        ("\u0430lpine", "NAME_INVALID"),  # Cyrillic a
        ("a" * 300, "NAME_INVALID"),
        ("registry.test/" + "a" * 300, "NAME_INVALID"),
        (f"a@b@{SHA256}", "NAME_INVALID"),
        ("alpine:", "TAG_INVALID"),
        ("alpine:-x", "TAG_INVALID"),
        ("alpine:.x", "TAG_INVALID"),
        ("alpine:" + "a" * 129, "TAG_INVALID"),
        ("alpine:t\u0430g", "TAG_INVALID"),
        ("alpine@", "DIGEST_INVALID"),
        ("alpine@sha256:abc", "DIGEST_INVALID"),
        ("alpine@sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("alpine@md5:" + "a" * 32, "DIGEST_INVALID"),
        ("alpine@sha512:" + "a" * 64, "DIGEST_INVALID"),
        (f"alpine:3@{SHA256}x", "DIGEST_INVALID"),
    ],
)
def test_parse_reference_rejects_invalid_input_with_the_right_code(text, code):
    with pytest.raises(BadRequest) as info:
        parse_reference(text)
    assert info.value.code == code
    assert info.value.status == 400


# --- the predicates ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("alpine", True),
        ("library/alpine", True),
        ("a/b/c/d/e", True),
        ("a.b", True),
        ("a_b", True),
        ("a__b", True),
        ("a-b", True),
        ("a---b", True),
        ("0", True),
        ("a" * MAX_NAME_LEN, True),
        ("a" * (MAX_NAME_LEN + 1), False),
        ("a" * 300, False),
        ("/".join(["abc"] * 100), False),  # 399 chars
        ("", False),
        ("Alpine", False),
        ("ALPINE", False),
        ("a..b", False),
        ("..", False),
        (".", False),
        ("a/..", False),
        ("../a", False),
        ("a/./b", False),
        ("a___b", False),
        ("a.-b", False),
        ("_a", False),
        ("a_", False),
        (".a", False),
        ("a.", False),
        ("/a", False),
        ("a/", False),
        ("a//b", False),
        ("%2e%2e", False),
        ("a%2fb", False),
        ("a\\b", False),
        ("a\x00", False),
        ("a\n", False),
        ("a b", False),
        ("a:b", False),
        ("a@b", False),
        ("\u0430", False),  # Cyrillic a
        ("a\u2024b", False),  # one dot leader
        ("a\uff0fb", False),  # fullwidth solidus
        ("\u212a", False),  # Kelvin sign, lower-cases to k
        ("\u0131", False),  # dotless i
        ("\uff10", False),  # fullwidth 0
        ("\u0661", False),  # Arabic-Indic 1
    ],
)
def test_is_name(name, ok):
    assert is_name(name) is ok


@pytest.mark.parametrize(
    ("tag", "ok"),
    [
        ("latest", True),
        ("3.19", True),
        ("v1.0-rc.1", True),
        ("_", True),
        ("A_b.C-d", True),
        ("0", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (".", False),
        ("..", False),
        (".hidden", False),
        ("-x", False),
        ("a/b", False),
        ("a:b", False),
        ("a@b", False),
        ("a+b", False),
        ("a b", False),
        ("a%2e", False),
        ("a\\b", False),
        ("a\x00", False),
        ("a\n", False),
        ("t\u0430g", False),
        ("\uff10", False),
        ("\u0661", False),
        (SHA256, False),
    ],
)
def test_is_tag(tag, ok):
    assert is_tag(tag) is ok


@pytest.mark.parametrize(
    ("digest", "ok"),
    [
        (SHA256, True),
        (SHA512, True),
        ("sha256:" + "0" * 64, True),
        ("sha256:" + "0" * 63, False),
        ("sha256:" + "0" * 65, False),
        ("sha512:" + "0" * 64, False),
        ("sha256:" + "A" * 64, False),
        ("sha256:" + "g" * 64, False),
        ("SHA256:" + "0" * 64, False),
        ("md5:" + "0" * 32, False),
        ("sha384:" + "0" * 96, False),
        ("sha256" + "0" * 64, False),
        (":" + "0" * 64, False),
        ("", False),
        ("sha256:", False),
        (SHA256 + "\n", False),
        (SHA256 + "\x00", False),
        (" " + SHA256, False),
        ("sha256:../" + "0" * 61, False),
        ("sha256:" + "\uff10" * 64, False),
        ("sha256:" + "\u0661" * 64, False),
    ],
)
def test_is_digest(digest, ok):
    assert is_digest(digest) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("docker.io", True),
        ("registry-1.docker.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("a", True),
        ("127.0.0.1", True),
        ("127.0.0.1:8080", True),
        ("[::1]", True),
        ("[::1]:5000", True),
        ("[2001:db8::1]:443", True),
        ("a" * 63 + ".test", True),
        ("a" * 64 + ".test", False),
        (".".join(["a" * 63] * 4), False),  # 255 chars
        ("a" * 300, False),
        ("a." * 150 + "a", False),
        ("", False),
        (".", False),
        ("..", False),
        ("a..b", False),
        (".a", False),
        ("a.", False),
        ("-a", False),
        ("a-", False),
        ("a_b", False),
        ("Docker.io", False),
        ("DOCKER.IO", False),
        ("a/b", False),
        ("/", False),
        ("a\\b", False),
        ("a\x00", False),
        ("a\n", False),
        ("a b", False),
        ("a:", False),
        ("a:port", False),
        ("a:123456", False),
        ("a@b", False),
        ("user@a.test", False),
        ("%2e%2e", False),
        ("a%2fb", False),
        ("::1", False),
        ("[::1", False),
        ("[g::1]", False),
        ("d\u043eck\u0435r.io", False),  # Cyrillic o and e
        ("docker\uff0eio", False),  # fullwidth full stop
        ("\u212a.test", False),  # Kelvin sign
        ("b\u00fccher.de", False),  # IDN must come as punycode
    ],
)
def test_is_host(host, ok):
    assert is_host(host) is ok


@pytest.mark.parametrize(
    ("component", "ok"),
    [
        ("ghcr.io", True),
        ("localhost:5000", True),
        ("localhost", True),
        ("library", False),
        ("my-org", False),
        ("Localhost", False),
    ],
)
def test_names_registry(component, ok):
    assert names_registry(component) is ok


# --- digests ----------------------------------------------------------------


def test_check_digest_returns_a_valid_digest_unchanged():
    assert check_digest(SHA256) == SHA256


@pytest.mark.parametrize("bad", ["", "sha256:abc", "../etc/passwd", "sha1:" + "0" * 40])
def test_check_digest_rejects_with_digest_invalid(bad):
    with pytest.raises(BadRequest) as info:
        check_digest(bad)
    assert info.value.code == "DIGEST_INVALID"


@pytest.mark.parametrize(("digest", "algorithm"), [(SHA256, "sha256"), (SHA512, "sha512")])
def test_hasher_uses_the_digests_algorithm(digest, algorithm):
    assert hasher(digest).name == algorithm


def test_hasher_rejects_an_invalid_digest():
    with pytest.raises(BadRequest):
        hasher("sha1:" + "0" * 40)


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_digest_of_matches_hashlib_and_is_a_valid_digest(algorithm):
    data = b"hello\n"
    digest = digest_of(data, algorithm)
    assert digest == f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    assert is_digest(digest)


# --- properties -------------------------------------------------------------


@PROPS
@given(NAMES)
def test_names_from_the_grammar_are_names_when_short_enough(name):
    assert is_name(name) is (len(name) <= MAX_NAME_LEN)


@PROPS
@given(TAGS)
def test_tags_from_the_grammar_are_tags(tag):
    assert is_tag(tag)


@PROPS
@given(DIGESTS)
def test_digests_from_the_grammar_are_digests(digest):
    assert is_digest(digest)


@PROPS
@given(HOSTS)
def test_hosts_from_the_grammar_are_hosts(host):
    assert is_host(host)


@PROPS
@given(hostile_text())
def test_accepted_names_are_safe_path_fragments(text):
    if is_name(text):
        assert text.isascii() and text == text.lower()
        assert all(seg not in ("", ".", "..") for seg in text.split("/"))
        assert not any(c in text for c in "\\%\x00:@ \n")


@PROPS
@given(hostile_text())
def test_accepted_tags_and_hosts_are_single_safe_segments(text):
    if is_tag(text) or is_host(text):
        assert text.isascii()
        assert text not in ("", ".", "..")
        assert not any(c in text for c in "/\\%\x00@ \n")


@PROPS
@given(hostile_text())
def test_accepted_digests_are_canonical(text):
    if is_digest(text):
        algorithm, hexpart = text.split(":")
        assert algorithm in ("sha256", "sha512")
        assert len(hexpart) == hashlib.new(algorithm).digest_size * 2
        assert set(hexpart) <= set("0123456789abcdef")


REF_TEXT = st.one_of(
    hostile_text(60),
    st.builds(
        lambda reg, name, tag, dig: f"{reg}{name}{tag}{dig}",
        st.sampled_from(["", "ghcr.io/", "localhost:5000/", "docker.io/", "Bad_Host/"]),
        NAMES,
        st.one_of(st.just(""), TAGS.map(":{}".format)),
        st.sampled_from(["", f"@{SHA256}", "@sha256:bad"]),
    ),
)


@PROPS
@given(REF_TEXT)
def test_parse_reference_raises_bad_request_or_returns_a_valid_reference(text):
    try:
        ref = parse_reference(text)
    except BadRequest as err:
        assert err.code in ("NAME_INVALID", "TAG_INVALID", "DIGEST_INVALID")
        return
    assert is_host(ref.registry)
    assert is_name(ref.name)
    assert ref.tag is None or is_tag(ref.tag)
    assert ref.digest is None or is_digest(ref.digest)
    assert ref.tag or ref.digest
    if ref.registry == "docker.io":
        assert "/" in ref.name


@PROPS
@given(REF_TEXT)
def test_parse_reference_of_its_own_string_is_a_fixed_point(text):
    try:
        ref = parse_reference(text)
    except BadRequest:
        return
    assert parse_reference(str(ref)) == ref
