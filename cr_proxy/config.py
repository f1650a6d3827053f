"""Settings: typed, frozen dataclasses built from YAML and the environment.

Precedence, lowest first: the embedded `default.yml`, the file given with
`--config`, then `CR_PROXY_*` variables (`__` separates nesting levels:
`CR_PROXY_LISTEN__MIRROR_HTTP=127.0.0.1:5000`; values are read as YAML, so
`CR_PROXY_ENDPOINTS='{a.test: http://127.0.0.1:1}'` works). An unknown key or
a bad value raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from cr_proxy.errors import BadRequest, ConfigError
from cr_proxy.net.policy import parse_rule
from cr_proxy.oci.reference import is_host, is_name, names_registry, parse_reference

ENV_PREFIX = "CR_PROXY_"
# Upstream connections open at once, all hosts together (the fetcher's
# aiohttp pool); limits.upstream_connections_per_host shares it out.
UPSTREAM_CONNECTIONS = 256
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MASK = "********"


@dataclass(frozen=True, slots=True)
class Address:
    """A listen address; port 0 or an empty setting means disabled."""

    host: str
    port: int

    @property
    def enabled(self) -> bool:
        return self.port != 0

    def nginx(self) -> str:
        """As nginx's `listen` wants it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.nginx() if self.enabled else "off"


@dataclass(frozen=True, slots=True)
class LoopbackAddress(Address):
    """An internal listener on loopback; port 0 means a free port picked at
    start (not off)."""

    def __str__(self) -> str:
        return self.nginx()


@dataclass(frozen=True, slots=True)
class Listen:
    proxy: Address
    mirror_https: Address
    mirror_http: Address
    metrics: Address
    # Where nginx ends TLS for the CONNECT front's tunnels: loopback TCP, not
    # a unix socket, because splice moves TCP data by page reference while a
    # unix socket's bytes are copied once more (about 3x the front's CPU per
    # GiB). Port 0: serve picks a free one at start.
    front_tls: LoopbackAddress


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float
    down_host: float  # seconds between probes of a registry that is down
    pool: float
    stale_budget: float = 0.3  # seconds a stale tag waits for its revalidation


@dataclass(frozen=True, slots=True)
class Credentials:
    """Credentials for one registry's token exchange. repr() masks secrets."""

    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def masked(self) -> dict[str, str]:
        out = {"username": self.username} if self.username else {}
        if self.password:
            out["password"] = MASK
        if self.token:
            out["token"] = MASK
        return out


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    allow_clients: tuple[IPNetwork, ...]
    intercept: tuple[str, ...]
    passthrough: tuple[str, ...]
    ports: frozenset[int]
    allow_private: tuple[str, ...]
    max_tunnels: int
    max_hosts: int  # intercepted hosts with a leaf and an nginx server


@dataclass(frozen=True, slots=True)
class CacheLimit:
    max_size: int  # bytes; 0 = no limit
    low_water: float
    min_age: float
    check_interval: float
    pins: tuple[str, ...] = ()  # image references never evicted, refreshed, warmed at start


@dataclass(frozen=True, slots=True)
class Limits:
    max_blob_size: int  # bytes; a download stops here when no Content-Length says less
    upstream_connections_per_host: int
    min_rate: int  # bytes/s, judged over each timeouts.read; 0 = no minimum


@dataclass(frozen=True, slots=True)
class Download:
    """A blob download whose upstream connection breaks is resumed where it
    got to (fetch/resume.py), this often at most, within this many seconds;
    a miss that joins a download under way waits up to `hold` seconds for
    the verified file, which nginx then sends (fetch/flight.py), else it is
    streamed."""

    retries: int = 5
    retry_budget: float = 60.0
    hold: float = 1.0


@dataclass(frozen=True, slots=True)
class Refresh:
    interval: float
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PushPolicy:
    enabled: bool
    allow_clients: tuple[IPNetwork, ...]
    default_target: str  # "" = only pushes naming their registry
    upload_timeout: float


@dataclass(frozen=True, slots=True)
class NginxSettings:
    binary: str
    user: str
    worker_processes: str


# MQTT brokers' URL schemes (Propeller's and paho's spellings) -> TLS.
MQTT_SCHEMES = {"tcp": False, "mqtt": False, "ssl": True, "tls": True, "mqtts": True}
MQTT_QOS = (0, 1, 2)
MAX_MQTT_CHUNK = 64 * 2**20  # bytes; a chunk is one MQTT message, held in memory while sent
# A topic level is the operator's id: no separator or wildcard in it.
TOPIC_LEVEL_RE = re.compile(r"[^/+#\x00]{1,200}")


@dataclass(frozen=True, slots=True)
class Mqtt:
    """Edge delivery over MQTT (cr_proxy/edge/mqtt.py). broker "" = off.
    repr() masks the password."""

    broker: str
    client_id: str
    username: str
    password: str = field(repr=False)
    ca_file: str
    domain_id: str
    channel_id: str
    qos: int
    chunk_size: int
    max_deliveries: int

    @property
    def enabled(self) -> bool:
        return bool(self.broker)

    @property
    def tls(self) -> bool:
        return MQTT_SCHEMES[urlsplit(self.broker).scheme]

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.broker).port or (8883 if self.tls else 1883)

    def masked(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["password"] = MASK if self.password else ""
        return data


@dataclass(frozen=True, slots=True)
class Artifacts:
    signed_urls: bool  # only /artifacts/s/<token> is served (cr_proxy/edge/signing.py)
    url_ttl: float  # seconds a signed URL stays valid


PRIVATE_OFFLINE = ("verified", "deny", "allow")


@dataclass(frozen=True, slots=True)
class Private:
    """Who may pull a private repository's content in https_proxy mode
    (cr_proxy/fetch/private.py; README, "Private content")."""

    verdict_ttl: float  # seconds a credential's verdict for a repository is trusted online
    offline: str  # verified | deny | allow: what an unreachable upstream means
    offline_grace: float  # seconds a verdict still counts while the upstream is unreachable


MIRROR_ANONYMOUS = ("pull-public", "none")
RULE_ALLOW = ("pull", "deny")
# Identities nginx takes from a password user or a certificate's CN: no
# character that could end a map key, a log field or a header.
IDENTITY_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MIRROR_AUTH_REALM = "cr-proxy"  # WWW-Authenticate: Basic realm="cr-proxy"
# mirror_auth.tokens_file: `<user>:<sha256 hex of the token>` a line; the
# token itself is never stored.
TOKEN_LINE_RE = re.compile(rf"({IDENTITY_RE.pattern}):([0-9a-f]{{64}})")
# What the mirror's own token endpoint (/_cr/token, nginx.py) gives a
# client that a Bearer challenge sent there: a name for no one, never an
# identity. A tokens_file line for it is refused.
ANONYMOUS_TOKEN = "cr-proxy-anonymous"
# nginx's word to the fetcher on a mirror miss (nginx.py, $cr_auth_grant):
# what mirror_auth would say of this client were the repository private.
MIRROR_GRANT_HEADER = "X-CR-Mirror-Grant"
# ...and for which repository it decided: `<domain>/<name>` as nginx read
# the request. The fetcher serves nothing it reads as another repository
# (a registry in upper case, with its default port, encoded).
MIRROR_GRANT_FOR_HEADER = "X-CR-Mirror-Grant-For"
# The fetcher's word to nginx on an https_proxy answer it decided (private
# content): the user the client's credential belongs to, for the access
# log (user=); nginx logs it and never passes it on (fetch.conf).
USER_HEADER = "X-CR-User"


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One mirror_auth rule: these identities ("*": any) may pull, or may
    not, the repositories these patterns name (docs in default.yml)."""

    users: tuple[str, ...]
    repositories: tuple[str, ...]  # [registry/]name, [registry/]prefix/* or *
    allow: str  # pull | deny


@dataclass(frozen=True, slots=True)
class MirrorAuth:
    """Client authentication on the mirror ports (cr_proxy/nginx.py,
    mirror_auth_maps and MIRROR_AUTH)."""

    htpasswd_file: Path | None
    client_ca: Path | None
    anonymous: str  # pull-public | none
    rules: tuple[AccessRule, ...] = ()
    tokens_file: Path | None = None  # bearer tokens: <user>:<sha256 hex> lines

    @property
    def enabled(self) -> bool:
        return bool(self.htpasswd_file or self.client_ca or self.rules or self.tokens_file
                    or self.anonymous != "pull-public")


@dataclass(frozen=True, slots=True)
class Cluster:
    """Sibling nodes (docs/design.md, "Cluster"). `peers` as written: nginx
    builds its hash ring from these strings, so every node must list the
    same ones for all to agree on each digest's owner. With `service` (the
    peers given as one DNS name), `peers` is empty here: serve resolves the
    name to the ring's members (cluster/members.py) and puts them in."""

    peers: tuple[str, ...]  # host:port of every node's mirror_http, self included
    me: str  # cluster.self: this node's entry in peers
    keep_local: bool
    service: str = ""  # cluster.peers as one name:port, resolved to every address
    resolve_interval: float = 30.0  # seconds between resolutions of `service`
    max_fails: int = 1  # failures of a peer before it is skipped (nginx's max_fails)
    fail_timeout: float = 10.0  # seconds a failed peer is skipped (nginx's fail_timeout)
    connect_timeout: float = 3.0  # seconds to connect to a peer
    read_timeout: float = 0.0  # seconds a peer may stay silent; 0: from timeouts

    @property
    def enabled(self) -> bool:
        return bool(self.peers or self.service)


@dataclass(frozen=True, slots=True)
class Config:
    cache_dir: Path
    certs_dir: Path
    run_dir: Path
    listen: Listen
    mirror_names: tuple[str, ...]
    mirror_allow_clients: tuple[IPNetwork, ...]
    timeouts: Timeouts
    tag_ttl: float
    cache: CacheLimit
    limits: Limits
    refresh: Refresh
    default_registry: str
    registry_hosts: Mapping[str, str]
    endpoints: Mapping[str, str]
    insecure: frozenset[str]
    parent_mirror: str  # a parent cr-proxy's mirror URL, or ""
    upstream_proxy: str  # a parent cr-proxy's https_proxy URL, or ""
    upstream_proxy_ca: Path | None  # its CA (PEM), added to the system's trust
    parent_fallback: str  # direct | fail
    registries: Mapping[str, Credentials]
    proxy: ProxyPolicy
    push: PushPolicy
    nginx: NginxSettings
    artifacts: Artifacts
    access_log_max_size: int  # bytes; 0 = never rotated by serve
    log_level: str
    mqtt: Mqtt
    download: Download = Download()
    cluster: Cluster = Cluster((), "", True)
    private: Private = Private(300, "verified", 86400)
    mirror_auth: MirrorAuth = MirrorAuth(None, None, "pull-public")

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "fetcher.sock"

    @property
    def peer_read_timeout(self) -> float:
        """Seconds a cluster peer may stay silent (cluster.read_timeout): by
        default the owner waits for a free upstream connection
        (timeouts.pool), connects and reads its upstream under the same
        settings as this node (every node should share them)."""
        if self.cluster.read_timeout:
            return self.cluster.read_timeout
        return int(self.timeouts.pool + self.timeouts.connect + self.timeouts.read) + 1

    @property
    def access_log_path(self) -> Path:
        return self.run_dir / "access.log"

    def credentials(self, registry: str) -> Credentials | None:
        return self.registries.get(registry)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked."""
        data = _plain(self)
        data["registries"] = {k: v.masked() for k, v in self.registries.items()}
        data["mqtt"] = self.mqtt.masked()
        return data


def _plain(value: Any) -> Any:
    if isinstance(value, Address):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | frozenset | list):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


# --- loading -----------------------------------------------------------------


def default_data() -> dict[str, Any]:
    text = resources.files("cr_proxy").joinpath("default.yml").read_text()
    return yaml.safe_load(text)


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective Config: defaults, then the file, then the environment."""
    data = default_data()
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(message=f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(message=f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(message=f"config file {path}: top level must be a mapping")
        _merge(data, loaded, "")
    _apply_env(data, os.environ if environ is None else environ)
    return build(data, environ)


def _merge(base: dict[str, Any], over: Mapping[str, Any], where: str) -> None:
    """Merge `over` into `base`; keys must exist in base unless base's value is a
    free-form mapping (endpoints, registries, registry_hosts)."""
    for key, value in over.items():
        name = f"{where}{key}"
        if key not in base:
            raise ConfigError(message=f"unknown setting {name!r}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in FREE_FORM:
            _merge(base[key], value, f"{name}.")
        elif key in FREE_FORM and isinstance(base[key], dict) and isinstance(value, dict):
            # Free-form maps add to the defaults (a new registry_hosts entry
            # must not drop docker.io's).
            base[key] = {**base[key], **value}
        else:
            base[key] = value


FREE_FORM = frozenset({"endpoints", "registries", "registry_hosts"})



def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        keys = var[len(ENV_PREFIX) :].lower().split("__")
        node = data
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[: i + 1])
                raise ConfigError(message=f"unknown setting {where!r} (from {var})")
            if i == len(keys) - 1:
                try:
                    node[key] = yaml.safe_load(raw) if raw != "" else ""
                except yaml.YAMLError as err:
                    raise ConfigError(message=f"{var}: not a valid value: {err}") from err
            else:
                node = node[key]


def build(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    listen = _mapping(data, "listen")
    proxy = _mapping(data, "proxy")
    timeouts = _mapping(data, "timeouts")
    nginx = _mapping(data, "nginx")
    artifacts = _mapping(data, "artifacts")
    push = _mapping(data, "push")
    return Config(
        cache_dir=_path(data, "cache_dir"),
        certs_dir=_path(data, "certs_dir"),
        run_dir=_path(data, "run_dir"),
        listen=Listen(
            proxy=_address(listen, "listen.proxy"),
            mirror_https=_address(listen, "listen.mirror_https"),
            mirror_http=_address(listen, "listen.mirror_http"),
            metrics=_address(listen, "listen.metrics"),
            front_tls=_loopback_address(listen, "listen.front_tls"),
        ),
        mirror_names=tuple(_str_list(data, "mirror_names")),
        mirror_allow_clients=tuple(_network(n, "mirror_allow_clients")
                                   for n in _str_list(data, "mirror_allow_clients")),
        timeouts=Timeouts(
            connect=_seconds(timeouts, "timeouts.connect"),
            read=_seconds(timeouts, "timeouts.read"),
            down_host=_seconds(timeouts, "timeouts.down_host"),
            pool=_seconds(timeouts, "timeouts.pool"),
            stale_budget=_seconds(timeouts, "timeouts.stale_budget", allow_zero=True),
        ),
        tag_ttl=_seconds(data, "tag_ttl", allow_zero=True),
        cache=_cache_limit(_mapping(data, "cache")),
        limits=_limits(_mapping(data, "limits")),
        download=_download(_mapping(data, "download")),
        refresh=Refresh(
            interval=_seconds(_mapping(data, "refresh"), "refresh.interval", allow_zero=True),
            tags=tuple(_str_list(_mapping(data, "refresh"), "refresh.tags")),
        ),
        default_registry=_host(data.get("default_registry"), "default_registry"),
        registry_hosts={
            _host(k, "registry_hosts"): _host(v, f"registry_hosts.{k}")
            for k, v in _mapping(data, "registry_hosts").items()
        },
        endpoints={
            _host(k, "endpoints"): _url(v, f"endpoints.{k}")
            for k, v in _mapping(data, "endpoints").items()
        },
        insecure=frozenset(_host(h, "insecure") for h in _str_list(data, "insecure")),
        parent_mirror=_parent_url(data.get("parent_mirror"), "parent_mirror"),
        upstream_proxy=_upstream_proxy(data),
        upstream_proxy_ca=_upstream_proxy_ca(data),
        parent_fallback=_choice(data, "parent_fallback", ("direct", "fail")),
        registries={
            _host(k, "registries"): _credentials(v, f"registries.{k}", environ)
            for k, v in _mapping(data, "registries").items()
        },
        proxy=ProxyPolicy(
            allow_clients=tuple(_network(n, "proxy.allow_clients")
                                for n in _str_list(proxy, "proxy.allow_clients")),
            intercept=tuple(_pattern(p, "proxy.intercept")
                            for p in _str_list(proxy, "proxy.intercept")),
            passthrough=tuple(_pattern(p, "proxy.passthrough")
                              for p in _str_list(proxy, "proxy.passthrough")),
            ports=frozenset(_port(p, "proxy.ports") for p in _list(proxy, "proxy.ports")),
            allow_private=tuple(_allow_entry(e, "proxy.allow_private")
                                for e in _str_list(proxy, "proxy.allow_private")),
            max_tunnels=_count(proxy, "proxy.max_tunnels"),
            max_hosts=_count(proxy, "proxy.max_hosts"),
        ),
        push=PushPolicy(
            enabled=_flag(push, "push.enabled"),
            allow_clients=tuple(_network(n, "push.allow_clients")
                                for n in _str_list(push, "push.allow_clients")),
            default_target=(_host(push["default_target"], "push.default_target")
                            if push.get("default_target") else ""),
            upload_timeout=_seconds(push, "push.upload_timeout"),
        ),
        nginx=NginxSettings(
            binary=_str(nginx, "nginx.binary"),
            user=_user_name(nginx, "nginx.user"),
            worker_processes=str(nginx.get("worker_processes", "auto")),
        ),
        artifacts=Artifacts(
            signed_urls=_flag(artifacts, "artifacts.signed_urls"),
            url_ttl=_seconds(artifacts, "artifacts.url_ttl"),
        ),
        access_log_max_size=parse_size(data.get("access_log_max_size", 0),
                                       "access_log_max_size"),
        log_level=_choice(data, "log_level", ("debug", "info", "warning", "error")),
        mqtt=_mqtt(_mapping(data, "mqtt"), environ),
        cluster=_cluster(_mapping(data, "cluster")),
        private=_private(_mapping(data, "private")),
        mirror_auth=_mirror_auth(_mapping(data, "mirror_auth"), listen),
    )


def _private(private: Mapping[str, Any]) -> Private:
    return Private(
        verdict_ttl=_seconds(private, "private.verdict_ttl", allow_zero=True),
        offline=_choice(private, "private.offline", PRIVATE_OFFLINE),
        offline_grace=_seconds(private, "private.offline_grace"),
    )


def _mirror_auth(data: Mapping[str, Any], listen: Mapping[str, Any]) -> MirrorAuth:
    client_ca = _readable_file(data, "mirror_auth.client_ca")
    if client_ca and not _address(listen, "listen.mirror_https").enabled:
        raise ConfigError(message="mirror_auth.client_ca: client certificates are asked for on "
                                  "listen.mirror_https, which is off")
    rules = _list(data, "mirror_auth.rules")
    tokens_file = _readable_file(data, "mirror_auth.tokens_file")
    if tokens_file is not None:
        check_tokens_file(tokens_file)
    return MirrorAuth(
        htpasswd_file=_readable_file(data, "mirror_auth.htpasswd_file"),
        client_ca=client_ca,
        anonymous=_choice(data, "mirror_auth.anonymous", MIRROR_ANONYMOUS),
        rules=tuple(_access_rule(rule, f"mirror_auth.rules[{i}]") for i, rule in enumerate(rules)),
        tokens_file=tokens_file,
    )


def check_tokens_file(path: Path) -> None:
    """Every line of mirror_auth.tokens_file is `<user>:<sha256 hex>`, a
    blank line or a # comment. nginx reads the file at each Bearer request
    (cr_auth.js, bearerUser) and skips what does not parse: a mistake is said
    here, at start, rather than found as a token that names no one."""
    anonymous = hashlib.sha256(ANONYMOUS_TOKEN.encode()).hexdigest()
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = TOKEN_LINE_RE.fullmatch(line)
        where = f"mirror_auth.tokens_file: {path} line {number}"
        # The line is not quoted: it may hold a token pasted by mistake.
        if match is None:
            raise ConfigError(message=f"{where} is not <user>:<sha256 hex of the token> "
                                      "(user: letters, digits, . _ @ -; hex: 64 lower-case)")
        if match.group(2) == anonymous:
            raise ConfigError(message=f"{where}: {ANONYMOUS_TOKEN!r} is the mirror's token "
                                      "for anonymous clients, no user's")


def _readable_file(data: Mapping[str, Any], key: str) -> Path | None:
    if not _str(data, key, allow_empty=True):
        return None
    path = _path(data, key)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(message=f"{key}: {path} is not a readable file")
    return path


def _access_rule(value: Any, key: str) -> AccessRule:
    if not isinstance(value, Mapping) or set(value) - {"users", "repositories", "allow"}:
        raise ConfigError(message=f"{key}: expected {{users: [...], repositories: [...], "
                                  f"allow: pull|deny}}, got {value!r}")
    users = tuple(_str_list(value, f"{key}.users"))
    repositories = tuple(_str_list(value, f"{key}.repositories"))
    if not users or not repositories:
        raise ConfigError(message=f"{key}: needs users and repositories")
    for user in users:
        if user != "*" and not IDENTITY_RE.fullmatch(user):
            raise ConfigError(message=f"{key}.users: {user!r} is not a user name "
                                      "(letters, digits, . _ @ -) or *")
    for pattern in repositories:
        if not is_repository_pattern(pattern):
            raise ConfigError(message=f"{key}.repositories: {pattern!r} is not "
                                      "[registry/]name, [registry/]prefix/* or *")
    return AccessRule(users, repositories, _choice(value, f"{key}.allow", RULE_ALLOW))


def is_repository_pattern(pattern: str) -> bool:
    """`*`, `[registry/]name` or `[registry/]prefix/*` by the reference
    grammar (a registry alone before `/*` too): nothing else reaches the
    regexes nginx matches them with."""
    if pattern == "*":
        return True
    wildcard = pattern.endswith("/*")
    base = pattern[:-2] if wildcard else pattern
    first, sep, rest = base.partition("/")
    if names_registry(first):
        return is_host(first) and (is_name(rest) if sep else wildcard)
    return is_name(base)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(_leaf(key))
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(message=f"{key}: expected a mapping, got {value!r}")
    return value


def _str(data: Mapping[str, Any], key: str, allow_empty: bool = False) -> str:
    value = data.get(_leaf(key))
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(message=f"{key}: expected a string, got {value!r}")
    return value


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(_leaf(key)) or []
    if not isinstance(value, list):
        raise ConfigError(message=f"{key}: expected a list, got {value!r}")
    return value


def _str_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(_leaf(key)) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(message=f"{key}: expected a list of strings, got {value!r}")
    return value


# A POSIX user name as useradd takes it (it goes into nginx's `user` line).
USER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def _user_name(data: Mapping[str, Any], key: str) -> str:
    value = _str(data, key, allow_empty=True)
    if value and not USER_NAME_RE.fullmatch(value):
        raise ConfigError(message=f"{key}: not a user name: {value!r}")
    return value


def _path(data: Mapping[str, Any], key: str) -> Path:
    return Path(_str(data, key)).absolute()


def _seconds(data: Mapping[str, Any], key: str, allow_zero: bool = False) -> float:
    value = data.get(_leaf(key))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        # NaN compares false with everything: cache.min_age .nan disabled
        # the guard it sets.
        raise ConfigError(message=f"{key}: expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(message=f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def _flag(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(_leaf(key))
    if not isinstance(value, bool):
        raise ConfigError(message=f"{key}: expected true or false, got {value!r}")
    return value


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(_leaf(key))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(message=f"{key}: expected a whole number >= 1, got {value!r}")
    return value


def _choice(data: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = data.get(_leaf(key))
    if value not in choices:
        raise ConfigError(message=f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _host(value: Any, key: str) -> str:
    if not isinstance(value, str) or not is_host(value.lower()):
        raise ConfigError(message=f"{key}: {value!r} is not a host name")
    return value.lower()


def _url(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(message=f"{key}: expected a URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(message=f"{key}: {value!r} is not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        # `cr-proxy config` prints URLs as they are: credentials go in
        # registries:, where they are masked.
        raise ConfigError(message=f"{key}: a URL with a user name or password; put "
                          "credentials under registries:")
    return value.rstrip("/")


def _parent_url(value: Any, key: str) -> str:
    """A parent's base URL: scheme, host and port, nothing after them (a
    mirror's request paths and ?ns= are added to it)."""
    if value == "":
        return ""
    url = _url(value, key)
    parts = urlsplit(url)
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(message=f"{key}: {value!r}: scheme://host[:port] only")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as err:
        raise ConfigError(message=f"{key}: {value!r}: {err}") from err
    return url


def _upstream_proxy(data: Mapping[str, Any]) -> str:
    url = _parent_url(data.get("upstream_proxy"), "upstream_proxy")
    if url and not url.startswith("http://"):
        raise ConfigError(message=f"upstream_proxy: {url!r}: an http:// proxy URL")
    if url and data.get("parent_mirror"):
        raise ConfigError(message="upstream_proxy and parent_mirror: set one of them")
    return url


def _upstream_proxy_ca(data: Mapping[str, Any]) -> Path | None:
    value = data.get("upstream_proxy_ca")
    if value in ("", None):
        return None
    if not data.get("upstream_proxy"):
        raise ConfigError(message="upstream_proxy_ca is set but upstream_proxy is not")
    path = _path(data, "upstream_proxy_ca")
    if not path.is_file():
        raise ConfigError(message=f"upstream_proxy_ca: {path} is not a file")
    return path


PORT_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit takes "²", int() does not
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
              "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
              "gib": 2**30, "tib": 2**40}
SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: Any, key: str) -> int:
    """Bytes from 123, "50GiB", "1.5 TB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = SIZE_RE.fullmatch(str(value))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(message=f"{key}: {value!r} is not a size (e.g. 50GiB)")
    size = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(size):  # 400 digits
        raise ConfigError(message=f"{key}: {str(value)[:40]!r}... is not a size we can hold")
    return int(size)


def _cache_limit(data: Mapping[str, Any]) -> CacheLimit:
    low_water = data.get("low_water")
    if isinstance(low_water, bool) or not isinstance(low_water, int | float) or not (
        0 < low_water <= 1
    ):
        raise ConfigError(message=f"cache.low_water: expected a fraction in (0, 1], "
                                  f"got {low_water!r}")
    return CacheLimit(
        max_size=parse_size(data.get("max_size", 0), "cache.max_size"),
        low_water=float(low_water),
        min_age=_seconds(data, "cache.min_age", allow_zero=True),
        check_interval=_seconds(data, "cache.check_interval"),
        pins=_references(data.get("pins"), "cache.pins"),
    )


def _references(value: object, key: str) -> tuple[str, ...]:
    """A list of image references, each checked by Docker's rules."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(message=f"{key}: expected a list of image references, got {value!r}")
    for text in value:
        try:
            parse_reference(text)
        except BadRequest as err:
            raise ConfigError(message=f"{key}: {err.message}") from None
    return tuple(value)


def _limits(data: Mapping[str, Any]) -> Limits:
    max_blob_size = parse_size(data.get("max_blob_size"), "limits.max_blob_size")
    if max_blob_size <= 0:
        raise ConfigError(message="limits.max_blob_size: must be more than 0 bytes")
    per_host = data.get("upstream_connections_per_host")
    if isinstance(per_host, bool) or not isinstance(per_host, int) or not (
        0 < per_host <= UPSTREAM_CONNECTIONS
    ):
        raise ConfigError(message="limits.upstream_connections_per_host: expected a number "
                                  f"of connections from 1 to {UPSTREAM_CONNECTIONS}, "
                                  f"got {per_host!r}")
    return Limits(
        max_blob_size=max_blob_size,
        upstream_connections_per_host=per_host,
        min_rate=parse_size(data.get("min_rate", 0), "limits.min_rate"),
    )


def _download(data: Mapping[str, Any]) -> Download:
    retries = data.get("retries")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(message=f"download.retries: expected a whole number >= 0, "
                                  f"got {retries!r}")
    return Download(retries=retries,
                    retry_budget=_seconds(data, "download.retry_budget", allow_zero=True),
                    hold=_seconds(data, "download.hold", allow_zero=True))


def _network(value: str, key: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as err:
        raise ConfigError(message=f"{key}: {value!r} is not an address or CIDR") from err


def _pattern(value: str, key: str) -> str:
    bare = value[2:] if value.startswith("*.") else value
    if value != "*" and not is_host(bare.lower()):
        raise ConfigError(message=f"{key}: {value!r} is not a host pattern (host, *.domain, *)")
    return value.lower()


def _allow_entry(value: str, key: str) -> str:
    try:
        parse_rule(value)
    except ValueError as err:
        raise ConfigError(message=f"{key}: {err} (host[:port], *.domain[:port], "
                                  "address[:port], [v6]:port or CIDR)") from err
    return value.lower()


def _port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(message=f"{key}: {value!r} is not a port number")
    return value


def _address(data: Mapping[str, Any], key: str) -> Address:
    value = data.get(_leaf(key))
    if value in (None, "", 0, "off"):
        return Address("", 0)
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", text
    host = host.strip("[]") or "0.0.0.0"
    if not PORT_RE.fullmatch(port) or not 0 < int(port) < 65536:
        raise ConfigError(message=f"{key}: {value!r} is not host:port")
    return Address(host, int(port))


PEER_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")


def _peer(value: str, key: str) -> str:
    if not PEER_RE.fullmatch(value) or not 0 < int(value.rpartition(":")[2]) < 65536:
        raise ConfigError(message=f"{key}: {value!r} is not host:port")
    return value


def _cluster(data: Mapping[str, Any]) -> Cluster:
    """cluster.*: peers are host:port, each once, and self one of them; or
    peers is one name:port (a headless Service), and self this node's
    address (or name) on that port."""
    service = ""
    if isinstance(data.get("peers"), str):
        service = _peer(data["peers"], "cluster.peers") if data["peers"] else ""
        peers: list[str] = []
    else:
        peers = [_peer(peer, "cluster.peers") for peer in _str_list(data, "cluster.peers")]
    doubles = sorted({peer for peer in peers if peers.count(peer) > 1})
    if doubles:
        raise ConfigError(message=f"cluster.peers: {', '.join(doubles)} listed more than once")
    me = data.get("self") or ""
    if not isinstance(me, str):
        raise ConfigError(message=f"cluster.self: expected host:port, got {me!r}")
    if service:
        # Its address is matched against the name's at each resolution.
        _peer(me, "cluster.self")
        if me.rpartition(":")[2] != service.rpartition(":")[2]:
            raise ConfigError(message=f"cluster.self: {me!r} is not on the port of "
                              f"cluster.peers ({service})")
    elif peers and me not in peers:
        raise ConfigError(message=f"cluster.self: {me!r} is not one of cluster.peers")
    if me and not (peers or service):
        raise ConfigError(message="cluster.self is set but cluster.peers is empty")
    keep_local = data.get("keep_local", True)
    if not isinstance(keep_local, bool):
        raise ConfigError(message=f"cluster.keep_local: expected true or false, got {keep_local!r}")
    max_fails = data.get("max_fails", 1)
    if isinstance(max_fails, bool) or not isinstance(max_fails, int) or max_fails < 0:
        raise ConfigError(message=f"cluster.max_fails: expected a whole number >= 0, "
                          f"got {max_fails!r}")
    defaults = {"resolve_interval": 30, "fail_timeout": 10, "connect_timeout": 3,
                "read_timeout": 0}
    given = {**defaults, **{k: data[k] for k in defaults if k in data}}
    return Cluster(
        tuple(peers), me, keep_local, service,
        resolve_interval=_seconds(given, "cluster.resolve_interval"),
        max_fails=max_fails,
        fail_timeout=_seconds(given, "cluster.fail_timeout"),
        connect_timeout=_seconds(given, "cluster.connect_timeout"),
        read_timeout=_seconds(given, "cluster.read_timeout", allow_zero=True),
    )


def _loopback_address(data: Mapping[str, Any], key: str) -> LoopbackAddress:
    """host:port on a loopback address (the listener trusts the PROXY line
    its peer sends); port 0 means any free port."""
    text = str(data.get(_leaf(key)) or "127.0.0.1:0")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not loopback or not PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ConfigError(message=f"{key}: {text!r} is not loopback-address:port")
    return LoopbackAddress(host, int(port))


def _credentials(value: Any, key: str, environ: Mapping[str, str]) -> Credentials:
    if not isinstance(value, Mapping):
        raise ConfigError(message=f"{key}: expected a mapping")
    allowed = {"username", "password", "password_file", "password_env"} | {
        "token",
        "token_file",
        "token_env",
    }
    for k in value:
        if k not in allowed:
            raise ConfigError(message=f"unknown setting '{key}.{k}'")
    password = _secret(value, "password", key, environ)
    token = _secret(value, "token", key, environ)
    username = value.get("username") or ""
    if password and not username:
        raise ConfigError(message=f"{key}: a password needs a username")
    if not (password or token):
        raise ConfigError(message=f"{key}: give a password or a token")
    return Credentials(str(username), password, token)


def _secret(value: Mapping[str, Any], name: str, key: str, environ: Mapping[str, str]) -> str:
    """A secret given inline, in a file, or in an environment variable."""
    if value.get(name):
        if not isinstance(value[name], str):
            raise ConfigError(message=f"{key}.{name}: quote it; YAML read {value[name]!r}, "
                                      "not the string you wrote")
        return value[name]
    if value.get(f"{name}_file"):
        path = Path(str(value[f"{name}_file"]))
        try:
            return path.read_text().strip()
        except OSError as err:
            raise ConfigError(
                message=f"{key}.{name}_file: cannot read {path}: {err.strerror}"
            ) from err
    if value.get(f"{name}_env"):
        var = str(value[f"{name}_env"])
        if var not in environ:
            raise ConfigError(message=f"{key}.{name}_env: variable {var} is not set")
        return environ[var]
    return ""


def _mqtt(data: Mapping[str, Any], environ: Mapping[str, str]) -> Mqtt:
    broker = _str(data, "mqtt.broker", allow_empty=True)
    qos = data.get("qos")
    if isinstance(qos, bool) or qos not in MQTT_QOS:
        raise ConfigError(message=f"mqtt.qos: expected 0, 1 or 2, got {qos!r}")
    password = _secret(data, "password", "mqtt", environ)
    settings = Mqtt(
        broker=broker,
        client_id=_str(data, "mqtt.client_id"),
        username=_str(data, "mqtt.username", allow_empty=True),
        password=password,
        ca_file=_str(data, "mqtt.ca_file", allow_empty=True),
        domain_id=_str(data, "mqtt.domain_id", allow_empty=True),
        channel_id=_str(data, "mqtt.channel_id", allow_empty=True),
        qos=int(qos),
        chunk_size=_count(data, "mqtt.chunk_size"),
        max_deliveries=_count(data, "mqtt.max_deliveries"),
    )
    if settings.chunk_size > MAX_MQTT_CHUNK:
        raise ConfigError(message=f"mqtt.chunk_size: at most {MAX_MQTT_CHUNK} bytes, "
                                  f"got {settings.chunk_size}")
    if not broker:
        return settings
    parts = urlsplit(broker)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in MQTT_SCHEMES or not parts.hostname or not port_ok or (
        parts.path not in ("", "/")
    ):
        raise ConfigError(message=f"mqtt.broker: {broker!r} is not tcp://host:port or "
                                  "ssl://host:port")
    for key in ("domain_id", "channel_id"):
        if not TOPIC_LEVEL_RE.fullmatch(getattr(settings, key)):
            raise ConfigError(message=f"mqtt.{key}: needed with mqtt.broker, one topic level "
                                      f"(no /, + or #), got {getattr(settings, key)!r}")
    if password and not settings.username:
        raise ConfigError(message="mqtt: a password needs a username")
    return settings
