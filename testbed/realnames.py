"""A production-like bed: Docker Hub by its real names, over TLS on 443,
inside network namespaces this bed makes; nothing can leave the machine.

    clients (cl)          router (rt)            cr-proxy (cr)
    192.0.2.10  ------  192.0.2.1                198.51.100.10
    no default route      198.51.100.1  -------  default via .1
    (reach cr only)       203.0.113.1   --+
                                          |      upstream (up)
                                          +----  203.0.113.10 registry-1.docker.io
                                                 203.0.113.11 auth.docker.io
                                                 203.0.113.12 production.cloudflare.docker.com
                                                 203.0.113.53 a resolver that drops DNS

The upstream is the real CNCF `docker-registry` (token auth, blob GETs
answered 307 to the CDN), the token server of testbed.registry (in this
process, on a socket opened inside the upstream's namespace) and an nginx
CDN, each serving TLS with a leaf from the bed's own root CA
(`cryptography`, as cr_proxy/front/certs.py makes cr-proxy's). cr-proxy
trusts that root through SSL_CERT_FILE (the system bundle plus the root);
clients never get it. cr-proxy has NO `endpoints`: it resolves the real
names through its namespace's hosts file (/etc/netns/<cr>/hosts) and
connects to port 443. Being documentation-range addresses (not global),
the upstream's network is in `proxy.allow_private`, and the clients'
network in `mirror_allow_clients` / `proxy.allow_clients`.

The router's FORWARD chain jumps to a chain of its own, CABLE:
`cable_out()` puts DROP rules for the upstream's network in it (every
packet to or from the upstream vanishes: connects time out, an open
connection hangs, exactly a cut cable or a dead uplink), `cable_in()`
flushes it. `dns_out()` takes the names out of cr-proxy's hosts file
(written in place) so lookups go to the resolver in its resolv.conf, whose
packets the upstream's namespace always drops.

The clients' namespace has a route to cr-proxy's network only and a
resolv.conf naming its own loopback (refused at once): a client that falls
back to the real Docker Hub fails on the spot instead of reaching it.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

from aiohttp import web

from cr_proxy.front.certs import CertPair as Leaf
from cr_proxy.front.certs import ensure_ca, issue_leaf
from testbed.crproxy import CrProxy, clean_env
from testbed.lifecycle import Started
from testbed.netns import Netns, listening_socket, veth, wait_listening
from testbed.registry import LoopThread, TokenServer, _registry_config, _terminate, signing_material

REGISTRY = "registry-1.docker.io"
AUTH = "auth.docker.io"
CDN = "production.cloudflare.docker.com"
SERVICE = "registry.docker.io"  # Docker Hub's token service name
CRPROXY_NAME = "cr-proxy.lan"  # what clients call cr-proxy (their hosts file)

UPSTREAM_NET = "203.0.113.0/24"
CRPROXY_NET = "198.51.100.0/24"
CLIENT_NET = "192.0.2.0/24"
ADDRESSES = {REGISTRY: "203.0.113.10", AUTH: "203.0.113.11", CDN: "203.0.113.12"}
DEAD_RESOLVER = "203.0.113.53"
CRPROXY_ADDRESS = "198.51.100.10"
CLIENT_ADDRESS = "192.0.2.10"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PUSH_TIMEOUT = 300.0

_beds = itertools.count()


# --------------------------------------------------------------------------- certificates


class TestRoot:
    """A root CA of the bed's own and leaves it signs for host names, as a
    public CA would for Docker Hub: made by cr-proxy's own certificate code
    (cr_proxy/front/certs.py), in a directory of its own, so it is another
    root than the CA of the cr-proxy under test."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._ca = ensure_ca(directory)
        self.cert = self._ca.cert
        self.pem = self.cert.read_bytes()
        # What an operator hands cr-proxy in SSL_CERT_FILE: the system's
        # roots and this one.
        self.bundle = self.dir / "bundle.crt"
        system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""
        self.bundle.write_bytes(system + self.pem)

    def leaf(self, host: str) -> Leaf:
        return issue_leaf(self._ca, [host], Leaf(self.dir / f"{host}.crt",
                                                 self.dir / f"{host}.key"))


# --------------------------------------------------------------------------- the bed


def _cdn_nginx_config(directory: Path, root: Path, leaf: Leaf) -> str:
    return f"""user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format cdn '$remote_addr "$request" $status $body_bytes_sent';
    access_log {directory}/access.log cdn;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    default_type application/octet-stream;
    server {{
        listen {ADDRESSES[CDN]}:443 ssl;
        server_name {CDN};
        ssl_certificate {leaf.cert};
        ssl_certificate_key {leaf.key};
        root {root};
        location /docker/registry/v2/blobs/ {{ }}
        location / {{ return 404; }}
    }}
}}
"""


class RealNamesBed(Started):
    """The namespaces, the upstream inside them, and the switches a test
    flips (cable_out/cable_in, dns_out/dns_in). Use as a context manager:
    everything is torn down on exit, whatever happened."""

    def __init__(self, workdir: Path, *, resolver_timeout: int = 1) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"cb{os.getpid()}{next(_beds)}"
        self.rt, self.up, self.cr, self.cl = (Netns(f"{tag}-{role}")
                                               for role in ("rt", "up", "cr", "cl"))
        # glibc's resolver waits 5 s x 2 attempts per query by default; the
        # bed says 1 x 1 so a "names stop resolving" test stays short.
        self.resolver_timeout = resolver_timeout
        self.storage_root = self.dir / "upstream" / "storage"
        self.token_server = TokenServer(SERVICE)
        self.root: TestRoot | None = None
        self._loop: LoopThread | None = None
        self._auth_runner: web.BaseRunner | None = None
        self._registry: subprocess.Popen[bytes] | None = None
        self._cdn: subprocess.Popen[bytes] | None = None
        self.proxies: list[CrProxy] = []

    # ---- life

    def start(self) -> None:
        # A test process that dies without stop() must not leave namespaces.
        atexit.register(self.stop)
        self._network()
        self.root = TestRoot(self.dir / "pki")
        self._names_online()
        self.up.write_etc("hosts", "127.0.0.1 localhost\n")
        self.cl.write_etc("hosts", f"127.0.0.1 localhost\n{CRPROXY_ADDRESS} {CRPROXY_NAME}\n")
        # Refused at once on the clients' own loopback: no lookup leaves.
        self.cl.write_etc("resolv.conf", "nameserver 127.0.0.1\n")
        self._start_auth()
        self._start_registry()
        self._start_cdn()

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for proxy in self.proxies:
            proxy.stop()
        _terminate(self._registry)
        _terminate(self._cdn)
        if self._auth_runner is not None and self._loop is not None:
            self._loop.run(self._auth_runner.cleanup())
        if self._loop is not None:
            self._loop.close()
        self._auth_runner = self._loop = self._registry = self._cdn = None
        for ns in (self.cl, self.cr, self.up, self.rt):
            ns.delete()

    def _network(self) -> None:
        for ns in (self.rt, self.up, self.cr, self.cl):
            ns.add()
        veth(self.rt, "up0", "203.0.113.1/24", self.up, "eth0",
             [f"{a}/24" for a in (*ADDRESSES.values(), DEAD_RESOLVER)])
        veth(self.rt, "cr0", "198.51.100.1/24", self.cr, "eth0", [f"{CRPROXY_ADDRESS}/24"])
        veth(self.rt, "cl0", "192.0.2.1/24", self.cl, "eth0", [f"{CLIENT_ADDRESS}/24"])
        self.up.ip("route", "add", "default", "via", "203.0.113.1")
        self.cr.ip("route", "add", "default", "via", "198.51.100.1")
        # The clients reach cr-proxy and nothing else: no default route.
        self.cl.ip("route", "add", CRPROXY_NET, "via", "192.0.2.1")
        self.rt.sysctl("net.ipv4.ip_forward", "1")
        self.rt.iptables("-A", "FORWARD", "-s", CLIENT_NET, "-d", UPSTREAM_NET, "-j", "DROP")
        self.rt.iptables("-N", "CABLE")
        self.rt.iptables("-A", "FORWARD", "-j", "CABLE")
        # The upstream's resolver: every query dropped, online or not.
        for proto in ("udp", "tcp"):
            self.up.iptables("-A", "INPUT", "-d", DEAD_RESOLVER, "-p", proto,
                             "--dport", "53", "-j", "DROP")

    def _names_online(self) -> None:
        lines = "".join(f"{address} {host}\n" for host, address in ADDRESSES.items())
        self.cr.write_etc("hosts", f"127.0.0.1 localhost\n{lines}")
        self.cr.write_etc("resolv.conf", f"nameserver {DEAD_RESOLVER}\n"
                          f"options timeout:{self.resolver_timeout} attempts:1\n")

    def _start_auth(self) -> None:
        assert self.root is not None
        leaf = self.root.leaf(AUTH)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(leaf.cert, leaf.key)
        sock = listening_socket(self.up.name, ADDRESSES[AUTH], 443)
        self._loop = LoopThread()

        async def serve() -> web.BaseRunner:
            runner = web.AppRunner(self.token_server.app(), shutdown_timeout=1.0,
                                   access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=context).start()
            return runner

        self._auth_runner = self._loop.run(serve())

    def _start_registry(self) -> None:
        assert self.root is not None
        leaf = self.root.leaf(REGISTRY)
        directory = self.storage_root.parent
        self.storage_root.mkdir(parents=True, exist_ok=True)
        token_ca = directory / "token-ca.pem"
        token_ca.write_bytes(signing_material().ca_pem)
        config: dict[str, Any] = _registry_config(443, self.storage_root, token_ca)
        config["http"]["addr"] = f"{ADDRESSES[REGISTRY]}:443"
        config["http"]["tls"] = {"certificate": str(leaf.cert), "key": str(leaf.key)}
        config["auth"]["token"].update(realm=f"https://{AUTH}/token", service=SERVICE)
        config["middleware"]["storage"][0]["options"]["baseurl"] = f"https://{CDN}"
        (directory / "registry.yml").write_text(json.dumps(config, indent=2))
        log = directory / "registry.log"
        with log.open("ab") as out:
            self._registry = subprocess.Popen(
                [*self.up.prefix(), "docker-registry", "serve", str(directory / "registry.yml")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.up.name, ADDRESSES[REGISTRY], 443, self._registry, log)

    def _start_cdn(self) -> None:
        assert self.root is not None
        leaf = self.root.leaf(CDN)
        directory = self.dir / "upstream" / "cdn"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "nginx.conf").write_text(
            _cdn_nginx_config(directory, self.storage_root, leaf))
        log = directory / "error.log"
        with log.open("ab") as out:
            self._cdn = subprocess.Popen(
                [*self.up.prefix(), "nginx", "-p", str(directory), "-c",
                 str(directory / "nginx.conf"), "-e", str(log), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.up.name, ADDRESSES[CDN], 443, self._cdn, log)

    # ---- the switches

    def cable_out(self) -> None:
        """Every packet to or from the upstream dropped at the router."""
        self.rt.iptables("-A", "CABLE", "-d", UPSTREAM_NET, "-j", "DROP")
        self.rt.iptables("-A", "CABLE", "-s", UPSTREAM_NET, "-j", "DROP")

    def cable_in(self) -> None:
        self.rt.iptables("-F", "CABLE")

    def forget_connections(self) -> None:
        """Abort cr-proxy's open TCP connections to the upstream (`ss -K`):
        with the cable out, what a cut older than the connections' keep-alive
        leaves, so every request needs a new connect (which times out). Right
        after a cut, the open connections hang instead (until timeouts.read)."""
        self.cr.exec("ss", "-K", "dst", UPSTREAM_NET)

    def dns_out(self) -> None:
        """cr-proxy's names stop resolving: only the dropping resolver is left."""
        self.cr.write_etc("hosts", "127.0.0.1 localhost\n")

    def dns_in(self) -> None:
        self._names_online()

    # ---- cr-proxy and clients

    def crproxy(self, workdir: Path, *, ns: Netns | None = None,
                address: str = CRPROXY_ADDRESS, **settings: Any) -> CrProxy:
        """A CrProxy in cr-proxy's namespace (or `ns`), listening on its
        address (or `address`), that trusts the bed's root and has no
        `endpoints`. Stopped with the bed (and by the caller's own `with`)."""
        assert self.root is not None
        base: dict[str, Any] = {
            "mirror_names": [CRPROXY_NAME],
            "mirror_allow_clients": [CLIENT_NET],
            "proxy": {"allow_clients": [CLIENT_NET], "allow_private": [UPSTREAM_NET]},
        }
        base.update(settings)
        proxy = CrProxy(workdir, None, address=address, prefix=(ns or self.cr).prefix(),
                        env={"SSL_CERT_FILE": str(self.root.bundle)},
                        listen_proxy=f"{address}:3128", **base)
        self.proxies.append(proxy)
        return proxy

    def client(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """One client command in the clients' namespace (no proxy variables
        unless `env` brings them)."""
        return subprocess.run([*self.cl.prefix(), *args], capture_output=True, text=True,
                              env={**clean_env(), **(env or {})}, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)

    def push(self, layout: Path, ref: str, repo: str, tag: str) -> str:
        """skopeo copy oci:LAYOUT:REF docker://docker.io/REPO:TAG from
        cr-proxy's side of the router, trusting the root; returns the
        manifest digest (digests preserved)."""
        assert self.root is not None
        work = self.dir / "push"
        work.mkdir(exist_ok=True)
        (work / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (work / "registries.conf").write_text("")
        (work / "auth.json").write_text("{}")
        digest = work / f"{repo.replace('/', '_')}-{tag}.digest"
        env = {**clean_env(), "SSL_CERT_FILE": str(self.root.cert),
               "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"),
               "REGISTRY_AUTH_FILE": str(work / "auth.json")}
        result = subprocess.run(
            [*self.cr.prefix(), "skopeo", "--policy", str(work / "policy.json"), "copy",
             "--preserve-digests", "--digestfile", str(digest), f"oci:{layout}:{ref}",
             f"docker://docker.io/{repo}:{tag}"],
            capture_output=True, text=True, env=env, timeout=PUSH_TIMEOUT,
            stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"push to the bed failed:\n{result.stderr}")
        return digest.read_text().strip()
