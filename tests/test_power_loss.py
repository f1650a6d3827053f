"""Power loss / kernel crash (not SIGKILL): data never fsynced is lost while
the renames after it survive (ext4 delalloc; see powerloss.py). Each test
does a normal write through cr-proxy's own code, "crashes" (PowerLoss.crash:
every file created since, neither fsynced nor renamed over an existing
name, is zero-length under its final name), restarts what serve restarts,
and asserts what a correct cache must do: serve nothing wrong.

The `test_ok_*` ones record what was checked and found right as it was;
the others failed before the files nothing rebuilds were flushed (pins,
use times, certificates) and before the /v2/ record was read whole
(docs/reliability.md, "Bugs these tests found").
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from cr_proxy import nginx
from cr_proxy.cache.layout import Kind, RegistryPath, Sidecar
from cr_proxy.cache.pins import Pins
from cr_proxy.cache.scrub import scrub_manifest_sidecars
from cr_proxy.cache.store import Store
from cr_proxy.errors import UpstreamError
from cr_proxy.fetch.app import make_app
from cr_proxy.front import certs
from cr_proxy.front.stamp import FrontStamp
from cr_proxy.oci.reference import digest_of
from cr_proxy.upstream.challenges import Challenges
from tests.inprocess import config_at, fetcher
from tests.powerloss import PowerLoss

HOST = "up.test"
CHALLENGE = 'Bearer realm="https://auth.up.test/token",service="up.test"'
PROXY_HEADERS = {"Host": HOST, "X-CR-Mode": "https_proxy", "X-CR-Port": "443",
                 "X-CR-Scheme": "https"}
IMAGE = "application/vnd.oci.image.manifest.v1+json"


def closed_port() -> int:
    """A loopback port nothing listens on (the upstream, down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- finding: the /v2/ record (www-authenticate/<host>/v2/_index) -----------------


async def test_a_lost_ping_challenge_is_not_replayed_as_an_anonymous_200(
    aiohttp_server, aiohttp_client, tmp_path: Path, monkeypatch,
) -> None:
    """https_proxy mode. The upstream's /v2/ answers 401 with a challenge;
    the fetcher stores it (Challenges._keep -> Store.write_sidecar, no
    fsync, a new file). Power loss: the record is zero bytes. After the
    restart, with the upstream down, the fetcher replays /v2/: it must
    send the 401 it saw (or nothing: unreachable), never a 200 saying no
    login is needed."""
    pl = PowerLoss(monkeypatch, tmp_path / "cache")

    async def registry(request: web.Request) -> web.StreamResponse:
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                 headers={"WWW-Authenticate": CHALLENGE})

    client = await fetcher(aiohttp_server, aiohttp_client, tmp_path, registry, hosts=(HOST,))
    first = await client.get("/v2/", headers=PROXY_HEADERS)
    assert first.status == 401
    record = tmp_path / "cache" / "www-authenticate" / HOST / "v2" / "_index"
    assert record.read_text() == CHALLENGE + "\n"

    pl.crash()  # the record: zero bytes under its final name
    down = f"http://127.0.0.1:{closed_port()}"
    restarted = await aiohttp_client(make_app(config_at(
        tmp_path / "again", endpoints={HOST: down}, cache_dir=str(tmp_path / "cache"))))
    answer = await restarted.get("/v2/", headers=PROXY_HEADERS)
    assert answer.status != 200, (
        f"/v2/ replayed as {answer.status} {await answer.text()!r} "
        f"(WWW-Authenticate={answer.headers.get('WWW-Authenticate')!r}); the upstream said 401")


def test_a_zero_length_ping_record_is_not_an_anonymous_ping(tmp_path: Path, monkeypatch) -> None:
    """The same, at Challenges: a written 200 is "\\n" (one byte), a lost
    401 is zero bytes, and stored() reads both as 200."""
    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    Challenges(store).answered(HOST, 401, CHALLENGE)
    pl.crash()
    answer = Challenges(store).stored(HOST)
    assert answer is None or answer.status == 401, f"replayed as {answer}"


# --- finding: pins.json ----------------------------------------------------------


def test_a_pin_survives_power_loss(tmp_path: Path, monkeypatch) -> None:
    """`cr-proxy pin` writes pins.json by Store._replace_with (no fsync;
    the first pin is a new file). Zero bytes after power loss: Pins._saved
    logs "not JSON ... its pins are ignored" and every saved pin is gone;
    the evictor may then take the pinned image."""
    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    pins = Pins(store, (), "docker.io", {"docker.io": "registry-1.docker.io"})
    [key] = pins.pin(["alpine:3.20"])
    pl.crash()
    pinned = Pins(store, (), "docker.io", {"docker.io": "registry-1.docker.io"}).keys()
    assert key in pinned


def test_usage_times_survive_power_loss(tmp_path: Path, monkeypatch) -> None:
    """serve's first save_uses (60 s after start, then at exit) makes
    usage.json, unsynced; zero bytes after power loss, load_uses() is {}:
    the LRU order of everything used so far is gone (eviction falls back
    to blob mtimes)."""
    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    store.save_uses({("up.test", "v2/a/manifests/v1"): 1_700_000_000.0})
    pl.crash()
    assert store.load_uses() == {("up.test", "v2/a/manifests/v1"): 1_700_000_000.0}


# --- finding (outside cache/: certs_dir, read at serve start-up) ------------------


def _start(conf):
    """What serve does with certs before nginx starts (serve.py 206-222)."""
    ca = certs.ensure_ca(conf.certs_dir)
    leaf = certs.ensure_mirror_leaf(ca, conf.certs_dir, conf.mirror_names)
    leaves = certs.LeafCache(ca, conf.certs_dir, conf.proxy.max_hosts)
    leaves.ensure_fallback()
    return ca, leaf, leaves


def test_the_first_start_certificates_survive_power_loss(tmp_path: Path, monkeypatch) -> None:
    """The first serve makes the CA and the mirror and fallback leaves
    (certs._write_atomic: no fsync, new files). Power loss before writeback:
    every later start raises in load_ca (a zero-length PEM)."""
    conf = config_at(tmp_path)
    pl = PowerLoss(monkeypatch, conf.certs_dir)
    _start(conf)
    pl.crash()  # unflushed, ca.key, ca.crt, mirror.*, hosts/_fallback.* were empty
    _start(conf)  # the next start must not fail


def test_a_new_hosts_leaf_survives_power_loss(tmp_path: Path, monkeypatch) -> None:
    """https_proxy mode: the first CONNECT to a new host issues
    certs/hosts/<host>.crt/.key at run time (LeafCache.ensure_sync, no
    fsync). Power loss: both zero bytes. The next start's render writes a
    server with that static leaf for every hosts/*.crt (nginx.py 1048) and
    `nginx -t` (serve.py 221) refuses the whole configuration: serve does
    not start until someone deletes the files."""
    conf = config_at(tmp_path, listen={"proxy": "127.0.0.1:3128"})
    _, _, leaves = _start(conf)
    pl = PowerLoss(monkeypatch, conf.certs_dir)
    leaves.ensure_sync("registry.example")
    pl.crash()  # unflushed, hosts/registry.example.crt and .key were empty
    # serve's start-up again, up to nginx -t:
    conf.run_dir.mkdir(parents=True, exist_ok=True)
    _, leaf, _ = _start(conf)
    conf = nginx.with_front_port(conf)
    rendered = nginx.render(conf, leaf.cert, leaf.key, stamp=FrontStamp.new())
    nginx.check(conf, rendered)


# --- checked and found correct -----------------------------------------------------


def _manifest() -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": IMAGE,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": "sha256:" + "a" * 64, "size": 2},
                       "layers": []}).encode()


def _cr_js(store: Store, domain: str, path: str) -> str:
    """nginx/cr.js manifestMeta, in Python (stat the digest sidecar; read
    both; no check of the values)."""
    digest_file = store.tree.sidecar(Sidecar.DOCKER_CONTENT_DIGEST, domain, path)
    type_file = store.tree.sidecar(Sidecar.CONTENT_TYPE, domain, path)
    try:
        digest_file.stat()
        return f"1|{type_file.read_text().strip()}|{digest_file.read_text().strip()}"
    except OSError:
        return "0"


def test_ok_lost_manifest_sidecars_are_scrubbed_before_nginx_starts(
    tmp_path: Path, monkeypatch,
) -> None:
    """A manifest committed by tag and by digest: the body is a link to an
    fsynced blob; its content-type and docker-content-digest sidecars are
    new files, unsynced, and come back zero-length. Without the start-up
    scrub cr.js would answer "1||" (served with no Content-Type and no
    Docker-Content-Digest). serve.py:204 runs scrub_manifest_sidecars
    before nginx: both go, cr.js says "0", the fetcher refetches."""
    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    body = _manifest()
    digest = digest_of(body)
    tag = RegistryPath(Kind.MANIFEST, "lib/app", "v1")
    store.commit_manifest(HOST, tag, body, digest, IMAGE, 1_700_000_000.0)
    lost = pl.crash()
    by_digest = RegistryPath(Kind.MANIFEST, "lib/app", digest).path
    assert store.tree.sidecar(Sidecar.CONTENT_TYPE, HOST, tag.path) in lost
    assert store.tree.content(HOST, tag.path).read_bytes() == body  # the body survived
    assert _cr_js(store, HOST, tag.path) == "1||"  # what nginx would replay, unscrubbed
    store.prepare()
    assert scrub_manifest_sidecars(store.tree) == 2
    for path in (tag.path, by_digest):
        assert _cr_js(store, HOST, path) == "0"
        assert store.read_manifest(HOST, path) is None


def test_ok_blobs_and_their_names_survive(tmp_path: Path, monkeypatch) -> None:
    """commit_blob: BlobWriter.sync_and_close fsyncs before the rename; the
    content/ name is a hard link of that inode; nothing served is lost."""
    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    data = b"layer bytes" * 1000
    digest = digest_of(data)
    writer = store.blob_writer(digest)
    writer.write(data)
    writer.verify(len(data))
    path = RegistryPath(Kind.BLOB, "lib/app", digest).path
    store.commit_blob(writer, HOST, path)
    upload = store.upload_writer()  # a push's DirectWriter
    upload.write(data + b"!")
    upload.name(digest_of(data + b"!"))
    upload.verify(None)
    store.commit_blob(upload, HOST, RegistryPath(Kind.BLOB, "lib/app", upload.digest).path)
    lost = [p for p in pl.crash() if "temp" not in p.parts]
    assert lost == []
    assert store.tree.content(HOST, path).read_bytes() == data


def test_ok_a_zero_length_private_mark_still_marks(tmp_path: Path, monkeypatch) -> None:
    """mark_private writes "private\\n" unsynced; zero bytes is still a
    regular file: Store.private_since (S_ISREG) and nginx's `-f` test
    (nginx.py 601, 686, 1082) both still see the repository private."""
    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    store.mark_private(HOST, "lib/app", True)
    assert store.tree.private_marker(HOST, "lib/app") in pl.crash()
    assert store.is_private(HOST, "lib/app")
    assert store.tree.private_marker(HOST, "lib/app").is_file()  # nginx: if (-f ...)


def test_ok_lost_listings_are_not_served(tmp_path: Path, monkeypatch) -> None:
    """A tag list or referrers answer written unsynced (a new file) comes
    back zero bytes; parse_stored / parse_referrers refuse it
    (Listings._read returns None): refetched, or offline a 404."""
    from cr_proxy.oci.referrers import parse_referrers
    from cr_proxy.oci.tags import TagPage, parse_stored

    store = Store(tmp_path / "cache")
    store.prepare()
    pl = PowerLoss(monkeypatch, store.root)
    store.write_listing(HOST, "lib/app", Kind.TAGS, "list",
                        TagPage("lib/app", ("v1",), None).stored(), 1_700_000_000.0)
    store.write_listing(HOST, "lib/app", Kind.REFERRERS, "sha256-" + "a" * 64,
                        b'{"schemaVersion":2,"manifests":[]}', 1_700_000_000.0)
    assert len(pl.crash()) == 2
    body, _ = store.read_listing(HOST, "lib/app", Kind.TAGS, "list")
    with pytest.raises(UpstreamError):
        parse_stored(body, "lib/app")
    body, _ = store.read_listing(HOST, "lib/app", Kind.REFERRERS, "sha256-" + "a" * 64)
    with pytest.raises(UpstreamError):
        parse_referrers(body, "r")
