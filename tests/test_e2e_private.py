"""Private content in https_proxy mode (issue 14), end to end: the real
distribution upstream whose token server lets `testuser` pull
`private/app` and no one else (anonymous and `other` get tokens that grant
nothing, so the registry answers 401), skopeo, podman and curl through the CONNECT
front of a real `cr-proxy serve`.

A repository the upstream refuses without a credential is marked private
when a credential first fetches it; from then on a hit or a miss of it is
served only to a client whose own credential the upstream accepts for
that repository. Offline, `private.offline` decides."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.crproxy import CrProxy, layout_blobs
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from testbed.ports import free_ports
from testbed.registry import Upstream, make_jwt
from tests.clients import podman, podman_cleanup
from tests.conftest import proxy_endpoints
from tests.faulty import wait_until
from tests.test_e2e_inventory import cr_proxy_json
from tests.test_e2e_metrics import scrape
from tests.test_e2e_proxy import ca_dir, proxied_env, skopeo_via_proxy

USERS = {"testuser": "pw-testuser", "other": "pw-other", "revokee": "pw-revokee"}
PRIVATE = {"private/app": {"testuser", "revokee"}, "private/other": {"other"},
           "private/pushed": {"testuser"}}
REGISTRY = "registry.test"


@dataclass
class Bed:
    upstream: Upstream
    v1: ImageInfo
    v2: ImageInfo
    work: Path

    def proxy(self, name: str, **settings: object) -> CrProxy:
        (port,) = free_ports(1)
        return CrProxy(self.work / name, proxy_endpoints(self.upstream),
                       listen_proxy=f"127.0.0.1:{port}", **settings)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("private")
    with Upstream(work / "upstream", users=USERS, private=PRIVATE) as up:
        v1 = build_image(work / "v1", layers=[tar_layer({"app/one": b"private one\n" * 300})],
                         tag="v1")
        v2 = build_image(work / "v2", layers=[tar_layer({"app/two": b"private two\n" * 300})],
                         tag="v2")
        for repo in ("private/app", "public/app", "private/other"):
            up.push(work / "v1", "v1", repo, "v1", user="testuser" if repo != "private/other"
                    else "other")
        up.push(work / "v2", "v2", "private/app", "v2", user="testuser")
        yield Bed(up, v1, v2, work)


@pytest.fixture(scope="module")
def cr(bed: Bed) -> Iterator[CrProxy]:
    with bed.proxy("crproxy") as running:
        yield running


def pull(cr: CrProxy, image: str, dest: Path, user: str | None = None):
    creds = ("--src-creds", f"{user}:{USERS[user]}") if user else ()
    return skopeo_via_proxy(cr, f"{REGISTRY}/{image}", dest, ca_dir(cr, dest.parent), *creds)


def curl(cr: CrProxy, path: str, authorization: str | None, tmp: Path,
         head: bool = False) -> tuple[int, bytes]:
    """One request through the https_proxy with this Authorization as sent."""
    out = tmp / "curl.out"
    args = ["curl", "-s", "-o", str(out), "-D", str(tmp / "curl.headers"), "-w", "%{http_code}",
            "--cacert",
            str(cr.ca_cert), "--proxy", f"http://127.0.0.1:{cr.proxy_port}",
            "-H", "Accept: application/vnd.oci.image.manifest.v1+json"]
    if authorization is not None:
        args += ["-H", f"Authorization: {authorization}"]
    if head:
        args.append("-I")
    result = subprocess.run([*args, f"https://{REGISTRY}{path}"], capture_output=True,
                            text=True, env=proxied_env(cr), timeout=60, check=False)
    return int(result.stdout or 0), out.read_bytes() if out.exists() else b""


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "unauthorized" in result.stderr.lower()


def test_only_entitled_credentials_pull_private_content_hit_or_miss(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    up = bed.upstream
    assert up.refuses("private/app", "v1", tmp_path / "direct", None)
    # A fills the cache; the repository is marked private before its content.
    result = pull(cr, "private/app:v1", tmp_path / "a1", "testuser")
    assert result.returncode == 0, result.stderr + cr.log_text()[-3000:]
    assert (cr.cache / f"lists/{REGISTRY}/private/app/_private").is_file()
    assert (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v1").is_file()
    # B (anonymous) and C (`other`) are refused the hit...
    assert refused(pull(cr, "private/app:v1", tmp_path / "b1"))
    assert refused(pull(cr, "private/app:v1", tmp_path / "c1", "other"))
    # ...and the miss, which stores nothing.
    assert refused(pull(cr, "private/app:v2", tmp_path / "b2"))
    assert refused(pull(cr, "private/app:v2", tmp_path / "c2", "other"))
    assert not (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v2").exists()
    assert not any((cr.cache / "blobs").rglob(bed.v2.layer_digests[0].split(":")[1]))
    # A again: from the cache, no blob fetched upstream a second time.
    layer = bed.v1.layer_digests[0]
    before = up.cdn_blob_gets_settled(layer)
    result = pull(cr, "private/app:v1", tmp_path / "a2", "testuser")
    assert result.returncode == 0, result.stderr
    assert layout_blobs(tmp_path / "a2") == layout_blobs(tmp_path / "a1")
    assert up.cdn_blob_gets_settled(layer) == before == 1
    # Never named under its CDN path, which names no repository to check.
    assert not list((cr.cache / "content" / up.cdn_name).rglob(layer.split(":")[1]))
    # Public content of the same registry: anyone, and never marked.
    result = pull(cr, "public/app:v1", tmp_path / "p1")
    assert result.returncode == 0, result.stderr
    assert not (cr.cache / f"lists/{REGISTRY}/public/app/_private").exists()
    listed = cr_proxy_json(cr, "ls")["images"]
    private = {i["repository"]: i["private"] for i in listed}
    assert private["private/app"] is True and private["public/app"] is False
    metrics = scrape(cr)
    assert metrics[("crproxy_private_denied_total", (("reason", "refused_upstream"),))] >= 2
    assert metrics[("crproxy_private_checks_total", (("how", "upstream"),))] >= 1


def test_the_access_log_names_the_https_proxy_client(bed: Bed, cr: CrProxy,
                                                    tmp_path: Path) -> None:
    """user= in the https_proxy access log, the fetcher's word (X-CR-User,
    which no client sees): a token request's Basic user; on private
    content, the user whose Basic credential got the token the client
    sends; nginx's own answers (hits of public content) name no one (`-`).
    Never a secret; a user name that is not a plain name is not logged."""
    result = pull(cr, "private/app:v1", tmp_path / "a", "testuser")
    assert result.returncode == 0, result.stderr
    assert cr.access_lines(re.compile(r'"GET http://auth\.test/token\?\S* HTTP/1\.1" 200 .* '
                                      r"user=testuser$"), 1)
    assert cr.access_lines(re.compile(r'"GET /v2/private/app/manifests/v1 HTTP/1\.1" 200 .* '
                                      r"user=testuser$"), 1)
    layer = bed.v1.layer_digests[0]
    assert cr.access_lines(re.compile(rf'"GET /v2/private/app/blobs/{layer} HTTP/1\.1" 200 .* '
                                      r"user=testuser$"), 1)
    # `other`, refused: named too (a refusal is a client's as much as a pull).
    assert refused(pull(cr, "private/app:v1", tmp_path / "c", "other"))
    assert cr.access_lines(re.compile(r'"GET /v2/private/app/manifests/v1 HTTP/1\.1" 401 .* '
                                      r"user=other$"), 1)
    # Public hits, anonymous: no one (nginx's own answers name no one: `-`).
    for attempt in ("miss", "hit"):
        result = pull(cr, "public/app:v1", tmp_path / f"p-{attempt}")
        assert result.returncode == 0, result.stderr
    assert cr.access_lines(re.compile(r'"GET /v2/public/app/manifests/v1 HTTP/1\.1" 200 .* '
                                      r"cache=HIT .* user=-$"), 1)
    # A Basic credential on the request itself names its user; the
    # fetcher's header is nginx's, never the client's.
    path = "/v2/private/app/manifests/v1"
    status, _ = curl(cr, path, basic("testuser", USERS["testuser"]), tmp_path)
    assert status == 200
    assert "x-cr-user" not in (tmp_path / "curl.headers").read_text().lower()
    # A user name with CR/LF or a space: not logged, nothing injected.
    for number, user in enumerate(("evil\r\nX-Injected: 1", "two words")):
        assert curl(cr, f"{path}?hostile={number}", basic(user, "pw"), tmp_path)[0] == 401
        cr.access_lines(re.compile(rf"{path}\?hostile={number} HTTP/1\.1\" 401 .* user=-$"), 1)
    log = cr.access_log.read_text()
    assert "X-Injected" not in log and "two words" not in log
    assert not any(password in log + cr.log_text() for password in USERS.values())


def test_podman_pulls_private_content_only_with_an_entitled_credential(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    work, image = tmp_path / "podman", f"{REGISTRY}/private/app:v1"
    trust = ca_dir(cr, tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return podman(work, f"http://127.0.0.1:{cr.proxy_port}", trust, *args)

    try:
        pulled = run("pull", "--creds", f"testuser:{USERS['testuser']}", image)
        assert pulled.returncode == 0, pulled.stderr
        image_id = run("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
        assert f"sha256:{image_id}" == bed.v1.config_digest
        assert run("rmi", image).returncode == 0
        for creds in ((), ("--creds", f"other:{USERS['other']}")):
            refused_pull = run("pull", *creds, image)
            assert refused_pull.returncode != 0
            assert "unauthorized" in refused_pull.stderr.lower(), refused_pull.stderr
    finally:
        podman_cleanup(work, run)


def test_hostile_credentials_are_refused_and_nothing_private_is_served(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    result = pull(cr, "private/app:v1", tmp_path / "fill", "testuser")
    assert result.returncode == 0, result.stderr
    manifest = f"/v2/private/app/manifests/{bed.v1.manifest_digest}"
    blob = f"/v2/private/app/blobs/{bed.v1.layer_digests[0]}"
    # The real thing, to show the paths are right: a token the registry accepts.
    good = f"Bearer {bed.upstream.issue_token(['repository:private/app:pull'], 'testuser')}"
    assert curl(cr, manifest, good, tmp_path)[0] == 200
    forged = make_jwt(service=REGISTRY, subject="testuser", scopes=["repository:private/app:pull"],
                      ttl=300, issuer="someone-else")
    hostile = {
        "none": None,
        "forged JWT (another issuer)": f"Bearer {forged}",
        "garbage token": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0ZXN0dXNlciJ9.",
        "a token for another repository": "Bearer " + bed.upstream.issue_token(
            ["repository:public/app:pull"], "testuser"),
        "a dummy token": "Bearer cr-proxy-offline-MjAyNi0xMS0zMFQxMjowMDowMFo.x",
        "a wrong password": basic("testuser", "wrong"),
        "header injection in the user name": basic("testuser\r\nX-Injected: 1", "pw-testuser"),
    }
    for what, authorization in hostile.items():
        for path in (manifest, blob):
            status, body = curl(cr, path, authorization, tmp_path)
            assert status == 401, (what, path, status, body[:200])
            assert b"UNAUTHORIZED" in body and b"private one" not in body, what
    # The tag list is private too; a refusal carries the registry's challenge.
    tags = "/v2/private/app/tags/list"
    assert curl(cr, tags, good, tmp_path)[0] == 200
    status, body = curl(cr, tags, None, tmp_path)
    assert status == 401 and b"v1" not in body
    challenge = (tmp_path / "curl.headers").read_text().lower()
    assert 'www-authenticate: bearer realm="http://auth.test/token"' in challenge, challenge
    assert 'scope="repository:private/app:pull"' in challenge, challenge
    # A credential in the query string is no credential.
    status, _ = curl(cr, f"{manifest}?access_token={good.split()[1]}", None, tmp_path)
    assert status == 401
    # A verdict for one repository is not one for another: `testuser`'s
    # token, good for private/app, asks for private/other (only `other`'s).
    other = f"/v2/private/other/manifests/{bed.v1.manifest_digest}"
    assert pull(cr, "private/other:v1", tmp_path / "o", "other").returncode == 0
    assert curl(cr, manifest, good, tmp_path)[0] == 200
    assert curl(cr, other, good, tmp_path)[0] == 401
    assert "pw-testuser" not in cr.log_text() and "pw-other" not in cr.log_text()


def test_a_revoked_credential_is_refused_once_its_verdict_expires(
    bed: Bed, tmp_path: Path
) -> None:
    """Basic credentials sent to the registry's paths: the verdict is kept
    per credential for private.verdict_ttl (1 s here), then asked again."""
    path = f"/v2/private/app/manifests/{bed.v1.manifest_digest}"
    revokee = basic("revokee", USERS["revokee"])
    with bed.proxy("revoke", private={"verdict_ttl": 1}) as cr:
        assert curl(cr, path, revokee, tmp_path)[0] == 200
        bed.upstream.token_server.revoke("revokee")
        assert bed.upstream.refuses("private/app", "v1", tmp_path / "direct", "revokee")
        # Bounded poll, not a sleep: refused as soon as the verdict is older than 1 s.
        wait_until(lambda: curl(cr, path, revokee, tmp_path)[0] != 200, 30,
                   "the revoked credential to be refused")
        assert curl(cr, path, revokee, tmp_path)[0] == 401


def test_an_image_pushed_through_the_front_to_a_private_repository_is_private(
    bed: Bed, tmp_path: Path
) -> None:
    """Written through (push.enabled) and so pullable from the cache at
    once, but only by those the upstream lets pull it: marked private
    before any of it is named."""
    push = {"enabled": True, "allow_clients": ["127.0.0.1/32"]}
    # Layers of its own: skopeo would mount ones it saw in another repository.
    image = build_image(tmp_path / "layout", layers=[tar_layer({"pushed": os.urandom(4096)})],
                        tag="v2")
    with bed.proxy("pusher", push=push) as cr:
        pushed = subprocess.run(
            ["skopeo", "copy", "--preserve-digests", "--retry-times", "0", "--dest-cert-dir",
             str(ca_dir(cr, tmp_path)), "--dest-creds", f"testuser:{USERS['testuser']}",
             f"oci:{tmp_path / 'layout'}:v2", f"docker://{REGISTRY}/private/pushed:v2"],
            capture_output=True, text=True, env=proxied_env(cr), timeout=300)
        assert pushed.returncode == 0, pushed.stderr + cr.log_text()[-3000:]
        assert (cr.cache / f"lists/{REGISTRY}/private/pushed/_private").is_file()
        assert (cr.cache / f"content/{REGISTRY}/v2/private/pushed/manifests/v2").is_file()
        assert refused(pull(cr, "private/pushed:v2", tmp_path / "anonymous"))
        assert refused(pull(cr, "private/pushed:v2", tmp_path / "other", "other"))
        with bed.upstream.stopped():  # from the cache only, as the entitled
            result = pull(cr, "private/pushed:v2", tmp_path / "testuser", "testuser")
        assert result.returncode == 0, result.stderr
        assert image.layer_digests[0] in layout_blobs(tmp_path / "testuser")


@pytest.mark.parametrize("policy", ["verified", "deny", "allow"])
def test_offline_the_policy_decides(bed: Bed, tmp_path: Path, policy: str) -> None:
    up = bed.upstream
    with bed.proxy(f"offline-{policy}", private={"offline": policy}) as cr:
        result = pull(cr, "private/app:v1", tmp_path / "online", "testuser")
        assert result.returncode == 0, result.stderr
        with up.stopped():
            entitled = pull(cr, "private/app:v1", tmp_path / "a", "testuser")
            anonymous = pull(cr, "private/app:v1", tmp_path / "b")
            other = pull(cr, "private/app:v1", tmp_path / "c", "other")
    outcome = (entitled.returncode == 0, anonymous.returncode == 0, other.returncode == 0)
    # verified: only the credential the upstream said yes to (its dummy
    # token, asked for with it, stands for it); deny: no one; allow: any
    # credential, never a client with none.
    expected = {"verified": (True, False, False), "deny": (False, False, False),
                "allow": (True, False, True)}[policy]
    assert outcome == expected, (entitled.stderr, anonymous.stderr, other.stderr)
    if entitled.returncode == 0:
        assert layout_blobs(tmp_path / "a") == layout_blobs(tmp_path / "online")


def test_a_private_repositorys_sha512_names_are_never_served_by_nginx_alone(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    """nginx's blob and manifest locations test the private mark for
    sha256 names; a sha512 name of a repository (the fetcher stores them)
    went to the CDN digest-path location, which tests no mark, and was
    served to anyone (a review finding, session 13). A sha512 blob and
    manifest of private/app are put in the tree as a commit would leave
    them; with no credential they are refused, the fetcher deciding."""
    result = pull(cr, "private/app:v1", tmp_path / "fill", "testuser")
    assert result.returncode == 0, result.stderr
    assert (cr.cache / f"lists/{REGISTRY}/private/app/_private").is_file()
    secret = b"private bytes under a sha512 name\n"
    digest = "sha512:" + hashlib.sha512(secret).hexdigest()
    for kind in ("blobs", "manifests"):
        stored = cr.cache / f"content/{REGISTRY}/v2/private/app/{kind}/{digest}"
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(secret)
        status, body = curl(cr, f"/v2/private/app/{kind}/{digest}", None, tmp_path)
        assert status == 401 and body != secret, (kind, status, body[:200])
