"""The client matrix in the production-like bed (testbed/realnames.py):
each client in each mode pulls docker.io/library/app:v1 through cr-proxy
online, then with the cable out (tests.test_e2e_realnames.outage), the
image checked by its id / digests each time; then an image never cached,
whose failure must name the reason ("... is not in the cache, and
registry-1.docker.io is unreachable") where the client prints it. Clients
run in the bed's clients' namespace: no route but to cr-proxy, so a client
that falls back to Docker Hub itself fails on the spot. docs/clients.md is
this matrix written out. skopeo (both modes) is in test_e2e_realnames.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testbed.crproxy import clean_env
from tests.clients import Containerd, Dockerd, podman, podman_cleanup
from tests.conftest import Bed
from tests.test_e2e_realnames import IMAGE, NEVER, REASON, outage, trust_dir

# What every Go client says of a certificate from a CA it does not trust.
UNKNOWN_CA = "x509: certificate signed by unknown authority"
CTR_FAILED = 'ctr: failed to resolve reference "docker.io/library/app:v1"'

# --------------------------------------------------------------------------- dockerd


@contextmanager
def dockerd(bed: Bed, tmp_path: Path, *, proxy: bool = False, ca: bool = True,
            config: dict[str, object] | None = None) -> Iterator[Dockerd]:
    """dockerd in the clients' namespace; through the https_proxy with
    cr-proxy's CA as SSL_CERT_FILE (`ca`), or not."""
    ca_file = bed.cr.ca_cert if proxy and ca else None
    with Dockerd(tmp_path / "docker", bed.proxy_url if proxy else None, ca_file,
                 netns=bed.net.cl.prefix_keep_sys(), config=config) as daemon:
        yield daemon


def docker_round_trip(bed: Bed, daemon: Dockerd) -> tuple[str, str]:
    """Pull online, then offline; return what the never-cached pull printed
    and what dockerd logged meanwhile."""
    for phase in ("online", "offline"):
        with outage(bed) if phase == "offline" else _nothing():
            pulled = daemon.docker("pull", IMAGE)
            assert pulled.returncode == 0, (phase, pulled.stderr,
                                            daemon.log.read_text()[-3000:])
            info = json.loads(daemon.docker("image", "inspect", IMAGE).stdout)[0]
            assert info["Id"] == bed.image.config_digest, phase
            # Docker's familiar name: docker.io/library/ dropped.
            assert f"app@{bed.image.manifest_digest}" in info["RepoDigests"], (
                phase, info["RepoDigests"])
            assert daemon.docker("rmi", IMAGE).returncode == 0
            if phase == "offline":
                logged = len(daemon.log.read_text())
                never = daemon.docker("pull", NEVER)
                assert never.returncode != 0
                return never.stderr, daemon.log.read_text()[logged:]
    raise AssertionError("unreachable")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def assert_mirror_fell_back(never: tuple[str, str]) -> None:
    """dockerd takes a mirror's 404 as a reason to try the next endpoint,
    Docker Hub itself (here: no resolver, no route), and prints only the
    last endpoint's error; the mirror's reason is in its log."""
    printed, logged = never
    assert REASON not in printed, printed
    assert 'Get "https://registry-1.docker.io/v2/"' in printed, printed
    assert f"Attempting next endpoint for pull after error: manifest unknown: {REASON}" in (
        logged), logged


def docker_untrusted(bed: Bed, tmp_path: Path, **how: object) -> tuple[str, str]:
    """A dockerd without cr-proxy's CA: what a pull prints, what it logs."""
    with dockerd(bed, tmp_path / "untrusted", **how) as daemon:  # type: ignore[arg-type]
        pulled = daemon.docker("pull", IMAGE)
        assert pulled.returncode != 0
        return pulled.stderr, daemon.log.read_text()


def test_dockerd_https_proxy(bed: Bed, tmp_path: Path) -> None:
    printed, _ = docker_untrusted(bed, tmp_path, proxy=True, ca=False)
    assert f'Error response from daemon: Get "https://registry-1.docker.io/v2/": {UNKNOWN_CA}' in (
        printed), printed
    with dockerd(bed, tmp_path, proxy=True) as daemon:
        printed, _ = docker_round_trip(bed, daemon)
    assert ("Error response from daemon: manifest for never:v1 not found: manifest unknown: "
            f"{REASON}") in printed, printed


def test_dockerd_registry_mirror_http(bed: Bed, tmp_path: Path) -> None:
    config = {"registry-mirrors": [f"http://{bed.mirror}"], "insecure-registries": [bed.mirror]}
    with dockerd(bed, tmp_path, config=config) as daemon:
        never = docker_round_trip(bed, daemon)
    assert_mirror_fell_back(never)


def test_dockerd_registry_mirror_https(bed: Bed, tmp_path: Path) -> None:
    """The CA in /etc/docker/certs.d/<mirror>/ca.crt, which dockerd reads
    from a fixed path: the clients' namespace gets an /etc/docker of its
    own (/etc/netns/<ns>/docker, bind-mounted by `ip netns exec`)."""
    config = {"registry-mirrors": [f"https://{bed.mirror_tls}"]}
    printed, logged = docker_untrusted(bed, tmp_path, config=config)
    assert 'Get "https://registry-1.docker.io/v2/"' in printed, printed
    assert UNKNOWN_CA in logged, logged
    certs = bed.net.cl.etc / "docker" / "certs.d" / bed.mirror_tls
    certs.mkdir(parents=True)
    try:
        (certs / "ca.crt").write_bytes(bed.cr.ca_cert.read_bytes())
        with dockerd(bed, tmp_path, config=config) as daemon:
            never = docker_round_trip(bed, daemon)
    finally:
        shutil.rmtree(bed.net.cl.etc / "docker")
    assert_mirror_fell_back(never)


# --------------------------------------------------------------------------- containerd


def ctr_round_trip(bed: Bed, daemon: Containerd, pull: list[str],
                   env: dict[str, str] | None = None) -> str:
    for phase in ("online", "offline"):
        with outage(bed) if phase == "offline" else _nothing():
            result = daemon.ctr(*pull, IMAGE, env=env)
            assert result.returncode == 0, (phase, result.stderr)
            listed = daemon.ctr("images", "ls").stdout
            assert IMAGE in listed and bed.image.manifest_digest in listed, (phase, listed)
            check = daemon.ctr("images", "check")
            assert "complete" in check.stdout, (phase, check.stdout)
            # --sync: the garbage collection done before it returns, so
            # the next pull must fetch every blob again.
            assert daemon.ctr("images", "rm", "--sync", IMAGE).returncode == 0
            assert daemon.ctr("content", "ls", "-q").stdout.split() == [], phase
            if phase == "offline":
                never = daemon.ctr(*pull, NEVER, env=env)
                assert never.returncode != 0
                return never.stderr
    raise AssertionError("unreachable")


def hosts_dir(bed: Bed, tmp_path: Path, host: str, ca: Path | None) -> Path:
    """certs.d/docker.io/hosts.toml naming cr-proxy as docker.io's mirror.
    The server (the fallback) is Docker Hub, which the clients' namespace
    cannot reach."""
    hosts = tmp_path / "certs.d"
    (hosts / "docker.io").mkdir(parents=True)
    ca_line = f'  ca = "{ca}"\n' if ca else ""
    (hosts / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        f'[host."{host}"]\n  capabilities = ["pull", "resolve"]\n{ca_line}')
    return hosts


def test_containerd_hosts_toml_http(bed: Bed, tmp_path: Path) -> None:
    hosts = hosts_dir(bed, tmp_path, f"http://{bed.mirror}", None)
    with Containerd(tmp_path / "containerd", bed.net.cl.prefix()) as daemon:
        never = ctr_round_trip(bed, daemon, ["images", "pull", "--hosts-dir", str(hosts)])
    assert_containerd_fell_back(never, bed.mirror)


def assert_containerd_fell_back(printed: str, mirror: str) -> None:
    """containerd resolves a tag with HEAD, whose 404 has no body to carry
    a reason; it takes the 404 as a cue to try the next host, the server
    (Docker Hub: here no resolver, no route), and prints that one's error."""
    assert REASON not in printed, printed
    assert f'"trying next host - response was http.StatusNotFound" host="{mirror}"' in (
        printed), printed
    assert ('ctr: failed to resolve reference "docker.io/library/never:v1": failed to do '
            'request: Head "https://registry-1.docker.io/v2/library/never/manifests/v1"'
            ) in printed, printed


def test_containerd_hosts_toml_https_with_ca(bed: Bed, tmp_path: Path) -> None:
    untrusting = hosts_dir(bed, tmp_path / "untrusted", f"https://{bed.mirror_tls}", None)
    hosts = hosts_dir(bed, tmp_path, f"https://{bed.mirror_tls}", bed.cr.ca_cert)
    with Containerd(tmp_path / "containerd", bed.net.cl.prefix()) as daemon:
        refused = daemon.ctr("images", "pull", "--hosts-dir", str(untrusting), IMAGE)
        assert refused.returncode != 0
        assert (f'{CTR_FAILED}: failed to do request: Head "https://{bed.mirror_tls}/v2/'
                f'library/app/manifests/v1?ns=docker.io": {UNKNOWN_CA}') in refused.stderr, (
            refused.stderr)
        never = ctr_round_trip(bed, daemon, ["images", "pull", "--hosts-dir", str(hosts)])
    assert_containerd_fell_back(never, bed.mirror_tls)


def test_ctr_https_proxy(bed: Bed, tmp_path: Path) -> None:
    """ctr fetches on the client side: HTTPS_PROXY and the CA in its own
    environment."""
    env = {"HTTPS_PROXY": bed.proxy_url, "HTTP_PROXY": bed.proxy_url, "NO_PROXY": "",
           "SSL_CERT_FILE": str(bed.cr.ca_cert)}
    with Containerd(tmp_path / "containerd", bed.net.cl.prefix()) as daemon:
        refused = daemon.ctr("images", "pull", IMAGE, env={
            **clean_env(), **{k: v for k, v in env.items() if k != "SSL_CERT_FILE"}})
        assert refused.returncode != 0
        assert (f'{CTR_FAILED}: failed to do request: Head "https://registry-1.docker.io/v2/'
                f'library/app/manifests/v1": {UNKNOWN_CA}') in refused.stderr, refused.stderr
        never = ctr_round_trip(bed, daemon, ["images", "pull"], env={**clean_env(), **env})
    # A HEAD's 404 (containerd resolves tags with HEAD) has no body to name
    # the reason: ctr says "not found".
    assert REASON not in never, never
    assert ('ctr: failed to resolve reference "docker.io/library/never:v1": '
            "docker.io/library/never:v1: not found") in never, never


# --------------------------------------------------------------------------- podman, buildah


def libpod_round_trip(bed: Bed, tmp_path: Path, tool: str, *, proxy: bool) -> tuple[str, str]:
    """podman or buildah, through the https_proxy or with a registries.conf
    mirror (cr-proxy's HTTPS mirror, docker.io by path prefix): first without
    cr-proxy's CA (an empty --cert-dir: the system's roots only), then with
    it, online and offline. Returns what the untrusting and the never-cached
    pulls printed."""
    work = tmp_path / tool
    trust = trust_dir(bed, tmp_path)
    no_trust = tmp_path / "no-trust"
    no_trust.mkdir()
    conf = None
    if not proxy:
        conf = tmp_path / "registries.conf"
        conf.write_text('unqualified-search-registries = []\n[[registry]]\n'
                        'location = "docker.io"\n[[registry.mirror]]\n'
                        f'location = "{bed.mirror_tls}/docker.io"\n')

    def run(*args: str, cert_dir: Path = trust) -> subprocess.CompletedProcess[str]:
        return podman(work, bed.proxy_url if proxy else None, cert_dir, *args,
                      netns=bed.net.cl.prefix(), registries_conf=conf, tool=tool)

    inspect = (["image", "inspect", "--format", "{{.Id}}"] if tool == "podman" else
               ["inspect", "--type", "image", "--format", "{{.FromImageID}}"])
    try:
        refused = run("pull", IMAGE, cert_dir=no_trust)
        assert refused.returncode != 0
        for phase in ("online", "offline"):
            with outage(bed) if phase == "offline" else _nothing():
                pulled = run("pull", IMAGE)
                assert pulled.returncode == 0, (phase, pulled.stderr)
                image_id = run(*inspect, IMAGE)
                assert f"sha256:{image_id.stdout.strip()}" == bed.image.config_digest, (
                    phase, image_id.stdout, image_id.stderr)
                assert run("rmi", IMAGE).returncode == 0
                if phase == "offline":
                    never = run("pull", NEVER)
                    assert never.returncode != 0
                    return refused.stderr, never.stderr
    finally:
        podman_cleanup(work, run, tool)
    raise AssertionError("unreachable")


def assert_libpod_proxy_messages(refused: str, never: str) -> None:
    assert ('pinging container registry registry-1.docker.io: Get '
            f'"https://registry-1.docker.io/v2/": {UNKNOWN_CA}') in refused, refused
    assert ("reading manifest v1 in docker.io/library/never: manifest unknown: "
            f"{REASON}") in never, never


def assert_libpod_mirror_messages(bed: Bed, refused: str, never: str) -> None:
    """containers/image tries the mirror, then docker.io itself (here: no
    resolver, no route), and prints both errors: the mirror's reason too."""
    mirror = bed.mirror_tls
    assert (f"(Mirrors also failed: [{mirror}/docker.io/library/app:v1: pinging container "
            f'registry {mirror}: Get "https://{mirror}/v2/": {UNKNOWN_CA}]') in refused, refused
    assert (f"(Mirrors also failed: [{mirror}/docker.io/library/never:v1: reading manifest "
            f"v1 in {mirror}/docker.io/library/never: manifest unknown: {REASON}]") in never, never


def test_podman_https_proxy(bed: Bed, tmp_path: Path) -> None:
    refused, never = libpod_round_trip(bed, tmp_path, "podman", proxy=True)
    assert_libpod_proxy_messages(refused, never)


def test_podman_registries_conf_mirror(bed: Bed, tmp_path: Path) -> None:
    refused, never = libpod_round_trip(bed, tmp_path, "podman", proxy=False)
    assert_libpod_mirror_messages(bed, refused, never)


def test_buildah_https_proxy(bed: Bed, tmp_path: Path) -> None:
    refused, never = libpod_round_trip(bed, tmp_path, "buildah", proxy=True)
    assert_libpod_proxy_messages(refused, never)


def test_buildah_registries_conf_mirror(bed: Bed, tmp_path: Path) -> None:
    refused, never = libpod_round_trip(bed, tmp_path, "buildah", proxy=False)
    assert_libpod_mirror_messages(bed, refused, never)

