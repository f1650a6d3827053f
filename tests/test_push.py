"""fetch/push.py's pure parts: which registry and repository a push names,
and the upstream's Locations as the client must follow them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cr_proxy.errors import BadRequest, Unsupported, UpstreamError
from cr_proxy.fetch.push import Pushes, PushTarget, Upload, client_location, push_target

HOSTS = {"docker.io": "registry-1.docker.io"}


def test_prefix_names_the_registry() -> None:
    target = push_target("/v2/ghcr.io/org/app/blobs/uploads/", "", HOSTS)
    assert target == PushTarget("ghcr.io", "ghcr.io", "org/app", "ghcr.io/org/app",
                                "blobs/uploads", "")
    assert target.path == "/v2/org/app/blobs/uploads/"


def test_plain_name_goes_to_default_target_or_is_refused() -> None:
    target = push_target("/v2/team/app/manifests/v1", "registry.example", HOSTS)
    assert (target.domain, target.name, target.what, target.ref) == (
        "registry.example", "team/app", "manifests", "v1")
    with pytest.raises(Unsupported):
        push_target("/v2/team/app/manifests/v1", "", HOSTS)


def test_docker_hub_rules_apply() -> None:
    target = push_target("/v2/docker.io/app/blobs/uploads/abc", "", HOSTS)
    assert (target.domain, target.name, target.ref) == ("registry-1.docker.io", "library/app",
                                                        "abc")


@pytest.mark.parametrize("path", [
    "/v2/registry.test/Bad/blobs/uploads/",
    "/v2/registry.test/app/manifests/bad%20tag",
    "/v2/registry.test/../app/blobs/uploads/",
])
def test_bad_names_are_refused(path: str) -> None:
    with pytest.raises(BadRequest):
        push_target(path, "", HOSTS)


def test_other_paths_are_not_pushes() -> None:
    with pytest.raises(Unsupported):
        push_target("/v2/registry.test/app/tags/list", "", HOSTS)


@pytest.mark.parametrize("location", [
    "/v2/app/blobs/uploads/u1?_state=abc%3D",
    "http://registry.test:5000/v2/app/blobs/uploads/u1?_state=abc%3D",
])
def test_locations_become_ours(location: str) -> None:
    target = push_target("/v2/registry.test/app/blobs/uploads/", "", HOSTS)
    ours = "/v2/registry.test/app/blobs/uploads/u1?_state=abc%3D"
    assert client_location(location, target) == ours


def test_a_location_outside_the_repository_is_refused() -> None:
    target = push_target("/v2/registry.test/app/blobs/uploads/", "", HOSTS)
    with pytest.raises(UpstreamError):
        client_location("https://s3.example/bucket/upload?sig=x", target)
    with pytest.raises(UpstreamError):
        client_location("/v2/other/blobs/uploads/u1", target)


@pytest.mark.parametrize(("content_range", "broken"), [
    ("0-1023", False),  # where our copy ends (nothing yet): followed
    ("bytes=0-1023", False),
    ("512-1023", True),  # a retried or resumed chunk: relayed, not stored
    ("²-3", True),  # str.isdigit() says yes, int() says no
    ("9" * 5000 + "-1", True),  # past what int() reads
    ("-5", True),
])
def test_a_chunks_content_range_is_followed_only_from_where_our_copy_ends(
    content_range: str, broken: bool,
) -> None:
    request = SimpleNamespace(headers={"Content-Range": content_range})
    upload = Upload()
    Pushes._check_range(request, upload)  # type: ignore[arg-type]
    assert upload.broken is broken
