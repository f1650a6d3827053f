"""Referrers end to end (issue 13, items 1 and 2), through `cr-proxy serve`
in mirror mode and through the https_proxy, with raw HTTP (no referrers
client installs in `make test`) and skopeo for the legacy cosign tag:

- by the tag schema against the real registry alone (Debian's CNCF
  distribution 2.8 has no referrers API: it answers 404), the
  `sha256-<hex>` index tag pushed as the spec says;
- by the API against tests/referrers_front.py, the real registry plus the
  referrers endpoint (answering in pages: cr-proxy follows the Link and
  keeps the answer whole);
- then with the registry, its token server, its CDN and the front all
  stopped: both answer from the cache (stale, saying so), each referrer
  artifact pulls, and so does the legacy `sha256-<hex>.sig` tag.
- issue 13's acceptance: a cache filled by `cr-proxy warm --referrers`
  alone (no client asked anything), then the upstream gone: `skopeo
  list-tags`, the referrers by the API and by the tag schema, a pull of
  each referrer artifact and of the legacy signature tag; `cr-proxy check
  --referrers` (no network) says complete, then names a referrer's blob
  and an image layer removed from blobs/; the status page names the image
  incomplete and stale; `cr-proxy du` counts the stored listings, and `rm`
  of a repository's last image removes them.

Before: mirror mode answered `404 UNSUPPORTED`; https_proxy mode relayed the
upstream's 404 uncached, and nothing answered offline.
"""

from __future__ import annotations

import html
import json
import os
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from testbed.crproxy import CrProxy, clean_env
from testbed.oci_layout import MT_INDEX, MT_MANIFEST, ImageInfo, build_image, tar_layer
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints
from tests.faulty import Answer, http, wait_until
from tests.referrers_front import (
    ATTESTATION_TYPE,
    SIGNATURE_TYPE,
    Artifact,
    ReferrersFront,
    push_artifact,
    push_manifest,
    push_tag_schema,
)
from tests.test_e2e_ls_complete import in_no_network
from tests.test_e2e_pins import cr_proxy
from tests.test_e2e_tags import stale_served

REPO = "signed/app"
FRONT = "refs.test"
NOBODY = "sha256:" + "0" * 64  # a subject nothing refers to


@dataclass
class Signed:
    image: ImageInfo
    signature: Artifact
    attestation: Artifact

    @property
    def subject(self) -> str:
        return self.image.manifest_digest

    @property
    def tag(self) -> str:
        return self.subject.replace(":", "-")


@pytest.fixture(scope="module")
def signed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Signed:
    layout = tmp_path_factory.mktemp("signed") / "app"
    image = build_image(layout, layers=[tar_layer({"signed.txt": b"signed\n"})], tag="v1")
    upstream.push(layout, "v1", REPO, "v1")
    subject = {"mediaType": MT_MANIFEST, "digest": image.manifest_digest,
               "size": image.sizes[image.manifest_digest]}
    signature = push_artifact(upstream, REPO, subject, SIGNATURE_TYPE, b'{"critical": {}}')
    attestation = push_artifact(upstream, REPO, subject, ATTESTATION_TYPE, b'{"_type": "x"}')
    push_tag_schema(upstream, REPO, image.manifest_digest, [signature, attestation])
    # cosign before OCI 1.1: the signature under `sha256-<hex>.sig`, a plain tag.
    legacy = image.manifest_digest.replace(":", "-") + ".sig"
    push_manifest(upstream, REPO, legacy, signature.manifest, MT_MANIFEST)
    return Signed(image, signature, attestation)


@pytest.fixture(scope="module")
def front(upstream: Upstream, signed: Signed) -> Iterator[ReferrersFront]:
    with ReferrersFront(upstream) as running:
        running.referrers[(REPO, signed.subject)] = [
            signed.signature.descriptor(), signed.attestation.descriptor()]
        running.page_size = 1  # two pages: cr-proxy follows the Link
        yield running


@pytest.fixture(scope="module")
def cr(upstream: Upstream, front: ReferrersFront,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrProxy]:
    (port,) = free_ports(1)
    endpoints = {**proxy_endpoints(upstream), FRONT: front.url}
    with CrProxy(tmp_path_factory.mktemp("referrers") / "crproxy", endpoints,
                 listen_proxy=f"127.0.0.1:{port}") as running:
        yield running


def mirror(cr: CrProxy, registry: str, path: str) -> Answer:
    return http(f"http://{cr.http}/v2/{registry}/{REPO}/{path}")


def proxied(cr: CrProxy, registry: str, path: str) -> Answer:
    """GET https://<registry>/v2/signed/app/<path> through the https_proxy
    (CONNECT, TLS with a leaf of our CA), with no credentials."""
    context = ssl.create_default_context(cafile=str(cr.ca_cert))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{cr.proxy_port}"}),
        urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(f"https://{registry}/v2/{REPO}/{path}", timeout=60) as answer:
            return Answer(answer.status, dict(answer.headers.items()), answer.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, dict(err.headers.items()), err.read())


def referrers(answer: Answer) -> list[tuple[str, str]]:
    """(digest, artifactType) of each descriptor of a referrers answer."""
    assert answer.status == 200, answer
    assert answer.header("Content-Type") == MT_INDEX, answer
    doc = json.loads(answer.body)
    assert (doc["schemaVersion"], doc["mediaType"]) == (2, MT_INDEX)
    return [(d["digest"], d.get("artifactType")) for d in doc["manifests"]]


def skopeo_copy(source: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "copy", "--retry-times", "0", "--src-tls-verify=false", "--preserve-digests",
         f"docker://{source}", f"oci:{dest}:pulled"],
        capture_output=True, text=True, env=clean_env(), timeout=120)


def test_referrers_by_api_and_by_tag_schema_online_then_offline(
    cr: CrProxy, upstream: Upstream, front: ReferrersFront, signed: Signed, tmp_path: Path
) -> None:
    both = [(signed.signature.digest, SIGNATURE_TYPE),
            (signed.attestation.digest, ATTESTATION_TYPE)]
    subject, sig_only = signed.subject, f"?artifactType={quote(SIGNATURE_TYPE, safe='/')}"

    # Online, by the tag schema: the registry answers the API with 404.
    by_tags = mirror(cr, "registry.test", f"referrers/{subject}")
    assert (referrers(by_tags), by_tags.header("X-Cache")) == (both, "MISS")
    assert by_tags.header("OCI-Filters-Applied") is None
    # The index tag is cached as a tag, the answer as a listing.
    assert (cr.cache / f"content/registry.test/v2/{REPO}/manifests/{signed.tag}").is_file()
    assert (cr.cache / f"lists/registry.test/{REPO}/_referrers/{signed.tag}").is_file()
    filtered = mirror(cr, "registry.test", f"referrers/{subject}{sig_only}")
    assert referrers(filtered) == both[:1]
    assert filtered.header("OCI-Filters-Applied") == "artifactType"
    assert referrers(mirror(cr, "registry.test", f"referrers/{NOBODY}")) == []
    # Online, by the API (the front): asked once, then served from the cache.
    by_api = mirror(cr, FRONT, f"referrers/{subject}")
    assert (referrers(by_api), by_api.header("X-Cache")) == (both, "MISS")
    assert mirror(cr, FRONT, f"referrers/{subject}").header("X-Cache") == "HIT"
    assert front.asked[subject] == 2  # one answer, in two pages
    # The https_proxy: the same answers, no client login needed.
    assert referrers(proxied(cr, "registry.test", f"referrers/{subject}")) == both
    assert referrers(proxied(cr, FRONT, f"referrers/{subject}{sig_only}")) == both[:1]
    # Clients fetch the artifacts (cached by the normal paths), and cosign's
    # legacy signature tag.
    for artifact in (signed.signature, signed.attestation):
        assert mirror(cr, "registry.test", f"manifests/{artifact.digest}").body \
            == artifact.manifest
        blob = json.loads(artifact.manifest)["layers"][0]["digest"]
        assert mirror(cr, "registry.test", f"blobs/{blob}").body == artifact.layer
    legacy = f"{cr.http}/registry.test/{REPO}:{signed.tag}.sig"
    online = skopeo_copy(legacy, tmp_path / "sig-online")
    assert online.returncode == 0, online.stderr

    upstream.stop_registry()
    upstream.stop_auth()
    upstream.stop_cdn()
    front.stop()
    try:
        for tree in ("lists", "docker-content-digest"):
            for path in (cr.cache / tree).rglob("*"):
                if path.is_file():
                    os.utime(path, (1, 1))  # stale: the fetcher must fall back
        for registry in ("registry.test", FRONT):
            before = stale_served(cr, registry)
            stale = mirror(cr, registry, f"referrers/{subject}")
            assert stale_served(cr, registry) == before + 1  # counted per registry
            assert (referrers(stale), stale.header("X-Cache")) == (both, "STALE"), registry
            assert int(stale.header("Age") or 0) > 10**9
            assert referrers(mirror(cr, registry, f"referrers/{subject}{sig_only}")) \
                == both[:1]
            assert referrers(proxied(cr, registry, f"referrers/{subject}")) == both
        assert referrers(mirror(cr, "registry.test", f"referrers/{NOBODY}")) == []
        # No stored answer, but the tag schema's index is cached as a tag.
        (cr.cache / f"lists/registry.test/{REPO}/_referrers/{signed.tag}").unlink()
        from_tag = mirror(cr, "registry.test", f"referrers/{subject}")
        assert (referrers(from_tag), from_tag.header("X-Cache")) == (both, "STALE")
        # Every referrer artifact pulls; so does the legacy signature tag.
        for artifact in (signed.signature, signed.attestation):
            assert mirror(cr, "registry.test", f"manifests/{artifact.digest}").body \
                == artifact.manifest
            blob = json.loads(artifact.manifest)["layers"][0]["digest"]
            assert mirror(cr, "registry.test", f"blobs/{blob}").body == artifact.layer
        offline = skopeo_copy(legacy, tmp_path / "sig-offline")
        assert offline.returncode == 0, offline.stderr
        # Never asked online: not in the cache, and said so.
        other = "sha256:" + "1" * 64
        never = mirror(cr, FRONT, f"referrers/{other}")
        assert never.status == 404, never
        assert never.json_errors()[0] == {
            "code": "MANIFEST_UNKNOWN",
            "message": f"the referrers index of {REPO}@{other} is not in the cache, and "
                       f"{FRONT} is unreachable"}
    finally:
        upstream.start_registry()
        upstream.start_auth()
        upstream.start_cdn()
        front.start()
        probe = f"http://{cr.http}/v2/registry.test/{REPO}/manifests/never"
        wait_until(lambda: b"unreachable" not in http(probe).body, 30,
                   "cr-proxy reaching the upstream again")


@pytest.mark.parametrize("query", ["?artifactType=", "?artifactType=not%20a%20type",
                                   "?artifactType=a/b/c"])
def test_a_bad_artifact_type_is_a_400(cr: CrProxy, signed: Signed, query: str) -> None:
    answer = mirror(cr, "registry.test", f"referrers/{signed.subject}{query}")
    assert answer.status == 400, answer
    assert answer.json_errors()[0]["code"] == "UNSUPPORTED"


def test_warm_referrers_then_the_cable_out(
    upstream: Upstream, front: ReferrersFront, signed: Signed, tmp_path: Path
) -> None:
    """Issue 13's acceptance, on a cache nothing but `warm --referrers`
    filled: registry.test has no referrers API (the tag schema is used),
    refs.test is the front (the API)."""
    both = [(signed.signature.digest, SIGNATURE_TYPE),
            (signed.attestation.digest, ATTESTATION_TYPE)]
    images = [f"{registry}/{REPO}:v1" for registry in ("registry.test", FRONT)]
    endpoints = {**proxy_endpoints(upstream), FRONT: front.url}
    with CrProxy(tmp_path / "crproxy", endpoints) as cr:
        warmed = cr_proxy(cr, "warm", "--referrers", "--json", *images)
        assert warmed.returncode == 0, warmed.stderr
        # Per image: two referrers and the legacy .sig tag's artifact.
        assert json.loads(warmed.stdout)["referrers"] == 6, warmed.stdout
        upstream.stop_registry()
        upstream.stop_auth()
        upstream.stop_cdn()
        front.stop()
        try:
            for tree in ("lists", "docker-content-digest"):
                for path in (cr.cache / tree).rglob("*"):
                    if path.is_file():
                        os.utime(path, (1, 1))  # stale: the upstream must be tried
            tags = subprocess.run(
                ["skopeo", "list-tags", "--retry-times", "0", "--tls-verify=false",
                 f"docker://{cr.http}/registry.test/{REPO}"],
                capture_output=True, text=True, env=clean_env(), timeout=120)
            assert tags.returncode == 0, tags.stderr
            assert {"v1", signed.tag, f"{signed.tag}.sig"} <= set(json.loads(tags.stdout)["Tags"])
            for registry in ("registry.test", FRONT):
                answer = mirror(cr, registry, f"referrers/{signed.subject}")
                assert (referrers(answer), answer.header("X-Cache")) == (both, "STALE"), registry
                for artifact in (signed.signature, signed.attestation):
                    dest = tmp_path / f"{registry}-{artifact.digest[7:19]}"
                    pulled = skopeo_copy(f"{cr.http}/{registry}/{REPO}@{artifact.digest}", dest)
                    assert pulled.returncode == 0, pulled.stderr
            legacy = skopeo_copy(f"{cr.http}/registry.test/{REPO}:{signed.tag}.sig",
                                 tmp_path / "legacy")
            assert legacy.returncode == 0, legacy.stderr

            checked = in_no_network(cr, "check", "--referrers", *images)
            assert (checked.returncode, checked.stderr) == (0, ""), checked.stdout
            assert checked.stdout.count("complete    ") == 2, checked.stdout
            # refs.test answered by the API: its stored answer is all there is.
            (cr.cache / f"lists/{FRONT}/{REPO}/_referrers/{signed.tag}").unlink()
            checked = in_no_network(cr, "check", "--referrers", images[1])
            assert checked.returncode == 1, checked.stdout
            assert f"referrers {signed.subject}: no referrers answer stored" in checked.stdout
            signature_layer = json.loads(signed.signature.manifest)["layers"][0]["digest"]
            image_layer = signed.image.layer_digests[0]
            for removed in (signature_layer, image_layer):
                (cr.cache / "blobs" / removed.replace(":", "/")).unlink()
                checked = in_no_network(cr, "check", "--referrers", images[0])
                assert checked.returncode == 1, checked.stdout
                assert f"blob {removed}: not in the cache" in checked.stdout, checked.stdout
            # Without --referrers only the image's own layer is missed.
            plain = in_no_network(cr, "check", "--json", images[0])
            assert plain.returncode == 1, plain.stdout
            assert [(m["what"], m["name"]) for m in json.loads(plain.stdout)["images"][0]
                    ["missing"]] == [("blob", image_layer)]

            status = http(f"http://127.0.0.1:{cr.metrics_port}/").body.decode()
            name = html.escape(f"registry.test/{REPO}:v1")
            assert f"<th>incomplete</th><td>{name}: 1 missing</td>" in status, status
            assert re.search(f"<th>stale</th><td>{re.escape(name)}: validated [0-9]+ s ago",
                             status), status
            listed = [p for p in (cr.cache / "lists" / FRONT).rglob("*") if p.is_file()]
            assert listed  # refs.test's tag list and referrers answers
            du = json.loads(cr_proxy(cr, "du", "--json").stdout)
            assert du["lists"]["files"] >= len(listed)
            front_row = next(d for d in du["domains"] if d["domain"] == FRONT)
            assert front_row["bytes"] >= sum(p.stat().st_size for p in listed)
            ls = json.loads(cr_proxy(cr, "ls", "--json").stdout)["images"]
            front_images = [i["name"] for i in ls if i["key"].startswith(f"{FRONT}/")]
            removed = cr_proxy(cr, "rm", *front_images)
            assert removed.returncode == 0, removed.stderr
            assert not [p for p in (cr.cache / "lists" / FRONT).rglob("*") if p.is_file()]
            assert any((cr.cache / "lists/registry.test").rglob("_tags/*"))  # not its own
        finally:
            upstream.start_registry()
            upstream.start_auth()
            upstream.start_cdn()
            front.start()
