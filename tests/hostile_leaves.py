"""A client of the https_proxy that invents host names: CONNECTs that never
start TLS, ClientHellos naming hosts that do not exist or another host than
the CONNECT's; and what such a client could leave behind (leaf files, nginx
servers, reloads, nginx memory), read from the outside."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from testbed.crproxy import CrProxy


@dataclass
class Outcome:
    """What a client saw after its CONNECT was answered 200."""

    alert: str = ""  # the TLS error, when the handshake failed
    names: tuple[str, ...] = ()  # the subjectAltNames of the certificate served
    status: bytes = b""  # the HTTP status line of a GET /v2/ over the tunnel


def connect(proxy_port: int, host: str) -> socket.socket:
    """A CONNECT host:443 answered 200; the socket, ready for TLS."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
    sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, f"the front closed the CONNECT to {host}: {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return sock


def connect_only(proxy_port: int, host: str) -> None:
    """A CONNECT, then nothing: the client goes away before any TLS."""
    connect(proxy_port, host).close()


def tls(
    proxy_port: int, host: str, sni: str | None, cafile: Path, path: str = "/v2/"
) -> Outcome:
    """CONNECT host:443, then TLS with `sni` (None: none), the chain checked
    against our CA (the name is not: the test compares it); then GET `path`
    for the SNI's host (the CONNECT's without one)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    with connect(proxy_port, host) as raw:
        try:
            tunnel = context.wrap_socket(raw, server_hostname=sni)
        except (ssl.SSLError, ConnectionError) as err:
            return Outcome(alert=getattr(err, "reason", None) or type(err).__name__)
        with tunnel:
            cert = tunnel.getpeercert()
            names = tuple(value for _, value in cert.get("subjectAltName", ()))
            request = f"GET {path} HTTP/1.1\r\nHost: {sni or host}\r\nConnection: close\r\n\r\n"
            tunnel.sendall(request.encode())
            answer = b""
            while b"\r\n" not in answer and (chunk := tunnel.recv(4096)):
                answer += chunk
            return Outcome(names=names, status=answer.split(b"\r\n")[0])


def leaves(cr: CrProxy) -> set[str]:
    """Hosts with a leaf certificate on disk (the fallback leaf aside)."""
    folder = Path(cr.config["certs_dir"]) / "hosts"
    return {p.stem for p in folder.glob("*.crt")} - {"_fallback"}


def host_servers(cr: CrProxy) -> set[str]:
    """Hosts with an nginx server of their own (run/hosts/<host>.conf)."""
    return {p.stem for p in (cr.run_dir / "hosts").glob("*.conf")}


def nginx_master(cr: CrProxy) -> int:
    line = next(line for line in cr.output if "cr-proxy ready" in line)
    return int(line.rsplit("nginx pid ", 1)[1].rstrip(")"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
