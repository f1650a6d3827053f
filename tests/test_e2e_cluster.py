"""Three cr-proxy nodes sharing their caches (cluster.peers), each in a
network namespace of its own, in front of one upstream (testbed/cluster.py).
Every blob has an owner, picked by nginx's consistent hash: pulls through
every node cost the upstream one download per blob; a node SIGKILLed
mid-test has its keys taken by the next node on the ring while pulls go
on; restarted, it serves its share again; a peer that answers wrong bytes
is caught by the digest check and the upstream is asked instead."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cr_proxy.upstream import members
from testbed.cluster import ClusterBed
from testbed.crproxy import CrProxy
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from tests.faulty import wait_until
from tests.test_e2e_mirror import expected_digests

REGISTRY = "docker.io"
DOMAIN = "registry-1.docker.io"
REJOIN_TIMEOUT = 60.0  # > the ring's fail_timeout (cluster.fail_timeout, 10 s)


@dataclass
class Cluster:
    net: ClusterBed
    nodes: list[CrProxy]
    work: Path

    def push(self, name: str, layers: int) -> ImageInfo:
        """A small image of `layers` distinct layers, docker.io/library/<name>:v1."""
        layout = self.work / f"layout-{name}"
        image = build_image(layout, layers=[
            tar_layer({f"{name}/{i}.txt": f"{name} layer {i}\n".encode() * (200 + i)})
            for i in range(layers)
        ], tag="v1")
        self.net.push(layout, "v1", f"library/{name}", "v1")
        return image

    def pull(self, node: int, name: str, dest: Path) -> dict[str, int]:
        """skopeo in the clients' namespace through one node's mirror; every
        pulled blob is hashed against its name."""
        return self.net.pull(self.nodes[node], f"library/{name}", dest)

    def owner_and_asker(self, name: str, image: ImageInfo, digest: str) -> tuple[int, int]:
        """The node that owns `digest` and the next one, which will ask it,
        once the asker's ring sends the digest to the owner: a node its ring
        saw fail (the kill case) is skipped for fail_timeout, and until then
        the asker would rightly fill from elsewhere."""
        owner_http = self.owners(0, name, image)[digest]
        owner = next(n for n, node in enumerate(self.nodes) if node.http == owner_http)
        asker = (owner + 1) % len(self.nodes)
        wait_until(lambda: self.net.owner(self.nodes[asker], REGISTRY, f"library/{name}",
                                          digest) == owner_http,
                   REJOIN_TIMEOUT, "the asker's ring sending the digest to its owner")
        return owner, asker

    def owners(self, node: int, name: str, image: ImageInfo) -> dict[str, str]:
        """digest -> the peer node `node`'s ring sends it to."""
        blobs = [image.config_digest, *image.layer_digests]
        return {d: self.net.owner(self.nodes[node], REGISTRY, f"library/{name}", d)
                for d in blobs}

    def tag_owner(self, node: int, name: str) -> str:
        """The peer node `node`'s ring sends docker.io/library/<name>:v1 to."""
        return self.net.ring(self.nodes[node], f"/v2/{REGISTRY}/library/{name}/manifests/v1",
                             f"{DOMAIN}/library/{name}:v1")

    def counter(self, node: int, name: str, **labels: str) -> float:
        text = self.net.metrics(node, self.nodes[node])
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        found = re.search(rf"^{name}_total\{{{re.escape(want)}\}} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    with ClusterBed(work) as net:
        nodes = net.nodes(work)
        for node in nodes:
            node.start()
        yield Cluster(net, nodes, work)


def blob_digests(image: ImageInfo) -> list[str]:
    return [image.config_digest, *image.layer_digests]


def test_pulls_through_every_node_cost_one_upstream_get_per_blob(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Clients pull at once through all three nodes: each blob is
    downloaded from the upstream once, by its owner; the others get it from
    the owner (verified, counted per peer) and keep their own copy."""
    image = cluster.push("app", layers=6)
    owners = cluster.owners(0, "app", image)
    # Every node's ring agrees on the owners.
    assert cluster.owners(1, "app", image) == owners == cluster.owners(2, "app", image)
    with ThreadPoolExecutor(3) as pool:
        pulled = list(pool.map(lambda n: cluster.pull(n, "app", tmp_path / f"n{n}"), range(3)))
    for blobs in pulled:
        assert expected_digests(image) <= set(blobs)
    for digest in blob_digests(image):
        assert cluster.net.cdn_gets(digest) == 1, digest
    # Each node keeps its own verified copy: the next pulls are its own hits.
    for node in cluster.nodes:
        node.wait_committed(DOMAIN, "library/app", *blob_digests(image))
    cluster.pull(1, "app", tmp_path / "again")
    for digest in blob_digests(image):
        assert cluster.net.cdn_gets(digest) == 1, digest
    # The owners (of the blobs and the tag) were asked through nginx's ring,
    # and counted by peer.
    owners["tag"] = cluster.tag_owner(0, "app")
    for n, node in enumerate(cluster.nodes):
        remote = sum(1 for d, o in owners.items() if o != node.http)
        asked = sum(cluster.counter(n, "crproxy_peer_requests", peer=peer.http)
                    for peer in cluster.nodes if peer is not node)
        assert asked == remote, (n, owners)
    # The status page shows each other owner's share of this node's misses
    # (its own misses of what it owns may have joined a peer's fill).
    page = cluster.net.metrics(0, cluster.nodes[0], "/")
    for peer in set(owners.values()) - {cluster.nodes[0].http}:
        assert f"<th>peer {peer}</th><td>owned " in page, page
    # And the ring itself: each node's share of the keys, nginx's ketama,
    # which picked exactly these owners.
    peers = [node.http for node in cluster.nodes]
    assert owners == {key: members.owner(peers, f"{DOMAIN}/library/app:v1" if key == "tag"
                                         else key) for key in owners}
    for peer, share in members.shares(peers).items():
        mine = " (this node)" if peer == cluster.nodes[0].http else ""
        assert f"<th>ring {peer}</th><td>{share:.1%} of the keys{mine}</td>" in page, page
    assert f"crproxy_cluster_members {len(peers)}.0" in cluster.net.metrics(0, cluster.nodes[0])


def test_a_tag_is_fetched_and_revalidated_by_its_owner_only(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A tag is owned by registry/name:tag: pulls through every node cost
    the upstream one GET of it; a non-owner whose copy is due for
    revalidation asks the owner (fresh there), not the upstream."""
    image = cluster.push("tagged", layers=1)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: cluster.pull(n, "tagged", tmp_path / f"n{n}"), range(3)))
    tag_path = "/v2/library/tagged/manifests/v1"
    assert cluster.net.registry_gets(tag_path) == 1
    key = f"{DOMAIN}/library/tagged:v1"
    owner = cluster.net.ring(cluster.nodes[0], f"/v2/{REGISTRY}/library/tagged/manifests/v1",
                             key)
    other = next(n for n, node in enumerate(cluster.nodes) if node.http != owner)
    heads = cluster.net.registry_gets(tag_path, "HEAD")
    sidecar = (cluster.nodes[other].cache / "docker-content-digest" / DOMAIN
               / "v2/library/tagged/manifests/v1")
    os.utime(sidecar, (1, 1))  # validated long ago: due for revalidation
    status, body = cluster.net.get(cluster.nodes[other], f"/v2/{REGISTRY}/library/tagged/"
                                   "manifests/v1")
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest_digest
    assert cluster.net.registry_gets(tag_path, "HEAD") == heads
    assert cluster.net.registry_gets(tag_path) == 1


def test_a_manifest_by_digest_comes_from_its_owner(cluster: Cluster) -> None:
    """A manifest asked by digest through every node: the upstream answers
    it once (to its owner), every node's copy is the digest's bytes."""
    image = cluster.push("man", layers=1)
    digest = image.manifest_digest
    for n, node in enumerate(cluster.nodes):
        status, body = cluster.net.get(node, f"/v2/{REGISTRY}/library/man/manifests/{digest}")
        assert status == 200, n
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert cluster.net.registry_gets(f"/v2/library/man/manifests/{digest}") == 1


def test_a_blob_head_on_a_non_owner_is_answered_by_the_owner(cluster: Cluster) -> None:
    """A HEAD of a blob a node has not stored goes to the blob's owner, which
    has it: answered with its size, counted for that peer, and the upstream
    sees no request for it (before: a HEAD to the upstream per node)."""
    image = cluster.push("headed", layers=1)
    digest = image.layer_digests[0]
    owner, asker = cluster.owner_and_asker("headed", image, digest)
    owner_http = cluster.nodes[owner].http
    path = f"/v2/{REGISTRY}/library/headed/blobs/{digest}"
    status, body = cluster.net.get(cluster.nodes[owner], path)
    assert status == 200
    cluster.nodes[owner].wait_committed(DOMAIN, "library/headed", digest)
    upstream = cluster.net.upstream_requests(digest)
    asked = cluster.counter(asker, "crproxy_peer_requests", peer=owner_http)
    status, headers, _ = cluster.net.request(cluster.nodes[asker], path, "HEAD")
    assert status == 200
    assert headers["Content-Length"] == str(len(body))
    assert headers["Docker-Content-Digest"] == digest
    assert cluster.counter(asker, "crproxy_peer_requests", peer=owner_http) == asked + 1
    assert cluster.net.upstream_requests(digest) == upstream
    assert not (cluster.nodes[asker].cache / "blobs/sha256" / digest.split(":", 1)[1]).exists()


def test_a_node_killed_mid_test_leaves_its_keys_to_the_next_and_rejoins(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGKILL the node owning most of a new image's blobs: pulls through the
    other two succeed, its keys fetched once from the upstream by the next
    node on the ring (failovers counted), also through a node started while
    it is down; restarted, it owns its share again."""
    image = cluster.push("lost", layers=6)
    owners = cluster.owners(0, "lost", image)
    counts = {n: list(owners.values()).count(node.http) for n, node in enumerate(cluster.nodes)}
    victim = max(counts, key=lambda n: counts[n])
    assert counts[victim] > 0
    survivors = [n for n in range(3) if n != victim]
    cluster.net.kill_node(victim, cluster.nodes[victim])
    try:
        for n in survivors:
            blobs = cluster.pull(n, "lost", tmp_path / f"n{n}")
            assert expected_digests(image) <= set(blobs)
        for digest in blob_digests(image):
            assert cluster.net.cdn_gets(digest) == 1, digest
        failovers = sum(cluster.counter(n, "crproxy_peer_failovers",
                                        peer=cluster.nodes[victim].http) for n in survivors)
        assert failovers >= 1
        # The survivors agree on who took the lost node's keys.
        moved = cluster.owners(survivors[0], "lost", image)
        assert moved == cluster.owners(survivors[1], "lost", image)
        assert cluster.nodes[victim].http not in moved.values()
        # A node started while a peer is unreachable serves all the same.
        late = cluster.nodes[survivors[1]]
        late.stop()
        late.start()
        image = cluster.push("late", layers=4)
        blobs = cluster.pull(survivors[1], "late", tmp_path / "late")
        assert expected_digests(image) <= set(blobs)
        for digest in blob_digests(image):
            assert cluster.net.cdn_gets(digest) == 1, digest
    finally:
        cluster.nodes[victim].start()
    # Rejoined: once the ring's fail_timeout is over, the survivors send the
    # victim its keys again, and it answers them.
    mine = next(d for d, o in owners.items() if o == cluster.nodes[victim].http)
    deadline = time.monotonic() + REJOIN_TIMEOUT
    asker = cluster.nodes[survivors[0]]
    while (said := cluster.net.owner(asker, REGISTRY, "library/lost", mine)
           ) != cluster.nodes[victim].http:
        assert time.monotonic() < deadline, (
            f"the restarted node never got its keys back: {said}\n"
            f"{cluster.nodes[victim].log_text()[-3000:]}")
        threading.Event().wait(0.2)
    fresh = cluster.push("back", layers=4)
    before = cluster.counter(survivors[0], "crproxy_peer_requests",
                             peer=cluster.nodes[victim].http)
    blobs = cluster.pull(survivors[0], "back", tmp_path / "back")
    assert expected_digests(fresh) <= set(blobs)
    back_owners = cluster.owners(survivors[0], "back", fresh)
    back_owners["tag"] = cluster.tag_owner(survivors[0], "back")
    served = sum(1 for o in back_owners.values() if o == cluster.nodes[victim].http)
    after = cluster.counter(survivors[0], "crproxy_peer_requests",
                            peer=cluster.nodes[victim].http)
    assert after - before == served
    for digest in blob_digests(fresh):
        assert cluster.net.cdn_gets(digest) == 1, digest


def test_a_peer_answering_wrong_bytes_is_caught_counted_and_skipped(cluster: Cluster) -> None:
    """The owner's stored copy corrupted on its disk (its nginx serves it as
    it is): a node asking it gets the wrong bytes, its digest check cuts the
    client's download short (never a whole wrong blob), it counts the peer
    and asks the upstream for that digest from then on."""
    image = cluster.push("bad", layers=1)
    digest = image.layer_digests[0]
    owner, asker = cluster.owner_and_asker("bad", image, digest)
    owner_http = cluster.nodes[owner].http
    path = f"/v2/{REGISTRY}/library/bad/blobs/{digest}"
    status, good = cluster.net.get(cluster.nodes[owner], path)
    assert status == 200
    (stored,) = cluster.nodes[owner].wait_committed(DOMAIN, "library/bad", digest)
    with stored.open("r+b") as file:  # same size, other bytes; in place (hard links)
        file.write(b"X" * 64)
    with pytest.raises(Exception) as cut:
        cluster.net.get(cluster.nodes[asker], path)
    assert "IncompleteRead" in repr(cut.value) or isinstance(cut.value, ConnectionError), cut.value
    assert cluster.counter(asker, "crproxy_peer_errors", peer=owner_http, reason="digest") == 1
    status, body = cluster.net.get(cluster.nodes[asker], path)
    assert (status, body) == (200, good)
    assert cluster.net.cdn_gets(digest) == 2  # the owner's fill, then the asker's own


def test_without_keep_local_a_node_streams_from_the_owner_every_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    """cluster.keep_local: false: what a peer owns is verified and passed
    on, never stored here; the owner is asked again next time (no second
    upstream GET)."""
    n = 2
    node = cluster.nodes[n]
    node.stop()
    node.config["cluster"]["keep_local"] = False
    try:
        node.start()
        image = cluster.push("thin", layers=3)
        # Its ring, just started, may still route round a peer it saw fail
        # (the kill case before): until some blob goes to another node.
        wait_until(lambda: any(o != node.http for o in cluster.owners(n, "thin", image).values()),
                   REJOIN_TIMEOUT, "the restarted node's ring sending a blob to a peer")
        owners = cluster.owners(n, "thin", image)
        remote = [d for d, o in owners.items() if o != node.http]
        assert remote
        # Nor its tag, when another node owns it: asked again each time.
        tag_remote = int(cluster.tag_owner(n, "thin") != node.http)
        before = sum(cluster.counter(n, "crproxy_peer_requests", peer=p.http)
                     for p in cluster.nodes if p is not node)
        for attempt in range(2):
            blobs = cluster.pull(n, "thin", tmp_path / f"pull{attempt}")
            assert expected_digests(image) <= set(blobs)
        after = sum(cluster.counter(n, "crproxy_peer_requests", peer=p.http)
                    for p in cluster.nodes if p is not node)
        assert after - before == 2 * (len(remote) + tag_remote)
        for digest in remote:
            assert not (node.cache / "blobs/sha256" / digest.split(":", 1)[1]).exists()
        for digest in blob_digests(image):
            assert cluster.net.cdn_gets(digest) == 1, digest
    finally:
        node.stop()
        node.config["cluster"]["keep_local"] = True
        node.start()
