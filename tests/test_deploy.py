"""The deployment files (Dockerfile, docker-compose.yml, deploy/): valid for
their tools, and in agreement with each other and with cr-proxy's settings.

docker-compose.yml is checked by `docker-compose config -q` and the systemd
unit by `systemd-analyze verify`; both tools must be installed (make test
installs docker-compose; systemd-analyze is in Debian's systemd package).
The image itself is not built: there is no Docker engine in CI. Its
Dockerfile is checked statically here: COPY sources exist and reach the
build context, the install keeps the nginx templates where cr_proxy/nginx.py
looks for them, and every CR_PROXY_* variable names a real setting.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from cr_proxy import config, nginx, serve
from cr_proxy.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
UNIT = REPO / "deploy/cr-proxy.service"
ENV_FILE = REPO / "deploy/cr-proxy.env"
EXAMPLE = REPO / "deploy/cr-proxy.yml"

CONFIG_PATH = "/etc/cr-proxy/cr-proxy.yml"
VENV_BIN = "/opt/cr-proxy/.venv/bin/cr-proxy"
CMD = ["cr-proxy", "serve", "--config", CONFIG_PATH]


# --- reading the files ---------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuations joined
    (comment lines inside a continued instruction are dropped, as Docker does)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        if whole:
            word, _, rest = whole.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def words(args: str) -> list[str]:
    """Exec (JSON) form or shell-like words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


def copies() -> dict[str, PurePosixPath]:
    """Each COPY source (from the build context) and where it lands: a
    directory's contents go into the destination; a file goes into it when
    it is a directory (trailing slash, or several sources)."""
    out: dict[str, PurePosixPath] = {}
    workdir = PurePosixPath("/")
    for word, args in dockerfile():
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            parts = words(args)
            assert not any(p.startswith("--from") for p in parts), "COPY --from: not expected"
            *sources, dest = [p for p in parts if not p.startswith("--")]
            into = workdir / dest
            for source in sources:
                name = source.rstrip("/")
                is_dir = (REPO / name).is_dir()
                if not is_dir and (dest.endswith("/") or len(sources) > 1):
                    out[name] = into / PurePosixPath(name).name
                else:
                    out[name] = into
    return out


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` (relative to the repository) out of
    the build context: a pattern matching it or one of its parents."""
    patterns = dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "exceptions: teach this test"
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatchcase(prefix, pattern.rstrip("/"))
        for pattern in patterns
        for prefix in prefixes
    )


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service() -> dict:
    return compose_raw()["services"]["cr-proxy"]


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def example_config(environ: dict[str, str] | None = None) -> config.Config:
    return config.load(EXAMPLE, environ={} if environ is None else environ)


def health_urls(command: list[str]) -> list[str]:
    found = re.findall(r"https?://[^'\"\s]+", " ".join(command))
    assert len(found) == 2, f"two URLs expected in the health check {command}"
    return found


# --- the CR_PROXY_* variables each file names ------------------------------------


def compose_variables() -> dict[str, str]:
    """The service's environment, and the commented examples beside it."""
    env = {k: str(v) for k, v in (service().get("environment") or {}).items()}
    for match in re.finditer(r"^\s*#\s*(CR_PROXY_\w+):\s*(.+?)\s*$", COMPOSE.read_text(), re.M):
        env[match[1]] = str(yaml.safe_load(match[2]))
    return env


def env_file_variables() -> dict[str, str]:
    """Every CR_PROXY_* line, commented or not, read as systemd reads
    EnvironmentFile= (one pair of surrounding quotes removed)."""
    env = {}
    for match in re.finditer(r"^#?(CR_PROXY_\w+)=(.*)$", ENV_FILE.read_text(), re.M):
        value = match[2].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[match[1]] = value
    return env


VARIABLE_SOURCES = {
    "Dockerfile": (lambda: {k: v for k, v in dockerfile_env().items()
                            if k.startswith(config.ENV_PREFIX)}, 3),
    "docker-compose.yml": (compose_variables, 2),
    "deploy/cr-proxy.env": (env_file_variables, 5),
}


@pytest.mark.parametrize("source", sorted(VARIABLE_SOURCES))
def test_every_cr_proxy_variable_names_a_real_setting(source: str) -> None:
    read, at_least = VARIABLE_SOURCES[source]
    variables = read()
    assert len(variables) >= at_least, f"{source}: expected {at_least}+ CR_PROXY_* variables"
    for var, value in variables.items():
        try:
            config.load(None, environ={var: value})
        except ConfigError as err:
            pytest.fail(f"{source}: {var}={value!r} is refused: {err.message}")
    # All of them at once, over the deployment's configuration file.
    example_config(variables)


# --- docker-compose.yml ------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is not installed: run `make test`, which installs it "
                    "(apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"docker-compose config -q: {result.stderr}"
    result = subprocess.run([tool, "-f", str(COMPOSE), "config"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]["cr-proxy"]
    assert Path(resolved["build"]["context"]) == REPO
    assert resolved["restart"] == "unless-stopped"
    assert resolved["stop_signal"] == "SIGTERM"
    assert resolved["stop_grace_period"] == "15s"
    assert {"CR_PROXY_TAG_TTL", "CR_PROXY_LOG_LEVEL"} <= set(resolved["environment"])


def test_compose_volumes_ports_and_health_check_match_the_settings() -> None:
    conf = example_config(dockerfile_env() | compose_variables())
    svc = service()
    mounts = {}
    for volume in svc["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    assert mounts[str(conf.cache_dir)] == "cache"
    assert mounts[str(conf.certs_dir)] == "certs"
    assert set(compose_raw()["volumes"]) == {"cache", "certs"}
    assert mounts[CONFIG_PATH] == "./deploy/cr-proxy.yml"
    listen = [conf.listen.proxy, conf.listen.mirror_http, conf.listen.mirror_https]
    assert sorted(svc["ports"]) == sorted(f"{a.port}:{a.port}" for a in listen)
    assert svc["healthcheck"]["test"][0] == "CMD"
    assert svc["healthcheck"]["test"][1:] == words(health_instruction())
    # stop_grace_period must outlast serve's grace for nginx.
    assert float(svc["stop_grace_period"].rstrip("s")) > serve.STOP_GRACE


# --- Dockerfile --------------------------------------------------------------------


def health_instruction() -> str:
    (args,) = instructions("HEALTHCHECK")
    _, _, command = args.partition(" CMD ")
    assert command, "HEALTHCHECK: expected options then CMD [...]"
    return command.strip()


def test_dockerfile_base_and_packages() -> None:
    assert instructions("FROM") == ["debian:bookworm-slim"]
    runs = " ".join(instructions("RUN"))
    for package in ("nginx", "libnginx-mod-http-js", "python3", "python3-venv",
                    "ca-certificates"):
        assert re.search(rf"apt-get install [^&]*\s{re.escape(package)}(\s|$)", runs), package
    assert "--no-install-recommends" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_dockerfile_copy_sources_exist_and_reach_the_build_context() -> None:
    found = copies()
    assert found, "no COPY in Dockerfile"
    for source in found:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
        files = [path] if path.is_file() else [
            f for f in path.rglob("*")
            if f.is_file() and f.suffix in {".py", ".yml", ".conf", ".js"}
        ]
        assert files, f"COPY {source}: nothing to copy"
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert not ignored(relative), f"{relative}: excluded by .dockerignore"
    for local in (".git", ".venv", "cache", "certs", "run", "cr_proxy/__pycache__"):
        assert ignored(local), f".dockerignore should leave {local} out of the build context"


def test_dockerfile_keeps_templates_beside_the_installed_package() -> None:
    # nginx.py's rule, which the image's layout relies on: the templates are
    # the sibling `nginx` of the package's directory (if that rule changes,
    # revisit the Dockerfile's install).
    package_dir = Path(nginx.__file__).resolve().parent
    assert nginx.TEMPLATE_DIR.relative_to(package_dir.parent) == Path("nginx")
    landed = copies()
    package, templates = landed["cr_proxy"], landed["nginx"]
    assert package.name == "cr_proxy" and templates.name == "nginx"
    assert package.parent == templates.parent, "cr_proxy/ and nginx/ must be siblings"
    assert landed["pyproject.toml"].parent == package.parent
    root = package.parent.as_posix()
    runs = " ".join(instructions("RUN"))
    # Editable: the package is imported from root/cr_proxy, next to root/nginx.
    assert re.search(rf"pip install (--\S+ )*-e {re.escape(root)}(\s|$)", runs), runs
    assert f"{root}/.venv" in runs
    assert PurePosixPath(VENV_BIN) == PurePosixPath(root, ".venv/bin/cr-proxy")
    assert landed["deploy/cr-proxy.yml"] == PurePosixPath(CONFIG_PATH)


def test_dockerfile_runtime_settings_agree_with_the_configuration() -> None:
    env = dockerfile_env()
    conf = example_config()
    assert env["CR_PROXY_CACHE_DIR"] == str(conf.cache_dir) == "/var/cache/cr-proxy"
    assert env["CR_PROXY_CERTS_DIR"] == str(conf.certs_dir) == "/var/lib/cr-proxy/certs"
    assert env["CR_PROXY_RUN_DIR"] == str(conf.run_dir) == "/run/cr-proxy"
    assert env["PATH"].startswith(str(PurePosixPath(VENV_BIN).parent) + ":")
    assert instructions("WORKDIR")[-1] == "/var/lib/cr-proxy"
    (volumes,) = instructions("VOLUME")
    assert sorted(words(volumes)) == sorted([str(conf.cache_dir), str(conf.certs_dir)])
    listen = [conf.listen.proxy, conf.listen.mirror_http, conf.listen.mirror_https]
    exposed = {int(p) for args in instructions("EXPOSE") for p in args.split()}
    assert exposed == {a.port for a in listen}
    # nginx's /v2/ on the mirror port, and serve's own /metrics (the
    # fetcher's event loop): a stuck fetcher fails the check too.
    mirror, metrics = map(urlsplit, health_urls(words(health_instruction())))
    assert mirror.hostname == "127.0.0.1" and mirror.path == "/v2/"
    assert mirror.port == conf.listen.mirror_http.port
    assert metrics.hostname == conf.listen.metrics.host == "127.0.0.1"
    assert (metrics.path, metrics.port) == ("/metrics", conf.listen.metrics.port)
    assert instructions("USER") == ["cr-proxy"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (cmd,) = instructions("CMD")
    assert json.loads(cmd) == CMD


def test_example_configuration_renders_and_passes_nginx_t(tmp_path: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/bin",
           "CR_PROXY_CACHE_DIR": str(tmp_path / "cache"),
           "CR_PROXY_CERTS_DIR": str(tmp_path / "certs"),
           "CR_PROXY_RUN_DIR": str(tmp_path / "run")}
    result = subprocess.run(
        [sys.executable, "-m", "cr_proxy", "config", "--check", "--config", str(EXAMPLE)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "nginx configuration OK" in result.stderr


# --- the systemd unit ---------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is not installed: apt-get install systemd "
                    "(it runs offline; no running systemd is needed)")
    # verify checks that ExecStart's program exists and is executable; the
    # unit's /opt/cr-proxy is not installed here, so a stub stands in for it.
    # Everything else is verified as written.
    text = UNIT.read_text()
    assert text.count(f"ExecStart={VENV_BIN} ") == 1
    stub = tmp_path / "bin" / "cr-proxy"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "cr-proxy.service"
    copy.write_text(text.replace(f"ExecStart={VENV_BIN} ", f"ExecStart={stub} "))
    # verify exits 0 when it ignores a line (an unknown key: a warning; a bad
    # value such as KillMode=sometimes: only a notice, hidden by default), so
    # notices are shown and any line about the unit counts as a failure.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env["SYSTEMD_LOG_LEVEL"] = "info"
    result = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=env)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "cr-proxy.service" in line]
    assert result.returncode == 0 and not complaints, (
        f"systemd-analyze verify (exit {result.returncode}):\n"
        f"{result.stdout}{result.stderr}"
    )


def test_unit_runs_the_same_command_and_directories_as_the_image() -> None:
    service_section = unit()["Service"]
    expected = {
        "Type": "simple",
        "User": "cr-proxy",
        "ExecStart": f"{VENV_BIN} {' '.join(CMD[1:])}",
        "EnvironmentFile": "-/etc/cr-proxy/cr-proxy.env",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "StateDirectory": "cr-proxy",
        "CacheDirectory": "cr-proxy",
        "RuntimeDirectory": "cr-proxy",
        "RuntimeDirectoryMode": "0750",
        "WorkingDirectory": "/var/lib/cr-proxy",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "full",
        "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert service_section.get(key) == value, f"[Service] {key}"
    assert float(service_section["TimeoutStopSec"]) > serve.STOP_GRACE
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
    # The directories systemd makes are the ones the configuration uses.
    conf = example_config(env_file_variables())
    assert conf.cache_dir == Path("/var/cache") / service_section["CacheDirectory"]
    assert conf.certs_dir.parent == Path("/var/lib") / service_section["StateDirectory"]
    assert conf.run_dir == Path("/run") / service_section["RuntimeDirectory"]
    # And the image reads its configuration from the same place.
    assert ENV_FILE.name == PurePosixPath(service_section["EnvironmentFile"]).name


# --- Kubernetes (deploy/kubernetes/) -----------------------------------------------

KUBE_DIR = REPO / "deploy/kubernetes"
HEADLESS = "cr-proxy-peers"
CLIENT_SERVICE = "cr-proxy"
CA_SECRET = "cr-proxy-ca"


def kube_objects() -> dict[tuple[str, str], dict]:
    """Every object in deploy/kubernetes/*.yaml by (kind, name)."""
    out: dict[tuple[str, str], dict] = {}
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in out, f"{path.name}: {key} defined twice"
                out[key] = doc
    return out


def kube(kind: str, name: str) -> dict:
    return kube_objects()[(kind, name)]


def pod_spec(kind: str, name: str) -> dict:
    return kube(kind, name)["spec"]["template"]["spec"]


def only_container(kind: str, name: str) -> dict:
    (container,) = pod_spec(kind, name)["containers"]
    return container


def pod_ip(ordinal: int) -> str:
    """The address the kubelet would give pod <ordinal> (a pod network)."""
    return f"10.244.{ordinal}.7"


def statefulset_pod_env(ordinal: int) -> dict[str, str]:
    """The CR_PROXY_* environment of pod <ordinal>, $(VAR) expanded as the
    kubelet does (metadata.name is <statefulset>-<ordinal>)."""
    name = f"{kube('StatefulSet', 'cr-proxy')['metadata']['name']}-{ordinal}"
    fields = {"metadata.name": name, "status.podIP": pod_ip(ordinal)}
    env: dict[str, str] = {}
    for item in only_container("StatefulSet", "cr-proxy")["env"]:
        if "valueFrom" in item:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], item["value"])
    return {k: v for k, v in env.items() if k.startswith(config.ENV_PREFIX)}


def kube_config(tmp_path: Path, ordinal: int) -> config.Config:
    data = yaml.safe_load(kube("ConfigMap", "cr-proxy")["data"]["cr-proxy.yml"])
    env = statefulset_pod_env(ordinal)
    path = tmp_path / f"cr-proxy-{ordinal}.yml"
    path.write_text(yaml.safe_dump(data))
    return config.load(path, environ=env)


def test_kubernetes_manifests_pass_kubernetes_validate_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    # The schemas ship with the package: nothing may reach the network.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"kubernetes-validate tried the network: {args}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    version = latest_version()
    assert tuple(map(int, version.split("."))) >= (1, 33), f"schemas for {version}: too old"
    objects = kube_objects()
    assert set(objects) == {("ConfigMap", "cr-proxy"), ("Service", HEADLESS),
                            ("Service", CLIENT_SERVICE), ("StatefulSet", "cr-proxy"),
                            ("DaemonSet", "cr-proxy-node-config")}
    for (kind, name), doc in objects.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{kind}/{name}: {err.message} at {list(err.path)}")
    # The validator does refuse what Kubernetes would: a misspelt field.
    broken = kube("StatefulSet", "cr-proxy")
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kubernetes_configuration_is_valid_for_every_pod(tmp_path: Path) -> None:
    sts = kube("StatefulSet", "cr-proxy")
    replicas = sts["spec"]["replicas"]
    assert replicas >= 2
    data = yaml.safe_load(kube("ConfigMap", "cr-proxy")["data"]["cr-proxy.yml"])
    port = example_config().listen.mirror_http.port
    # Every pod through the headless Service's one name (its addresses are
    # the ring), each pod on it by its own address.
    assert data["cluster"]["peers"] == f"{HEADLESS}:{port}"
    for ordinal in range(replicas):
        conf = kube_config(tmp_path, ordinal)
        assert conf.listen.mirror_http.port == port
        assert conf.cluster.service == f"{HEADLESS}:{port}"
        assert conf.cluster.me == f"{pod_ip(ordinal)}:{port}"
    # Eviction bounds the cache below its volume's size.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    volume = config.parse_size(claim["spec"]["resources"]["requests"]["storage"]
                               .replace("Gi", "GiB"), "storage")
    assert 0 < kube_config(tmp_path, 0).cache.max_size < volume


def test_kubernetes_service_links_are_off_since_cr_proxy_reads_them_as_settings() -> None:
    # The kubelet names a Service's variables after it: cr-proxy ->
    # CR_PROXY_SERVICE_HOST, CR_PROXY_PORT... which cr-proxy refuses.
    link = {"CR_PROXY_SERVICE_HOST": "10.96.0.7", "CR_PROXY_PORT": "tcp://10.96.0.7:3128"}
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load(None, environ=link)
    assert pod_spec("StatefulSet", "cr-proxy")["enableServiceLinks"] is False


def test_kubernetes_statefulset_services_volumes_and_probes(tmp_path: Path) -> None:
    conf = kube_config(tmp_path, 0)
    sts = kube("StatefulSet", "cr-proxy")
    spec, pod = sts["spec"], pod_spec("StatefulSet", "cr-proxy")
    container = only_container("StatefulSet", "cr-proxy")
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels
    # Peer discovery: the headless Service, its pods published before ready.
    headless, client = kube("Service", HEADLESS), kube("Service", CLIENT_SERVICE)
    assert spec["serviceName"] == HEADLESS
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert client["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service in (headless, client):
        assert service["spec"]["selector"] == labels
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"]
    assert ports["mirror-http"] == conf.listen.mirror_http.port
    assert ports["mirror-https"] == conf.listen.mirror_https.port
    assert ports["proxy"] == conf.listen.proxy.port
    assert ports["metrics"] == conf.listen.metrics.port
    # The image's command, user and stop grace.
    assert container["args"] == CMD
    assert instructions("USER") == ["cr-proxy"]
    uid = re.search(r"useradd [^&]*--uid (\d+)", " ".join(instructions("RUN")))
    assert uid, "Dockerfile: useradd --uid"
    context = pod["securityContext"]
    assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == int(uid[1])
    assert pod["terminationGracePeriodSeconds"] > serve.STOP_GRACE
    # Ready: GET /v2/ on the mirror port, which nginx answers itself;
    # alive: /metrics, which serve's event loop (the fetcher's) answers.
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/", "port": "mirror-http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # Volumes: the configuration where CMD reads it, a persistent cache per
    # pod, and one CA (the Secret) for every pod.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[str(PurePosixPath(CONFIG_PATH).parent)]["name"] == "config"
    assert volumes["config"]["configMap"]["name"] == "cr-proxy"
    assert mounts[str(conf.cache_dir)]["name"] == "cache"
    assert [c["metadata"]["name"] for c in spec["volumeClaimTemplates"]] == ["cache"]
    assert "cache" not in volumes
    # The Secret is mounted in the init container only, which copies the CA
    # into the certs volume the server then uses as its own.
    certs_volume = mounts[str(conf.certs_dir)]["name"]
    assert "emptyDir" in volumes[certs_volume]
    assert not any(m.startswith(f"{conf.certs_dir}/") for m in mounts)
    env, init_mounts = ca_init()
    assert env["DEST"] == str(conf.certs_dir)
    assert init_mounts[env["DEST"]] == certs_volume
    assert volumes[init_mounts[env["SRC"]]]["secret"]["secretName"] == CA_SECRET
    assert mounts[str(conf.run_dir)]["name"] in volumes


def ca_init() -> tuple[dict[str, str], dict[str, str]]:
    """The StatefulSet's init container "ca": its env and its mounts (path ->
    volume)."""
    (init,) = pod_spec("StatefulSet", "cr-proxy")["initContainers"]
    assert init["name"] == "ca" and init["image"] == only_container(
        "StatefulSet", "cr-proxy")["image"]
    return ({e["name"]: e["value"] for e in init["env"]},
            {m["mountPath"]: m["name"] for m in init["volumeMounts"]})


def run_ca_init(src: Path, dest: Path) -> None:
    """The init container's script, run as the pod would run it."""
    (init,) = pod_spec("StatefulSet", "cr-proxy")["initContainers"]
    shell, flag, script = init["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    subprocess.run(["sh", "-c", script], check=True, timeout=30,
                   env={"PATH": os.environ["PATH"], "SRC": str(src), "DEST": str(dest)})


def node_config() -> tuple[str, dict[str, str]]:
    """The DaemonSet's script and its environment."""
    container = only_container("DaemonSet", "cr-proxy-node-config")
    shell, flag, script = container["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    return script, {e["name"]: e["value"] for e in container["env"]}


@contextmanager
def node_config_running(env: dict[str, str], expect: list[Path]) -> Iterator[None]:
    """Run the DaemonSet's script (as the node's pod would, under sh) until
    the files in `expect` exist; stop it on leaving."""
    script, _ = node_config()
    proc = subprocess.Popen(["sh", "-c", script], env={"PATH": os.environ["PATH"], **env},
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all(path.exists() for path in expect):
            assert proc.poll() is None, f"node-config exited: {proc.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "node-config wrote nothing in 30 s"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_kubernetes_node_config_writes_containerd_hosts_toml(tmp_path: Path) -> None:
    _, env = node_config()
    ds_pod = pod_spec("DaemonSet", "cr-proxy-node-config")
    container = only_container("DaemonSet", "cr-proxy-node-config")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in ds_pod["volumes"]}
    # containerd's directory on the node, and the CA's certificate only.
    host = volumes[mounts[env["CONFIG_PATH"]]]["hostPath"]
    assert host == {"path": env["CONFIG_PATH"], "type": "DirectoryOrCreate"}
    ca_volume = volumes[mounts[str(PurePosixPath(env["CA_FILE"]).parent)]]["secret"]
    assert ca_volume["secretName"] == CA_SECRET
    assert ca_volume["items"] == [{"key": "ca.crt", "path": PurePosixPath(env["CA_FILE"]).name}]
    # The mirror: the client Service's HTTP port.
    assert env["MIRROR_SERVICE"] == CLIENT_SERVICE
    client_ports = {p["name"]: p["port"] for p in kube("Service", CLIENT_SERVICE)["spec"]["ports"]}
    assert int(env["MIRROR_PORT"]) == client_ports[f"mirror-{env['MIRROR_SCHEME']}"]

    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nAA==\n")
    registries = env["REGISTRIES"].split()
    assert "docker.io" in registries
    for scheme in ("http", "https"):
        hosts = tmp_path / scheme / "certs.d"
        run_env = env | {"CONFIG_PATH": str(hosts), "CA_FILE": str(tmp_path / "ca.crt"),
                         "MIRROR_SERVICE": "localhost", "MIRROR_SCHEME": scheme,
                         "REGISTRIES": f"{env['REGISTRIES']} lab.test:5000=http://10.0.0.9:5000"}
        files = [hosts / r / "hosts.toml" for r in [*registries, "lab.test:5000"]]
        with node_config_running(run_env, files):
            pass
        assert (hosts / "cr-proxy-ca.crt").read_text() == (tmp_path / "ca.crt").read_text()
        for registry, path in zip([*registries, "lab.test:5000"], files, strict=True):
            parsed = tomllib.loads(path.read_text())
            server = {"docker.io": "https://registry-1.docker.io",
                      "lab.test:5000": "http://10.0.0.9:5000"}.get(registry,
                                                                 f"https://{registry}")
            assert parsed["server"] == server
            ((url, entry),) = parsed["host"].items()
            parts = urlsplit(url)
            assert parts.scheme == scheme and parts.port == int(env["MIRROR_PORT"])
            assert parts.hostname in {"127.0.0.1", "::1"}
            assert entry["capabilities"] == ["pull", "resolve"]
            if scheme == "https":
                assert entry["ca"] == str(hosts / "cr-proxy-ca.crt")
            else:
                assert "ca" not in entry


# --- the three-node lab (deploy/compose/) -------------------------------------------

LAB = REPO / "deploy/compose/docker-compose.yml"
LAB_CONFIG = REPO / "deploy/compose/cr-proxy.yml"


def test_lab_compose_file_is_valid_for_docker_compose() -> None:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is not installed: run `make test`"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run([tool, "-f", str(LAB), "config"], cwd=LAB.parent, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"docker-compose config: {result.stderr}"
    services = yaml.safe_load(result.stdout)["services"]
    assert sorted(services) == ["node1", "node2", "node3"]
    for service in services.values():
        assert Path(service["build"]["context"]) == REPO


def test_lab_every_node_has_a_valid_configuration(tmp_path: Path) -> None:
    services = yaml.safe_load(LAB.read_text())["services"]
    data = yaml.safe_load(LAB_CONFIG.read_text())
    port = example_config().listen.mirror_http.port
    assert data["cluster"]["peers"] == [f"{name}:{port}" for name in sorted(services)]
    path = tmp_path / "cr-proxy.yml"
    path.write_text(yaml.safe_dump(data))
    host_ports = set()
    for name, service in services.items():
        env = dockerfile_env() | {k: str(v) for k, v in service["environment"].items()}
        assert env["CR_PROXY_CLUSTER__SELF"] == f"{name}:{port}"
        conf = config.load(path, environ={k: v for k, v in env.items()
                                          if k.startswith(config.ENV_PREFIX)})
        assert name in conf.mirror_names
        assert conf.cluster.me == f"{name}:{port}"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[CONFIG_PATH] == "./cr-proxy.yml"
        # The CA copied into certs_dir before serve starts (as the
        # StatefulSet's init container does), then the image's command.
        assert mounts["/etc/cr-proxy-ca"] == "./ca"
        shell, flag, script = service["command"]
        assert (shell, flag) == ("/bin/sh", "-c")
        for name, mode in (("ca.key", "0600"), ("ca.crt", "0640")):
            assert f"install -m {mode} /etc/cr-proxy-ca/{name} {conf.certs_dir / name}" in script
        assert script.endswith(f"&& exec {' '.join(CMD)}")
        assert mounts[str(conf.cache_dir)].startswith("cache")
        inside = {int(p.split(":")[1]) for p in service["ports"]}
        assert inside == {conf.listen.proxy.port, conf.listen.mirror_http.port,
                          conf.listen.mirror_https.port}
        for published in service["ports"]:
            assert published.split(":")[0] not in host_ports, f"{name}: {published} taken"
            host_ports.add(published.split(":")[0])
