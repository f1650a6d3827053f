"""The cluster's ring is nginx's (cr_proxy/nginx.py, cluster_conf): measured
on a real nginx running the rendered cluster.conf, with three peers and
then four. A node joining takes about a quarter of the keys, every one of
them from the others (none moves between the nodes that stayed): what
`hash ... consistent` (ketama) promises, and why a node that leaves or
joins costs the upstream only its own share again."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from cr_proxy import nginx
from cr_proxy.upstream import members
from testbed.ports import free_ports
from tests.test_nginx_render import load, needs_nginx

KEYS = 1000
READY_TIMEOUT = 10.0


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket, reconnecting as http.client does."""

    def __init__(self, path: Path) -> None:
        super().__init__("cr-peers", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


def owners(work: Path, peers: list[str], keys: list[str], dead: tuple[str, ...] = (),
           **settings: str) -> dict[str, str]:
    """key -> the peers nginx's ring tried for it ($upstream_addr; the last
    answered), with these peers, the `dead` ones not listening."""
    work.mkdir()
    conf = load(work, CLUSTER__PEERS=repr(peers).replace("'", '"'), CLUSTER__SELF=peers[0],
                **settings)
    conf.run_dir.mkdir()
    (conf.run_dir / "cluster.conf").write_text(nginx.cluster_conf(conf))
    servers = "\n".join(f"    server {{ listen {peer}; return 204; }}" for peer in peers
                        if peer not in dead)
    (conf.run_dir / "nginx.conf").write_text(f"""user root;
worker_processes 1;
pid {conf.run_dir}/nginx.pid;
error_log stderr warn;
events {{ }}
http {{
    access_log off;
    map $host $cr_mode {{ default mirror; }}
    include {conf.run_dir}/cluster.conf;
{servers}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(conf.run_dir), "-c",
                             str(conf.run_dir / "nginx.conf"), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL)
    try:
        sock_path = conf.run_dir / "peers.sock"
        deadline = time.monotonic() + READY_TIMEOUT
        while not sock_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "nginx did not start"
            threading.Event().wait(0.05)
        connection = UnixConnection(sock_path)
        found = {}
        for key in keys:
            connection.request("GET", "/", headers={"X-CR-Digest": key})
            response = connection.getresponse()
            response.read()
            assert response.status == 204
            found[key] = response.getheader("X-CR-Peer-Addr")
        connection.close()
        return found
    finally:
        proc.terminate()
        proc.wait(10)


@needs_nginx
def test_a_fourth_node_takes_about_a_quarter_of_the_keys_all_from_the_others(
    tmp_path: Path,
) -> None:
    peers = [f"127.0.0.1:{port}" for port in free_ports(4)]
    keys = [f"sha256:{i:064x}" for i in range(KEYS)]
    three = owners(tmp_path / "three", peers[:3], keys)
    four = owners(tmp_path / "four", peers, keys)
    shares = Counter(three.values())
    assert set(shares) == set(peers[:3])
    moved = [key for key in keys if three[key] != four[key]]
    # Only the new node takes keys; no key moves between the old ones.
    assert {four[key] for key in moved} == {peers[3]}
    assert Counter(four.values())[peers[3]] == len(moved)
    # About a quarter (ketama: 160 points per server on the ring).
    assert 0.15 < len(moved) / KEYS < 0.35, (len(moved), shares)


@needs_nginx
def test_the_status_pages_ring_is_nginxs_key_for_key(tmp_path: Path) -> None:
    """upstream/members.py's ketama (the status page's shares) picks the
    owner nginx picks for every key, with ring entries as the DNS mode
    writes them (address:port) and as a list may (names)."""
    ports = free_ports(3)
    peers = [f"127.0.0.1:{ports[0]}", f"127.0.0.2:{ports[1]}", f"127.0.0.3:{ports[2]}"]
    keys = [f"sha256:{i:064x}" for i in range(KEYS)] + [f"registry-1.docker.io/a/b:{i}"
                                                         for i in range(100)]
    found = owners(tmp_path / "ring", peers, keys)
    assert {key: members.owner(peers, key) for key in keys} == found
    shares = members.shares(peers)
    assert set(shares) == set(peers)
    assert abs(sum(shares.values()) - 1) < 1e-9
    # Each share is what the keys show, within sampling noise.
    counted = Counter(found.values())
    for peer, share in shares.items():
        assert abs(counted[peer] / len(keys) - share) < 0.1, (peer, share, counted)


@needs_nginx
def test_the_rings_failure_accounting_follows_the_settings(tmp_path: Path) -> None:
    """A peer that refuses connections: with cluster.max_fails 1 the ring
    tries it once, then skips it for fail_timeout (the next key it owns goes
    straight to the next node); with max_fails 0 it is tried every time."""
    peers = [f"127.0.0.1:{port}" for port in free_ports(3)]
    dead = peers[2]
    keys = [f"sha256:{i:064x}" for i in range(200)]
    theirs = [key for key in keys if members.owner(peers, key) == dead][:3]
    assert len(theirs) == 3
    skipped = owners(tmp_path / "skip", peers, theirs, (dead,), CLUSTER__MAX_FAILS="1",
                     CLUSTER__FAIL_TIMEOUT="300")
    assert skipped[theirs[0]].startswith(f"{dead}, ")  # tried, failed, the next answered
    assert all(dead not in skipped[key] for key in theirs[1:])
    tried = owners(tmp_path / "always", peers, theirs, (dead,), CLUSTER__MAX_FAILS="0")
    assert all(tried[key].startswith(f"{dead}, ") for key in theirs)
