"""cr-proxy warm: the pure parts (list file, platform choice, summary), and
the client against a fake fetcher on a unix socket (cut connections, wrong
bytes, registry errors, HITs, one fetch per shared digest)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web

from cr_proxy import config as config_mod
from cr_proxy.cache.sizes import human_size
from cr_proxy.errors import BadRequest, CrProxyError
from cr_proxy.oci.manifest import Platform, parse
from cr_proxy.oci.reference import Reference
from cr_proxy.ops.fetcher_client import mirror_path, registry_error
from cr_proxy.ops.warm import (
    ImageResult,
    Summary,
    collect_images,
    read_image_list,
    warm,
)

# --- the list file -------------------------------------------------------------------


def test_list_file_ignores_comments_and_blank_lines() -> None:
    text = """# images for the lab
alpine

  registry.test/small:v1   # pinned for CI
\t
# ghcr.io/org/app:1.0
ghcr.io/org/app@sha256:""" + "a" * 64 + "\n"
    assert read_image_list(text) == [
        "alpine", "registry.test/small:v1", "ghcr.io/org/app@sha256:" + "a" * 64,
    ]


def test_images_from_arguments_and_file_are_deduplicated_in_order(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("b\n# c\na\nd\n")
    assert collect_images(["a", "b"], listing) == ["a", "b", "d"]
    assert collect_images(["a"], None) == ["a"]


def test_unreadable_list_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CrProxyError, match=r"missing\.txt"):
        collect_images([], tmp_path / "missing.txt")


# --- platforms -------------------------------------------------------------------------

DIGESTS = {name: "sha256:" + hashlib.sha256(name.encode()).hexdigest()
           for name in ("amd64", "arm64", "armv7", "armv6", "att1", "att2")}
INDEX = {
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [
        {"digest": DIGESTS["amd64"], "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": DIGESTS["arm64"],
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": DIGESTS["armv7"],
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": DIGESTS["armv6"],
         "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": DIGESTS["att1"], "platform": {"os": "unknown", "architecture": "unknown"}},
        {"digest": DIGESTS["att2"],
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        {"platform": {"os": "linux", "architecture": "amd64"}},  # no digest: unusable
    ],
}


def chosen(*platforms: str) -> list[str]:
    picked = parse(json.dumps(INDEX).encode()).select([Platform.parse(p) for p in platforms])
    return [name for name, digest in DIGESTS.items() if digest in {e.digest for e in picked}]


def test_every_platform_by_default_but_never_attestations() -> None:
    assert chosen() == ["amd64", "arm64", "armv7", "armv6"]


def test_platform_matches_os_and_architecture_and_variant_if_given() -> None:
    assert chosen("linux/amd64") == ["amd64"]
    assert chosen("linux/arm64") == ["arm64"]  # any variant when none is asked for
    assert chosen("linux/arm") == ["armv7", "armv6"]
    assert chosen("linux/arm/v7") == ["armv7"]
    assert chosen("linux/arm/v7", "linux/amd64") == ["amd64", "armv7"]
    assert chosen("windows/amd64") == []
    assert chosen("unknown/unknown") == []  # attestations stay out even when asked for


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_bad_platform_is_refused(text: str) -> None:
    with pytest.raises(BadRequest, match="os/arch"):
        Platform.parse(text)


def test_image_blobs_are_config_and_layers_but_not_foreign_layers() -> None:
    c, l1, win, l2 = ("sha256:" + hashlib.sha256(n).hexdigest() for n in (b"c", b"1", b"w", b"2"))
    manifest = {
        "config": {"digest": c},
        "layers": [{"digest": l1},
                   {"digest": win, "urls": ["https://mcr.microsoft.com/x"]},
                   {"digest": l2}],
    }
    assert [b.digest for b in parse(json.dumps(manifest).encode()).blobs] == [c, l1, l2]


def test_mirror_path_puts_the_registry_where_layout_finds_it() -> None:
    hub = Reference("docker.io", "library/alpine", "3")
    assert mirror_path(hub, "manifests", "3") == "/v2/docker.io/library/alpine/manifests/3"
    local = Reference("localhost:5000", "app", "v1")
    assert mirror_path(local, "blobs", "sha256:x") == "/v2/localhost:5000/app/blobs/sha256:x"
    # A registry named without a dot or colon would read as part of the name.
    plain = Reference("internal", "team/app", "v1")
    assert mirror_path(plain, "manifests", "v1") == "/v2/team/app/manifests/v1?ns=internal"


def test_registry_error_shows_code_and_message() -> None:
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no such"}]}).encode()
    err = registry_error(404, body)
    assert (err.code, err.message) == ("MANIFEST_UNKNOWN", "no such")
    err = registry_error(502, b"<html>bad gateway</html>")
    assert (err.code, err.message) == ("HTTP_502", "the fetcher answered 502")


# --- the summary ---------------------------------------------------------------------


def test_summary_adds_up_images_blobs_bytes_and_failures() -> None:
    results = [
        ImageResult("a", blobs_fetched=3, blobs_cached=1, bytes_fetched=3000),
        ImageResult("b", blobs_fetched=0, blobs_cached=4, stale=True),
        ImageResult("c", blobs_fetched=1, bytes_fetched=500, error="MANIFEST_UNKNOWN: gone"),
    ]
    summary = Summary.of(results, seconds=2.0)
    assert (summary.images, summary.images_ok, summary.images_failed) == (3, 2, 1)
    assert (summary.blobs_fetched, summary.blobs_cached, summary.bytes_fetched) == (4, 5, 3500)
    assert summary.stale == 1
    assert summary.rate == 1750.0
    data = summary.as_dict()
    assert data["failures"] == [{"image": "c", "error": "MANIFEST_UNKNOWN: gone"}]
    assert json.loads(json.dumps(data)) == data
    text = summary.text()
    assert "3 images (2 ok, 1 failed" in text
    assert "4 fetched (3.4 KiB), 5 already cached" in text


def test_empty_summary_has_no_rate() -> None:
    summary = Summary.of([])
    assert (summary.images, summary.rate, summary.failures) == (0, 0.0, [])


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (5 * 1024 ** 3, "5.0 GiB")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_size(n) == text


# --- against a fake fetcher --------------------------------------------------------------


def blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


SHARED, LAYER_A, LAYER_B, CONFIG = (blob(b"shared" * 1000), blob(b"a" * 5000),
                                    blob(b"b" * 7000), blob(b'{"os":"linux"}'))


def manifest_for(*layers: tuple[str, bytes]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": CONFIG[0], "size": len(CONFIG[1])},
        "layers": [{"digest": d, "size": len(b)} for d, b in layers],
    }).encode()


INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class FakeFetcher:
    """Answers like the fetcher: X-Cache on manifests and blobs, registry
    JSON errors, and the misbehaviours we want warm to catch."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}  # path after /v2/ -> body
        self.blobs = dict([SHARED, LAYER_A, LAYER_B, CONFIG])
        self.cached: set[str] = set()
        self.cut: set[str] = set()
        self.wrong: set[str] = set()
        self.gets: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.referrers: dict[str, list[str]] = {}  # subject -> artifact digests
        self.asked: list[str] = []  # subjects whose referrers were asked
        self.manifest_gets: list[str] = []
        self.tags = ["v1"]
        self.tag_page: int | None = None  # tags per page, as a registry that pages by itself
        self.tag_queries: list[str] = []  # each tag list request's query string

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        tail = request.match_info["tail"]
        if tail.endswith("/tags/list"):
            return self._tag_list(request, tail)
        if "/referrers/" in tail:
            subject = tail.rsplit("/", 1)[1]
            self.asked.append(subject)
            return web.json_response({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [
                {"mediaType": MANIFEST_TYPE, "digest": d, "size": 1}
                for d in self.referrers.get(subject, [])]})
        if "/manifests/" in tail:
            self.manifest_gets.append(tail)
            body = self.manifests.get(tail)
            if body is None:
                return web.json_response(
                    {"errors": [{"code": "MANIFEST_UNKNOWN", "message": f"{tail} not found"}]},
                    status=404)
            return web.Response(body=body, headers={
                "Content-Type": json.loads(body)["mediaType"], "X-Cache": "MISS",
                "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()})
        digest = tail.rsplit("/", 1)[1]
        data = self.blobs[digest]
        if request.method == "HEAD":
            cache = {"X-Cache": "HIT"} if digest in self.cached else {}
            return web.Response(headers={"Content-Length": str(len(data)), **cache})
        self.gets.append(digest)
        if digest in self.wrong:
            data = data[:-1] + b"!"
        response = web.StreamResponse(headers={"X-Cache": "MISS"})
        response.content_length = len(data)
        await response.prepare(request)
        if digest in self.cut:
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(data)
        await response.write_eof()
        self.cached.add(digest)
        return response


    def _tag_list(self, request: web.Request, tail: str) -> web.Response:
        self.tag_queries.append(request.query_string)
        after = [t for t in self.tags if t > request.query.get("last", "")]
        n = int(request.query.get("n", self.tag_page or len(after)))
        page, headers = after[:n], {}
        if len(after) > n:
            params = urlencode([*[(k, v) for k, v in request.query.items() if k == "ns"],
                                ("n", str(n)), ("last", page[-1])])
            headers["Link"] = f'<{request.path}?{params}>; rel="next"'
        return web.json_response({"name": tail, "tags": page}, headers=headers)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeFetcher, config_mod.Config]]:
    conf = config_mod.load(environ={"CR_PROXY_RUN_DIR": str(tmp_path / "run"),
                                    "CR_PROXY_CACHE_DIR": str(tmp_path / "cache")})
    conf.run_dir.mkdir()
    fetcher = FakeFetcher()
    fetcher.manifests["registry.test/one/manifests/v1"] = manifest_for(SHARED, LAYER_A)
    fetcher.manifests["registry.test/two/manifests/v1"] = manifest_for(SHARED, LAYER_B)
    runner = web.AppRunner(fetcher.app())
    await runner.setup()
    # On serve's socket: warm must find it and use it rather than start its own.
    await web.UnixSite(runner, str(conf.socket_path)).start()
    try:
        yield fetcher, conf
    finally:
        await runner.cleanup()


class Quiet:
    def __init__(self) -> None:
        self.fetched: list[str] = []

    def note(self, image: str, text: str) -> None: ...
    def expect(self, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def blob_fetched(self, image: str, digest: str, nbytes: int) -> None:
        self.fetched.append(digest)
    def image_done(self, result: ImageResult) -> None: ...
    def close(self) -> None: ...


async def test_uses_a_running_fetcher_and_fetches_a_shared_layer_once(fake) -> None:
    fetcher, conf = fake
    summary = await warm(conf, ["registry.test/one:v1", "registry.test/two:v1"], jobs=4,
                         progress=Quiet())
    assert summary.failures == []
    assert (summary.fetcher, summary.started_fetcher) == (str(conf.socket_path), False)
    assert sorted(fetcher.gets) == sorted([SHARED[0], LAYER_A[0], LAYER_B[0], CONFIG[0]])
    # 4 distinct blobs over 6 (image, blob) pairs: the second image finds 2 cached.
    assert (summary.blobs_fetched, summary.blobs_cached) == (4, 2)
    sizes = sum(len(b) for _, b in (SHARED, LAYER_A, LAYER_B, CONFIG))
    assert summary.bytes_fetched == sizes
    tag_requests = [h for h in fetcher.headers if h.get("Accept", "").count("+json") == 4]
    assert len(tag_requests) == 2
    assert all(h["X-CR-Revalidate"] == "1" and h["X-CR-Mode"] == "mirror" for h in tag_requests)


async def test_cached_blobs_are_not_fetched(fake) -> None:
    fetcher, conf = fake
    fetcher.cached |= {SHARED[0], LAYER_A[0], CONFIG[0]}
    summary = await warm(conf, ["registry.test/one:v1"], progress=Quiet())
    assert (summary.blobs_fetched, summary.blobs_cached, summary.bytes_fetched) == (0, 3, 0)
    assert fetcher.gets == []


@pytest.mark.parametrize(("damage", "code"), [("cut", "TRUNCATED"), ("wrong", "DIGEST_INVALID")])
async def test_a_bad_blob_fails_its_image_only(fake, damage: str, code: str) -> None:
    fetcher, conf = fake
    getattr(fetcher, damage).add(LAYER_A[0])
    summary = await warm(conf, ["registry.test/one:v1", "registry.test/two:v1"],
                         progress=Quiet())
    assert [image for image, _ in summary.failures] == ["registry.test/one:v1"]
    error = summary.failures[0][1]
    assert error.startswith(f"{code}: blob {LAYER_A[0]}")
    # Everything else still got fetched.
    assert {SHARED[0], LAYER_B[0], CONFIG[0]} <= set(fetcher.gets)


async def test_registry_error_names_the_image(fake) -> None:
    _, conf = fake
    summary = await warm(conf, ["registry.test/nope:v1", "registry.test/one:v1", "UPPER/case"],
                         progress=Quiet())
    failures = dict(summary.failures)
    assert failures["registry.test/nope:v1"].startswith("MANIFEST_UNKNOWN: ")
    assert failures["UPPER/case"].startswith("NAME_INVALID: ")
    assert summary.images_ok == 1


async def test_index_platform_choice_and_digest_check(fake) -> None:
    fetcher, conf = fake
    one = manifest_for(LAYER_A)
    two = manifest_for(LAYER_B)
    ids = {"sha256:" + hashlib.sha256(m).hexdigest(): m for m in (one, two)}
    for digest, body in ids.items():
        fetcher.manifests[f"registry.test/multi/manifests/{digest}"] = body
    (d_one, _), (d_two, _) = ids.items()
    fetcher.manifests["registry.test/multi/manifests/latest"] = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": d_one, "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": d_two, "platform": {"os": "linux", "architecture": "arm64"}},
        ]}).encode()
    summary = await warm(conf, ["registry.test/multi"], [Platform.parse("linux/arm64")],
                         progress=Quiet())
    assert summary.failures == []
    assert sorted(fetcher.gets) == sorted([LAYER_B[0], CONFIG[0]])
    # A manifest body that is not what its digest says fails the image.
    fetcher.manifests[f"registry.test/multi/manifests/{d_one}"] = two
    summary = await warm(conf, ["registry.test/multi"], progress=Quiet())
    assert summary.failures[0][1].startswith("DIGEST_INVALID: manifest is ")


def nest(fetcher: FakeFetcher, repo: str, body: bytes, levels: int) -> None:
    """`levels` indexes above the manifest `body`, the top one tagged latest."""
    for _ in range(levels):
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        fetcher.manifests[f"registry.test/{repo}/manifests/{digest}"] = body
        body = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"digest": digest,
                           "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    fetcher.manifests[f"registry.test/{repo}/manifests/latest"] = body


async def test_indexes_nest_three_deep_as_ls_reads_them_and_no_deeper(fake) -> None:
    fetcher, conf = fake
    nest(fetcher, "deep", manifest_for(LAYER_A), 3)
    nest(fetcher, "deeper", manifest_for(LAYER_B), 4)
    summary = await warm(conf, ["registry.test/deep", "registry.test/deeper"], progress=Quiet())
    assert [image for image, _ in summary.failures] == ["registry.test/deeper"]
    assert "nested too deep" in summary.failures[0][1]
    assert sorted(fetcher.gets) == sorted([LAYER_A[0], CONFIG[0]])



def artifact(fetcher: FakeFetcher, repo: str, n: int) -> str:
    """A signature-like manifest of `repo` (distinct by an annotation)."""
    body = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": "application/x.sig",
        "config": {"digest": CONFIG[0], "size": len(CONFIG[1])}, "layers": [],
        "annotations": {"n": str(n)}}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    fetcher.manifests[f"registry.test/{repo}/manifests/{digest}"] = body
    return digest


async def test_referrers_are_followed_three_levels_deep_and_64_at_most(fake) -> None:
    fetcher, conf = fake
    top = "sha256:" + hashlib.sha256(fetcher.manifests["registry.test/one/manifests/v1"]
                                     ).hexdigest()
    chain = [artifact(fetcher, "one", n) for n in range(4)]  # each refers to the one before
    for subject, referrer in zip([top, *chain], chain, strict=False):
        fetcher.referrers[subject] = [referrer]
    summary = await warm(conf, ["registry.test/one:v1"], progress=Quiet(), referrers=True)
    assert summary.failures == []
    assert summary.referrers == 3
    assert fetcher.asked == [top, *chain[:2]]  # the third level's referrers are not asked
    assert f"registry.test/one/manifests/{chain[2]}" in fetcher.manifest_gets
    assert f"registry.test/one/manifests/{chain[3]}" not in fetcher.manifest_gets
    # cosign's legacy tags were asked (none there: no fault).
    assert f"registry.test/one/manifests/{top.replace(':', '-')}.sig" in fetcher.manifest_gets

    fetcher.asked.clear()
    fetcher.referrers = {top: [artifact(fetcher, "one", 100 + n) for n in range(70)]}
    summary = await warm(conf, ["registry.test/one:v1"], progress=Quiet(), referrers=True)
    assert (summary.failures, summary.referrers) == ([], 64)
    assert fetcher.asked == [top]  # the budget spent: no next level


async def test_the_tag_list_is_stored_page_by_page_as_a_client_pages_it(fake) -> None:
    """Offline, `skopeo list-tags` follows the Links: each page must be in
    the cache, not the first alone."""
    fetcher, conf = fake
    fetcher.tags = [f"t{i}" for i in range(5)]
    fetcher.tag_page = 2
    summary = await warm(conf, ["registry.test/one:v1"], progress=Quiet(), referrers=True)
    assert summary.failures == []
    assert fetcher.tag_queries == ["", "n=2&last=t1", "n=2&last=t3"]
