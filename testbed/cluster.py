"""Several cr-proxy nodes side by side, each in a network namespace of its
own, sharing one upstream: testbed/realnames.py's bed (Docker Hub by its
real names, over TLS, in its own namespace behind a router) with the
router's cr-proxy side turned into a bridge that every node hangs on.

    clients (cl) --- router (rt) --- upstream (up)
    192.0.2.10       br0 198.51.100.1
                      |-- node 0 (the bed's cr)  198.51.100.10
                      |-- node 1                 198.51.100.11
                      |-- node 2                 198.51.100.12

Nodes reach each other over the bridge and the upstream through the
router; nothing leaves the machine. `publish()` makes a name resolve to
some nodes' addresses in every node's hosts file (written in place, read
again at each lookup), as a Kubernetes headless Service's DNS name does
for its pods. `kill_node()` SIGKILLs everything
running in a node's namespace (serve, nginx, fetcher: the node is gone at
once, as a crashed machine); `CrProxy.start()` brings it back. `owner()`
asks a node's nginx ring which peer owns a digest (a HEAD through
run/peers.sock, which costs the upstream no GET), `cdn_gets()` counts the
upstream's blob downloads in its CDN's access log.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from testbed.crproxy import CrProxy, layout_blobs
from testbed.netns import Netns, in_netns, run
from testbed.realnames import CRPROXY_ADDRESS, CRPROXY_NET, REGISTRY, RealNamesBed

ROUTER_ADDRESS = "198.51.100.1/24"
KILL_TIMEOUT = 10.0


class ClusterBed(RealNamesBed):
    """RealNamesBed with `nodes` cr-proxy namespaces on a bridge."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        super().__init__(workdir)
        tag = self.cr.name.rsplit("-", 1)[0]
        self.node_ns = [self.cr, *(Netns(f"{tag}-n{i}") for i in range(1, nodes))]
        self.node_addresses = [CRPROXY_ADDRESS,
                               *(f"198.51.100.{10 + i}" for i in range(1, nodes))]
        self.published: dict[str, list[int]] = {}  # name -> the nodes it resolves to

    def _network(self) -> None:
        super()._network()
        rt = self.rt
        # The router's cr-proxy side becomes a bridge: the bed's cr0 on it,
        # then one veth per further node.
        rt.ip("link", "add", "br0", "type", "bridge")
        rt.ip("addr", "del", ROUTER_ADDRESS, "dev", "cr0")
        rt.ip("link", "set", "cr0", "master", "br0")
        rt.ip("addr", "add", ROUTER_ADDRESS, "dev", "br0")
        rt.ip("link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.node_ns, self.node_addresses, strict=True)):
            if i == 0:
                continue
            ns.add()
            run("ip", "link", "add", f"nd{i}", "netns", rt.name, "type", "veth",
                "peer", "name", "eth0", "netns", ns.name)
            ns.ip("addr", "add", f"{address}/24", "dev", "eth0")
            ns.ip("link", "set", "eth0", "up")
            rt.ip("link", "set", f"nd{i}", "master", "br0")
            rt.ip("link", "set", f"nd{i}", "up")
            ns.ip("route", "add", "default", "via", ROUTER_ADDRESS.split("/")[0])

    def _names_online(self) -> None:
        super()._names_online()
        hosts = (self.cr.etc / "hosts").read_text()
        published = "".join(f"{self.node_addresses[i]} {name}\n"
                            for name, nodes in self.published.items() for i in nodes)
        for ns in self.node_ns:
            ns.write_etc("hosts", hosts + published)
            if ns is not self.cr:
                ns.write_etc("resolv.conf", (self.cr.etc / "resolv.conf").read_text())

    def publish(self, name: str, nodes: list[int]) -> None:
        """`name` resolves to these nodes' addresses, in every node, from
        now on (the next lookup reads the hosts files again)."""
        self.published[name] = list(nodes)
        self._names_online()

    def stop(self) -> None:
        super().stop()
        for ns in self.node_ns[1:]:
            ns.delete()

    # ---- the nodes

    def nodes(self, workdir: Path, *, dns_name: str = "", **settings: Any) -> list[CrProxy]:
        """One CrProxy per namespace (not started), all listing each other's
        mirror_http as cluster.peers; the peers' network is a mirror client.
        With `dns_name`, cluster.peers is that name on one port that every
        node's mirror_http listens on (see publish())."""
        pairs = zip(self.node_ns, self.node_addresses, strict=True)
        proxies = [self.crproxy(workdir / f"node{i}", ns=ns, address=address, **settings)
                   for i, (ns, address) in enumerate(pairs)]
        peers: list[str] | str = [proxy.http for proxy in proxies]
        if dns_name:
            port = proxies[0].http_port
            for proxy in proxies:  # each in a namespace of its own: the port is free
                proxy.http_port = port
                proxy.config["listen"]["mirror_http"] = proxy.http
            peers = f"{dns_name}:{port}"
        for proxy in proxies:
            proxy.config["cluster"] = {"peers": peers, "self": proxy.http}
            proxy.config["mirror_allow_clients"] = [*proxy.config["mirror_allow_clients"],
                                                    CRPROXY_NET]
        return proxies

    def kill_node(self, index: int, proxy: CrProxy) -> None:
        """SIGKILL every process in the node's namespace at once."""
        ns = self.node_ns[index]
        for pid in ns.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT
        while ns.pids():
            if time.monotonic() > deadline:
                raise AssertionError(f"processes left in {ns.name}: {ns.pids()}")
            threading.Event().wait(0.05)
        proxy.stop()  # reaps serve; nothing of it is left to stop

    def metrics(self, index: int, proxy: CrProxy, path: str = "/metrics") -> str:
        """A page of the node's metrics listener (/metrics, or / the status page)."""
        url = f"http://{proxy.address}:{proxy.metrics_port}{path}"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()

        return in_netns(self.node_ns[index].name, fetch)

    def pull(self, proxy: CrProxy, repo: str, dest: Path) -> dict[str, int]:
        """skopeo in the clients' namespace pulls registry-1.docker.io's
        `repo:v1` through one node's mirror; every blob it got is hashed
        against its name (layout_blobs)."""
        result = self.client(
            "skopeo", "copy", "--preserve-digests", "--retry-times", "0",
            "--src-tls-verify=false", f"docker://{proxy.http}/{REGISTRY}/{repo}:v1",
            f"oci:{dest}:pulled")
        if result.returncode != 0:
            raise RuntimeError(f"pull through {proxy.http}: {result.stderr}")
        return layout_blobs(dest)

    def get(self, proxy: CrProxy, path: str) -> tuple[int, bytes]:
        """GET from the clients' namespace; a body cut short raises."""
        status, _, body = self.request(proxy, path)
        return status, body

    def request(self, proxy: CrProxy, path: str, method: str = "GET"
                ) -> tuple[int, dict[str, str], bytes]:
        """One request from the clients' namespace: status, headers, body."""
        def fetch() -> tuple[int, dict[str, str], bytes]:
            connection = http.client.HTTPConnection(proxy.address, proxy.http_port, timeout=30)
            try:
                connection.request(method, path)
                response = connection.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            finally:
                connection.close()

        return in_netns(self.cl.name, fetch)

    def upstream_requests(self, digest: str) -> int:
        """Every request of the upstream's (registry and CDN, any method and
        status) that names this digest, from their access logs."""
        hexdigest = digest.split(":", 1)[1]
        logs = [self.storage_root.parent / "registry.log",
                self.dir / "upstream" / "cdn" / "access.log"]
        return sum(log.read_text(errors="replace").count(hexdigest)
                   for log in logs if log.exists())

    @staticmethod
    def owner(proxy: CrProxy, registry: str, repo: str, digest: str) -> str:
        """The peer nginx's ring on `proxy` sends this digest to (its
        X-CR-Peer-Addr's last entry), asked with a HEAD of the blob."""
        return ClusterBed.ring(proxy, f"/v2/{registry}/{repo}/blobs/{digest}", digest)

    @staticmethod
    def ring(proxy: CrProxy, path: str, key: str) -> str:
        """The peer nginx's ring on `proxy` sends `key` to, with a HEAD of `path`."""
        connection = http.client.HTTPConnection("cr-peers", timeout=30)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(proxy.run_dir / "peers.sock"))
        connection.sock = sock
        try:
            connection.request("HEAD", path, headers={"X-CR-Peer": proxy.http, "X-CR-Digest": key})
            response = connection.getresponse()
            response.read()
            return response.getheader("X-CR-Peer-Addr", "").split(",")[-1].strip()
        finally:
            connection.close()

    def cdn_gets(self, digest: str) -> int:
        """The upstream's downloads of one blob (its CDN's access log)."""
        hexdigest = digest.split(":", 1)[1]
        log = self.dir / "upstream" / "cdn" / "access.log"
        needle = f'"GET /docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data '
        text = log.read_text() if log.exists() else ""
        return sum(1 for line in text.splitlines() if needle in line and '" 200 ' in line)

    def registry_gets(self, path: str, method: str = "GET") -> int:
        """The upstream registry's answered GETs (or `method`s) of one path
        (its access log)."""
        log = self.storage_root.parent / "registry.log"
        needle = f'"{method} {path} HTTP/1.1" 200 '
        text = log.read_text(errors="replace") if log.exists() else ""
        return sum(1 for line in text.splitlines() if needle in line)
