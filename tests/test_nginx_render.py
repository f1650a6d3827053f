"""cr_proxy.nginx rendering: what it writes passes `nginx -t` for a few
configurations, every include resolves, the mirror and https_proxy servers
share one blob and manifest location template, and every regex nginx
matches is reference.py's grammar (checked against a table of names)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from cr_proxy import config as config_mod
from cr_proxy import nginx
from cr_proxy.cache import layout
from cr_proxy.front import certs
from cr_proxy.front.stamp import FrontStamp
from cr_proxy.oci import reference

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None or not any(Path(p).exists()
                                              for p in nginx.NJS_MODULE_CANDIDATES),
    reason="nginx with njs is not installed",
)

CONFIGURATIONS = {
    "mirror-http": {},
    "mirror-https-and-proxy": {"LISTEN__MIRROR_HTTPS": "127.0.0.1:5443",
                               "LISTEN__PROXY": "127.0.0.1:3128"},
    "aliases-and-clients": {"REGISTRY_HOSTS": '{"hub": "registry-1.docker.io"}',
                            "MIRROR_ALLOW_CLIENTS": '["127.0.0.0/8", "10.0.0.0/8"]',
                            "LISTEN__PROXY": "127.0.0.1:3128"},
    "cluster": {"CLUSTER__PEERS": '["127.0.0.1:5001", "127.0.0.2:5001", "[::1]:5002"]',
                "CLUSTER__SELF": "127.0.0.2:5001"},
}


def load(tmp_path: Path, **env: str) -> config_mod.Config:
    environ = {"CR_PROXY_CACHE_DIR": str(tmp_path / "cache"),
               "CR_PROXY_CERTS_DIR": str(tmp_path / "certs"),
               "CR_PROXY_RUN_DIR": str(tmp_path / "run"),
               **{f"CR_PROXY_{key}": value for key, value in env.items()}}
    return config_mod.load(None, environ=environ)


def rendered(tmp_path: Path, **env: str) -> tuple[config_mod.Config, Path]:
    """Render as `cr-proxy config --check` does; -> (config, nginx.conf)."""
    conf = load(tmp_path, **env)
    conf.run_dir.mkdir(parents=True)
    ca = certs.ensure_ca(conf.certs_dir)
    leaf = certs.ensure_mirror_leaf(ca, conf.certs_dir, conf.mirror_names)
    certs.LeafCache(ca, conf.certs_dir, conf.proxy.max_hosts).ensure_fallback()
    conf = nginx.with_front_port(conf)
    return conf, nginx.render(conf, leaf.cert, leaf.key, stamp=FrontStamp.new())


def includes(path: Path) -> list[str]:
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    return re.findall(r"(?m)^\s*include\s+(\S+);", text)


@needs_nginx
@pytest.mark.parametrize("env", CONFIGURATIONS.values(), ids=list(CONFIGURATIONS))
def test_the_rendered_configuration_passes_nginx_t(tmp_path: Path, env: dict[str, str]) -> None:
    conf, path = rendered(tmp_path, **env)
    nginx.check(conf, path)


@needs_nginx
@pytest.mark.parametrize("env", CONFIGURATIONS.values(), ids=list(CONFIGURATIONS))
def test_every_include_resolves_in_the_run_directory(tmp_path: Path, env: dict[str, str]) -> None:
    conf, path = rendered(tmp_path, **env)
    pending, seen = [path], set()
    while pending:
        for target in includes(pending.pop()):
            if target == "mime.types":  # nginx's own, next to its binary's conf
                continue
            found = sorted(Path(target).parent.glob(Path(target).name))
            assert found or "*" in target, f"{target} is missing"
            assert all(p.is_relative_to(conf.run_dir) for p in found), target
            pending += [p for p in found if p not in seen]
            seen.update(found)
    assert {"mirror-locations.conf", "mirror.conf", "fetch.conf"} <= {p.name for p in seen}
    if conf.listen.proxy.enabled:
        assert {"proxy-locations.conf", "proxy-server.conf"} <= {p.name for p in seen}


@needs_nginx
def test_the_mirror_and_proxy_servers_share_one_location_template(tmp_path: Path) -> None:
    conf, _ = rendered(tmp_path, **CONFIGURATIONS["mirror-https-and-proxy"])
    run = conf.run_dir
    assert f"include {run}/mirror-locations.conf;" in (run / "mirror.conf").read_text()
    assert f"include {run}/proxy-locations.conf;" in (run / "proxy-server.conf").read_text()
    for server in ("mirror.conf", "proxy-server.conf"):  # no location of their own
        heads = re.findall(r"(?m)^\s*location\b.*", (run / server).read_text())
        assert not [head for head in heads if "/blobs/" in head or "/manifests/" in head]
    directives, private_checks = [], []
    for name, server in nginx.LOCATION_FILES.items():
        text = (run / name).read_text()
        assert text == nginx.locations(server, conf.cache_dir, conf.mirror_auth.enabled)
        lines = [line for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        private_checks.append([line.strip() for line in lines if "/_private)" in line])
        directives.append([line.split()[0] for line in lines if "/_private)" not in line])
    mirror, proxy = directives
    assert mirror == proxy  # the same directives, in the same order
    assert mirror.count("location") == 3 and mirror.count("if") == 5  # blob, manifest, held
    # Only the https_proxy server checks a private repository's mark, in
    # both locations (the mirror's clients bring no credential to check).
    assert private_checks[0] == []
    assert private_checks[1] == [
        f"if (-f {conf.cache_dir}/lists/$cr_proxy_domain/$cr_name/_private) {{ return 418; }}"
    ] * 2


def python_regex(nginx_regex: str) -> re.Pattern[str]:
    """PCRE's (?<name>...) is Python's (?P<name>...); the rest is shared."""
    return re.compile(re.sub(r"\(\?<(?=[a-z_])", "(?P<", nginx_regex))


def map_pattern(text: str, variable: str, value: str) -> re.Pattern[str]:
    """The regex of the map entry that sets `variable` to `value`."""
    block = text[text.index(f" {variable} {{"):]
    block = block[:block.index("}\n")]
    (pattern,) = re.findall(rf'"~(\^.*\$)" {re.escape(value)};', block)
    return python_regex(pattern)


NAMES = ["library/alpine", "a", "a/b/c", "a.b_c__d-e---f/g", "A/b", "a//b", "-a", "a-", "a__b",
         "a___b", "a/", "a..b", "äb", "a b", "x" * 300]
HOSTS = ["ghcr.io", "localhost:5000", "127.0.0.1", "[::1]:5000", "[fe80::1]", "a-b.c",
         "-a.b", "a_b.c", "Ghcr.io", "a" * 64 + ".io", "host:", "host:123456", "[::1", ""]
TAGS = ["latest", "v1.2.3", "_x", ".x", "-x", "a" * 128, "a" * 129, "a:b", "", "A-b_c.d"]
DIGESTS = ["sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha256:" + "a" * 63,
           "sha512:" + "b" * 128, "md5:" + "c" * 32]


def test_the_mirror_maps_check_names_and_hosts_by_the_reference_grammar(tmp_path: Path) -> None:
    text = nginx.mirror_maps(load(tmp_path))
    name_ok = map_pattern(text, "$cr_repo_ok", "1")
    for name in NAMES:
        grammar = reference.NAME_RE.fullmatch(name) is not None
        assert (name_ok.fullmatch(name) is not None) is grammar, name
    domain = map_pattern(text, "$cr_domain", "$cr_registry")
    for host in HOSTS:
        assert (domain.fullmatch(host) is not None) is (
            reference.HOST_RE.fullmatch(host) is not None), host


def test_the_proxy_maps_read_hosts_and_names_by_the_reference_grammar() -> None:
    text = nginx.proxy_maps()
    sni = map_pattern(text, "$cr_sni_cert", "$cr_s")
    for host in HOSTS:  # the SNI: a host without a port
        plain = reference.HOST_RE.fullmatch(host) is not None and not re.search(r":\d+$", host)
        assert (sni.fullmatch(host) is not None) is plain, host
    name_ok = map_pattern(text, "$cr_name_ok", "1")
    for name in NAMES:
        assert (name_ok.fullmatch(name) is not None) is (
            reference.NAME_RE.fullmatch(name) is not None), name


@pytest.mark.parametrize("server", nginx.LOCATION_FILES.values(), ids=list(nginx.LOCATION_FILES))
def test_the_locations_take_a_reference_tag_or_sha256_digest(
    server: nginx.ServerLocations,
) -> None:
    text = nginx.locations(server, Path("/cache"))
    blob, manifest, held = (python_regex(p) for p in re.findall(r'location ~ "([^"]+)"', text))
    for ref in TAGS + DIGESTS:
        sha256 = reference.is_digest(ref) and ref.startswith("sha256:")
        assert (blob.fullmatch(f"/v2/a/b/blobs/{ref}") is not None) is sha256, ref
        served = reference.is_tag(ref) or sha256
        assert (manifest.fullmatch(f"/v2/a/b/manifests/{ref}") is not None) is served, ref
    assert blob.fullmatch(f"/v2/a/b/blobs/{DIGESTS[0]}").group("cr_name") == "a/b"
    # The held location (internal): the fetcher's held names, nothing else.
    name = "0123456789abcdef" * 2
    for cache in ("HIT", "MISS"):
        found = held.fullmatch(f"/_cr/held/{cache}/sha256:{'a' * 64}/{name}")
        assert (found.group("cr_held"), found.group("cr_held_cache")) == (name, cache)
    for uri in (f"/_cr/held/MISS/sha256:{'a' * 64}/../{name}",
                f"/_cr/held/MISS/sha256:{'a' * 64}/x", f"/_cr/held/MISS/md5:{'a' * 32}/{name}",
                f"/_cr/held/MISS/sha256:{'a' * 64}/{name}/", f"/_cr/held/sha256:{'a' * 64}/{name}",
                f"/_cr/held/STALE/sha256:{'a' * 64}/{name}"):
        assert held.fullmatch(uri) is None, uri


def test_a_cluster_renders_nginx_ring_over_the_peers(tmp_path: Path) -> None:
    """The ring is nginx's: `hash ... consistent` over every peer as written,
    this node never skipped by itself (no key sent round a circle), the
    others by max_fails; peers' addresses may say X-CR-Peer and are mirror
    clients; this node's own hop comes back as 421."""
    conf = load(tmp_path, CLUSTER__PEERS='["127.0.0.1:5001", "192.0.2.7:5001"]',
                CLUSTER__SELF="127.0.0.1:5001",
                MIRROR_ALLOW_CLIENTS='["127.0.0.0/8"]')
    text = nginx.cluster_conf(conf)
    assert "hash $http_x_cr_digest consistent;" in text
    assert "server 127.0.0.1:5001 max_fails=0;" in text
    assert "server 192.0.2.7:5001 max_fails=1 fail_timeout=10s;" in text
    assert "proxy_connect_timeout 3000ms;" in text
    # timeouts.pool + connect + read + 1 (default.yml): what the owner's upstream may cost it.
    assert "proxy_read_timeout 94000ms;" in text
    assert "proxy_next_upstream error timeout http_502 http_503 http_504;" in text
    assert '"127.0.0.1:5001" 1;' in text  # $cr_peer_self
    assert re.search(r"geo \$cr_from_peer \{\s*default 0;\s*127\.0\.0\.1 1;\s*192\.0\.2\.7 1;",
                     text)
    assert "    192.0.2.7 1;" in nginx.mirror_maps(conf)  # a mirror client, not listed


def test_the_rings_failure_accounting_is_configured(tmp_path: Path) -> None:
    """cluster.max_fails, fail_timeout, connect_timeout and read_timeout
    become the ring's server parameters and its proxy timeouts."""
    conf = load(tmp_path, CLUSTER__PEERS='["127.0.0.1:5001", "192.0.2.7:5001"]',
                CLUSTER__SELF="127.0.0.1:5001", CLUSTER__MAX_FAILS="3",
                CLUSTER__FAIL_TIMEOUT="2.5", CLUSTER__CONNECT_TIMEOUT="0.5",
                CLUSTER__READ_TIMEOUT="7")
    text = nginx.cluster_conf(conf)
    assert "server 192.0.2.7:5001 max_fails=3 fail_timeout=3s;" in text
    assert "server 127.0.0.1:5001 max_fails=0;" in text
    assert "proxy_connect_timeout 500ms;" in text
    assert "proxy_read_timeout 7000ms;" in text


def test_without_peers_no_request_is_a_peers(tmp_path: Path) -> None:
    text = nginx.cluster_conf(load(tmp_path))
    assert "upstream" not in text
    assert 'map $http_x_cr_peer $cr_peer { default ""; }' in text


def test_a_peer_that_does_not_resolve_stops_the_render(tmp_path: Path) -> None:
    conf = load(tmp_path, CLUSTER__PEERS='["127.0.0.1:5001", "nowhere.invalid:5001"]',
                CLUSTER__SELF="127.0.0.1:5001")
    with pytest.raises(nginx.NginxError, match=r"nowhere\.invalid:5001 does not resolve"):
        nginx.cluster_conf(conf)


# --- mirror_auth -------------------------------------------------------------------

AUTH_MARKS = ("auth_basic", "ssl_verify_client", "ssl_client_certificate", "mirror-auth.conf",
              "$cr_user", "$cr_auth", "_cr/ping", "$cr_fetch_authorization")


def rendered_text(conf: config_mod.Config) -> str:
    return "\n".join(path.read_text() for path in sorted(conf.run_dir.glob("*.conf")))


@needs_nginx
def test_mirror_auth_off_renders_nothing_of_it(tmp_path: Path) -> None:
    """Off (the default), no directive, variable or log field of it is
    rendered: the hit path is the one measured without it. Only fetch.conf
    drops a client's own X-CR-Mirror-Grant, as it drops every X-CR-*."""
    conf, _ = rendered(tmp_path, **CONFIGURATIONS["mirror-https-and-proxy"])
    text = rendered_text(conf)
    assert not [mark for mark in AUTH_MARKS if mark in text]
    assert 'proxy_set_header X-CR-Mirror-Grant "";' in text
    assert not (conf.run_dir / nginx.PING_FILE).exists()
    # The https_proxy's own user= field (its clients' identity, the
    # fetcher's word) is there; the mirror's lines have a format of their own.
    assert "server=$server_name user=$upstream_http_x_cr_user';" in text
    assert "log_format cr_mirror '" in text and "access_log" in text


def auth_settings(tmp_path: Path, rules: list[dict[str, object]],
                  passwords: bool = True) -> dict[str, str]:
    htpasswd, ca, tokens = tmp_path / "htpasswd", tmp_path / "clients.pem", tmp_path / "tokens"
    htpasswd.write_text("alice:$2y$05$Uvwb6kLTYMK/Na/yJFqXJ.KvSWEmL3sv/F1al8GRdPxim1z6cCTbi\n")
    ca.write_bytes(certs.ensure_ca(tmp_path / "client-ca").cert.read_bytes())
    tokens.write_text(f"# ci\nci-bot:{hashlib.sha256(b'a-token').hexdigest()}\n\n")
    settings = {"htpasswd_file": str(htpasswd) if passwords else "", "client_ca": str(ca),
                "anonymous": "pull-public", "rules": rules, "tokens_file": str(tokens)}
    return {**CONFIGURATIONS["mirror-https-and-proxy"], "MIRROR_AUTH": json.dumps(settings)}


@needs_nginx
def test_mirror_auth_on_passes_nginx_t(tmp_path: Path) -> None:
    rules = [{"users": ["alice", "*"], "repositories": ["registry.test/private/*", "*"],
              "allow": "pull"}]
    conf, path = rendered(tmp_path / "t", **auth_settings(tmp_path, rules))
    nginx.check(conf, path)
    text = rendered_text(conf)
    assert all(mark in text for mark in AUTH_MARKS)
    assert "server=$server_name user=$cr_log_user';" in text
    assert "server=$server_name user=$upstream_http_x_cr_user';" in text
    # Password users and token users: the challenge asks for a password.
    assert "$cr_bearer_js" in text and 'WWW-Authenticate \'Basic realm="cr-proxy"\'' in text


@needs_nginx
def test_mirror_auth_with_tokens_and_no_passwords_challenges_bearer(tmp_path: Path) -> None:
    """skopeo and docker send a token they were given only to a Bearer
    challenge; its realm is the mirror's own /_cr/token."""
    conf, path = rendered(tmp_path / "t", **auth_settings(tmp_path, [], passwords=False))
    nginx.check(conf, path)
    text = rendered_text(conf)
    assert ('WWW-Authenticate \'Bearer realm="$scheme://$http_host/_cr/token",'
            'service="cr-proxy"\'' in text)
    assert "auth_basic_user_file" not in text and "location = /_cr/token" in text


def rule_regex(conf: config_mod.Config) -> list[tuple[re.Pattern[str], str]]:
    entries = re.findall(r'(?m)^    "~(\^.*\$)" (pull|deny);$', nginx.rule_lines(conf))
    return [(python_regex(pattern.replace("\\\\", "\\")), allow) for pattern, allow in entries]


def first_rule(rules: list[tuple[re.Pattern[str], str]], subject: str) -> str:
    return next((allow for regex, allow in rules if regex.fullmatch(subject)), "")


def test_rules_become_escaped_regexes_normalised_as_the_mirror_maps(tmp_path: Path) -> None:
    rules = [
        {"users": ["carol"], "repositories": ["registry.test/private/*"], "allow": "deny"},
        {"users": ["a.b", "ci-bot@x"], "repositories": ["registry.test/private/*",
                                                        "docker.io/nginx", "ghcr.io/*"],
         "allow": "pull"},
        {"users": ["*"], "repositories": ["acme/*", "localhost:5000/exact"], "allow": "pull"},
    ]
    conf = load(tmp_path, **auth_settings(tmp_path, rules))
    compiled = rule_regex(conf)
    cases = {
        "a.b|registry.test/private/app": "pull",
        "a.b|registry.test/private/a/b": "pull",
        "carol|registry.test/private/app": "deny",  # the first match wins
        "aXb|registry.test/private/app": "",  # "." is no wildcard
        "a.b|registryXtest/private/app": "",
        "a.b|registry.test/privateX/app": "",
        "a.b|registry.test/private": "",
        "a.b|registry-1.docker.io/library/nginx": "pull",  # docker.io/nginx, as the maps say
        "a.b|registry-1.docker.io/nginx": "",
        "ci-bot@x|ghcr.io/org/app": "pull",
        "|registry.test/private/app": "",  # no identity: no rule
        "|registry-1.docker.io/acme/app": "",
        "anyone|registry-1.docker.io/acme/app": "pull",  # acme/*: the default registry's
        "anyone|localhost:5000/exact": "pull",
        "anyone|localhost:5000/exact/more": "",
        "a.b|x|registry.test/private/app": "",  # a separator in the name
    }
    assert {subject: first_rule(compiled, subject) for subject in cases} == cases


@pytest.mark.parametrize(
    ("users", "repository"),
    [
        (["alice"], "registry.test/(.*)"),
        (["alice"], "registry.test/a|b"),
        (["alice"], 'registry.test/a"; } evil {'),
        (["alice"], "registry.test/private*"),
        (["alice"], "registry.test/a/../b"),
        (["alice"], "Registry.Test/App"),
        (["alice"], "registry.test"),
        (["alice"], "registry.test/a/*/b"),
        (["alice"], "$cr_user/x"),
        (["al|ice"], "registry.test/a"),
        (["alice\r\nX: y"], "registry.test/a"),
        (["al ice"], "registry.test/a"),
        (["alice$x"], "registry.test/a"),
        ([""], "registry.test/a"),
    ],
)
def test_hostile_rules_never_reach_a_map(tmp_path: Path, users: list[str],
                                         repository: str) -> None:
    rules = [{"users": users, "repositories": [repository], "allow": "pull"}]
    with pytest.raises(config_mod.ConfigError, match=r"mirror_auth\.rules\[0\]"):
        load(tmp_path, **auth_settings(tmp_path, rules))


@needs_nginx
def test_mirror_auth_with_a_cluster_keeps_its_maps_when_the_ring_is_rewritten(
    tmp_path: Path
) -> None:
    """serve rewrites mirror-maps.conf when the cluster's members change
    (render_cluster): mirror_auth's maps go with it; a peer's hop is
    exempt (its client was checked on the node it came in to)."""
    settings = {**auth_settings(tmp_path, []), **CONFIGURATIONS["cluster"]}
    conf, path = rendered(tmp_path / "t", **settings)
    nginx.render_cluster(conf)
    maps = (conf.run_dir / "mirror-maps.conf").read_text()
    assert "$cr_auth_verdict" in maps and 'map $cr_peer $cr_auth_peer' in maps
    nginx.check(conf, path)


DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("path", [
    f"/v2/library/bench/blobs/{DIGEST}",
    f"/v2/a/blobs/b/blobs/{DIGEST}",
    f"/v2/blobs/blobs/{DIGEST}",
    f"/v2/x/manifests/y/blobs/{DIGEST}",
    "/v2/a/manifests/b/manifests/v1",
    f"/v2/org/app/manifests/{DIGEST}",
    "/v2/a/blobs/b/manifests/v1.2-rc_3",
    f"/v2//blobs/{DIGEST}",
    "/v2/a/manifests/",
])
def test_lazy_name_captures_split_paths_as_the_greedy_ones(tmp_path: Path, path: str) -> None:
    """The locations' and mirror_auth's names are lazy (.+?) for speed: the
    last segment holds no "/", so the split is the same as a greedy one's."""
    for lazy in (nginx.BLOB_LOCATION, nginx.MANIFEST_LOCATION,
                 "^/v2/(?<cr_name>.+?)/(?:blobs|manifests|referrers)/[^/]+$"):
        greedy = lazy.replace("(?<cr_name>.+?)", "(?<cr_name>.+)")
        assert lazy != greedy
        found, expected = python_regex(lazy).match(path), python_regex(greedy).match(path)
        assert (found and found.groupdict()) == (expected and expected.groupdict()), (lazy, path)
    assert "(?<cr_name>.+?)/(?:blobs|manifests|referrers)/[^/]+$" in nginx.mirror_auth_server(
        load(tmp_path))


def map_block(text: str, variable: str) -> list[tuple[str, str]]:
    """A rendered map's entries (key as written, value), in order."""
    found = re.search(r"^map \S+ \$" + variable + r" \{\n(.*?)^\}", text, re.M | re.S)
    assert found, variable
    return [(key.strip('"'), value) for key, value in
            re.findall(r'^\s+("[^"]*"|\S+) ("[^"]*"|[^;]+);$', found.group(1), re.M)]


@pytest.mark.parametrize("anonymous", ["pull-public", "none"])
def test_the_quick_verdict_of_a_read_with_no_credential_is_the_full_maps(
    tmp_path: Path, anonymous: str
) -> None:
    """Reads with no credential are decided by exact keys ($cr_auth_verdict),
    without the identity's and rules' maps: each must be what the full map
    ($cr_auth_verdict_full, first matching regex) answers for the same
    request: no peer, no write, no rule, no identity."""
    rules = [{"users": ["alice"], "repositories": ["*"], "allow": "pull"}]
    settings = auth_settings(tmp_path, rules)
    settings["MIRROR_AUTH"] = json.dumps({**json.loads(settings["MIRROR_AUTH"]),
                                          "anonymous": anonymous})
    conf, _ = rendered(tmp_path / "t", **settings)
    text = (conf.run_dir / "mirror-maps.conf").read_text()
    full = [(re.compile(key[1:].replace("\\\\", "\\")), value.strip('"'))
            for key, value in map_block(text, "cr_auth_verdict_full") if key.startswith("~")]
    quick = [(key, value) for key, value in map_block(text, "cr_auth_verdict")
             if key != "default"]
    assert len(quick) == 2 * 7
    for key, verdict in quick:
        _, method, kind, private, credential = key.split("|")
        assert method in ("GET", "HEAD") and credential == "0"
        full_key = f"0|0|{kind}|{private}||"
        answer = next(value for pattern, value in full if pattern.search(full_key))
        assert verdict.strip('"') == answer, (key, full_key)
    # With no credential an anonymous reader of a public repository gets the policy.
    expected = "" if anonymous == "pull-public" else "no_identity"
    assert dict(quick)["|GET|repo|0|0"].strip('"') == expected


@needs_nginx
def test_a_peers_hop_is_never_a_fast_read(tmp_path: Path) -> None:
    """In a cluster a peer's hop (X-CR-Peer, kept only from a peer's
    address) goes to the full decision, which serves it (its client was
    checked where it came in): the fast key names the peer, and its exact
    keys want none. Without peers the key leaves $cr_peer out (always "")."""
    rules = [{"users": ["alice"], "repositories": ["*"], "allow": "pull"}]
    settings = auth_settings(tmp_path, rules)
    conf, path = rendered(tmp_path / "c", **settings, **CONFIGURATIONS["cluster"])
    nginx.check(conf, path)
    maps = (conf.run_dir / "mirror-maps.conf").read_text()
    key = "$request_method|$ssl_client_verify|$http_authorization"
    assert f'map "$cr_peer|{key}" $cr_auth_fast' in maps
    fast = [key for key, _ in map_block(maps, "cr_auth_fast") if key != "default"]
    assert fast and all(key.startswith("|") for key in fast), fast
    conf, _ = rendered(tmp_path / "n", **settings)
    maps = (conf.run_dir / "mirror-maps.conf").read_text()
    assert f'map "{key}" $cr_auth_fast' in maps


def test_only_the_blob_location_keeps_a_missing_private_mark(tmp_path: Path) -> None:
    """With mirror_auth on, the mirror's blob location keeps what it found
    missing (its repository's private mark) for OPEN_FILE_CACHE_VALID, the
    time Privacy.learn waits after marking. The manifest location keeps no
    file at all (a tag's manifest is replaced under its name), and with
    mirror_auth off nothing missing is kept."""
    rules = [{"users": ["alice"], "repositories": ["*"], "allow": "pull"}]
    for name, settings, kept in (("on", auth_settings(tmp_path, rules), True), ("off", {}, False)):
        conf, path = rendered(tmp_path / name, **settings)
        nginx.check(conf, path)
        text = (conf.run_dir / "mirror-locations.conf").read_text()
        blob, manifest = text.split("# Manifests:", 1)
        assert f"open_file_cache_valid {layout.OPEN_FILE_CACHE_VALID}s;" in blob
        assert ("open_file_cache_errors on;" in blob) is kept, name
        assert "open_file_cache" not in manifest, name
        proxy = (conf.run_dir / "proxy-locations.conf").read_text()
        assert "open_file_cache_errors" not in proxy, name
