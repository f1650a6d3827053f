"""cr_proxy.config: defaults, file, environment; errors name the key; secrets stay hidden."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from cr_proxy.config import (
    ANONYMOUS_TOKEN,
    MASK,
    Address,
    Credentials,
    NginxSettings,
    Timeouts,
    default_data,
    load,
)
from cr_proxy.errors import ConfigError

PASSWORD = "pw-Zq8!secret-do-not-print"
TOKEN = "tok-Xy7-secret-do-not-print"
FILE_PASSWORD = "pw-from-file-4711"
ENV_PASSWORD = "pw-from-env-0815"
ENV_TOKEN = "tok-from-env-1234"
SECRETS = (PASSWORD, TOKEN, FILE_PASSWORD, ENV_PASSWORD, ENV_TOKEN)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Relative paths in the defaults resolve against the working directory."""
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load_data(tmp_path: Path, data: object, environ: dict[str, str] | None = None):
    return load(write_config(tmp_path, data), environ=environ or {})


# --- defaults ----------------------------------------------------------------------


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        assert not duplicates, f"duplicate keys {duplicates} at {node.start_mark}"
        return super().construct_mapping(node, deep)


def test_the_default_file_names_each_key_once():
    """Two sections of one name (two branches each adding `limits:`) would
    silently drop the first one's keys."""
    text = (Path(__file__).resolve().parent.parent / "cr_proxy" / "default.yml").read_text()
    assert yaml.load(text, Loader=UniqueKeyLoader) == default_data()


def test_defaults_without_a_file_are_the_documented_ones(tmp_path):
    conf = load(None, environ={})
    assert conf.cache_dir == tmp_path / "cache"
    assert conf.certs_dir == tmp_path / "certs"
    assert conf.run_dir == tmp_path / "run"
    assert conf.socket_path == tmp_path / "run" / "fetcher.sock"
    assert conf.listen.proxy == Address("0.0.0.0", 3128)
    assert conf.listen.mirror_https == Address("0.0.0.0", 5443)
    assert conf.listen.mirror_http == Address("0.0.0.0", 5000)
    assert conf.mirror_names == ()
    assert conf.timeouts == Timeouts(connect=3.0, read=30.0, down_host=5.0, pool=60.0,
                                     stale_budget=0.3)
    assert conf.limits.upstream_connections_per_host == 64
    assert conf.limits.min_rate == 4096
    assert (conf.download.retries, conf.download.retry_budget) == (5, 60.0)
    assert conf.tag_ttl == 300.0
    assert conf.default_registry == "docker.io"
    assert dict(conf.registry_hosts) == {
        "docker.io": "registry-1.docker.io",
        "index.docker.io": "registry-1.docker.io",
    }
    assert dict(conf.endpoints) == {}
    assert conf.insecure == frozenset()
    assert dict(conf.registries) == {}
    assert conf.nginx == NginxSettings(binary="nginx", user="auto", worker_processes="auto")
    assert conf.limits.max_blob_size == 64 << 30
    assert conf.log_level == "info"


def test_defaults_ignore_the_process_environment_when_environ_is_given(monkeypatch):
    monkeypatch.setenv("CR_PROXY_TAG_TTL", "1")
    assert load(None, environ={}).tag_ttl == 300.0


def test_every_key_of_default_yml_is_in_the_effective_config():
    assert set(load(None, environ={}).masked()) == set(default_data())


def test_paths_are_absolute(tmp_path):
    conf = load_data(tmp_path, {"cache_dir": "rel/cache", "run_dir": "/abs/run"})
    assert conf.cache_dir == tmp_path / "rel" / "cache"
    assert conf.run_dir == Path("/abs/run")


# --- the file ------------------------------------------------------------------------


def test_a_file_merges_over_the_defaults(tmp_path):
    conf = load_data(
        tmp_path,
        {
            "timeouts": {"connect": 1},
            "tag_ttl": 0,
            "listen": {"mirror_http": "127.0.0.1:5001"},
            "endpoints": {"a.test": "http://127.0.0.1:1/"},
            "insecure": ["A.Test"],
            "mirror_names": ["mirror.test", "10.0.0.1"],
            "log_level": "debug",
        },
    )
    assert conf.timeouts == Timeouts(connect=1.0, read=30.0, down_host=5.0, pool=60.0,
                                     stale_budget=0.3)
    assert conf.tag_ttl == 0.0
    assert conf.listen.mirror_http == Address("127.0.0.1", 5001)
    assert conf.listen.proxy == Address("0.0.0.0", 3128)  # untouched sibling
    assert dict(conf.endpoints) == {"a.test": "http://127.0.0.1:1"}
    assert conf.insecure == frozenset({"a.test"})
    assert conf.mirror_names == ("mirror.test", "10.0.0.1")
    assert conf.log_level == "debug"
    assert conf.default_registry == "docker.io"  # untouched


def test_an_empty_file_gives_the_defaults(tmp_path):
    assert load_data(tmp_path, "") == load(None, environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_a_malformed_file_raises_config_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_data(tmp_path, text)


def test_a_missing_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.yml", environ={})


# --- the environment -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "attribute", "expected"),
    [
        ({"CR_PROXY_TIMEOUTS__CONNECT": "2"}, "timeouts", Timeouts(2.0, 30.0, 5.0, 60.0, 0.3)),
        ({"CR_PROXY_TIMEOUTS__READ": "2.5"}, "timeouts", Timeouts(3.0, 2.5, 5.0, 60.0, 0.3)),
        ({"CR_PROXY_TIMEOUTS__POOL": "5"}, "timeouts", Timeouts(3.0, 30.0, 5.0, 5.0, 0.3)),
        ({"CR_PROXY_TIMEOUTS__STALE_BUDGET": "0"}, "timeouts",
         Timeouts(3.0, 30.0, 5.0, 60.0, 0.0)),
        ({"CR_PROXY_TAG_TTL": "0"}, "tag_ttl", 0.0),
        ({"cr_proxy_tag_ttl": "1"}, "tag_ttl", 300.0),  # prefix is case-sensitive
        ({"CR_PROXY_tag_ttl": "7"}, "tag_ttl", 7.0),
        (
            {"CR_PROXY_ENDPOINTS": "{a.test: http://127.0.0.1:1}"},
            "endpoints",
            {"a.test": "http://127.0.0.1:1"},
        ),
        ({"CR_PROXY_DEFAULT_REGISTRY": "Registry.Test"}, "default_registry", "registry.test"),
        ({"CR_PROXY_INSECURE": "[a.test, b.test:5000]"}, "insecure",
         frozenset({"a.test", "b.test:5000"})),
        ({"CR_PROXY_LOG_LEVEL": "warning"}, "log_level", "warning"),
        ({"CR_PROXY_NGINX__USER": "www-data"}, "nginx",
         NginxSettings("nginx", "www-data", "auto")),
        ({"CR_PROXY_NGINX__WORKER_PROCESSES": "4"}, "nginx", NginxSettings("nginx", "auto", "4")),
        ({"PATH": "/bin", "CR_PROXYTAG_TTL": "1"}, "tag_ttl", 300.0),
    ],
)
def test_environment_overrides(environ, attribute, expected):
    value = getattr(load(None, environ=environ), attribute)
    assert (dict(value) if attribute == "endpoints" else value) == expected


@pytest.mark.parametrize(
    ("environ", "per_host", "min_rate"),
    [
        ({"CR_PROXY_LIMITS__MIN_RATE": "1MiB"}, 64, 1 << 20),
        ({"CR_PROXY_LIMITS__MIN_RATE": "0"}, 64, 0),
        ({"CR_PROXY_LIMITS__UPSTREAM_CONNECTIONS_PER_HOST": "16"}, 16, 4096),
    ],
)
def test_upstream_limits_from_the_environment(environ, per_host, min_rate):
    limits = load(None, environ=environ).limits
    assert (limits.upstream_connections_per_host, limits.min_rate) == (per_host, min_rate)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:5001", Address("127.0.0.1", 5001)),
        ("5001", Address("0.0.0.0", 5001)),
        (":5001", Address("0.0.0.0", 5001)),
        ("localhost:5001", Address("localhost", 5001)),
        ("'[::1]:5001'", Address("::1", 5001)),
        ("off", Address("", 0)),
        ("0", Address("", 0)),
        ("", Address("", 0)),
    ],
)
def test_listen_addresses_from_the_environment(raw, expected):
    conf = load(None, environ={"CR_PROXY_LISTEN__MIRROR_HTTP": raw})
    assert conf.listen.mirror_http == expected
    assert conf.listen.mirror_http.enabled is (expected.port != 0)


@pytest.mark.parametrize(
    ("address", "nginx", "text"),
    [
        (Address("0.0.0.0", 5000), "0.0.0.0:5000", "0.0.0.0:5000"),
        (Address("::1", 5000), "[::1]:5000", "[::1]:5000"),
        (Address("", 0), ":0", "off"),
    ],
)
def test_address_renders_for_nginx(address, nginx, text):
    assert address.nginx() == nginx
    assert str(address) == text


@pytest.mark.parametrize(
    ("raw", "host", "port"),
    [("", "127.0.0.1", 0), ("127.0.0.1:3129", "127.0.0.1", 3129), ("127.8.0.1:0", "127.8.0.1", 0),
     ("'[::1]:3129'", "::1", 3129)],
)
def test_front_tls_is_loopback_and_port_0_means_pick_one(raw, host, port):
    conf = load(None, environ={"CR_PROXY_LISTEN__FRONT_TLS": raw} if raw else {})
    assert (conf.listen.front_tls.host, conf.listen.front_tls.port) == (host, port)
    # Port 0 is not "off" here: serve picks a free port (nginx.with_front_port).
    assert str(conf.listen.front_tls) == conf.listen.front_tls.nginx()


@pytest.mark.parametrize("raw", ["0.0.0.0:3129", "10.0.0.1:3129", "localhost:3129", "3129",
                                 "127.0.0.1:99999"])
def test_front_tls_anywhere_but_a_loopback_address_is_refused(raw):
    # Its listener trusts the PROXY line it is sent: it must not face the network.
    with pytest.raises(ConfigError, match=r"listen\.front_tls"):
        load(None, environ={"CR_PROXY_LISTEN__FRONT_TLS": raw})


def test_environment_beats_the_file(tmp_path):
    conf = load_data(tmp_path, {"tag_ttl": 10}, {"CR_PROXY_TAG_TTL": "20"})
    assert conf.tag_ttl == 20.0


# --- errors name the key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": 1}, "'bogus'"),
        ({"timeouts": {"conect": 2}}, "'timeouts.conect'"),
        ({"listen": {"mirror": "1"}}, "'listen.mirror'"),
        ({"timeouts": {"connect": "fast"}}, "timeouts.connect"),
        ({"timeouts": {"connect": 0}}, "timeouts.connect"),
        ({"timeouts": {"read": -1}}, "timeouts.read"),
        ({"timeouts": {"down_host": True}}, "timeouts.down_host"),
        ({"timeouts": {"down_host": 0}}, "timeouts.down_host"),  # probes need a pause
        ({"timeouts": {"stale_budget": -1}}, "timeouts.stale_budget"),
        ({"timeouts": None}, "timeouts.connect"),
        ({"timeouts": {"pool": 0}}, "timeouts.pool"),
        ({"limits": {"upstream_connections_per_host": 0}},
         "limits.upstream_connections_per_host"),
        ({"limits": {"upstream_connections_per_host": 257}},
         "limits.upstream_connections_per_host"),
        ({"limits": {"upstream_connections_per_host": "8"}},
         "limits.upstream_connections_per_host"),
        ({"limits": {"min_rate": "fast"}}, "limits.min_rate"),
        ({"limits": {"max_rate": 1}}, "'limits.max_rate'"),
        ({"tag_ttl": -5}, "tag_ttl"),
        ({"tag_ttl": "5m"}, "tag_ttl"),
        ({"listen": {"mirror_http": "host:99999"}}, "listen.mirror_http"),
        ({"listen": {"proxy": "host:port"}}, "listen.proxy"),
        ({"listen": {"mirror_https": True}}, "listen.mirror_https"),
        ({"listen": "0.0.0.0:5000"}, "listen"),
        ({"default_registry": "Not A Host"}, "default_registry"),
        ({"default_registry": 5}, "default_registry"),
        ({"registry_hosts": {"docker.io": "bad host"}}, "registry_hosts.docker.io"),
        ({"registry_hosts": {"bad/host": "x.test"}}, "registry_hosts"),
        ({"endpoints": {"a.test": "ftp://a.test"}}, "endpoints.a.test"),
        ({"endpoints": {"a.test": "a.test:5000"}}, "endpoints.a.test"),
        ({"endpoints": {"a.test": 5000}}, "endpoints.a.test"),
        ({"endpoints": ["a.test"]}, "endpoints"),
        ({"insecure": "a.test"}, "insecure"),
        ({"proxy": {"allow_private": ["localhost:99999"]}}, "proxy.allow_private"),
        ({"proxy": {"allow_private": ["10.0.0.0/33"]}}, "proxy.allow_private"),
        ({"proxy": {"allow_private": ["bad_host"]}}, "proxy.allow_private"),
        ({"insecure": ["../x"]}, "insecure"),
        ({"mirror_names": [1]}, "mirror_names"),
        ({"log_level": "loud"}, "log_level"),
        ({"nginx": {"binary": ""}}, "nginx.binary"),
        ({"nginx": {"user": "www-data;\ndaemon on"}}, "nginx.user"),
        ({"nginx": {"user": "-rf"}}, "nginx.user"),
        ({"cache_dir": 3}, "cache_dir"),
        ({"registries": {"ghcr.io": "token"}}, "registries.ghcr.io"),
        ({"registries": {"ghcr.io": {"username": "u"}}}, "registries.ghcr.io"),
        ({"registries": {"ghcr.io": {"password": "p"}}}, "registries.ghcr.io"),
        ({"registries": {"ghcr.io": {"token": "t", "pasword": "p"}}},
         "'registries.ghcr.io.pasword'"),
        ({"registries": {"bad host": {"token": "t"}}}, "registries"),
        ({"limits": {"max_blob_size": "lots"}}, "limits.max_blob_size"),
        ({"limits": {"max_blob_size": 0}}, "limits.max_blob_size"),
        ({"limits": {"max_blob_size": -1}}, "limits.max_blob_size"),
        ({"download": {"retries": -1}}, "download.retries"),
        ({"download": {"retries": "5"}}, "download.retries"),
        ({"download": {"retry_budget": -1}}, "download.retry_budget"),
        ({"mirror_auth": {"htpasswd_file": "/nonexistent/htpasswd"}}, "mirror_auth.htpasswd_file"),
        ({"mirror_auth": {"client_ca": "/nonexistent/ca.pem"}}, "mirror_auth.client_ca"),
        ({"mirror_auth": {"anonymous": "everyone"}}, "mirror_auth.anonymous"),
        ({"mirror_auth": {"rules": {"users": ["a"]}}}, "mirror_auth.rules"),
        ({"mirror_auth": {"rules": ["a"]}}, "mirror_auth.rules[0]"),
        ({"mirror_auth": {"rules": [{"users": ["a"], "repositories": ["x/y"], "allow": "push"}]}},
         "mirror_auth.rules[0].allow"),
        ({"mirror_auth": {"rules": [{"users": ["a"], "repositories": ["x/y"], "allow": "pull",
                                     "push": True}]}}, "mirror_auth.rules[0]"),
        ({"mirror_auth": {"rules": [{"users": [], "repositories": ["x/y"], "allow": "pull"}]}},
         "mirror_auth.rules[0]"),
        # Numbers that crashed or meant nothing (a review of session 13):
        # NaN compares false with everything (cache.min_age's guard off).
        ({"cache": {"min_age": float("nan")}}, "cache.min_age"),
        ({"timeouts": {"read": float("inf")}}, "timeouts.read"),
        ({"proxy": {"max_tunnels": float("inf")}}, "proxy.max_tunnels"),
        ({"proxy": {"max_tunnels": float("nan")}}, "proxy.max_tunnels"),
        ({"cache": {"max_size": "9" * 400}}, "cache.max_size"),
        ({"listen": {"mirror_http": "127.0.0.1:\u00b2"}}, "listen.mirror_http"),
        ({"endpoints": {"a.test": "http://bob:s3cret@10.0.0.5:5000"}}, "endpoints.a.test"),
    ],
)
def test_bad_file_settings_raise_config_error_naming_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as info:
        load_data(tmp_path, data)
    assert key in info.value.message
    assert info.value.code == "CONFIG"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"CR_PROXY_BOGUS": "1"}, "'bogus'"),
        ({"CR_PROXY_TIMEOUTS__CONECT": "2"}, "'timeouts.conect'"),
        ({"CR_PROXY_TAG_TTL__X": "2"}, "'tag_ttl.x'"),
        ({"CR_PROXY_ENDPOINTS__A.TEST": "http://a.test"}, "'endpoints.a.test'"),
        ({"CR_PROXY_TIMEOUTS__CONNECT": "soon"}, "timeouts.connect"),
        ({"CR_PROXY_TIMEOUTS__CONNECT": "[1"}, "CR_PROXY_TIMEOUTS__CONNECT"),
        ({"CR_PROXY_LISTEN__MIRROR_HTTP": "[::1]:5000"}, "CR_PROXY_LISTEN__MIRROR_HTTP"),
        ({"CR_PROXY_LISTEN__MIRROR_HTTP": "x:0"}, "listen.mirror_http"),
        ({"CR_PROXY_ENDPOINTS": "{a.test: nope}"}, "endpoints.a.test"),
        ({"CR_PROXY_TIMEOUTS": "{connect: 1}"}, "timeouts.read"),
        ({"CR_PROXY_LOG_LEVEL": "trace"}, "log_level"),
    ],
)
def test_bad_environment_raises_config_error_naming_the_key(environ, key):
    with pytest.raises(ConfigError) as info:
        load(None, environ=environ)
    assert key in info.value.message


def test_a_scalar_proxy_ports_raises_config_error():
    with pytest.raises(ConfigError) as info:
        load(None, environ={"CR_PROXY_PROXY__PORTS": "443"})
    assert "proxy.ports" in info.value.message


# --- credentials ------------------------------------------------------------------------


def test_credentials_inline(tmp_path):
    conf = load_data(
        tmp_path, {"registries": {"GHCR.io": {"username": "bot", "password": PASSWORD}}}
    )
    assert conf.credentials("ghcr.io") == Credentials("bot", PASSWORD, "")
    assert conf.credentials("quay.io") is None


def test_credentials_from_password_file_are_stripped(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(f"  {FILE_PASSWORD}\n")
    conf = load_data(
        tmp_path, {"registries": {"ghcr.io": {"username": "bot", "password_file": str(secret)}}}
    )
    assert conf.credentials("ghcr.io") == Credentials("bot", FILE_PASSWORD, "")


def test_credentials_from_password_env(tmp_path):
    conf = load_data(
        tmp_path,
        {"registries": {"ghcr.io": {"username": "bot", "password_env": "GHCR_PW"}}},
        {"GHCR_PW": ENV_PASSWORD},
    )
    assert conf.credentials("ghcr.io") == Credentials("bot", ENV_PASSWORD, "")


def test_credentials_from_token_env_need_no_username(tmp_path):
    conf = load_data(
        tmp_path, {"registries": {"ghcr.io": {"token_env": "GHCR_TOKEN"}}}, {"GHCR_TOKEN": TOKEN}
    )
    assert conf.credentials("ghcr.io") == Credentials("", "", TOKEN)


def test_credentials_from_the_environment_variable_registries(tmp_path):
    conf = load(
        None,
        environ={
            "CR_PROXY_REGISTRIES": "{ghcr.io: {username: bot, password_env: PW}}",
            "PW": ENV_PASSWORD,
        },
    )
    assert conf.credentials("ghcr.io") == Credentials("bot", ENV_PASSWORD, "")


def test_a_missing_password_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_data(
            tmp_path,
            {"registries": {"ghcr.io": {"username": "u", "password_file": str(tmp_path / "x")}}},
        )
    assert "registries.ghcr.io.password_file" in info.value.message


def test_a_missing_password_env_names_the_key_and_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_data(
            tmp_path, {"registries": {"ghcr.io": {"username": "u", "password_env": "NOPE_PW"}}}
        )
    assert "registries.ghcr.io.password_env" in info.value.message
    assert "NOPE_PW" in info.value.message


# --- secrets never shown -----------------------------------------------------------------


@pytest.fixture
def secret_config(tmp_path) -> object:
    secret = tmp_path / "secret"
    secret.write_text(FILE_PASSWORD)
    return load_data(
        tmp_path,
        {
            "registries": {
                "ghcr.io": {"username": "bot", "password": PASSWORD},
                "quay.io": {"token": TOKEN},
                "a.test": {"username": "f", "password_file": str(secret)},
                "b.test": {"username": "e", "password_env": "B_PW"},
                "c.test": {"token_env": "C_TOKEN"},
            }
        },
        {"B_PW": ENV_PASSWORD, "C_TOKEN": ENV_TOKEN},
    )


def test_masked_config_dump_never_contains_secrets(secret_config):
    text = yaml.safe_dump(secret_config.masked())
    for secret in SECRETS:
        assert secret not in text
    assert MASK in text
    assert secret_config.masked()["registries"] == {
        "ghcr.io": {"username": "bot", "password": MASK},
        "quay.io": {"token": MASK},
        "a.test": {"username": "f", "password": MASK},
        "b.test": {"username": "e", "password": MASK},
        "c.test": {"token": MASK},
    }


def test_masked_config_keeps_the_secrets_in_the_config_itself(secret_config):
    assert secret_config.credentials("ghcr.io").password == PASSWORD
    assert secret_config.credentials("c.test").token == ENV_TOKEN


def test_repr_of_credentials_and_config_never_contains_secrets(secret_config):
    for creds in secret_config.registries.values():
        assert all(s not in repr(creds) for s in SECRETS)
    assert all(s not in repr(secret_config) for s in SECRETS)
    assert "bot" in repr(secret_config.credentials("ghcr.io"))


def test_masked_config_is_plain_yaml_with_readable_addresses():
    data = load(None, environ={}).masked()
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert data["listen"]["proxy"] == "0.0.0.0:3128"
    assert data["listen"]["mirror_https"] == "0.0.0.0:5443"
    assert data["listen"]["mirror_http"] == "0.0.0.0:5000"
    assert data["default_registry"] == "docker.io"


def test_unquoted_non_string_secret_is_refused_naming_the_key(tmp_path):
    conf = tmp_path / "c.yml"
    conf.write_text("registries:\n  ghcr.io: {username: bot, password: 0123}\n")
    with pytest.raises(ConfigError) as info:
        load(conf, environ={})
    assert "registries.ghcr.io.password" in info.value.message


def test_a_registry_hosts_entry_adds_to_the_defaults(tmp_path):
    conf = tmp_path / "c.yml"
    conf.write_text("registry_hosts:\n  mirror.example: real.example\n")
    hosts = load(conf, environ={}).registry_hosts
    assert hosts["mirror.example"] == "real.example"
    assert hosts["docker.io"] == "registry-1.docker.io"


def test_max_blob_size_takes_a_size_like_cache_max_size(tmp_path):
    conf = load_data(tmp_path, {"limits": {"max_blob_size": "1.5GiB"}})
    assert conf.limits.max_blob_size == 3 << 29


def test_proxy_max_hosts_defaults_to_256_and_takes_a_whole_number(tmp_path):
    assert load(None, environ={}).proxy.max_hosts == 256
    assert load_data(tmp_path, {"proxy": {"max_hosts": 3}}).proxy.max_hosts == 3
    for bad in (0, -1, 2.5, True, "many", None):
        with pytest.raises(ConfigError, match=r"proxy\.max_hosts"):
            load_data(tmp_path, {"proxy": {"max_hosts": bad}})


def test_cluster_defaults_to_one_node_alone(tmp_path: Path) -> None:
    cluster = load(None, environ={}).cluster
    assert (cluster.peers, cluster.me, cluster.keep_local, cluster.enabled) == ((), "", True, False)


def test_cluster_peers_and_self_are_read_as_written(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"cluster": {
        "peers": ["198.51.100.11:5000", "node-b.lan:5000", "[2001:db8::3]:5000"],
        "self": "node-b.lan:5000", "keep_local": False}})
    cluster = load(path, environ={}).cluster
    assert cluster.peers == ("198.51.100.11:5000", "node-b.lan:5000", "[2001:db8::3]:5000")
    assert (cluster.me, cluster.keep_local, cluster.enabled) == ("node-b.lan:5000", False, True)


def test_cluster_peers_as_one_dns_name(tmp_path: Path) -> None:
    """A headless Service: one name:port, resolved by serve; self is this
    node's address (or name) on that port."""
    path = write_config(tmp_path, {"cluster": {
        "peers": "cr-proxy-peers.default.svc:5000", "self": "10.1.2.3:5000",
        "resolve_interval": 5}})
    cluster = load(path, environ={}).cluster
    assert (cluster.service, cluster.peers, cluster.me) == (
        "cr-proxy-peers.default.svc:5000", (), "10.1.2.3:5000")
    assert (cluster.enabled, cluster.resolve_interval) == (True, 5.0)


def test_the_rings_failure_settings(tmp_path: Path) -> None:
    cluster = load(None, environ={}).cluster
    assert (cluster.max_fails, cluster.fail_timeout, cluster.connect_timeout,
            cluster.read_timeout) == (1, 10.0, 3.0, 0.0)
    assert load(None, environ={}).peer_read_timeout == 60 + 3 + 30 + 1  # from timeouts.*
    path = write_config(tmp_path, {"cluster": {"max_fails": 0, "read_timeout": 2.5}})
    conf = load(path, environ={})
    assert (conf.cluster.max_fails, conf.peer_read_timeout) == (0, 2.5)


@pytest.mark.parametrize(("cluster", "message"), [
    ({"peers": "peers.lan", "self": "10.0.0.1:5000"}, r"cluster\.peers: 'peers\.lan' is not"),
    ({"peers": "peers.lan:5000", "self": "10.0.0.1:6000"},
     r"cluster\.self: '10\.0\.0\.1:6000' is not on the port of cluster\.peers"),
    ({"peers": "peers.lan:5000", "self": ""}, r"cluster\.self: '' is not host:port"),
    ({"resolve_interval": 0}, r"cluster\.resolve_interval: must be > 0"),
    ({"max_fails": -1}, r"cluster\.max_fails: expected a whole number >= 0"),
    ({"fail_timeout": "10s"}, r"cluster\.fail_timeout: expected a number of seconds"),
    ({"connect_timeout": 0}, r"cluster\.connect_timeout: must be > 0"),
    ({"read_timeout": -1}, r"cluster\.read_timeout: must be >= 0"),
    ({"peers": ["10.0.0.1:5000", "10.0.0.1:5000"], "self": "10.0.0.1:5000"},
     r"cluster\.peers: 10\.0\.0\.1:5000 listed more than once"),
    ({"peers": ["10.0.0.1:5000", "10.0.0.2:5000"], "self": "10.0.0.3:5000"},
     r"cluster\.self: '10\.0\.0\.3:5000' is not one of cluster\.peers"),
    ({"peers": ["10.0.0.1:5000"], "self": ""}, r"cluster\.self: '' is not one"),
    ({"peers": ["10.0.0.1"], "self": "10.0.0.1"},
     r"cluster\.peers: '10\.0\.0\.1' is not host:port"),
    ({"peers": ["10.0.0.1:0"], "self": "10.0.0.1:0"}, r"is not host:port"),
    ({"peers": ["a b:1"], "self": "a b:1"}, r"is not host:port"),
    ({"self": "10.0.0.1:5000"}, r"cluster\.self is set but cluster\.peers is empty"),
    ({"keep_local": "yes"}, r"cluster\.keep_local: expected true or false"),
])
def test_bad_cluster_settings_name_the_key(tmp_path: Path, cluster: dict[str, object],
                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write_config(tmp_path, {"cluster": cluster}), environ={})


def test_mirror_auth_is_off_by_default_and_client_ca_needs_the_https_port(tmp_path):
    assert not load_data(tmp_path, {}).mirror_auth.enabled
    ca = tmp_path / "clients.pem"
    ca.write_text("PEM")
    on = load_data(tmp_path, {"mirror_auth": {"client_ca": str(ca)}}).mirror_auth
    assert on.enabled and on.client_ca == ca and on.anonymous == "pull-public"
    with pytest.raises(ConfigError) as info:
        load_data(tmp_path, {"mirror_auth": {"client_ca": str(ca)},
                             "listen": {"mirror_https": "off"}})
    assert "mirror_auth.client_ca" in info.value.message


def test_mirror_auth_tokens_file_holds_hashes_of_named_users(tmp_path):
    """`<user>:<sha256 hex>` lines, comments and blanks; anything else (a
    token pasted as is, a user name nginx would not take, the anonymous
    token's hash) is refused at start, without quoting the line."""
    tokens = tmp_path / "tokens"
    good = hashlib.sha256(b"t0ken").hexdigest()
    tokens.write_text(f"# CI\n\nci-bot@acme.example:{good}\n  alice:{good}  \n")
    on = load_data(tmp_path, {"mirror_auth": {"tokens_file": str(tokens)}}).mirror_auth
    assert on.enabled and on.tokens_file == tokens
    anonymous = hashlib.sha256(ANONYMOUS_TOKEN.encode()).hexdigest()
    for line in ("alice:t0ken-in-clear", f"al ice:{good}", f"alice:{good.upper()}",
                 f"alice|x:{good}", f"alice:sha256:{good}", f"nobody:{anonymous}"):
        tokens.write_text(f"{line}\n")
        with pytest.raises(ConfigError) as info:
            load_data(tmp_path, {"mirror_auth": {"tokens_file": str(tokens)}})
        assert "mirror_auth.tokens_file" in info.value.message and "line 1" in info.value.message
        assert "t0ken-in-clear" not in info.value.message
    with pytest.raises(ConfigError, match=r"mirror_auth\.tokens_file"):
        load_data(tmp_path, {"mirror_auth": {"tokens_file": str(tmp_path / "none")}})
