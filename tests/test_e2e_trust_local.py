"""Local users (issue 10, finding 15), through `cr-proxy serve` started as root
(the test suite runs as root): nginx's workers drop to www-data (nginx.user
auto) and still serve hits in both modes; other local users (`nobody`) reach
no socket, no cache file, no certificate; the workers cannot read the CA key;
a local process that writes its own PROXY line to nginx's TLS port for the
front gets no answer, so it cannot pass for a client the front refuses.

pytest's temporary directories are 0700 (/tmp/pytest-of-root), which the
workers may not enter (so the other e2e tests run with root workers, serve
warning why): these tests serve from a directory of their own that other
users may cross (0711), as /var/cache is.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed.crproxy import CrProxy, clean_env, layout_blobs, skopeo_pull
from testbed.ports import free_ports
from testbed.registry import Upstream
from tests.conftest import Images, proxy_endpoints
from tests.test_e2e_mirror import expected_digests

WORKERS = "www-data"  # what nginx.user: auto picks on Debian
OTHER = "nobody"  # a local user with no part in cr-proxy
FRONT_CLIENT = "127.0.0.2"  # the only address proxy.allow_clients lets in
# Probes run as other users: Debian's python3 (make installs it), which
# they may run; the test's own interpreter may live where they cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Served:
    cr: CrProxy
    front_tls: int  # nginx's TLS port for the front (listen.front_tls)
    layer: str  # a layer of registry.test/small:v1, cached by a mirror pull


@pytest.fixture(scope="module")
def crossable_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 tree that others may cross, not list."""
    path = Path(tempfile.mkdtemp(prefix="cr-proxy-trust-local-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def served(
    upstream: Upstream, images: Images, crossable_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    proxy_port, front_tls = free_ports(2)
    cr = CrProxy(crossable_dir / "crproxy", proxy_endpoints(upstream),
                 listen_proxy=f"127.0.0.1:{proxy_port}",
                 proxy={"allow_clients": [f"{FRONT_CLIENT}/32"]})
    cr.config["listen"]["front_tls"] = f"127.0.0.1:{front_tls}"
    with cr:
        out = tmp_path_factory.mktemp("pulled")
        result = skopeo_pull(f"{cr.http}/registry.test/small:v1", out)
        assert result.returncode == 0, result.stderr + cr.log_text()[-3000:]
        assert expected_digests(images.small) <= set(layout_blobs(out))
        yield Served(cr, front_tls, images.small.layer_digests[0])


# --- helpers ------------------------------------------------------------------------------------


def nginx_workers(cr: CrProxy) -> list[int]:
    """The pids whose parent is the nginx master."""
    master = (cr.run_dir / "nginx.pid").read_text().strip()
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if fields[1] == master:
                children.append(int(entry.name))
    return children


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def as_user(name: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Python code run as another user, with exactly that user's groups."""
    entry = pwd.getpwnam(name)
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code, *args],
        user=entry.pw_uid, group=entry.pw_gid,
        extra_groups=os.getgrouplist(name, entry.pw_gid),
        capture_output=True, text=True, timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin"},
    )


# Prints, for each path, "ok" or the errno name of opening it (a file) or
# connecting to it (a unix socket).
PROBE = """
import errno, socket, stat, sys, os
for path in sys.argv[1:]:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            socket.socket(socket.AF_UNIX).connect(path)
        else:
            open(path, "rb").read(1)
        print("ok")
    except OSError as err:
        print(errno.errorcode.get(err.errno, str(err.errno)))
"""


def probe(user: str, *paths: Path) -> list[str]:
    result = as_user(user, PROBE, *map(str, paths))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def blob_path(cr: CrProxy, digest: str) -> Path:
    return cr.cache / "blobs" / "sha256" / digest.split(":", 1)[1]


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ssl.SSLError, ConnectionResetError):
        pass  # nginx's 444 closes without a TLS close_notify
    return data


def spoofed_request(served: Served, claimed: str, path: str) -> bytes:
    """What a local process gets that connects to nginx's TLS port for the
    front itself and writes the PROXY line the front would have written for
    `claimed` (the old front's: destination 127.0.0.1, the CONNECT port)."""
    context = ssl.create_default_context(cafile=str(served.cr.ca_cert))
    with socket.create_connection(("127.0.0.1", served.front_tls), timeout=30) as raw:
        raw.sendall(f"PROXY TCP4 {claimed} 127.0.0.1 40000 443\r\n".encode())
        with context.wrap_socket(raw, server_hostname="registry.test") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: registry.test\r\n"
                        "Connection: close\r\n\r\n".encode())
            return read_until_closed(tls)


def curl_through_front(served: Served, path: str, dest: Path) -> dict[str, str]:
    """GET https://registry.test<path> through the front from FRONT_CLIENT;
    the response headers (lower-case names)."""
    cr = served.cr
    result = subprocess.run(
        ["curl", "-sS", "--interface", FRONT_CLIENT, "-x", f"http://127.0.0.1:{cr.proxy_port}",
         "--cacert", str(cr.ca_cert), "-D", "-", "-o", str(dest),
         f"https://registry.test{path}"],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )
    assert result.returncode == 0, result.stderr + cr.log_text()[-3000:]
    # The proxy's "200 Connection established" block, then the server's.
    lines = result.stdout.strip().split("\n\n")[-1].splitlines()
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return {"status": lines[0], **{k.lower(): v.strip() for k, v in headers.items()}}


# --- the tests -----------------------------------------------------------------------------------


def test_workers_run_as_www_data_and_serve_hits_in_both_modes(
    served: Served, tmp_path: Path
) -> None:
    cr = served.cr
    workers = nginx_workers(cr)
    assert workers, "no nginx worker found"
    uid = pwd.getpwnam(WORKERS).pw_uid
    for pid in workers:
        assert uids(pid) == [uid] * 4, f"worker {pid} runs as {uids(pid)}"
    assert "cannot enter" not in cr.log_text()

    # Mirror mode: a cached blob and manifest, from disk by the workers.
    again = skopeo_pull(f"{cr.http}/registry.test/small:v1", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    # Each kind waited for on its own: two workers flush their lines a second
    # apart, so two blob lines may land before the manifest's.
    assert cr.access_lines("type=blob cache=HIT", at_least=1)
    assert cr.access_lines("type=manifest cache=HIT", at_least=1)

    # https_proxy mode: the first TLS handshake for registry.test picks its
    # new leaf by SNI (the workers read its key), then the blob is a hit.
    out = tmp_path / "blob"
    headers = curl_through_front(served, f"/v2/small/blobs/{served.layer}", out)
    assert " 200" in headers["status"], headers
    assert headers.get("x-cache") == "HIT", headers
    assert f"sha256:{hashlib.sha256(out.read_bytes()).hexdigest()}" == served.layer


def test_other_users_reach_no_socket_cache_file_or_certificate(served: Served) -> None:
    cr = served.cr
    workers_gid = grp.getgrnam(WORKERS).gr_gid
    roots = [cr.cache, cr.run_dir, Path(cr.config["certs_dir"])]
    entries = [p for root in roots for p in [root, *root.rglob("*")]]
    assert any(p.parent.name == "sha256" for p in entries), "nothing cached"
    for path in entries:
        st = path.lstat()
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0, f"{path} is {oct(st.st_mode)}"
        if path.is_dir():
            # setgid: what the fetcher makes inside stays in the workers' group
            assert st.st_gid == workers_gid and st.st_mode & stat.S_ISGID, path
    fetcher, front = cr.run_dir / "fetcher.sock", cr.run_dir / "mitm-http.sock"
    assert stat.S_IMODE(fetcher.stat().st_mode) == 0o660
    assert fetcher.stat().st_gid == workers_gid
    assert stat.S_IMODE(front.stat().st_mode) == 0o600
    assert stat.S_IMODE((cr.run_dir / "front-stamp.conf").stat().st_mode) == 0o600

    # What another local user gets, asked of the kernel.
    certs = Path(cr.config["certs_dir"])
    targets = [fetcher, front, blob_path(cr, served.layer), certs / "ca.key",
               certs / "hosts" / "_fallback.key", cr.access_log]
    assert probe(OTHER, *targets) == ["EACCES"] * len(targets)


def test_workers_read_what_they_serve_but_not_the_ca_key(served: Served) -> None:
    cr = served.cr
    certs = Path(cr.config["certs_dir"])
    readable = [cr.run_dir / "fetcher.sock", blob_path(cr, served.layer),
                certs / "hosts" / "_fallback.key"]
    assert probe(WORKERS, *readable, certs / "ca.key") == ["ok"] * len(readable) + ["EACCES"]
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600


def test_a_spoofed_proxy_line_gets_no_answer(served: Served, tmp_path: Path) -> None:
    """proxy.allow_clients lets in FRONT_CLIENT only. A local process (from
    127.0.0.1) is refused by the front; writing the front's PROXY line for
    FRONT_CLIENT to nginx's port itself gets it nothing either."""
    cr = served.cr
    path = f"/v2/small/blobs/{served.layer}"
    # The front lets FRONT_CLIENT in (this also gives registry.test its leaf).
    assert " 200" in curl_through_front(served, path, tmp_path / "blob")["status"]
    with socket.create_connection(("127.0.0.1", cr.proxy_port), timeout=30) as sock:
        sock.sendall(b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 403")

    assert spoofed_request(served, FRONT_CLIENT, path) == b""
    assert spoofed_request(served, "127.0.0.1", "/v2/") == b""
    # nginx closed them before any location (444), logged as such.
    assert len(cr.access_lines(" 444 ", at_least=2)) >= 2


def test_a_named_worker_user_who_cannot_enter_stops_serve(
    upstream: Upstream, crossable_dir: Path
) -> None:
    closed = crossable_dir / "closed"
    closed.mkdir(mode=0o700)
    cr = CrProxy(closed / "named", proxy_endpoints(upstream), nginx={"user": WORKERS})
    # Run to its end here: serve must stop by itself, before nginx starts.
    cr.config_path.write_text(yaml.safe_dump(cr.config))
    result = subprocess.run(
        [sys.executable, "-m", "cr_proxy", "serve", "--config", str(cr.config_path)],
        capture_output=True, text=True, timeout=60, cwd=cr.dir,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"nginx workers as {WORKERS} cannot enter {closed} " in result.stderr
    assert not (closed / "named/run/nginx.pid").exists()


def test_auto_keeps_workers_root_where_www_data_cannot_enter_and_says_so(
    upstream: Upstream, crossable_dir: Path
) -> None:
    closed = crossable_dir / "closed-auto"
    closed.mkdir(mode=0o700)
    with CrProxy(closed / "auto", proxy_endpoints(upstream)) as cr:
        assert f"nginx workers as {WORKERS} cannot enter {closed} " in cr.log_text()
        workers = nginx_workers(cr)
        assert workers
        for pid in workers:
            assert uids(pid) == [0] * 4
        # Closed to other users all the same.
        assert stat.S_IMODE(cr.cache.stat().st_mode) == 0o2750
