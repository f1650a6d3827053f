"""Byte counts as people read them, for every command that prints a size
(`cr-proxy ls|du|rm|verify`, `cr-proxy warm`). Pure."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(size: float) -> str:
    """1023 -> '1023 B', 1536 -> '1.5 KiB': binary units up to TiB, one
    decimal above bytes."""
    value = float(size)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
