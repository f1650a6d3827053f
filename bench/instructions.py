"""Instructions nginx spends per hit, counted by valgrind: cr-proxy's nginx
against plain nginx serving the same files, side by side in one run.

`make bench` measures rates, and on a busy or shared machine those move by
20-40% from run to run (docs/performance.md), which hides a 10% change of
the hit path. An instruction count does not move with the machine's load:
callgrind counts the same total for the same binary, configuration and
requests. So a change to the hit path (nginx/*.conf, cr.js) is judged here
first, and by `make bench` for the wall-clock picture.

Each case runs nginx under callgrind with `master_process off` (one process
doing a worker's job), sends N keep-alive requests with `ab -k -c 1`, and
subtracts the count of a run that serves none (start-up and shut-down).
Each cr-proxy case runs twice: on the mirror port, and as an https_proxy
client's request reaches nginx from the CONNECT front (its plain HTTP
socket, after the front's PROXY line), whose locations also test a
private repository's mark.
The ratio is plain nginx's instructions per request over cr-proxy's: like
`make bench`'s ratios, 1.0x is "as cheap as plain nginx", lower is dearer.

Run: `make bench-instructions` (about a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.procs import PlainNginx, terminate, wait_listening
from cr_proxy.privsep import STAMP_FILE
from testbed.crproxy import CrProxy
from testbed.ports import free_ports

DOMAIN = "registry-1.docker.io"  # the mirror's default registry: no prefix in the URL
REPO = "library/bench"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TOTALS_RE = re.compile(r"^totals:\s+(\d+)", re.M)


@dataclass(frozen=True)
class Case:
    name: str
    method: str  # ab: GET, or HEAD with -i
    path: str  # the same URL path on both servers
    accept: str


def make_cache(cache: Path) -> tuple[str, str]:
    """One manifest (by tag) and one 64 KiB blob, as the fetcher stores them;
    their URL paths."""
    blob = bytes(range(256)) * 256
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob_digest, "size": len(blob)},
        "layers": [],
    }).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    manifest_path = f"v2/{REPO}/manifests/latest"
    blob_path = f"v2/{REPO}/blobs/{blob_digest}"
    files = {
        f"content/{DOMAIN}/{manifest_path}": manifest,
        f"content-type/{DOMAIN}/{manifest_path}": f"{MANIFEST_TYPE}\n".encode(),
        f"docker-content-digest/{DOMAIN}/{manifest_path}": f"{manifest_digest}\n".encode(),
        f"content/{DOMAIN}/{blob_path}": blob,
    }
    for rel, data in files.items():
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(data)
    return f"/{manifest_path}", f"/{blob_path}"


def proxy_requests(sock: Path, stamp_file: Path, case: Case, requests: int) -> None:
    """`requests` keep-alive requests of `case` as an https_proxy client's
    plain HTTP reaches nginx: on the front's unix socket, after the PROXY
    line with the front's stamp (what the CONNECT front sends; ab cannot)."""
    found = re.search(r'"([0-9.]+) (\d+)" 1;', stamp_file.read_text())
    if found is None:
        raise RuntimeError(f"no IPv4 stamp in {stamp_file}")
    stamp, port = found.groups()
    head = (f"{case.method} {case.path} HTTP/1.1\r\nHost: {DOMAIN}\r\n"
            f"Accept: {case.accept}\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.sendall(f"PROXY TCP4 127.0.0.1 {stamp} {port} 80\r\n".encode())
        reader = conn.makefile("rb")
        for _ in range(requests):
            conn.sendall(head)
            status = reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"{case.name} (https_proxy): {status!r}")
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if case.method != "HEAD":
                reader.read(length)


def count(conf: Path, port: int, case: Case | None, requests: int, work: Path,
          proxy: tuple[Path, Path] | None = None) -> int:
    """callgrind's total for nginx (one process) serving `requests` of `case`."""
    out = work / "callgrind.out"
    out.unlink(missing_ok=True)
    for sock in conf.parent.glob("*.sock"):  # left by the last nginx: it would not bind
        sock.unlink()
    log = work / "valgrind.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             "nginx", "-c", str(conf), "-g", "master_process off;"],
            stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
    try:
        wait_listening([port], proc, log)
        if proxy is not None and case is not None and requests:
            proxy_requests(*proxy, case, requests)
        elif case is not None and requests:
            ab = ["ab", "-q", "-k", "-c", "1", "-n", str(requests), "-H", f"Accept: {case.accept}"]
            if case.method == "HEAD":
                ab.append("-i")
            result = subprocess.run([*ab, f"http://127.0.0.1:{port}{case.path}"],
                                    capture_output=True, text=True, check=True)
            if re.search(r"^(Non-2xx responses|Failed requests:\s+[1-9])", result.stdout, re.M):
                raise RuntimeError(f"{case.name}: not every answer was a 2xx:\n{result.stdout}")
    finally:
        terminate(proc)
    found = TOTALS_RE.search(out.read_text())
    if found is None:
        raise RuntimeError(f"no callgrind totals in {out}")
    return int(found.group(1))


def per_request(conf: Path, port: int, case: Case, requests: int, work: Path,
                proxy: tuple[Path, Path] | None = None) -> float:
    idle = count(conf, port, None, 0, work)
    return (count(conf, port, case, requests, work, proxy) - idle) / requests


# --mirror-auth: client authentication on (a rule, no password users), the
# requests anonymous: what a public hit costs with the feature on.
MIRROR_AUTH = {"anonymous": "pull-public",
               "rules": [{"users": ["ci"], "repositories": ["docker.io/*"], "allow": "pull"}]}


@contextmanager
def rendered_cr_proxy(work: Path, mirror_auth: bool = False
                      ) -> Iterator[tuple[Path, int, Path]]:
    """cr-proxy's own rendered nginx configuration over a cache made here:
    serve renders it and is stopped; nginx is then run from it alone (hits
    never reach the fetcher). (nginx.conf, mirror HTTP port, cache dir)."""
    cache = work / "crproxy" / "cache"
    cache.mkdir(parents=True)
    (proxy_port,) = free_ports(1)  # the front is rendered too: its nginx servers are measured
    settings = {"mirror_auth": MIRROR_AUTH} if mirror_auth else {}
    cr = CrProxy(work / "crproxy", {}, tag_ttl=10**9,  # the tag stays fresh
                 listen_proxy=f"127.0.0.1:{proxy_port}", **settings)
    with cr:
        pass
    yield cr.dir / "run" / "nginx.conf", cr.http_port, cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--mirror-auth", action="store_true",
                        help="mirror_auth on (anonymous requests, public content)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("ab") is None:
        print("needs valgrind and ab (apache2-utils)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cr-bench-instr-") as tmp:
        work = Path(tmp)
        with rendered_cr_proxy(work, args.mirror_auth) as (conf, port, cache):
            manifest_path, blob_path = make_cache(cache)
            plain = PlainNginx(work / "plain", cache / "content" / DOMAIN)
            plain.dir.mkdir()
            plain.start()  # renders its config and TLS files; it is run alone below
            plain.stop()
            cases = [
                Case("manifest GET", "GET", manifest_path, MANIFEST_TYPE),
                Case("blob HEAD", "HEAD", blob_path, "*/*"),
                Case("blob GET (64 KiB)", "GET", blob_path, "*/*"),
            ]
            print(f"nginx instructions per request (callgrind, {args.requests} keep-alive "
                  "requests, one process)")
            print(f"{'case':<28} {'cr-proxy':>10} {'plain':>10} {'ratio':>7}")
            # The same hits as an https_proxy client's (the front's plain HTTP
            # socket): the server that checks a private repository's mark.
            run = conf.parent
            proxy = (run / "mitm-http.sock", run / STAMP_FILE)
            for case in cases:
                base = per_request(plain.dir / "nginx.conf", plain.http_port, case,
                                   args.requests, work)
                for mode, via in (("", None), (" (proxy)", proxy)):
                    ours = per_request(conf, port, case, args.requests, work, via)
                    name = case.name + mode
                    print(f"{name:<28} {ours:>10.0f} {base:>10.0f} {base / ours:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
