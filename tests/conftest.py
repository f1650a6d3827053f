"""Shared end-to-end fixtures: one Docker-Hub-like upstream with a set of
images pushed by skopeo, and one cr-proxy serving in front of it.

The upstream answers for registry.test and, through the endpoint override
`registry-1.docker.io -> the same registry`, for docker.io too, so the
default-registry form (Docker's registry-mirrors) is tested without any
traffic leaving loopback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy
from testbed.oci_layout import ImageInfo, big_file_layer, build_image, build_index, tar_layer
from testbed.realnames import CRPROXY_NAME, RealNamesBed
from testbed.registry import Upstream

BIG_LAYER = 100 * 1024 * 1024


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "e2e" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Images:
    small: ImageInfo  # registry.test/small:v1 and docker.io/library/small:v1
    other: ImageInfo  # registry.test/other/app:v1, shares a layer with small
    multi: ImageInfo  # registry.test/multi:latest, a two-platform index
    big: ImageInfo  # registry.test/big:v1, one 100 MiB layer
    shared_layer: str


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    for tool in ("docker-registry", "skopeo", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"{tool} is not installed: run `make test`, which installs it")
    with Upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


@pytest.fixture(scope="session")
def images(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("layouts")
    shared = tar_layer({"etc/shared-base.txt": b"a base layer many images share\n" * 64})
    small = build_image(
        work / "small",
        layers=[shared, tar_layer({"app/small.txt": b"small\n" * 1000})],
        tag="v1",
    )
    upstream.push(work / "small", "v1", "small", "v1")
    upstream.push(work / "small", "v1", "library/small", "v1")
    other = build_image(
        work / "other", layers=[shared, tar_layer({"app/other.txt": b"other\n" * 500})], tag="v1"
    )
    upstream.push(work / "other", "v1", "other/app", "v1")
    multi = build_index(
        work / "multi",
        [
            ("linux", "amd64", [tar_layer({"bin/amd64": b"\x7fELF amd64" * 4096})]),
            ("linux", "arm64", [tar_layer({"bin/arm64": b"\x7fELF arm64" * 4096})]),
        ],
        tag="latest",
    )
    upstream.push(work / "multi", "latest", "multi", "latest")
    big = build_image(
        work / "big",
        layers=[big_file_layer(BIG_LAYER, seed=7), tar_layer({"big.txt": b"big\n"})],
        tag="v1",
    )
    upstream.push(work / "big", "v1", "big", "v1")
    return Images(small, other, multi, big, small.layer_digests[0])


def proxy_endpoints(up: Upstream) -> dict[str, str]:
    return {**up.endpoints, "registry-1.docker.io": up.registry_url}


@pytest.fixture(scope="session")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    with CrProxy(tmp_path_factory.mktemp("crproxy"), proxy_endpoints(upstream)) as running:
        yield running


@pytest.fixture
def upstream_down(upstream: Upstream) -> Iterator[Upstream]:
    """The upstream's registry, token server and CDN all stopped for one
    test, and started again after it."""
    with upstream.stopped():
        yield upstream


@dataclass
class Bed:
    """The production-like bed (testbed/realnames.py) with one small image
    pushed as docker.io/library/app:v1, and a cr-proxy serving in it."""

    net: RealNamesBed
    image: ImageInfo
    cr: CrProxy

    @property
    def mirror(self) -> str:
        return f"{CRPROXY_NAME}:{self.cr.http_port}"

    @property
    def mirror_tls(self) -> str:
        return f"{CRPROXY_NAME}:{self.cr.https_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{CRPROXY_NAME}:{self.cr.proxy_port}"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """Module-scoped: one bed (namespaces, upstream, cr-proxy) shared by a
    module's cases; every case must leave the cable in."""
    work = tmp_path_factory.mktemp("bed")
    with RealNamesBed(work) as net:
        image = build_image(work / "layout", layers=[
            tar_layer({"etc/bed-base.txt": b"the bed's base layer\n" * 64}),
            tar_layer({"app/bed.txt": b"bed\n" * 1000}),
        ], tag="v1")
        net.push(work / "layout", "v1", "library/app", "v1")
        with net.crproxy(work / "crproxy") as cr:
            yield Bed(net, image, cr)
