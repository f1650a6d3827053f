"""certs.LeafCache: at most max_hosts leaves, the least recently used
dropped, at start-up too; a dropped leaf's files go at once, or when its
owner says so (after nginx reloaded), and never while the host is back."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from cr_proxy.front import certs


def cache(tmp_path: Path, max_hosts: int) -> certs.LeafCache:
    return certs.LeafCache(certs.ensure_ca(tmp_path), tmp_path, max_hosts)


def on_disk(tmp_path: Path) -> set[str]:
    return {p.stem for p in (tmp_path / "hosts").glob("*.crt")} - {certs.FALLBACK_NAME}


async def test_a_leaf_names_its_host_and_is_reused(tmp_path: Path) -> None:
    leaves = cache(tmp_path, 3)
    pair = await leaves.ensure("a.test")
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["a.test"]
    before = pair.cert.read_bytes()
    assert await leaves.ensure("a.test") == pair
    assert pair.cert.read_bytes() == before
    assert leaves.has("a.test") and not leaves.has("b.test")


async def test_the_least_recently_used_leaf_is_dropped(tmp_path: Path) -> None:
    leaves = cache(tmp_path, 2)
    for host in ("a.test", "b.test", "a.test", "c.test"):
        await leaves.ensure(host)
    assert on_disk(tmp_path) == {"a.test", "c.test"}
    assert not leaves.has("b.test")


async def test_with_an_owner_files_go_when_it_says_unless_the_host_came_back(
    tmp_path: Path
) -> None:
    leaves = cache(tmp_path, 1)
    dropped: list[str] = []
    leaves.on_drop = dropped.append
    await leaves.ensure("a.test")
    await leaves.ensure("b.test")
    assert dropped == ["a.test"]
    assert on_disk(tmp_path) == {"a.test", "b.test"}  # nginx may still read a's
    await leaves.ensure("a.test")  # back before its owner removed it
    leaves.remove("a.test")
    assert on_disk(tmp_path) == {"a.test", "b.test"}
    assert dropped == ["a.test", "b.test"]
    leaves.remove("b.test")
    assert on_disk(tmp_path) == {"a.test"}


async def test_start_up_keeps_the_most_recently_used_by_mtime(tmp_path: Path) -> None:
    leaves = cache(tmp_path, 10)
    hosts = [f"h{i}.test" for i in range(6)]
    for age, host in enumerate(hosts):
        pair = await leaves.ensure(host)
        os.utime(pair.cert, (1e9 + age, 1e9 + age))  # h5 used last
    leaves.ensure_fallback()
    again = cache(tmp_path, 2)
    assert on_disk(tmp_path) == {"h4.test", "h5.test"}
    assert again.has("h5.test") and not again.has("h0.test")
    assert (tmp_path / "hosts" / f"{certs.FALLBACK_NAME}.crt").is_file()
    assert not (tmp_path / "hosts" / "h0.test.key").exists()


def test_the_mirror_leaf_covers_its_names_and_is_renewed_for_a_new_one(tmp_path: Path) -> None:
    ca = certs.ensure_ca(tmp_path)
    pair = certs.ensure_mirror_leaf(ca, tmp_path, ("mirror.test",))
    assert pair == certs.CertPair(tmp_path / "mirror.crt", tmp_path / "mirror.key")
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "mirror.test"} <= set(names.get_values_for_type(x509.DNSName))
    before = pair.cert.read_bytes()
    assert certs.ensure_mirror_leaf(ca, tmp_path, ("mirror.test",)) == pair
    assert pair.cert.read_bytes() == before
    certs.ensure_mirror_leaf(ca, tmp_path, ("other.test",))
    assert pair.cert.read_bytes() != before
