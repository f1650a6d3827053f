"""The results table: medians, ratios, each bar and PASS/MISS, as text for
the terminal and as Markdown for docs/benchmarks.md."""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass

MIB = 1 << 20
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}


@dataclass
class Bar:
    """`ratio OP limit`, e.g. Bar(">=", 0.95)."""

    op: str
    limit: float
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.op} {self.limit:g}x"

    def met(self, value: float) -> bool:
        return OPS[self.op](value, self.limit)


@dataclass
class Row:
    case: str
    ours: str  # cr-proxy's median, formatted
    against: str  # the reference's median and what it is
    ratio: str
    bar: str
    result: str  # PASS / MISS / n/a


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def fmt_rate(bps: float) -> str:
    return f"{bps / MIB:,.0f} MiB/s"


def fmt_secs(s: float) -> str:
    return f"{s:.2f} s"


def fmt_rps(r: float) -> str:
    return f"{r:,.0f} req/s"


def fmt_mib(b: float) -> str:
    return f"{b / MIB:.1f} MiB"


def compare(
    case: str, ours: list[float], ref: list[float], ref_name: str, bar: Bar,
    fmt: Callable[[float], str],
) -> Row:
    """A row comparing cr-proxy's samples with a reference's, by median."""
    if not ours or not ref:
        return Row(case, "-", ref_name, "-", str(bar), "n/a (no samples)")
    a, b = median(ours), median(ref)
    ratio = a / b
    return Row(case, fmt(a), f"{fmt(b)} {ref_name}", f"{ratio:.2f}x", str(bar),
               "PASS" if bar.met(ratio) else "MISS")


def info(case: str, ours: list[float], ref: list[float], ref_name: str,
         fmt: Callable[[float], str]) -> Row:
    """A row with no bar: context for reading the rows that have one."""
    if not ours or not ref:
        return Row(case, "-", ref_name, "-", "(info)", "-")
    a, b = median(ours), median(ref)
    return Row(case, fmt(a), f"{fmt(b)} {ref_name}", f"{a / b:.2f}x", "(info)", "-")


def absolute(case: str, value: str, against: str, ok: bool, bar: str) -> Row:
    return Row(case, value, against, "-", bar, "PASS" if ok else "MISS")


HEADER = ("case", "cr-proxy (median)", "against (median)", "ratio", "bar", "result")


def text_table(rows: list[Row]) -> str:
    cells = [HEADER, *[(r.case, r.ours, r.against, r.ratio, r.bar, r.result) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for n, cell in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(cell, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(HEADER), line(tuple("---" for _ in HEADER))]
    out += [line((r.case, r.ours, r.against, r.ratio, r.bar, r.result)) for r in rows]
    return "\n".join(out)
