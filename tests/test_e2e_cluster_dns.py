"""cluster.peers as one DNS name (a Kubernetes headless Service): every
address the name resolves to is a node. Three nodes in network namespaces
(testbed/cluster.py), the name served by their hosts files: two nodes
start with the name naming them; a third is started and published, and
the two others' rings take it in without a restart (serve resolves the
name every cluster.resolve_interval, renders the ring again and reloads
nginx); unpublished, it leaves their rings again; a name that stops
resolving leaves the rings as they were."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cr_proxy.upstream import members
from testbed.cluster import ClusterBed
from testbed.crproxy import CrProxy
from testbed.oci_layout import ImageInfo, build_image, tar_layer
from tests.faulty import wait_until
from tests.test_e2e_mirror import expected_digests

NAME = "peers.cr.lan"
REGISTRY = "docker.io"
DOMAIN = "registry-1.docker.io"
RESOLVE_INTERVAL = 0.5  # seconds: the test waits for the change, not for a clock
CHANGE_TIMEOUT = 60.0


@dataclass
class Bed:
    net: ClusterBed
    nodes: list[CrProxy]
    work: Path

    def push(self, name: str, owner_among: list[str]) -> ImageInfo:
        """docker.io/library/<name>:v1 of four layers, at least one of whose
        blobs the ring of `owner_among` gives to its last entry (upstream/
        members.py, checked against nginx in tests/test_cluster_ring.py)."""
        for salt in range(100):
            layout = self.work / f"layout-{name}-{salt}"
            image = build_image(layout, layers=[
                tar_layer({f"{name}/{i}.txt": f"{name} {salt} layer {i}\n".encode() * 300})
                for i in range(4)
            ], tag="v1")
            if any(members.owner(owner_among, d) == owner_among[-1] for d in blobs(image)):
                self.net.push(layout, "v1", f"library/{name}", "v1")
                return image
        raise AssertionError("no image with a blob for the new node")

    def owners(self, node: int, name: str, image: ImageInfo) -> dict[str, str]:
        return {d: self.net.owner(self.nodes[node], REGISTRY, f"library/{name}", d)
                for d in blobs(image)}

    def pull(self, node: int, name: str, dest: Path) -> dict[str, int]:
        return self.net.pull(self.nodes[node], f"library/{name}", dest)

    def metric(self, node: int, line: str) -> float:
        text = self.net.metrics(node, self.nodes[node])
        found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


def blobs(image: ImageInfo) -> list[str]:
    return [image.config_digest, *image.layer_digests]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("cluster-dns")
    with ClusterBed(work) as net:
        net.publish(NAME, [0, 1])
        nodes = net.nodes(work, dns_name=NAME)
        for node in nodes:
            node.config["cluster"]["resolve_interval"] = RESOLVE_INTERVAL
        nodes[0].start()
        nodes[1].start()
        yield Bed(net, nodes, work)


def test_a_node_joining_the_name_grows_the_ring_without_a_restart(
    bed: Bed, tmp_path: Path
) -> None:
    """The name gains the third node's address: the running nodes' rings
    take it in (same serve, same nginx master: a reload), it owns its
    share of a new image's blobs, and a pull through node 0 costs the
    upstream one GET per blob, the new node's blobs fetched through it."""
    first, second, third = (node.http for node in bed.nodes)
    two = [first, second]
    before = bed.owners(0, "early", bed.push("early", two))
    assert set(before.values()) <= set(two)
    assert bed.metric(0, "crproxy_cluster_members") == 2
    serve_pids = [bed.nodes[0].proc.pid, bed.nodes[1].proc.pid]  # type: ignore[union-attr]

    bed.net.publish(NAME, [0, 1, 2])
    bed.nodes[2].start()
    for node in bed.nodes[:2]:
        node.wait_for_output(f"(added {third}, removed none)", CHANGE_TIMEOUT)
    three = [first, second, third]
    image = bed.push("grown", three)
    predicted = {d: members.owner(three, d) for d in blobs(image)}
    for node in range(3):
        wait_until(lambda n=node: bed.owners(n, "grown", image) == predicted,
                   CHANGE_TIMEOUT, f"node {node}'s ring giving the new node its share")
    assert [bed.nodes[0].proc.pid, bed.nodes[1].proc.pid] == serve_pids  # type: ignore[union-attr]
    assert bed.nodes[0].log_text().count("cr-proxy ready") == 1

    pulled = bed.pull(0, "grown", tmp_path / "grown")
    assert expected_digests(image) <= set(pulled)
    for digest in blobs(image):
        assert bed.net.cdn_gets(digest) == 1, digest
    theirs = sum(1 for owner in predicted.values() if owner == third)
    assert bed.metric(0, f'crproxy_peer_requests_total{{peer="{third}"}}') >= theirs > 0
    assert bed.metric(0, "crproxy_cluster_members") == 3
    assert bed.metric(0, "crproxy_cluster_changes_total") == 1
    # The status page's ring: each member's share of the keys.
    page = bed.net.metrics(0, bed.nodes[0], "/")
    for peer, share in members.shares(three).items():
        suffix = " (this node)" if peer == first else ""
        assert f"<th>ring {peer}</th><td>{share:.1%} of the keys{suffix}</td>" in page, page


def test_a_node_leaving_the_name_leaves_the_ring(bed: Bed, tmp_path: Path) -> None:
    """The name drops the third node: the others' rings give its keys back
    to the two of them, and pulls go on without it."""
    first, second, third = (node.http for node in bed.nodes)
    bed.net.publish(NAME, [0, 1])
    bed.nodes[2].stop()
    for node in bed.nodes[:2]:
        node.wait_for_output(f"(added none, removed {third})", CHANGE_TIMEOUT)
    two = [first, second]
    image = bed.push("shrunk", [first, second, third])
    wait_until(lambda: set(bed.owners(1, "shrunk", image).values()) <= set(two),
               CHANGE_TIMEOUT, "node 1's ring without the third node")
    pulled = bed.pull(1, "shrunk", tmp_path / "shrunk")
    assert expected_digests(image) <= set(pulled)
    for digest in blobs(image):
        assert bed.net.cdn_gets(digest) == 1, digest
    assert bed.metric(1, "crproxy_cluster_members") == 2


def test_a_name_that_stops_resolving_leaves_the_ring_as_it_was(bed: Bed) -> None:
    """The name's answer lost (a DNS outage): the nodes keep their ring,
    they do not shrink it to themselves; the name back, nothing changes."""
    first, second = bed.nodes[0].http, bed.nodes[1].http
    changes = bed.metric(0, "crproxy_cluster_changes_total")
    bed.net.publish(NAME, [])
    try:
        bed.nodes[0].wait_for_output(f"{NAME}:{bed.nodes[0].http_port} did not resolve",
                                     CHANGE_TIMEOUT)
        image = bed.push("kept", [first, second])
        assert bed.owners(0, "kept", image) == {d: members.owner([first, second], d)
                                                for d in blobs(image)}
        assert bed.metric(0, "crproxy_cluster_members") == 2
    finally:
        bed.net.publish(NAME, [0, 1])
    # No change of the ring all along (the outage shrank nothing).
    assert bed.metric(0, "crproxy_cluster_changes_total") == changes
