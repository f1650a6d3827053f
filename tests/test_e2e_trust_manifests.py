"""Issue 10, manifests and the headers stored beside them, end to end.

A hostile registry (tests/hostile_manifests.py) chooses a manifest's
Content-Type, digest header and body, and how the body arrives; clients
reach `cr-proxy serve` through all three doors (mirror HTTP, mirror TLS,
https_proxy CONNECT + TLS). What must hold:

- a manifest is stored only whole, verified, parsed as a schema 2
  manifest or index, with a media type from the closed list; anything else
  is a registry-JSON error and leaves the cache as it was (findings 2, 10);
- no header from the wire is replayed: no injected Set-Cookie, nothing
  served as text/html from the mirror's origin; every answer says nosniff;
- a client's X-CR-* headers do not reach the fetcher (finding 13).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cr_proxy.oci.referrers import MAX_PAGES
from testbed.crproxy import CrProxy
from testbed.ports import free_ports
from tests.faulty import sha256, wait_until
from tests.hostile_manifests import (
    FAKE,
    MT_OCI,
    Door,
    Reply,
    Script,
    ScriptedRegistry,
    get,
    manifest_body,
)

MT_INDEX = "application/vnd.oci.image.index.v1+json"
INJECTED = "application/vnd.oci.image.manifest.v1+json\r\nSet-Cookie: x=y"
SCRIPT_TAG = b"<script>alert(document.cookie)</script>"


@pytest.fixture(scope="module")
def fake() -> Iterator[ScriptedRegistry]:
    with ScriptedRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def cr(fake: ScriptedRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    (proxy_port,) = free_ports(1)
    with CrProxy(tmp_path_factory.mktemp("trust-manifests") / "crproxy", fake.endpoints,
                 listen_proxy=f"127.0.0.1:{proxy_port}") as running:
        yield running


def cached(cr: CrProxy, repo: str) -> dict[str, tuple[bytes, int]]:
    """relative path -> (bytes, mtime_ns) of every file the cache holds for
    faulty.test's repository `repo` (payloads and sidecars alike)."""
    out = {}
    for path in sorted(cr.cache.rglob(f"{FAKE}/v2/{repo}/**/*")):
        if path.is_file():
            out[path.relative_to(cr.cache).as_posix()] = (path.read_bytes(),
                                                          path.stat().st_mtime_ns)
    return out


def assert_refused(reply: Reply, what: object, code: str = "MANIFEST_INVALID") -> None:
    """A registry-JSON error that carries nothing from the hostile answer."""
    assert reply.status == 502, (what, reply)
    assert reply.all("Content-Type") == ["application/json"], (what, reply)
    assert reply.error_code() == code, (what, reply)
    assert reply.all("Set-Cookie") == [], (what, reply)
    assert reply.all("X-Content-Type-Options") == ["nosniff"], (what, reply)
    assert SCRIPT_TAG not in reply.body, (what, reply)


# --- finding 2: header injection and stored XSS ---------------------------------------


def test_media_type_with_crlf_is_refused_and_never_replayed(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    fake.script("/v2/evil/manifests/crlf",
                Script(manifest_body(INJECTED), content_type="application/json"))
    for door in Door:
        for attempt in ("miss", "what was a hit"):
            reply = get(cr, door, "/v2/evil/manifests/crlf")
            assert_refused(reply, (door, attempt))
            assert not any("x=y" in value for _, value in reply.lines), (door, reply)
    assert cached(cr, "evil") == {}
    assert not [p for p in (cr.cache / "content-type").rglob("*")
                if p.is_file() and b"Set-Cookie" in p.read_bytes()]


@pytest.mark.parametrize("door", list(Door), ids=[d.value for d in Door])
def test_unsafe_sidecars_of_an_older_cache_are_never_replayed(
    cr: CrProxy, fake: ScriptedRegistry, door: Door
) -> None:
    """A cache an older cr-proxy poisoned, served by this one: serve takes
    the manifest off the hit path at start-up (cache/scrub.py; nginx replays
    stored headers unchecked), and the fetcher fetches it again and stores
    clean headers."""
    repo = f"older/{door.name.lower()}"
    image = fake.add_image(repo, "v1", [os.urandom(500)])
    path = f"/v2/{repo}/manifests/v1"
    assert get(cr, door, path).status == 200
    content_type = cr.cache / f"content-type/{FAKE}{path}"
    content_type.write_text(INJECTED + "\n")
    cr.stop()
    cr.start()
    cr.wait_for_output("with unsafe stored headers", 10)
    for attempt in ("first", "second"):
        reply = get(cr, door, path)
        assert (reply.status, reply.body) == (200, image.manifest), (attempt, reply)
        assert reply.all("Set-Cookie") == [], (attempt, reply)
        assert reply.all("Content-Type") == [MT_OCI], (attempt, reply)
        assert reply.all("X-Content-Type-Options") == ["nosniff"], (attempt, reply)
    assert content_type.read_text() == MT_OCI + "\n"


@pytest.mark.parametrize(("content_type", "body"), [
    ("text/html", b"<html>" + SCRIPT_TAG + b"</html>"),
    ("application/json", manifest_body("text/html", annotations={"x": SCRIPT_TAG.decode()})),
    ("text/html; charset=utf-8", manifest_body()),  # a real manifest, labelled HTML
    ("image/svg+xml", manifest_body(annotations={"x": SCRIPT_TAG.decode()})),
], ids=["html", "html-media-type", "html-header", "svg"])
def test_manifest_that_is_not_one_is_never_served_as_html(
    cr: CrProxy, fake: ScriptedRegistry, content_type: str, body: bytes
) -> None:
    repo = "html" + sha256(content_type.encode() + body)[7:19]
    fake.script(f"/v2/{repo}/manifests/v1", Script(body, content_type=content_type))
    for door in Door:
        for attempt in ("miss", "what was a hit"):
            reply = get(cr, door, f"/v2/{repo}/manifests/v1")
            assert_refused(reply, (door, attempt))
    assert cached(cr, repo) == {}


def test_docker_schema1_manifest_is_refused(cr: CrProxy, fake: ScriptedRegistry) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "old/app", "tag": "v1",
                       "architecture": "amd64", "fsLayers": [], "history": [],
                       "signatures": []}).encode()
    fake.script("/v2/old/app/manifests/v1", Script(
        body, content_type="application/vnd.docker.distribution.manifest.v1+prettyjws"))
    reply = get(cr, Door.MIRROR_HTTP, "/v2/old/app/manifests/v1")
    assert_refused(reply, "schema 1")
    assert "schema 1" in json.loads(reply.body)["errors"][0]["message"]
    assert cached(cr, "old/app") == {}


def stored_lists(cr: CrProxy, repo: str) -> list[str]:
    """What lists/ holds for faulty.test's repository `repo`."""
    return sorted(p.relative_to(cr.cache).as_posix()
                  for p in (cr.cache / "lists" / FAKE / repo).rglob("*") if p.is_file())


@pytest.mark.parametrize("what, script", [
    ("HTML", Script(b"<html>" + SCRIPT_TAG, content_type="text/html")),
    ("not JSON", Script(b'{"name": "listing", "tags": [', content_type="application/json")),
    ("another name", Script(b'{"name": "other", "tags": ["v1"]}')),
    ("not tags", Script(b'{"name": "listing", "tags": ["../x", "a b"]}')),
    ("oversized", Script(b"", endless=True, content_type="application/json")),
])
def test_bad_tag_lists_are_502_and_never_stored(
    cr: CrProxy, fake: ScriptedRegistry, what: str, script: Script
) -> None:
    """An upstream's tags/list is served (and stored) only as the registry
    JSON of the name asked for: HTML from the mirror's origin, another
    repository's list, a body past MAX_TAG_LIST are a 502 in every door."""
    fake.script("/v2/listing/tags/list", script)
    for door in Door:
        reply = get(cr, door, "/v2/listing/tags/list")
        assert_refused(reply, (what, door), code="UPSTREAM_ERROR"
                       if what != "oversized" else "SIZE_INVALID")
    assert stored_lists(cr, "listing") == []


def test_a_redirected_tag_list_names_the_repository_it_was_sent_to(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    """registry.k8s.io redirects tags/list to Artifact Registry, whose list
    names the repository there: followed, checked against the last hop's
    path, served and stored under the name asked for."""
    fake.script("/v2/k8s/pause/tags/list", Script(b"", status=307, headers={
        "Location": "/v2/mirror/images/pause/tags/list"}))
    fake.script("/v2/mirror/images/pause/tags/list",
                Script(b'{"name": "mirror/images/pause", "tags": ["3.9"]}'))
    reply = get(cr, Door.MIRROR_HTTP, "/v2/k8s/pause/tags/list")
    assert reply.status == 200, reply
    assert json.loads(reply.body) == {"name": "k8s/pause", "tags": ["3.9"]}
    # Where it was sent, the list must name that repository.
    fake.script("/v2/k8s/liar/tags/list", Script(b"", status=307, headers={
        "Location": "/v2/mirror/liar/tags/list"}))
    fake.script("/v2/mirror/liar/tags/list",
                Script(b'{"name": "mirror/images/pause", "tags": ["3.9"]}'))
    assert_refused(get(cr, Door.MIRROR_HTTP, "/v2/k8s/liar/tags/list"), "redirected",
                   code="UPSTREAM_ERROR")


def test_a_slow_upstream_gets_the_stale_tag_list_and_finishes_behind(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    """A stored list due for a fetch waits timeouts.stale_budget for the
    upstream, as a tag does: an upstream that has sent half its answer gets
    the client the stored copy (STALE), and the fetch, finished in the
    background, stores the new list."""
    path = "/v2/slow/tags/list"
    fake.script(path, Script(b'{"name": "slow", "tags": ["old"]}'))
    assert get(cr, Door.MIRROR_HTTP, path).header("X-Cache") == "MISS"
    (stored,) = (cr.cache / "lists" / FAKE / "slow").rglob("list")
    os.utime(stored, (1, 1))
    fake.script(path, Script(b'{"name": "slow", "tags": ["new"]}', pieces=2, gated=True))
    try:
        # Answered while the upstream's answer is held at its gate.
        reply = get(cr, Door.MIRROR_HTTP, path)
        assert (reply.header("X-Cache"), json.loads(reply.body)["tags"]) == ("STALE", ["old"])
        assert fake.first_piece_sent.wait(30), "the upstream was never asked"
    finally:
        fake.release()
    wait_until(lambda: b"new" in stored.read_bytes(), 30, "the fetch finishing behind")
    reply = get(cr, Door.MIRROR_HTTP, path)
    assert (reply.header("X-Cache"), json.loads(reply.body)["tags"]) == ("HIT", ["new"])


def test_an_upstream_link_is_made_again_on_the_clients_path(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    """The next page's query is kept (checked); its URL is ours, never the
    upstream's; a Link naming parameters we would refuse is dropped."""
    body = b'{"name": "paged", "tags": ["a", "b"]}'
    fake.script("/v2/paged/tags/list", Script(body, headers={
        "Link": '<https://evil.test/v2/x/tags/list?n=2&last=b&x=1>; rel="next"'}))
    reply = get(cr, Door.MIRROR_HTTP, "/v2/paged/tags/list?n=2")
    assert reply.status == 200, reply
    assert json.loads(reply.body) == {"name": "paged", "tags": ["a", "b"]}
    assert reply.all("Link") == ['</v2/faulty.test/paged/tags/list?n=2&last=b>; rel="next"']
    reply = get(cr, Door.PROXY_TLS, "/v2/paged/tags/list?n=2")
    assert reply.all("Link") == ['</v2/paged/tags/list?n=2&last=b>; rel="next"']
    fake.script("/v2/paged/tags/list", Script(body, headers={
        "Link": '</v2/paged/tags/list?n=2&last=../../x>; rel="next"'}))
    reply = get(cr, Door.MIRROR_HTTP, "/v2/paged/tags/list?n=3")
    assert (reply.status, reply.all("Link")) == (200, [])


SUBJECT = "sha256:" + "5" * 64
GOOD_DESCRIPTOR = {"mediaType": MT_OCI, "digest": "sha256:" + "6" * 64, "size": 10,
                   "artifactType": "application/vnd.example+json"}


def referrers_index(*descriptors: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX,
                       "manifests": list(descriptors)}).encode()


@pytest.mark.parametrize("what, script, code", [
    ("an image manifest", Script(manifest_body()), "UPSTREAM_ERROR"),
    ("HTML", Script(b"<html>" + SCRIPT_TAG, content_type="text/html"), "UPSTREAM_ERROR"),
    ("a bad digest", Script(referrers_index({**GOOD_DESCRIPTOR, "digest": "sha256:../x"}),
                            content_type=MT_INDEX), "UPSTREAM_ERROR"),
    ("a negative size", Script(referrers_index({**GOOD_DESCRIPTOR, "size": -1}),
                               content_type=MT_INDEX), "UPSTREAM_ERROR"),
    ("a bad artifactType", Script(referrers_index(
        {**GOOD_DESCRIPTOR, "artifactType": "text/html\r\nX: y"}), content_type=MT_INDEX),
     "UPSTREAM_ERROR"),
    ("oversized", Script(b"", endless=True, content_type=MT_INDEX), "SIZE_INVALID"),
])
def test_bad_referrers_are_502_and_never_stored(
    cr: CrProxy, fake: ScriptedRegistry, what: str, script: Script, code: str
) -> None:
    """A referrers answer is stored and served only as a checked OCI index
    (oci/referrers.py); anything else is a 502 in every door, and the
    registry's tag schema (no such tag here) does not stand in for it."""
    fake.script(f"/v2/evil/referrers/{SUBJECT}", script)
    for door in Door:
        reply = get(cr, door, f"/v2/evil/referrers/{SUBJECT}")
        assert_refused(reply, (what, door), code=code)
    assert stored_lists(cr, "evil") == []


def test_referrers_pages_are_followed_within_bounds(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    """An upstream whose Link always names a next page is asked MAX_PAGES
    times, then refused; a Link to another path is not followed."""
    path = f"/v2/loop/referrers/{SUBJECT}"
    fake.script(path, Script(referrers_index(GOOD_DESCRIPTOR), content_type=MT_INDEX,
                             headers={"Link": f'<{path}?last=x>; rel="next"'}))
    assert_refused(get(cr, Door.MIRROR_HTTP, path), "endless pages", code="UPSTREAM_ERROR")
    assert fake.count("GET", path) == MAX_PAGES
    assert stored_lists(cr, "loop") == []
    elsewhere = f"/v2/away/referrers/{SUBJECT}"
    fake.script(elsewhere, Script(referrers_index(GOOD_DESCRIPTOR), content_type=MT_INDEX,
                                  headers={"Link": f'<{path}?last=x>; rel="next"'}))
    reply = get(cr, Door.MIRROR_HTTP, elsewhere)
    assert json.loads(reply.body)["manifests"] == [GOOD_DESCRIPTOR]
    assert fake.count("GET", elsewhere) == 1


def test_a_good_referrers_answer_is_rebuilt_from_its_checked_fields(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    body = referrers_index({**GOOD_DESCRIPTOR, "extra": "<script>", "annotations": {"a": "b"}})
    fake.script(f"/v2/good/referrers/{SUBJECT}", Script(body, content_type=MT_INDEX))
    reply = get(cr, Door.PROXY_TLS, f"/v2/good/referrers/{SUBJECT}")
    assert reply.status == 200, reply
    assert reply.all("Content-Type") == [MT_INDEX]
    assert json.loads(reply.body)["manifests"] == [{**GOOD_DESCRIPTOR, "annotations": {"a": "b"}}]
    assert stored_lists(cr, "good") == [f"lists/{FAKE}/good/_referrers/sha256-{'5' * 64}"]


def test_every_answer_of_a_normal_pull_says_nosniff(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    for door in Door:
        repo = f"pull/{door.name.lower()}"
        image = fake.add_image(repo, "v1", [os.urandom(3000)])
        manifest, blob = f"/v2/{repo}/manifests/v1", f"/v2/{repo}/blobs/{image.layer_digests[0]}"
        answers = {
            "manifest miss": get(cr, door, manifest),
            "manifest hit": get(cr, door, manifest),
            "manifest HEAD hit": get(cr, door, manifest, method="HEAD"),
            "manifest by digest": get(cr, door, f"/v2/{repo}/manifests/{image.manifest_digest}"),
            "blob HEAD miss": get(cr, door, blob, method="HEAD"),
            "blob miss": get(cr, door, blob),
            "unknown manifest": get(cr, door, f"/v2/{repo}/manifests/nope"),
            "ping": get(cr, door, "/v2/"),
        }
        # The name is linked just after the miss's last byte went out.
        wait_until((cr.cache / f"content/{FAKE}{blob}").is_file, 30, "the blob's link")
        answers["blob hit"] = get(cr, door, blob)
        assert answers["manifest miss"].header("X-Cache") == "MISS"
        assert answers["manifest hit"].header("X-Cache") == "HIT"
        assert answers["manifest hit"].header("X-CR-Request-Type") == "manifest"  # nginx's
        assert answers["manifest hit"].body == image.manifest
        assert answers["manifest hit"].all("Content-Type") == [MT_OCI]
        assert answers["manifest hit"].all("Docker-Content-Digest") == [image.manifest_digest]
        assert answers["blob hit"].header("X-CR-Request-Type") == "blob"
        assert answers["unknown manifest"].status == 404
        for what, reply in answers.items():
            assert reply.status is not None and reply.status < 500, (door, what, reply)
            assert reply.all("X-Content-Type-Options") == ["nosniff"], (door, what, reply)


def test_nginx_own_errors_say_nosniff(cr: CrProxy) -> None:
    answers = {
        "raw bytes (mirror)": get(cr, Door.MIRROR_HTTP, "/v2/a\x01b/manifests/v1"),
        "raw bytes (https_proxy)": get(cr, Door.PROXY_TLS, "/v2/a\x01b/manifests/v1"),
        "Host of another host (https_proxy)": get(cr, Door.PROXY_TLS, "/v2/", host="other.test"),
        "Host not a host (https_proxy)": get(cr, Door.PROXY_TLS, "/v2/", host="a_b"),
    }
    for what, reply in answers.items():
        assert reply.status is not None and 400 <= reply.status < 500, (what, reply)
        assert reply.all("X-Content-Type-Options") == ["nosniff"], (what, reply)


# --- finding 10: manifests read whole, or not at all --------------------------------


def test_manifest_sent_in_two_pieces_is_stored_whole(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    body = manifest_body(annotations={"pad": "p" * 3000})
    path = "/v2/pieces/manifests/v1"
    # No Docker-Content-Digest: nothing but reading to the end finds the cut.
    fake.script(path, Script(body, digest="", pieces=2, gated=True))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get, cr, Door.MIRROR_HTTP, path)
        assert fake.first_piece_sent.wait(60), "the fetcher never asked for the manifest"
        # A barrier: one more fetcher round trip to the upstream. The first
        # piece was in the fetcher's socket before it began, and reading it
        # needs no I/O, so whatever the fetcher does with a part-read body
        # it has done by the time this is answered.
        assert get(cr, Door.MIRROR_HTTP, "/v2/pieces/tags/list").status == 404
        assert not pending.done(), pending.result()
        assert cached(cr, "pieces") == {}
        fake.release()
        reply = pending.result(60)
    assert (reply.status, reply.body) == (200, body), reply
    assert reply.header("Docker-Content-Digest") == sha256(body)
    assert (cr.cache / f"content/{FAKE}{path}").read_bytes() == body
    hit = get(cr, Door.MIRROR_HTTP, path)
    assert (hit.header("X-CR-Request-Type"), hit.body) == ("manifest", body)


@pytest.mark.parametrize("claimed", [
    "sha256:" + "0" * 64,
    "sha512:" + "0" * 128,  # another algorithm than the cache's is checked too
], ids=["sha256", "sha512"])
def test_manifest_unlike_the_digest_its_upstream_named_is_refused(
    cr: CrProxy, fake: ScriptedRegistry, claimed: str
) -> None:
    repo = "claimed" + claimed[4:6]
    fake.script(f"/v2/{repo}/manifests/v1", Script(manifest_body(), digest=claimed))
    for door in Door:
        assert_refused(get(cr, door, f"/v2/{repo}/manifests/v1"), door, code="DIGEST_INVALID")
    assert cached(cr, repo) == {}


def test_endless_manifest_is_refused_and_stores_nothing(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    path = "/v2/endless/manifests/v1"
    fake.script(path, Script(b"", digest="", endless=True))
    for door in Door:
        reply = get(cr, door, path)
        assert_refused(reply, door)
        assert "larger than" in json.loads(reply.body)["errors"][0]["message"]
    assert cached(cr, "endless") == {}


def test_endless_manifest_leaves_the_cached_tag_untouched(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    path = "/v2/kept/manifests/v1"
    body = manifest_body(annotations={"kept": "yes"})
    fake.script(path, Script(body))
    assert get(cr, Door.MIRROR_HTTP, path).body == body
    # Stale: validated an hour ago (the fetcher reads the sidecar's mtime).
    validated = cr.cache / f"docker-content-digest/{FAKE}{path}"
    an_hour_ago = time.time() - 3600
    os.utime(validated, (an_hour_ago, an_hour_ago))
    before = cached(cr, "kept")
    fake.script(path, Script(b"", digest="", endless=True))  # moved: HEAD names no digest
    reply = get(cr, Door.MIRROR_HTTP, path)
    assert (reply.status, reply.header("X-Cache"), reply.body) == (200, "STALE", body), reply
    assert fake.count("GET", path) == 2  # it did try the new one
    assert cached(cr, "kept") == before


# --- finding 13: X-CR-* headers are cr-proxy's own ----------------------------------


# Spellings of faulty.test that nginx does not take for the cached name but
# the fetcher does (it folds case and drops the default port): requests that
# reach the fetcher while the tag is fresh.
SPELLINGS = {Door.MIRROR_HTTP: ("FAULTY.TEST", "faulty.test:443", FAKE),
             Door.MIRROR_TLS: ("Faulty.Test", "faulty.test:443", FAKE),
             Door.PROXY_TLS: (FAKE,)}


@pytest.mark.parametrize("door", list(Door), ids=[d.value for d in Door])
def test_client_revalidate_header_costs_no_upstream_request(
    cr: CrProxy, fake: ScriptedRegistry, door: Door
) -> None:
    repo = f"fresh/{door.name.lower()}"
    path = f"/v2/{repo}/manifests/v1"
    body = manifest_body(annotations={"repo": repo})
    fake.script(path, Script(body))
    assert get(cr, door, path).status == 200
    for spelling in ("X-CR-Revalidate", "x-cr-revalidate", "X-Cr-Revalidate", "X-CR-REVALIDATE",
                     "X-CR-Revalidate"):
        for registry in SPELLINGS[door]:
            reply = get(cr, door, path, headers={spelling: "1"}, registry=registry)
            assert (reply.status, reply.body) == (200, body), (spelling, registry, reply)
    assert fake.count("HEAD", path) == 0
    assert fake.count("GET", path) == 1


def test_client_cache_only_header_has_no_effect(cr: CrProxy, fake: ScriptedRegistry) -> None:
    image = fake.add_image("cacheonly", "v1", [os.urandom(1000)])
    digest = image.layer_digests[0]
    reply = get(cr, Door.MIRROR_HTTP, f"/v2/cacheonly/blobs/{digest}", method="HEAD",
                headers={"X-CR-Cache-Only": "1"})
    assert reply.status == 200, reply  # asked upstream, as for any client
    assert fake.count("HEAD", f"/v2/cacheonly/blobs/{digest}") == 1


def test_client_mode_and_scheme_headers_change_nothing(
    cr: CrProxy, fake: ScriptedRegistry
) -> None:
    image = fake.add_image("modes", "v1", [os.urandom(1000)])
    path = "/v2/modes/manifests/v1"
    mirror = get(cr, Door.MIRROR_HTTP, path, headers={"X-CR-Mode": "proxy"})
    assert (mirror.status, mirror.body) == (200, image.manifest), mirror
    proxied = get(cr, Door.PROXY_TLS, "/v2/modes/manifests/v1",
                  headers={"X-CR-Mode": "mirror", "X-CR-Scheme": "http"})
    assert (proxied.status, proxied.body) == (200, image.manifest), proxied
