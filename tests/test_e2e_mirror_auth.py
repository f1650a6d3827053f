"""Client authentication on the mirror ports (mirror_auth, issue 14 item
4), end to end: the real distribution upstream whose token server lets
only `testuser` pull `private/app` (cr-proxy's own `registries:` login),
a real `cr-proxy serve` with nginx deciding, and skopeo and curl as the
mirror's clients.

Password users come from an htpasswd file with bcrypt entries of both
spellings ($2y$ as Apache's htpasswd writes, $2b$ as Python's do); client
certificates are made here with trustme, under a client CA cr-proxy
trusts and under one it does not. Bearer tokens (tokens_file, their
sha256 only) name `alice` and `bob`. The rules: `alice` and the
certificate `ci-bot` may pull registry.test/private/*; `carol` is denied
registry.test/public/*; `bob` and the certificate `outsider` have no rule."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from cr_proxy.config import ANONYMOUS_TOKEN
from cr_proxy.upstream.auth import DUMMY_PREFIX
from testbed.crproxy import CrProxy, clean_env, layout_blobs
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from testbed.registry import REGISTRY_NAME, Upstream
from tests.clients import Containerd, Dockerd, podman
from tests.conftest import proxy_endpoints
from tests.faulty import wait_until
from tests.test_e2e_metrics import scrape, value

REGISTRY = "registry.test"
UPSTREAM_USERS = {"testuser": "pw-testuser"}
CLIENTS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
# Bearer tokens of the mirror's clients (mirror_auth.tokens_file keeps their sha256).
TOKENS = {"alice": "alice-token-" + "a1" * 20, "bob": "bob-token-" + "b2" * 20}
RULES = [
    {"users": ["carol"], "repositories": [f"{REGISTRY}/public/*"], "allow": "deny"},
    {"users": ["alice", "ci-bot"], "repositories": [f"{REGISTRY}/private/*"], "allow": "pull"},
]


@dataclass
class Bed:
    upstream: Upstream
    image: ImageInfo
    work: Path
    htpasswd: Path
    client_ca: trustme.CA
    client_ca_pem: Path
    tokens: Path

    def mirror(self, name: str, anonymous: str, passwords: bool = True,
               **settings: Any) -> CrProxy:
        """A mirror with every kind of identity; without `passwords`, no
        htpasswd file: token users then get a Bearer challenge."""
        return CrProxy(
            self.work / name, proxy_endpoints(self.upstream),
            registries={REGISTRY: {"username": "testuser",
                                   "password": UPSTREAM_USERS["testuser"]}},
            mirror_auth={"htpasswd_file": str(self.htpasswd) if passwords else "",
                         "client_ca": str(self.client_ca_pem), "tokens_file": str(self.tokens),
                         "anonymous": anonymous, "rules": RULES},
            **settings,
        )


def htpasswd_lines() -> str:
    """bcrypt entries by Apache's htpasswd, cost 5 as the README advises
    (nginx checks one on every request). bob's and carol's in the $2b$
    spelling (Python's bcrypt, passlib), the same algorithm as $2y$:
    libcrypt must read both."""
    lines = []
    for user, password in CLIENTS.items():
        line = subprocess.run(["htpasswd", "-nbB", "-C", "5", user, password],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert line.startswith(f"{user}:$2y$05$")
        lines.append(line if user == "alice" else line.replace(":$2y$", ":$2b$", 1))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("mirror-auth")
    with Upstream(work / "upstream", users=UPSTREAM_USERS,
                  private={"private/app": {"testuser"}, "private/window": {"testuser"}}) as up:
        image = build_image(work / "v1", layers=[tar_layer({"app/x": b"mirror auth\n" * 300})],
                            tag="v1")
        for repo in ("private/app", "private/window", "public/app"):
            up.push(work / "v1", "v1", repo, "v1", user="testuser")
        htpasswd = work / "htpasswd"
        htpasswd.write_text(htpasswd_lines())
        client_ca = trustme.CA()
        client_ca_pem = work / "client-ca.pem"
        client_ca.cert_pem.write_to_path(str(client_ca_pem))
        tokens = work / "tokens"
        tokens.write_text("# mirror clients' tokens, by sha256\n" + "".join(
            f"{user}:{hashlib.sha256(token.encode()).hexdigest()}\n"
            for user, token in TOKENS.items()))
        yield Bed(up, image, work, htpasswd, client_ca, client_ca_pem, tokens)


@pytest.fixture(scope="module")
def cr(bed: Bed) -> Iterator[CrProxy]:
    with bed.mirror("pull-public", "pull-public") as running:
        yield running


def cert_dir(cr: CrProxy, where: Path, ca: trustme.CA | None = None, cn: str = "") -> Path:
    """skopeo's --src-cert-dir: the mirror's CA (*.crt) and, with `ca`, a
    client certificate for CN=cn (client.cert, client.key)."""
    where.mkdir(parents=True)
    (where / "ca.crt").write_bytes(cr.ca_cert.read_bytes())
    if ca is not None:
        leaf = ca.issue_cert(f"{cn}.clients.test", common_name=cn)
        leaf.cert_chain_pems[0].write_to_path(str(where / "client.cert"))
        leaf.private_key_pem.write_to_path(str(where / "client.key"))
    return where


def pull(cr: CrProxy, image: str, dest: Path, user: str | None = None,
         password: str | None = None, certs: Path | None = None, token: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    """skopeo copy from the mirror: its HTTP port, or with `certs` its
    HTTPS port; with a user, that user's password unless one is given;
    with a token, that Bearer token."""
    args = ["skopeo", "copy", "--preserve-digests", "--retry-times", "0"]
    if user is not None:
        args += ["--src-creds", f"{user}:{password or CLIENTS[user]}"]
    if token is not None:
        args += ["--src-registry-token", token]
    if certs is not None:
        args += ["--src-cert-dir", str(certs)]
        host = cr.https
    else:
        args.append("--src-tls-verify=false")
        host = cr.http
    args += [f"docker://{host}/{REGISTRY}/{image}", f"oci:{dest}:pulled"]
    return subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=120,
                          check=False)


def pulled(result: subprocess.CompletedProcess[str], dest: Path, image: ImageInfo) -> bool:
    return result.returncode == 0 and set(image.layer_digests) <= set(layout_blobs(dest))


def refused(result: subprocess.CompletedProcess[str], how: str) -> bool:
    return result.returncode != 0 and how in result.stderr.lower()


def curl(cr: CrProxy, path: str, tmp: Path, *headers: str,
         certs: Path | None = None, method: str = "GET") -> tuple[int, str, bytes]:
    """One GET to the mirror's HTTP port, or with `certs` (cert_dir) its
    HTTPS port with that client certificate: (status, headers, body)."""
    out, head = tmp / "curl.body", tmp / "curl.head"
    args = ["curl", "-s", "-X", method, "-o", str(out), "-D", str(head), "-w", "%{http_code}",
            "-H", "Accept: application/vnd.oci.image.manifest.v1+json"]
    for header in headers:
        args += ["-H", header]
    url = f"http://{cr.http}{path}"
    if certs is not None:
        # curl sends its certificate whatever CAs the server names (Go's
        # TLS, skopeo's, sends none that the server's list does not name).
        args += ["--cacert", str(certs / "ca.crt"), "--cert", str(certs / "client.cert"),
                 "--key", str(certs / "client.key")]
        url = f"https://{cr.https}{path}"
    result = subprocess.run([*args, url], capture_output=True, text=True,
                            env=clean_env(), timeout=60, check=False)
    return int(result.stdout or 0), head.read_text(), out.read_bytes()


def basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


def test_password_users_get_what_a_rule_grants_anonymous_only_public(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    image = bed.image
    # Anonymous asks first: nginx cannot know yet that private/app is
    # private; the fetcher finds out, marks it, and refuses (nothing stored).
    assert refused(pull(cr, "private/app:v1", tmp_path / "anon-miss"), "unauthorized")
    assert (cr.cache / f"lists/{REGISTRY}/private/app/_private").is_file()
    assert not (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v1").exists()
    # alice's rule grants it: the miss, then the hit.
    for attempt in ("miss", "hit"):
        result = pull(cr, "private/app:v1", tmp_path / f"alice-{attempt}", "alice")
        assert pulled(result, tmp_path / f"alice-{attempt}", image), result.stderr
    # Refused from the cache: anonymous (401) and bob, whom no rule grants it (403).
    assert refused(pull(cr, "private/app:v1", tmp_path / "anon-hit"), "unauthorized")
    assert refused(pull(cr, "private/app:v1", tmp_path / "bob", "bob"), "denied")
    # Public content: anonymous and bob; carol's deny rule refuses her.
    for who in (None, "bob"):
        result = pull(cr, "public/app:v1", tmp_path / f"public-{who}", who)
        assert pulled(result, tmp_path / f"public-{who}", image), result.stderr
    assert refused(pull(cr, "public/app:v1", tmp_path / "carol", "carol"), "denied")
    # A wrong password is refused, public content too; for a user the rules
    # refuse, still 401: the password is checked before the rules answer.
    for user, image_name in (("alice", "public/app:v1"), ("alice", "private/app:v1"),
                             ("bob", "private/app:v1"), ("carol", "public/app:v1")):
        result = pull(cr, image_name, tmp_path / f"bad-{user}-{image_name[:3]}", user, "guess")
        assert refused(result, "unauthorized"), (user, image_name, result.stderr)
    # The identity in the access log, never a password; denials by reason.
    assert cr.access_lines(f"/v2/{REGISTRY}/private/app/blobs/", 1)
    assert cr.access_lines(" user=alice", 2)
    log = cr.access_log.read_text() + cr.log_text()
    assert not any(password in log for password in CLIENTS.values())
    # serve reads nginx's usage log every second: polled, bounded.
    wait_until(lambda: all(
        value(scrape(cr), "crproxy_mirror_auth_denied_total", reason=reason) >= 1
        for reason in ("no_identity", "not_granted", "rule_deny", "bad_password")),
        30, "the denial counts")
    # The first miss, refused by the fetcher once it found the repository private.
    assert value(scrape(cr), "crproxy_private_denied_total", reason="mirror_no_identity") == 1


def test_client_certificates_on_the_https_port(bed: Bed, cr: CrProxy, tmp_path: Path) -> None:
    image = bed.image
    trusted = cert_dir(cr, tmp_path / "ci-bot", bed.client_ca, "ci-bot")
    result = pull(cr, "private/app:v1", tmp_path / "ci-bot-pull", certs=trusted)
    assert pulled(result, tmp_path / "ci-bot-pull", image), result.stderr
    assert cr.access_lines(" user=ci-bot", 1)
    # A certificate of the client CA whose CN no rule grants the repository.
    outsider = cert_dir(cr, tmp_path / "outsider", bed.client_ca, "outsider")
    assert refused(pull(cr, "private/app:v1", tmp_path / "o", certs=outsider), "denied")
    result = pull(cr, "public/app:v1", tmp_path / "o-public", certs=outsider)
    assert pulled(result, tmp_path / "o-public", image), result.stderr
    # The same CN from another CA: skopeo does not send it (not of a CA the
    # server names), so it is anonymous; curl sends it, and nginx refuses
    # the request (400), public content too.
    rogue = cert_dir(cr, tmp_path / "rogue", trustme.CA(), "ci-bot")
    rogue_before = value(scrape(cr), "crproxy_mirror_auth_denied_total", reason="bad_certificate")
    assert refused(pull(cr, "private/app:v1", tmp_path / "rogue", certs=rogue), "unauthorized")
    for repo in ("private/app", "public/app"):
        status, _, body = curl(cr, f"/v2/{REGISTRY}/{repo}/manifests/v1", tmp_path, certs=rogue)
        assert status == 400 and b"schemaVersion" not in body, (repo, status)
        assert json.loads(body)["errors"][0]["code"] == "DENIED", body
    # Counted by reason, as mirror_auth's own refusals (nginx's 495 answered 400).
    wait_until(lambda: value(scrape(cr), "crproxy_mirror_auth_denied_total",
                             reason="bad_certificate") >= rogue_before + 2,
               30, "the bad certificates' count")
    status, _, body = curl(cr, f"/v2/{REGISTRY}/private/app/manifests/v1", tmp_path,
                           certs=trusted)
    assert status == 200 and b"schemaVersion" in body
    # No certificate at all over TLS: anonymous.
    plain = cert_dir(cr, tmp_path / "none")
    assert refused(pull(cr, "private/app:v1", tmp_path / "n", certs=plain), "unauthorized")
    result = pull(cr, "public/app:v1", tmp_path / "n-public", certs=plain)
    assert pulled(result, tmp_path / "n-public", image), result.stderr


def test_hostile_credentials_and_paths_get_nothing_private(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    # The repository cached and marked private by a granted pull.
    result = pull(cr, "private/app:v1", tmp_path / "fill", "alice")
    assert pulled(result, tmp_path / "fill", bed.image), result.stderr
    manifest = f"/v2/{REGISTRY}/private/app/manifests/v1"
    layer = f"/v2/{REGISTRY}/private/app/blobs/{bed.image.layer_digests[0]}"
    secret = (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v1").read_bytes()
    wrong_before = value(scrape(cr), "crproxy_mirror_auth_denied_total", reason="bad_password")
    hostile = {
        # A user name that would add a header, or reach past the map's separator.
        "injected": basic("alice\r\nX-Injected: 1", CLIENTS["alice"]),
        "separator": basic(f"alice|{REGISTRY}/private/app", CLIENTS["alice"]),
        "wrong password": basic("alice", "alice-pw-2"),
        "empty user": basic("", ""),
        "bearer": "Authorization: Bearer alice",
    }
    for label, header in hostile.items():
        for path in (manifest, layer, f"/v2/{REGISTRY}/private/app/tags/list"):
            status, head, body = curl(cr, path, tmp_path, header)
            assert status == 401, (label, path, status, body[:200])
            assert "x-injected" not in head.lower() and body != secret, label
            # One challenge, a registry's error body (auth_basic's 401 is answered
            # by /_cr/bad-password, the tag list's from @fetch too).
            assert head.lower().count("www-authenticate:") == 1, (label, path, head)
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED", (label, path)
            assert bed.image.layer_digests[0].encode() not in body or path != layer, label
    # A public manifest, which anonymous clients may pull: a user name
    # that is no identity is refused all the same, and never reaches a log
    # raw (auth_basic would write it to nginx's error log, serve's output).
    for label in ("injected", "separator"):
        status, _, _ = curl(cr, f"/v2/{REGISTRY}/public/app/manifests/v1", tmp_path,
                            hostile[label])
        assert status == 401, label
    assert "\nX-Injected" not in cr.log_text() + cr.access_log.read_text()
    # The wrong password's three refusals, counted as such. The instance is
    # the module's: counted from what it had, at least (the usage feed may
    # still bring an earlier test's).
    wait_until(lambda: value(scrape(cr), "crproxy_mirror_auth_denied_total",
                             reason="bad_password") >= wrong_before + 3,
               30, "the wrong passwords' count")
    # A credential in the query string is no credential.
    user, password = "alice", CLIENTS["alice"]
    status, _, _ = curl(cr, f"{manifest}?user={user}&password={password}", tmp_path)
    assert status == 401
    # Writes are never anonymous, to a public repository either.
    for method, path in (("PUT", f"/v2/{REGISTRY}/public/app/manifests/v9"),
                         ("POST", f"/v2/{REGISTRY}/public/app/blobs/uploads/")):
        assert curl(cr, path, tmp_path, method=method)[0] == 401, (method, path)
    # Unsigned module URLs name no checked repository: refused with mirror_auth on.
    status, _, body = curl(cr, f"/artifacts/{REGISTRY}/private/app:v1", tmp_path,
                           basic("alice", CLIENTS["alice"]))
    assert status == 403 and b"unsigned_artifact" in body
    # The challenge names cr-proxy's realm; alice herself gets the manifest.
    status, head, _ = curl(cr, manifest, tmp_path)
    assert status == 401 and 'www-authenticate: basic realm="cr-proxy"' in head.lower()
    status, _, body = curl(cr, manifest, tmp_path, basic("alice", CLIENTS["alice"]))
    assert (status, body) == (200, secret)


def test_reads_with_no_credential_are_decided_where_they_are_served(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    """A read with no credential skips the full decision (AUTH_FAST): each
    location that can serve one decides it. Every kind of request, from
    the cache and not: a private repository's refused (401), a public one's
    served, the ping asking for a password, other paths refused, unsigned
    modules 403."""
    result = pull(cr, "private/app:v1", tmp_path / "fill", "alice")
    assert pulled(result, tmp_path / "fill", bed.image), result.stderr
    result = pull(cr, "public/app:v1", tmp_path / "public", None)
    assert pulled(result, tmp_path / "public", bed.image), result.stderr
    layer = bed.image.layer_digests[0]
    expected = {
        f"/v2/{REGISTRY}/private/app/manifests/v1": 401,
        f"/v2/{REGISTRY}/private/app/blobs/{layer}": 401,
        f"/v2/{REGISTRY}/private/app/tags/list": 401,
        f"/v2/{REGISTRY}/private/app/referrers/{layer}": 401,
        # Not cached, by tag and by digest: refused before the fetcher.
        f"/v2/{REGISTRY}/private/app/manifests/v9": 401,
        f"/v2/{REGISTRY}/private/app/blobs/sha256:{'0' * 64}": 401,
        "/v2/_catalog": 401,
        "/v2/": 401,  # password users: the ping asks for one
        f"/artifacts/{REGISTRY}/public/app:v1": 403,
        f"/v2/{REGISTRY}/public/app/manifests/v1": 200,
        f"/v2/{REGISTRY}/public/app/blobs/{layer}": 200,
    }
    for path, status in expected.items():
        got, head, body = curl(cr, path, tmp_path)
        assert got == status, (path, got, body[:200])
        if status == 401:
            assert 'www-authenticate: basic realm="cr-proxy"' in head.lower(), path
    private = (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v1").read_bytes()
    assert curl(cr, f"/v2/{REGISTRY}/private/app/manifests/v1", tmp_path,
                basic("alice", CLIENTS["alice"]))[2] == private
    # nginx's refusals (the fetcher would refuse the tag list too, later),
    # logged with no identity: user= empty. (A query of this test's own
    # marks its lines in the module's log.)
    for kind in ("tags/list", f"blobs/{layer}", f"referrers/{layer}"):
        path = f"/v2/{REGISTRY}/private/app/{kind}?n=anonymous-read"
        assert curl(cr, path, tmp_path)[0] == 401, path
        lines = cr.access_lines(f'"GET {path} HTTP/1.1" 401', 1)
        assert all("type=denied-no_identity" in line and line.endswith(" user=")
                   for line in lines), lines


def test_a_repository_marked_private_is_refused_by_every_worker_at_once(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    """nginx keeps that a repository's private mark is missing for
    open_file_cache_valid (nginx.MARK_CACHE, the blob hit's speed), so the
    fetcher names nothing of a repository it has just found private before
    every worker has looked again (Privacy.learn). On one connection (one
    worker): an anonymous read of a repository not yet known private (the
    worker keeps "no mark"), alice fetches another of its blobs, and the
    anonymous read of that blob, found on disk, is still refused."""
    config_path = f"/v2/{REGISTRY}/private/window/blobs/{bed.image.config_digest}"
    layer_path = f"/v2/{REGISTRY}/private/window/blobs/{bed.image.layer_digests[0]}"
    worker = http.client.HTTPConnection(cr.http, timeout=60)
    worker.request("HEAD", config_path)
    first = worker.getresponse()
    first.read()
    assert first.status == 401
    connection = worker.sock
    status, _, body = curl(cr, layer_path, tmp_path, basic("alice", CLIENTS["alice"]))
    assert status == 200 and hashlib.sha256(body).hexdigest() == \
        bed.image.layer_digests[0].removeprefix("sha256:")
    stored = f"content/{REGISTRY}/v2/private/window/blobs/{bed.image.layer_digests[0]}"
    # Named after the last byte went out (blobs.py: the fsync and rename follow).
    wait_until(lambda: (cr.cache / stored).is_file(), 60, "the layer named in the tree")
    worker.request("HEAD", layer_path)
    second = worker.getresponse()
    second.read()
    assert worker.sock is connection  # the same worker, which kept "no mark"
    assert second.status == 401, second.getheaders()
    worker.close()


def upstream_token(bed: Bed) -> str:
    """A real token of the upstream's token server: testuser's, for private/app."""
    query = urllib.parse.urlencode({"service": REGISTRY_NAME,
                                    "scope": "repository:private/app:pull"})
    request = urllib.request.Request(f"{bed.upstream.token_url}?{query}", headers={
        "Authorization": basic("testuser", UPSTREAM_USERS["testuser"]).split(": ", 1)[1]})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(json.load(answer)["token"])


def test_bearer_tokens_name_their_user_and_nothing_else_does(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    """With password users too the challenge is Basic: a token is sent
    unasked (curl here, containerd's hosts.toml header below)."""
    result = pull(cr, "private/app:v1", tmp_path / "fill", "alice")
    assert pulled(result, tmp_path / "fill", bed.image), result.stderr
    manifest = f"/v2/{REGISTRY}/private/app/manifests/v1"
    layer = f"/v2/{REGISTRY}/private/app/blobs/{bed.image.layer_digests[0]}"
    public = f"/v2/{REGISTRY}/public/app/manifests/v1"
    secret = (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v1").read_bytes()
    # alice's token is alice: her rule grants the private repository (hit).
    for path in (manifest, layer):
        status, _, body = curl(cr, path, tmp_path, bearer(TOKENS["alice"]))
        assert status == 200, (path, status, body[:200])
    # The scheme's case does not matter (RFC 7235).
    status, _, body = curl(cr, manifest, tmp_path, f"Authorization: bearer {TOKENS['alice']}")
    assert (status, body) == (200, secret)
    assert cr.access_lines(re.compile(r"/private/app/blobs/sha256:\S+ HTTP/1\.1\" 200 .* "
                                      r"user=alice$"), 1)
    # bob's token is bob, whom no rule grants it; public content is his.
    assert curl(cr, manifest, tmp_path, bearer(TOKENS["bob"]))[0] == 403
    assert curl(cr, public, tmp_path, bearer(TOKENS["bob"]))[0] == 200
    # Tokens that name no one: 401, public content too (as a wrong password).
    upstream_jwt = upstream_token(bed)
    nobody = {
        "wrong": TOKENS["alice"][:-1] + "x",
        "the stored hash": hashlib.sha256(TOKENS["alice"].encode()).hexdigest(),
        "the upstream's own token for the repository": upstream_jwt,
        "cr-proxy's offline dummy": DUMMY_PREFIX + "MjAyNi0xMS0zMFQwMDowMDowMFo.abc",
        "two tokens": f"{TOKENS['bob']} {TOKENS['alice']}",
        "a header in the token": f"{TOKENS['alice']}%0d%0aX-Injected: 1",
        "empty": "",
    }
    for label, token in nobody.items():
        for path in (manifest, layer, public):
            status, head, body = curl(cr, path, tmp_path, bearer(token))
            assert status == 401, (label, path, status)
            assert body != secret and "x-injected" not in head.lower(), label
    # The mirror's anonymous token (the Bearer realm's) is no one: anonymous.
    assert curl(cr, public, tmp_path, bearer(ANONYMOUS_TOKEN))[0] == 200
    assert curl(cr, manifest, tmp_path, bearer(ANONYMOUS_TOKEN))[0] == 401
    # Counted; and no token, nor its hash, in a log.
    wait_until(lambda: value(scrape(cr), "crproxy_mirror_auth_denied_total",
                             reason="bad_token") >= len(nobody) * 3, 30, "the bad tokens")
    log = cr.access_log.read_text() + cr.log_text()
    assert not any(token in log for token in TOKENS.values()) and upstream_jwt not in log
    # A token's line removed: it names no one at once (the file is read per request).
    saved = bed.tokens.read_text()
    try:
        bed.tokens.write_text("".join(line + "\n" for line in saved.splitlines()
                                      if not line.startswith("alice:")))
        assert curl(cr, manifest, tmp_path, bearer(TOKENS["alice"]))[0] == 401
    finally:
        bed.tokens.write_text(saved)


def test_skopeo_registry_token_on_a_mirror_without_passwords(bed: Bed, tmp_path: Path) -> None:
    """skopeo sends --src-registry-token only to a Bearer challenge: with
    token users and no password users the mirror's is Bearer, its realm the
    mirror's /_cr/token, which gives an anonymous client the anonymous
    token: public content still pulls."""
    with bed.mirror("tokens-only", "pull-public", passwords=False) as cr:
        status, head, _ = curl(cr, "/v2/", tmp_path)
        assert status == 401
        assert (f'www-authenticate: bearer realm="http://{cr.http}/_cr/token",'
                'service="cr-proxy"') in head.lower()
        # Anonymous first: the fetcher finds private/app private, refuses.
        assert refused(pull(cr, "private/app:v1", tmp_path / "anon"), "unauthorized")
        for attempt in ("miss", "hit"):
            dest = tmp_path / f"alice-{attempt}"
            result = pull(cr, "private/app:v1", dest, token=TOKENS["alice"])
            assert pulled(result, dest, bed.image), result.stderr
        assert refused(pull(cr, "private/app:v1", tmp_path / "bob", token=TOKENS["bob"]),
                       "denied")
        assert refused(pull(cr, "private/app:v1", tmp_path / "wrong", token="guess"),
                       "unauthorized")
        assert refused(pull(cr, "public/app:v1", tmp_path / "wrong-pub", token="guess"),
                       "unauthorized")
        for who, token in (("anon", None), ("bob", TOKENS["bob"])):
            dest = tmp_path / f"public-{who}"
            result = pull(cr, "public/app:v1", dest, token=token)
            assert pulled(result, dest, bed.image), result.stderr
        assert cr.access_lines(re.compile(r"/private/app/manifests/v1 HTTP/1\.1\" 200 .* "
                                          r"user=alice$"), 1)
        assert cr.access_lines(re.compile(r"GET /_cr/token\?.* 200 .* type=token .*user=$"), 1)


def test_anonymous_none_serves_only_identities(bed: Bed, tmp_path: Path) -> None:
    with bed.mirror("none", "none") as cr:
        status, head, _ = curl(cr, "/v2/", tmp_path)
        assert status == 401 and 'www-authenticate: basic realm="cr-proxy"' in head.lower()
        assert curl(cr, "/v2/", tmp_path, basic("bob", CLIENTS["bob"]))[0] == 200
        assert curl(cr, "/v2/", tmp_path, basic("bob", "nope"))[0] == 401
        assert refused(pull(cr, "public/app:v1", tmp_path / "anon"), "unauthorized")
        assert not (cr.cache / f"content/{REGISTRY}/v2/public/app/manifests/v1").exists()
        result = pull(cr, "public/app:v1", tmp_path / "bob", "bob")
        assert pulled(result, tmp_path / "bob", bed.image), result.stderr
        assert refused(pull(cr, "public/app:v1", tmp_path / "anon-hit"), "unauthorized")
        assert curl(cr, "/v2/_catalog", tmp_path)[0] == 401


def test_containerd_hosts_toml_client_certificate(bed: Bed, cr: CrProxy, tmp_path: Path) -> None:
    """containerd is given no password for a mirror: its hosts.toml
    `client = [[cert, key]]` is how it authenticates. registry.test's
    own server does not resolve here, so a refused mirror fails the pull."""
    def hosts(name: str, cn: str | None) -> Path:
        certs = cert_dir(cr, tmp_path / f"{name}-certs", bed.client_ca if cn else None,
                         cn or "")
        client = (f'  client = [["{certs / "client.cert"}", "{certs / "client.key"}"]]\n'
                  if cn else "")
        where = tmp_path / name / REGISTRY
        where.mkdir(parents=True)
        (where / "hosts.toml").write_text(
            f'server = "https://{REGISTRY}"\n[host."https://{cr.https}"]\n'
            f'  capabilities = ["pull", "resolve"]\n  ca = "{certs / "ca.crt"}"\n{client}')
        return where.parent

    image = f"{REGISTRY}/private/app:v1"
    with Containerd(tmp_path / "containerd") as daemon:
        refused_pull = daemon.ctr("images", "pull", "--hosts-dir", str(hosts("anon", None)),
                                  image)
        assert refused_pull.returncode != 0
        assert "401 Unauthorized" in refused_pull.stderr, refused_pull.stderr
        pulled_ = daemon.ctr("images", "pull", "--hosts-dir", str(hosts("ci-bot", "ci-bot")),
                             image)
        assert pulled_.returncode == 0, pulled_.stderr
        listed = daemon.ctr("images", "ls", "-q").stdout.split()
        assert listed == [image]
    assert cr.access_lines(re.compile(r"/v2/private/app/manifests/v1\?ns=registry\.test .* "
                                      r"200 .* user=ci-bot$"), 1)


def test_containerd_hosts_toml_bearer_header(bed: Bed, cr: CrProxy, tmp_path: Path) -> None:
    """containerd sends a hosts.toml [host.header] on every request to the
    mirror, unasked: a token works whatever the challenge."""
    def hosts(name: str, token: str) -> Path:
        certs = cert_dir(cr, tmp_path / f"{name}-certs")
        where = tmp_path / name / REGISTRY
        where.mkdir(parents=True)
        (where / "hosts.toml").write_text(
            f'server = "https://{REGISTRY}"\n[host."https://{cr.https}"]\n'
            f'  capabilities = ["pull", "resolve"]\n  ca = "{certs / "ca.crt"}"\n'
            f'  [host."https://{cr.https}".header]\n    Authorization = "Bearer {token}"\n')
        return where.parent

    image = f"{REGISTRY}/private/app:v1"
    with Containerd(tmp_path / "containerd") as daemon:
        for user, allowed in (("bob", False), ("alice", True)):
            result = daemon.ctr("images", "pull", "--hosts-dir",
                                str(hosts(user, TOKENS[user])), image)
            assert (result.returncode == 0) == allowed, (user, result.stderr)
        assert daemon.ctr("images", "ls", "-q").stdout.split() == [image]
    assert cr.access_lines(re.compile(r"/v2/private/app/manifests/v1\?ns=registry\.test .* "
                                      r"403 .* user=bob$"), 1)
    assert cr.access_lines(re.compile(r"/v2/private/app/manifests/v1\?ns=registry\.test .* "
                                      r"200 .* user=alice$"), 1)


def test_dockerd_with_a_password(bed: Bed, cr: CrProxy, tmp_path: Path) -> None:
    """dockerd pulls from the mirror by its address (127.0.0.0/8: plain
    HTTP allowed) once `docker login` gave it a password user; refused
    before, and for a user no rule grants the repository."""
    image = f"{cr.http}/{REGISTRY}/private/app:v1"
    with Dockerd(tmp_path / "docker", None, None) as daemon:
        anonymous = daemon.docker("pull", image)
        assert anonymous.returncode != 0
        assert "no basic auth credentials" in anonymous.stderr, anonymous.stderr
        for user, allowed in (("bob", False), ("alice", True)):
            login = daemon.docker("login", cr.http, "-u", user, "--password-stdin",
                                  stdin=CLIENTS[user])
            assert login.returncode == 0, login.stderr
            pulled = daemon.docker("pull", image)
            assert (pulled.returncode == 0) == allowed, (user, pulled.stderr)
        info = json.loads(daemon.docker("image", "inspect", image).stdout)[0]
        assert info["Id"] == bed.image.config_digest
    assert CLIENTS["alice"] not in cr.log_text()
    assert cr.access_lines(re.compile(r"/v2/registry\.test/private/app/manifests/v1 .* 200 .* "
                                      r"user=alice$"), 1)


MIRROR_NAME = "mirror.test"


def private_etc(etc_docker: Path, hosts: Path) -> list[str]:
    """A command prefix: a mount namespace of its own in which /etc/docker
    (dockerd reads client certificates only from /etc/docker/certs.d) and
    /etc/hosts are the test's; the host's stay as they are."""
    script = ('mount --bind "$1" /etc/docker && mount --bind "$2" /etc/hosts '
              '&& shift 2 && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(etc_docker), str(hosts)]


def test_dockerd_with_a_client_certificate(bed: Bed, tmp_path: Path) -> None:
    """dockerd sends the client certificate of certs.d/<host:port>/
    (client.cert, client.key; the mirror's CA as ca.crt), and only to a
    registry it takes for secure: never 127.0.0.0/8, which it always
    treats as insecure (plain HTTP, no certs.d). So the mirror listens on
    ::1, called mirror.test through dockerd's own /etc/hosts."""
    with bed.mirror("dockerd-cert", "pull-public", address="[::1]",
                    mirror_names=[MIRROR_NAME]) as cr:
        host = f"{MIRROR_NAME}:{cr.https_port}"
        etc = tmp_path / "etc-docker"
        ci_bot = cert_dir(cr, etc / "certs.d" / host, bed.client_ca, "ci-bot")
        hosts = tmp_path / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n::1 {MIRROR_NAME}\n")
        image = f"{host}/{REGISTRY}/private/app:v1"
        with Dockerd(tmp_path / "docker", None, None, netns=private_etc(etc, hosts)) as daemon:
            pulled_ = daemon.docker("pull", image)
            assert pulled_.returncode == 0, pulled_.stderr
            info = json.loads(daemon.docker("image", "inspect", image).stdout)[0]
            assert info["Id"] == bed.image.config_digest
            # Without the certificate: anonymous, refused the private repository.
            for name in ("client.cert", "client.key"):
                (ci_bot / name).unlink()
            daemon.docker("rmi", image)
            anonymous = daemon.docker("pull", image)
            assert anonymous.returncode != 0
            assert "no basic auth credentials" in anonymous.stderr, anonymous.stderr
        assert cr.access_lines(re.compile(r"/v2/registry\.test/private/app/manifests/v1 .* 200 .* "
                                          r"user=ci-bot$"), 1)
        # The ping asks the certificate-less dockerd for a password; it has none.
        assert cr.access_lines(re.compile(r'"GET /v2/ HTTP/1\.1" 401 .* type=denied-no_identity '
                                          r".* user=$"), 1)


def test_podman_with_a_password_and_with_a_certificate(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    image = f"{cr.https}/{REGISTRY}/private/app:v1"
    plain = cert_dir(cr, tmp_path / "plain")
    refused_pull = podman(tmp_path / "anon", None, plain, "pull", image)
    assert refused(refused_pull, "unauthorized"), refused_pull.stderr
    by_password = podman(tmp_path / "alice", None, plain, "pull", "--creds",
                         f"alice:{CLIENTS['alice']}", image)
    assert by_password.returncode == 0, by_password.stderr
    by_certificate = podman(tmp_path / "ci-bot", None,
                            cert_dir(cr, tmp_path / "ci-bot-certs", bed.client_ca, "ci-bot"),
                            "pull", image)
    assert by_certificate.returncode == 0, by_certificate.stderr
    for who in ("alice", "ci-bot"):
        listed = podman(tmp_path / who, None, plain, "images", "--format", "{{.Digest}}")
        assert listed.stdout.split() == [bed.image.manifest_digest], (who, listed.stdout)


def test_an_ns_nginx_reads_one_way_grants_nothing_read_another(
    bed: Bed, tmp_path: Path
) -> None:
    """nginx decides mirror_auth for the registry it reads from `?ns=`
    (`$arg_ns`: the first, in any case, as sent); the fetcher read it as
    aiohttp does (case-sensitive, decoded), so `?NS=docker.io&ns=registry.test`
    or `?n%73=registry.test` carried bob's grant for docker.io to
    registry.test's private repository (a review finding, session 13)."""
    rules = [*RULES, {"users": ["bob"], "repositories": ["docker.io/*"], "allow": "pull"}]
    with CrProxy(tmp_path / "ns", proxy_endpoints(bed.upstream),
                 registries={REGISTRY: {"username": "testuser",
                                        "password": UPSTREAM_USERS["testuser"]}},
                 mirror_auth={"htpasswd_file": str(bed.htpasswd), "anonymous": "pull-public",
                              "rules": rules}) as cr:
        result = pull(cr, "private/app:v1", tmp_path / "fill", "alice")
        assert pulled(result, tmp_path / "fill", bed.image), result.stderr
        secret = (cr.cache / f"content/{REGISTRY}/v2/private/app/manifests/v1").read_bytes()
        layer = bed.image.layer_digests[0]
        layer_bytes = (cr.cache / f"content/{REGISTRY}/v2/private/app/blobs/{layer}"
                       ).read_bytes()
        bob = basic("bob", CLIENTS["bob"])
        status, _, _ = curl(cr, f"/v2/private/app/manifests/v1?ns={REGISTRY}", tmp_path, bob)
        assert status == 403
        for query in (f"NS=docker.io&ns={REGISTRY}", f"n%73={REGISTRY}",
                      f"nS=docker.io&ns={REGISTRY}"):
            for path, kept in ((f"/v2/private/app/manifests/v1?{query}", secret),
                               (f"/v2/private/app/blobs/{layer}?{query}", layer_bytes)):
                status, _, body = curl(cr, path, tmp_path, bob)
                assert status != 200 and body != kept, (path, status, body[:200])


def test_anonymous_referrers_of_a_public_repository_are_read_as_its_tags_are(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    """anonymous: pull-public: a public repository's referrers, like its
    tag list, go to the fetcher (nginx's fast path took them for "other"
    and answered 401); a private one's are refused."""
    digest = bed.image.manifest_digest
    status, _, _ = curl(cr, f"/v2/{REGISTRY}/public/app/tags/list", tmp_path)
    assert status == 200
    status, _, body = curl(cr, f"/v2/{REGISTRY}/public/app/referrers/{digest}", tmp_path)
    assert status == 200 and json.loads(body)["manifests"] == [], (status, body[:200])
    status, _, _ = curl(cr, f"/v2/{REGISTRY}/private/app/referrers/{digest}", tmp_path)
    assert status == 401


def test_a_registry_spelled_as_nginx_does_not_read_it_is_refused(
    bed: Bed, cr: CrProxy, tmp_path: Path
) -> None:
    """carol is denied registry.test/public/*. nginx reads the registry as
    written (a default port kept, upper case not folded), the fetcher
    canonically: registry.test:443/public/app escaped her deny rule, and
    a grant for another name reached a private repository (a review
    finding, session 13). Such a spelling is refused; the plain one is
    decided as before."""
    carol = basic("carol", CLIENTS["carol"])
    plain = f"/v2/{REGISTRY}/public/app/manifests/v1"
    assert curl(cr, plain, tmp_path, carol)[0] == 403
    for path in (f"/v2/{REGISTRY}:443/public/app/manifests/v1",
                 f"/v2/{REGISTRY.upper()}/public/app/manifests/v1",
                 f"/v2/public/app/manifests/v1?ns={REGISTRY}:443",
                 f"/v2/public/app/manifests/v1?ns={REGISTRY}%3A443"):
        status, _, body = curl(cr, path, tmp_path, carol)
        assert status in (400, 403), (path, status, body[:200])
    alice = basic("alice", CLIENTS["alice"])
    assert curl(cr, f"/v2/{REGISTRY}/private/app/manifests/v1", tmp_path, alice)[0] == 200
    status, _, _ = curl(cr, f"/v2/{REGISTRY}:443/private/app/manifests/v1", tmp_path, alice)
    assert status in (400, 403)
