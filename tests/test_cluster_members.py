"""cluster.peers as one DNS name (upstream/members.py): its addresses are
the ring's members, this node's entry found among them; a name that does
not resolve at start gives a ring of this node alone; a self that does not
resolve is a configuration error."""

from __future__ import annotations

from pathlib import Path

import pytest

from cr_proxy.errors import ConfigError
from cr_proxy.upstream import members
from tests.test_nginx_render import load


def test_a_name_is_every_address_it_resolves_to(tmp_path: Path) -> None:
    conf = load(tmp_path, CLUSTER__PEERS="localhost:5000", CLUSTER__SELF="127.0.0.1:5000")
    found = members.resolve(conf.cluster)
    assert "127.0.0.1:5000" in found.peers
    assert all(peer.endswith(":5000") for peer in found.peers)
    assert (found.me, found.listed) == ("127.0.0.1:5000", True)
    ready, _ = members.first(conf)
    assert (ready.cluster.peers, ready.cluster.me) == (found.peers, "127.0.0.1:5000")


def test_self_not_listed_yet_is_on_its_own_ring(tmp_path: Path) -> None:
    conf = load(tmp_path, CLUSTER__PEERS="localhost:5000", CLUSTER__SELF="192.0.2.9:5000")
    found = members.resolve(conf.cluster)
    assert found.me == "192.0.2.9:5000" and not found.listed
    assert found.peers[-1] == "192.0.2.9:5000"  # v4 addresses in numeric order
    assert "127.0.0.1:5000" in found.peers


def test_a_name_that_does_not_resolve_yet_starts_a_ring_of_one(tmp_path: Path) -> None:
    conf = load(tmp_path, CLUSTER__PEERS="nowhere.invalid:5000", CLUSTER__SELF="192.0.2.9:5000")
    with pytest.raises(OSError):
        members.resolve(conf.cluster)
    ready, found = members.first(conf)
    assert found is not None and found.peers == ("192.0.2.9:5000",)
    assert ready.cluster.peers == ("192.0.2.9:5000",)


def test_a_self_that_does_not_resolve_stops_the_start(tmp_path: Path) -> None:
    conf = load(tmp_path, CLUSTER__PEERS="localhost:5000",
                CLUSTER__SELF="nowhere.invalid:5000")
    with pytest.raises(ConfigError, match=r"cluster\.self: nowhere\.invalid:5000 does not"):
        members.first(conf)


def test_a_list_is_left_as_written(tmp_path: Path) -> None:
    conf = load(tmp_path, CLUSTER__PEERS='["b.lan:5000", "a.lan:5000"]',
                CLUSTER__SELF="a.lan:5000")
    assert members.first(conf) == (conf, None)


def test_shares_cover_the_ring() -> None:
    shares = members.shares(["10.0.0.1:5000", "10.0.0.2:5000", "[2001:db8::1]:5000"])
    assert list(shares) == ["10.0.0.1:5000", "10.0.0.2:5000", "[2001:db8::1]:5000"]
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert all(0.2 < share < 0.5 for share in shares.values())
