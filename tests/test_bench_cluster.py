"""bench/cluster.py's verdicts: a cold round must cost the upstream exactly
one GET per blob, a warm round none, and every pull must succeed."""

from __future__ import annotations

from bench.cluster import MIB, Round, table


def test_a_round_is_ok_only_with_one_get_per_blob_cold_and_none_warm() -> None:
    assert Round("three nodes", "cold", 2.0, 100.0, (1, 1), 0).ok
    assert Round("three nodes", "warm", 1.0, 200.0, (0, 0), 0).ok
    assert not Round("three nodes", "cold", 2.0, 100.0, (1, 2), 0).ok
    assert not Round("three nodes", "warm", 1.0, 200.0, (0, 1), 0).ok
    assert not Round("one node", "cold", 2.0, 100.0, (1, 1), 3).ok


def test_the_table_names_what_is_wrong() -> None:
    text = table([Round("one node", "cold", 2.0, 768.0, (1, 1), 0),
                  Round("three nodes", "cold", 1.5, 1024.0, (1, 2), 0),
                  Round("three nodes", "warm", 1.0, 0.0, (0, 0), 48)], 48, 32 * MIB)
    assert "| one node | cold | 2.0 s | 768 MiB/s | 1 | ok |" in text
    assert "| three nodes | cold | 1.5 s | 1024 MiB/s | 1..2 | WRONG |" in text
    assert "| three nodes | warm | 1.0 s | 0 MiB/s | 0 | WRONG (48 pulls failed) |" in text
