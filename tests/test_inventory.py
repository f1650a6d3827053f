"""cr_proxy.cache.inventory (and diskuse, removal, verify behind it) on trees
built with Store, the way the fetcher fills them: images, disk use, removal
by reference counting, verification."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cr_proxy import cli
from cr_proxy.cache.diskuse import Usage
from cr_proxy.cache.inventory import Inventory
from cr_proxy.cache.layout import Kind
from cr_proxy.cache.removal import chain_order
from cr_proxy.cache.scan import Link, Redirect
from cr_proxy.cache.store import Store
from cr_proxy.oci.reference import digest_of

REG = "registry.test"
HUB = "registry-1.docker.io"
CDN = "cdn.test"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
SHARED = b"a base layer two images share\n" * 200
HOSTS = {"docker.io": HUB}


@dataclass
class Cached:
    digest: str
    config: str
    layers: list[str]
    size: int  # manifest + config + distinct layers


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.prepare()
    return s


@pytest.fixture
def inventory(store: Store) -> Inventory:
    return Inventory(store.root, HOSTS)


# --- building a tree as the fetcher does ------------------------------------------------


def put(store: Store, data: bytes) -> str:
    digest = digest_of(data)
    store.put_bytes(data, digest)
    return digest


def cdn_path(digest: str) -> str:
    hexpart = digest.split(":")[1]
    return f"/docker/registry/v2/blobs/sha256/{hexpart[:2]}/{hexpart}/data"


def cache_blob(store: Store, domain: str, name: str, data: bytes, cdn: bool = False) -> str:
    """As Store.commit_blob does for the fetcher: blobs/, the redirect target and its record,
    then the requested path."""
    digest = put(store, data)
    path = f"v2/{name}/blobs/{digest}"
    if cdn:
        store.link(digest, CDN, cdn_path(digest))
        store.record_redirect(domain, path, 307, f"http://{CDN}{cdn_path(digest)}?sig=abc")
    store.link(digest, domain, path)
    return digest


def cache_manifest(
    store: Store, domain: str, name: str, body: bytes, tag: str | None, media_type: str
) -> str:
    """As Store.commit_manifest does: by digest always, by tag when pulled by tag."""
    digest = put(store, body)
    store.record_manifest(domain, f"v2/{name}/manifests/{digest}", digest, media_type, None)
    if tag is not None:
        store.record_manifest(domain, f"v2/{name}/manifests/{tag}", digest, media_type, time.time())
    return digest


def descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def cache_image(
    store: Store, name: str, tag: str | None, layers: list[bytes], *,
    platform: tuple[str, ...] = ("linux", "amd64"), domain: str = REG, cdn: bool = False,
    label: str | None = None,
) -> Cached:
    """An image as a pull by tag (or by digest, tag None) leaves it; its
    config is labelled with the name, so images differ unless told."""
    layer_digests = [cache_blob(store, domain, name, layer, cdn) for layer in layers]
    config_doc = {"os": platform[0], "architecture": platform[1],
                  "config": {"Labels": {"name": label or name}}, "rootfs": {"type": "layers"}}
    if len(platform) > 2:
        config_doc["variant"] = platform[2]
    config = json.dumps(config_doc).encode()
    config_digest = cache_blob(store, domain, name, config, cdn)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": descriptor(MT_CONFIG, config),
        "layers": [descriptor(MT_LAYER, layer) for layer in layers],
    }).encode()
    digest = cache_manifest(store, domain, name, body, tag, MT_MANIFEST)
    size = len(body) + len(config) + sum(len(layer) for layer in {*layers})
    return Cached(digest, config_digest, layer_digests, size)


def cache_index(store: Store, name: str, tag: str | None) -> tuple[str, list[Cached], int]:
    """A two-platform index plus a buildx attestation entry, every platform
    pulled (its manifest by digest, as clients ask for it)."""
    amd = cache_image(store, name, None, [b"amd64 binary" * 100], platform=("linux", "amd64"))
    arm = cache_image(store, name, None, [b"arm64 binary" * 100],
                      platform=("linux", "arm64", "v8"))
    entries = [
        {"mediaType": MT_MANIFEST, "digest": amd.digest, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MT_MANIFEST, "digest": arm.digest, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": MT_MANIFEST, "digest": digest_of(b"attestation"), "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
    ]
    body = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode()
    digest = cache_manifest(store, REG, name, body, tag, MT_INDEX)
    return digest, [amd, arm], len(body) + amd.size + arm.size


def blob_file(store: Store, digest: str) -> Path:
    return store.tree.blob(digest)


def content(store: Store, domain: str, path: str) -> Path:
    return store.tree.content(domain, path)


def write_config(tmp_path: Path, store: Store) -> str:
    conf = tmp_path / "cr-proxy.yml"
    conf.write_text(f"cache_dir: {store.root}\nlog_level: warning\n")
    return str(conf)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- ls ---------------------------------------------------------------------------------


def test_ls_lists_a_single_platform_image(store: Store, inventory: Inventory) -> None:
    small = cache_image(store, "small", "v1", [SHARED, b"small layer" * 50])
    [image] = inventory.images()
    assert image.key == image.name == f"{REG}/small:v1"
    assert (image.repository, image.tag, image.digest) == ("small", "v1", small.digest)
    assert image.media_type == MT_MANIFEST
    assert image.platforms == ("linux/amd64",)
    assert image.size == small.size
    assert image.digests == {small.digest, small.config, *small.layers}
    assert image.missing == frozenset()
    assert image.path == "v2/small/manifests/v1"


def test_ls_lists_a_two_platform_index_as_one_image(store: Store, inventory: Inventory) -> None:
    digest, platforms, size = cache_index(store, "multi", "latest")
    [image] = inventory.images()  # the platform manifests are parts of it, not images
    assert (image.key, image.digest, image.media_type) == (f"{REG}/multi:latest", digest, MT_INDEX)
    assert image.platforms == ("linux/amd64", "linux/arm64/v8")
    assert image.size == size
    assert image.manifests == {digest, *(p.digest for p in platforms), digest_of(b"attestation")}
    assert image.missing == {digest_of(b"attestation")}  # never pulled: not in blobs/


def test_ls_shows_digest_only_manifests_and_docker_io(store: Store, inventory: Inventory) -> None:
    pinned = cache_image(store, "pinned", None, [b"pinned layer"])
    cache_image(store, "library/alpine", "3", [b"alpine"], domain=HUB)
    index, _, _ = cache_index(store, "multi", None)
    names = [image.name for image in inventory.images()]
    assert names == [
        "docker.io/library/alpine:3",
        f"{REG}/multi@{index}",  # its platforms are covered by it
        f"{REG}/pinned@{pinned.digest}",
    ]
    assert inventory.images()[0].key == f"{HUB}/library/alpine:3"


def test_ls_ignores_unknown_media_types(store: Store, inventory: Inventory) -> None:
    """A cache an older cr-proxy filled (it stored schema 1 manifests, which
    record_manifest now refuses): written sidecar by sidecar."""
    schema1 = b'{"schemaVersion":1,"name":"old","tag":"v1","fsLayers":[]}'
    digest = put(store, schema1)
    for ref in (digest, "v1"):
        path = f"v2/old/manifests/{ref}"
        store.write_sidecar("content-type", REG, path,
                            "application/vnd.docker.distribution.manifest.v1+prettyjws")
        store.write_sidecar("docker-content-digest", REG, path, digest)
        store.link(digest, REG, path)
    [image] = inventory.images()
    assert (image.digest, image.platforms, image.size) == (digest, (), len(schema1))
    assert image.digests == {digest}


def test_last_used_is_the_newest_file_time_or_what_the_hook_says(
    store: Store, inventory: Inventory
) -> None:
    cache_image(store, "small", "v1", [b"layer"])
    sidecar = store.tree.sidecar("docker-content-digest", REG, "v2/small/manifests/v1")
    os.utime(sidecar, (1_000, 2_000_000_000))  # validated far in the future
    [image] = inventory.images()
    assert image.validated_at == image.last_used == 2_000_000_000
    hooked = Inventory(store.root, HOSTS, last_used=lambda image: 42.0)
    assert [i.last_used for i in hooked.images()] == [42.0]


def test_listing_does_not_touch_access_times(store: Store, inventory: Inventory) -> None:
    small = cache_image(store, "small", "v1", [b"layer"])
    path = blob_file(store, small.digest)
    os.utime(path, (1_000, 1_000))
    inventory.images()
    assert path.stat().st_atime == 1_000  # read with O_NOATIME: a listing is not a pull


def test_a_foreign_layer_is_no_part_of_an_image(store: Store, inventory: Inventory) -> None:
    """A Windows base layer (`urls`) lives outside the registry: no pull
    fetches it, so it is neither used nor missing (oci/manifest.py)."""
    layer = cache_blob(store, REG, "win", b"app layer" * 10)
    config = json.dumps({"os": "windows", "architecture": "amd64"}).encode()
    cache_blob(store, REG, "win", config)
    foreign = descriptor("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                         b"windows base", urls=["https://mcr.microsoft.com/base"])
    body = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                       "config": descriptor(MT_CONFIG, config),
                       "layers": [foreign, descriptor(MT_LAYER, b"app layer" * 10)]}).encode()
    digest = cache_manifest(store, REG, "win", body, "v1", MT_MANIFEST)
    [image] = inventory.images()
    assert image.missing == frozenset()
    assert image.digests == {digest, digest_of(config), layer}
    assert image.platforms == ("windows/amd64",)


def test_an_index_nested_three_deep_is_listed_whole(store: Store, inventory: Inventory) -> None:
    """index -> index -> index -> manifest: as deep as warm goes, ls reads."""
    leaf = cache_image(store, "deep", None, [b"deep layer" * 10])
    digest, below = leaf.digest, [leaf.digest]
    for _ in range(3):
        body = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
            {"mediaType": MT_MANIFEST, "digest": digest, "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
        digest = cache_manifest(store, REG, "deep", body, None, MT_INDEX)
        below.append(digest)
    store.record_manifest(REG, "v2/deep/manifests/v1", digest, MT_INDEX, time.time())
    [image] = inventory.images()
    assert image.key == f"{REG}/deep:v1"
    assert image.missing == frozenset()
    assert image.manifests == set(below)
    assert {leaf.config, *leaf.layers} <= image.digests


# --- du ----------------------------------------------------------------------------------


def test_du_counts_a_shared_blob_once(store: Store, inventory: Inventory) -> None:
    small = cache_image(store, "small", "v1", [SHARED, b"small" * 100])
    other = cache_image(store, "other/app", "v1", [SHARED, b"other" * 100])
    shared = digest_of(SHARED)
    distinct = {small.digest, small.config, *small.layers, other.digest, other.config,
                *other.layers}
    expected = sum(blob_file(store, d).stat().st_size for d in distinct)
    assert small.size + other.size - len(SHARED) == expected

    usage = inventory.usage()
    assert usage.total.bytes == expected
    assert usage.total.files == len(distinct)
    [registry] = usage.domains
    assert (registry.domain, registry.registry, registry.usage.bytes) == (REG, REG, expected)
    assert usage.unlinked.files == 0
    assert inventory.blob_refs()[shared] == {f"{REG}/small:v1", f"{REG}/other/app:v1"}


def test_du_per_domain_overlaps_and_reports_unlinked_blobs(
    store: Store, inventory: Inventory
) -> None:
    small = cache_image(store, "small", "v1", [SHARED], cdn=True)
    loose = put(store, b"in blobs/ only")
    usage = inventory.usage()
    by_domain = {d.domain: d.usage for d in usage.domains}
    layer = digest_of(SHARED)
    assert by_domain[CDN].bytes == len(SHARED) + blob_file(store, small.config).stat().st_size
    assert by_domain[REG].bytes == small.size
    assert usage.total.bytes == small.size + len(b"in blobs/ only")
    assert (usage.unlinked.files, usage.unlinked.bytes) == (1, len(b"in blobs/ only"))
    assert inventory.blob_refs()[loose] == set()
    assert layer in inventory.blob_refs()


def test_du_counts_stored_listings_in_their_domain_and_the_total(
    store: Store, inventory: Inventory
) -> None:
    small = cache_image(store, "small", "v1", [SHARED])
    store.write_listing(REG, "small", Kind.TAGS, "list", b'{"tags": ["v1"]}', 1.0)
    store.write_listing("other.test", "x", Kind.REFERRERS, "sha256-" + "a" * 64, b"{}", 1.0)
    usage = inventory.usage()
    by_domain = {d.domain: d.usage for d in usage.domains}
    assert by_domain[REG] == Usage(2 + len(small.layers) + 1,
                                   small.size + len(b'{"tags": ["v1"]}'))
    assert by_domain["other.test"] == Usage(1, 2)
    assert usage.lists == Usage(2, len(b'{"tags": ["v1"]}') + 2)
    assert usage.total.bytes == small.size + usage.lists.bytes


# --- rm ----------------------------------------------------------------------------------


def test_rm_frees_own_blobs_and_keeps_shared_ones(store: Store, inventory: Inventory) -> None:
    small = cache_image(store, "small", "v1", [SHARED, b"small" * 100])
    other = cache_image(store, "other/app", "v1", [SHARED, b"other" * 100])
    shared, own = small.layers
    removed = inventory.remove(*inventory.find(f"{REG}/small:v1"))

    assert removed.images == (f"{REG}/small:v1",)
    assert set(removed.blobs) == {small.digest, small.config, own}
    assert removed.bytes == small.size - len(SHARED)
    for digest in (small.digest, small.config, own):
        assert not blob_file(store, digest).exists()
        assert not content(store, REG, f"v2/small/blobs/{digest}").exists()
    for kind in ("content-type", "docker-content-digest"):
        assert not store.tree.sidecar(kind, REG, "v2/small/manifests/v1").exists()
        assert not store.tree.sidecar(kind, REG, f"v2/small/manifests/{small.digest}").exists()
    assert not content(store, REG, "v2/small/manifests/v1").exists()
    # The shared layer: still in blobs/, linked by other/app (and small's
    # name for it, which still serves the right bytes).
    assert blob_file(store, shared).stat().st_nlink == 3
    assert content(store, REG, f"v2/other/app/blobs/{shared}").read_bytes() == SHARED
    assert [i.key for i in inventory.images()] == [f"{REG}/other/app:v1"]
    assert all(blob_file(store, d).exists() for d in (other.digest, other.config, *other.layers))


def test_rm_of_a_cdn_redirected_blob_removes_the_cdn_name_and_record(
    store: Store, inventory: Inventory
) -> None:
    small = cache_image(store, "small", "v1", [SHARED, b"own" * 100], cdn=True)
    other = cache_image(store, "other/app", "v1", [SHARED], cdn=True)
    shared, own = small.layers
    inventory.remove(*inventory.find(f"{REG}/small:v1"))

    assert not content(store, CDN, cdn_path(own)).exists()
    assert not store.tree.sidecar("redirect", REG, f"v2/small/blobs/{own}").exists()
    assert not blob_file(store, own).exists()
    # Shared: the CDN name and other/app's record stay.
    assert content(store, CDN, cdn_path(shared)).read_bytes() == SHARED
    assert store.tree.sidecar("redirect", REG, f"v2/other/app/blobs/{shared}").exists()
    assert blob_file(store, shared).exists()
    assert blob_file(store, other.config).exists()


def test_rm_unlinks_payload_then_sidecars_then_the_blob(
    store: Store, inventory: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = cache_image(store, "small", "v1", [b"own" * 100], cdn=True)
    [layer] = small.layers
    calls: list[tuple[str, str]] = []
    for method in ("unlink_content", "remove_sidecars", "remove_blob"):
        original = getattr(Store, method)

        def record(self, *args, _name=method, _original=original, **kwargs):
            calls.append((_name, "/".join(str(a) for a in args[:2])))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Store, method, record)
    inventory.remove(*inventory.find(f"{REG}/small:v1"))
    registry_name, cdn_name = f"{REG}/v2/small/blobs/{layer}", f"{CDN}/{cdn_path(layer)[1:]}"
    order = [(name, where) for name, where in calls
             if where in (registry_name, cdn_name) or where.startswith(f"{layer}/")]
    assert [name for name, _ in order] == ["unlink_content", "remove_sidecars"] * 2 + [
        "remove_blob"
    ]
    assert [where for _, where in order[:4:2]] == [registry_name, cdn_name]  # redirecting first
    assert calls[:2] == [("unlink_content", f"{REG}/v2/small/manifests/v1"),
                         ("remove_sidecars", f"{REG}/v2/small/manifests/v1")]


def test_rm_finds_records_whose_source_name_is_already_gone(
    store: Store, inventory: Inventory
) -> None:
    small = cache_image(store, "small", "v1", [b"own" * 100], cdn=True)
    [layer] = small.layers
    content(store, REG, f"v2/small/blobs/{layer}").unlink()  # as after a crash
    inventory.remove(*inventory.find(f"{REG}/small:v1"))
    assert not store.tree.sidecar("redirect", REG, f"v2/small/blobs/{layer}").exists()
    assert not content(store, CDN, cdn_path(layer)).exists()


def test_rm_keeps_a_manifest_another_registry_uses_and_leaves_no_digest_image(
    store: Store, inventory: Inventory
) -> None:
    ours = cache_image(store, "small", "v1", [SHARED], label="same")
    theirs = cache_image(store, "library/small", "v1", [SHARED], domain=HUB, label="same")
    assert ours.digest == theirs.digest
    removed = inventory.remove(*inventory.find("registry.test/small:v1"))
    assert removed.blobs == ()
    assert not content(store, REG, f"v2/small/manifests/{ours.digest}").exists()
    assert [i.name for i in inventory.images()] == ["docker.io/library/small:v1"]
    assert blob_file(store, ours.digest).exists()


def test_rm_of_a_tag_keeps_another_tag_of_the_same_manifest(
    store: Store, inventory: Inventory
) -> None:
    small = cache_image(store, "small", "v1", [SHARED])
    store.record_manifest(REG, "v2/small/manifests/latest", small.digest, MT_MANIFEST, None)
    removed = inventory.remove(*inventory.find("registry.test/small:v1"))
    assert (removed.images, removed.blobs) == ((f"{REG}/small:v1",), ())
    assert [i.key for i in inventory.images()] == [f"{REG}/small:latest"]
    assert content(store, REG, f"v2/small/manifests/{small.digest}").exists()


def test_rm_by_digest_of_an_index_removes_its_platforms(
    store: Store, inventory: Inventory
) -> None:
    digest, platforms, size = cache_index(store, "multi", "latest")
    removed = inventory.remove(*inventory.find(f"registry.test/multi@{digest}"))
    assert removed.images == (f"{REG}/multi:latest",)  # the tag pointing at it
    assert removed.bytes == size
    assert inventory.images() == []
    assert not any(blob_file(store, p.digest).exists() for p in platforms)
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def test_rm_with_docker_short_names_through_the_cli(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_image(store, "library/alpine", "latest", [b"alpine"], domain=HUB)
    conf = write_config(tmp_path, store)
    code, out, _ = run_cli(capsys, "ls", "--config", conf, "--json")
    # The default registry_hosts name registry-1.docker.io twice: docker.io wins.
    assert [i["name"] for i in json.loads(out)["images"]] == ["docker.io/library/alpine:latest"]
    code, out, _ = run_cli(capsys, "rm", "--config", conf, "--json", "alpine")
    assert code == 0
    doc = json.loads(out)
    assert doc["images"] == [f"{HUB}/library/alpine:latest"]
    assert len(doc["blobs"]) == 3 and doc["bytes"] > 0 and doc["files"] >= 3
    assert Inventory(store.root, HOSTS).images() == []


def test_rm_of_an_image_not_cached_fails_and_removes_nothing(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_image(store, "small", "v1", [SHARED])
    conf = write_config(tmp_path, store)
    code, _, err = run_cli(capsys, "rm", "--config", conf, "registry.test/small:v1",
                           "registry.test/small:v2")
    assert code == 1
    assert "registry.test/small:v2 is not in the cache" in err
    assert len(Inventory(store.root).images()) == 1


def test_chain_order_puts_a_redirecting_name_before_its_target() -> None:
    a, b, c = Link(REG, "v2/x/blobs/d", 1, 1), Link(CDN, "hop1", 1, 1), Link("cdn2", "z", 1, 1)
    records = [Redirect(REG, "v2/x/blobs/d", (CDN, "hop1")), Redirect(CDN, "hop1", ("cdn2", "z"))]
    assert chain_order([c, b, a], records) == [a, b, c]


# --- verify --------------------------------------------------------------------------------


def test_verify_quarantines_a_corrupt_blob_and_unlinks_its_names(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = cache_image(store, "small", "v1", [SHARED, b"own" * 100], cdn=True)
    bad = small.layers[1]
    path = blob_file(store, bad)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))  # same inode: every name sees the damage
    conf = write_config(tmp_path, store)

    code, out, _ = run_cli(capsys, "verify", "--config", conf)
    assert code == 1
    assert f"CORRUPT {bad}" in out and "1 corrupt" in out
    quarantined = store.root / "quarantine" / bad.replace(":", "-")
    assert quarantined.read_bytes() == bytes(data)
    assert not path.exists()
    assert not content(store, REG, f"v2/small/blobs/{bad}").exists()
    assert not content(store, CDN, cdn_path(bad)).exists()
    assert not store.tree.sidecar("redirect", REG, f"v2/small/blobs/{bad}").exists()
    assert content(store, REG, f"v2/small/blobs/{small.layers[0]}").read_bytes() == SHARED

    code, out, _ = run_cli(capsys, "verify", "--config", conf, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc == {"checked": 3, "bytes": small.size - len(b"own" * 100), "failures": []}


def test_verify_json_names_failures(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = cache_image(store, "small", "v1", [b"layer" * 10])
    blob_file(store, small.config).write_bytes(b"{}")
    code, out, _ = run_cli(capsys, "verify", "--config", write_config(tmp_path, store), "--json")
    assert code == 1
    [failure] = json.loads(out)["failures"]
    assert failure["digest"] == small.config
    assert failure["actual"] == digest_of(b"{}")
    assert failure["quarantined"].endswith(small.config.replace(":", "-"))
    assert failure["removed"] == [f"{REG}/v2/small/blobs/{small.config}"]


# --- --json and tables -----------------------------------------------------------------------


def test_ls_and_du_json_parse_and_tables_align(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = cache_image(store, "small", "v1", [SHARED])
    index, _, _ = cache_index(store, "multi", "latest")
    conf = write_config(tmp_path, store)

    code, out, _ = run_cli(capsys, "ls", "--config", conf, "--json")
    assert code == 0
    images = {i["key"]: i for i in json.loads(out)["images"]}
    entry = images[f"{REG}/small:v1"]
    assert (entry["digest"], entry["tag"], entry["platforms"]) == (small.digest, "v1",
                                                                   ["linux/amd64"])
    assert set(entry) == {"key", "name", "registry", "domain", "repository", "tag", "digest",
                          "media_type", "platforms", "size", "blobs", "missing", "last_used",
                          "complete", "not_pulled", "cached_platforms", "missing_bytes", "pinned",
                          "private"}
    assert images[f"{REG}/multi:latest"]["digest"] == index

    code, out, _ = run_cli(capsys, "du", "--config", conf, "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"domains", "total", "unlinked", "lists"}
    assert doc["domains"][0] == {"domain": REG, "registry": REG, **doc["total"]}

    code, out, _ = run_cli(capsys, "ls", "--config", conf)
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "DIGEST", "PLATFORMS", "SIZE", "STATE", "LAST", "USED"]
    assert lines[1].startswith(f"{REG}/multi:latest ")
    assert "linux/amd64,linux/arm64/v8" in lines[1]
    assert len({line.index("sha256:") for line in lines[1:]}) == 1  # one column
    code, out, _ = run_cli(capsys, "du", "--config", conf)
    assert out.splitlines()[-1].startswith("total")


def test_commands_work_on_an_empty_or_missing_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text(f"cache_dir: {tmp_path / 'nothing'}\n")
    code, out, _ = run_cli(capsys, "ls", "--config", str(conf), "--json")
    assert (code, json.loads(out)) == (0, {"images": []})
    assert run_cli(capsys, "du", "--config", str(conf))[0] == 0
    assert run_cli(capsys, "verify", "--config", str(conf))[0] == 0


def test_attestations_are_no_platforms_by_either_mark(store: Store, inventory: Inventory) -> None:
    """oci/manifest.py's rule, as warm's: platform unknown/unknown (any
    variant) or the attestation annotation (any platform)."""
    amd = cache_image(store, "att", None, [b"amd64 binary" * 10])
    entries = [
        {"mediaType": MT_MANIFEST, "digest": amd.digest, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MT_MANIFEST, "digest": digest_of(b"att1"), "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown", "variant": "v0"}},
        {"mediaType": MT_MANIFEST, "digest": digest_of(b"att2"), "size": 1,
         "platform": {"os": "linux", "architecture": "arm64"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
    ]
    body = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode()
    cache_manifest(store, REG, "att", body, "v1", MT_INDEX)
    [image] = inventory.images()
    assert image.platforms == ("linux/amd64",)


# --- complete or missing -------------------------------------------------------------------


def cache_one_platform_of_two(store: Store, name: str) -> tuple[str, Cached, str]:
    """An index of linux/amd64 and linux/arm64 (plus an attestation) of
    which a client pulled linux/amd64 only."""
    amd = cache_image(store, name, None, [b"amd64 binary" * 100])
    arm = digest_of(b"an arm64 manifest never pulled")
    entries = [
        {"mediaType": MT_MANIFEST, "digest": amd.digest, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MT_MANIFEST, "digest": arm, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": MT_MANIFEST, "digest": digest_of(b"attestation"), "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"}},
    ]
    body = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode()
    return cache_manifest(store, REG, name, body, "v1", MT_INDEX), amd, arm


def test_platforms_never_pulled_leave_an_image_complete(
    store: Store, inventory: Inventory
) -> None:
    _, _, arm = cache_one_platform_of_two(store, "half")
    [image] = inventory.images()
    assert image.platforms == ("linux/amd64", "linux/arm64")
    assert image.cached_platforms == ("linux/amd64",)
    assert image.missing == image.unpulled == {arm, digest_of(b"attestation")}
    assert image.complete and image.lost == frozenset() and image.missing_bytes == 0


def test_a_whole_index_and_a_plain_image_are_complete(store: Store, inventory: Inventory) -> None:
    cache_index(store, "multi", "latest")
    cache_image(store, "small", "v1", [SHARED])
    multi, small = inventory.images()
    assert multi.cached_platforms == multi.platforms == ("linux/amd64", "linux/arm64/v8")
    assert small.cached_platforms == small.platforms == ("linux/amd64",)
    assert multi.complete and small.complete


def test_a_quarantined_layer_is_missing_with_its_stated_size(
    store: Store, inventory: Inventory
) -> None:
    """verify moves a corrupt layer to quarantine/ and unlinks its names:
    the image was pulled whole, so it is now one blob short."""
    small = cache_image(store, "small", "v1", [SHARED, b"own" * 100])
    bad = small.layers[1]
    blob_file(store, bad).write_bytes(b"rotten")
    assert len(inventory.verification().failures) == 1
    [image] = inventory.images()
    assert image.lost == image.missing == {bad}
    assert not image.complete
    assert image.size == small.size - len(b"own" * 100)
    assert image.missing_bytes == len(b"own" * 100)  # as the manifest states it


def test_a_lost_platform_manifest_is_missing_not_unpulled(
    store: Store, inventory: Inventory
) -> None:
    """A platform manifest quarantined, or its blobs/ file removed by hand
    (its content/ name stays): pulled once, so it counts as missing; what it
    named is unknown, so the size missing is too."""
    _, amd, _ = cache_one_platform_of_two(store, "half")
    blob_file(store, amd.digest).write_bytes(b"rotten")
    inventory.verification()
    [image] = inventory.images()
    assert image.lost == {amd.digest}
    assert image.cached_platforms == ("linux/amd64",)  # what was pulled, broken or not
    assert (image.complete, image.missing_bytes) == (False, None)

    _, other, _ = cache_one_platform_of_two(store, "other")
    blob_file(store, other.digest).unlink()
    [_, image] = inventory.images()
    assert image.key == f"{REG}/other:v1"
    assert image.lost == {other.digest}


def test_rm_of_a_repositorys_last_image_removes_its_listings(
    store: Store, inventory: Inventory
) -> None:
    cache_image(store, "small", "v1", [SHARED])
    cache_image(store, "small", "v2", [b"two"])
    cache_image(store, "small/below", "v1", [b"below"])
    subject = "sha256-" + "a" * 64
    for name in ("small", "small/below"):
        store.write_listing(REG, name, Kind.TAGS, "list", b"{}", 1.0)
        store.write_listing(REG, name, Kind.REFERRERS, subject, b"{}", 1.0)
    listed = store.tree.listing(REG, "small", Kind.TAGS, "list")
    inventory.remove(*inventory.find(f"{REG}/small:v1"))
    assert listed.is_file()  # small:v2 is still cached
    removed = inventory.remove(*inventory.find(f"{REG}/small:v2"))
    assert not listed.exists()
    assert not store.tree.listing(REG, "small", Kind.REFERRERS, subject).exists()
    assert removed.files >= 2
    # A repository below it is another repository: its listings stay.
    assert store.tree.listing(REG, "small/below", Kind.REFERRERS, subject).is_file()


# --- check --referrers -------------------------------------------------------------------


def referrers_index(*digests_and_bodies: tuple[str, bytes]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": d, "size": len(b)} for d, b in digests_and_bodies
    ]}).encode()


def test_check_referrers_requires_each_answer_and_every_artifact_whole(
    store: Store, inventory: Inventory
) -> None:
    small = cache_image(store, "small", "v1", [b"layer"])
    missing = [str(m) for c in inventory.check([f"{REG}/small:v1"], [], referrers=True)
               for m in c.missing]
    assert missing == [f"referrers {small.digest}: no referrers answer stored "
                       "(cr-proxy warm --referrers stores it)"]
    # An index artifact (a signature of each of two payloads): all its
    # manifests are needed, pulled or not.
    payload = b"signature payload"
    signature = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                            "config": descriptor(MT_CONFIG, b"{}"),
                            "layers": [descriptor(MT_LAYER, payload)]}).encode()
    sig_digest = cache_manifest(store, REG, "small", signature, None, MT_MANIFEST)
    other = b'{"schemaVersion": 2, "mediaType": "application/x.unknown"}'
    bundle = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        descriptor(MT_MANIFEST, signature), descriptor(MT_MANIFEST, other)]}).encode()
    bundle_digest = cache_manifest(store, REG, "small", bundle, None, MT_INDEX)
    # The tag schema's index cached as a tag answers for the image.
    cache_manifest(store, REG, "small", referrers_index((bundle_digest, bundle)),
                   small.digest.replace(":", "-"), MT_INDEX)
    [checked] = inventory.check([f"{REG}/small:v1"], [], referrers=True)
    assert {(m.what, m.name) for m in checked.missing} == {
        ("manifest", digest_of(other)),  # an entry never fetched
        ("blob", digest_of(b"{}")), ("blob", digest_of(payload)),
        ("referrers", bundle_digest), ("referrers", sig_digest),  # the next level's answers
    }
    # A stored answer that is not an index is said, not served.
    store.write_listing(REG, "small", Kind.REFERRERS, sig_digest.replace(":", "-"), b"[", 1.0)
    [checked] = inventory.check([f"{REG}/small:v1"], [], referrers=True)
    assert f"referrers {sig_digest}: the stored referrers index of small@{sig_digest}: " \
        "not JSON" in [str(m) for m in checked.missing]
    # Without --referrers the image itself is whole.
    assert inventory.check([f"{REG}/small:v1"], [])[0].complete
