"""cr_proxy.usage: nginx's usage log, parsed and followed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cr_proxy.metrics import Metrics
from cr_proxy.ops import usage
from cr_proxy.ops.usage import LogTail, UsageFeed, parse_line

HIT = "registry.test /v2/a/blobs/sha256:ab 200 1234 blob HIT"
MISS = "registry.test /v2/a/manifests/v1 200 500 manifest-fetch MISS"


def test_parse_line_reads_the_six_fields() -> None:
    use = parse_line(HIT)
    assert use is not None
    assert (use.domain, use.path, use.status, use.size, use.kind, use.cache) == (
        "registry.test", "/v2/a/blobs/sha256:ab", 200, 1234, "blob", "HIT")
    assert use.nginx_hit
    assert parse_line(MISS) is not None and not parse_line(MISS).nginx_hit
    assert parse_line("garbage") is None
    assert parse_line("a b c d e f") is None  # status not a number


def test_feed_counts_nginx_hits_and_records_uses_of_both() -> None:
    feed = UsageFeed(Metrics())
    feed.feed(f"{HIT}\n{MISS}\n- / 400 0 other -\n", when=42.0)
    assert feed.metrics.total(feed.metrics.hits) == 1
    assert feed.metrics.total(feed.metrics.bytes_served) == 1234
    assert feed.last_used == {("registry.test", "v2/a/blobs/sha256:ab"): 42.0,
                              ("registry.test", "v2/a/manifests/v1"): 42.0}


def test_repeated_lines_count_once_each() -> None:
    """feed() counts identical lines together: the totals must still be per line."""
    feed = UsageFeed(Metrics())
    feed.feed("\n".join([HIT] * 500 + [MISS] * 3 + [HIT] * 7), when=7.0)
    assert feed.lines == 510
    assert feed.metrics.total(feed.metrics.hits) == 507
    assert feed.metrics.total(feed.metrics.bytes_served) == 507 * 1234
    assert feed.metrics.total(feed.metrics.requests) == 510
    assert feed.last_used[("registry.test", "v2/a/blobs/sha256:ab")] == 7.0


def test_mirror_auth_refusals_are_counted_by_reason() -> None:
    """nginx's mirror_auth refusals log denied-<reason> as their request
    type, no domain or path (nginx.py, mirror_auth_server)."""
    feed = UsageFeed(Metrics())
    feed.feed("  401 86 denied-no_identity -\n" * 2 + "  403 90 denied-rule_deny -\n"
              + HIT + "\n", when=1.0)
    denied = feed.metrics.mirror_auth_denied
    counts = {sample.labels["reason"]: sample.value for family in denied.collect()
              for sample in family.samples if sample.name.endswith("_total")}
    assert counts == {"no_identity": 2, "rule_deny": 1}
    assert feed.last_used == {("registry.test", "v2/a/blobs/sha256:ab"): 1.0}


def test_tail_returns_whole_lines_once(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    tail = LogTail(log)
    assert tail.read_new() == ""  # not there yet
    log.write_text(f"{HIT}\nregistry.test /v2/a")
    assert tail.read_new() == HIT
    with log.open("a") as f:
        f.write("/manifests/v1 200 500 manifest-fetch MISS\n")
    assert tail.read_new() == MISS
    assert tail.read_new() == ""


def test_rotation_reads_the_old_file_to_its_end(tmp_path: Path, monkeypatch) -> None:
    import cr_proxy.ops.usage as usage

    monkeypatch.setattr(usage, "ROTATE_BYTES", 10)
    log = tmp_path / "usage.log"
    tail = LogTail(log)
    log.write_text(f"{HIT}\n")
    assert tail.read_new() == HIT
    reopened = []

    def reopen() -> None:  # nginx, told to reopen, writes on to a new file
        reopened.append(True)
        log.write_text(f"{MISS}\n")

    with (tmp_path / "usage.log").open("a") as f:
        f.write(f"{MISS}\n")
    assert tail.rotate_if_large(reopen) == MISS
    assert reopened == [True]
    assert tail.read_new() == MISS
    assert not (tmp_path / "usage.log.1").exists()  # read, then removed


def test_last_use_times_are_bounded_the_oldest_going_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The names are the clients' (a stored blob is served under invented
    ones when the upstream cannot be asked): a flood of them keeps the
    table at MAX_USES, and a name used again is the newest (a review
    finding, session 13: it grew with every name, and usage.json too)."""
    monkeypatch.setattr(usage, "MAX_USES", 100)
    feed = UsageFeed(Metrics())
    feed.feed(HIT, when=1.0)
    for i in range(300):
        feed.feed(f"reg{i}.invalid /v2/x{i}/blobs/sha256:ab 200 10 blob-fetch HIT", when=2.0 + i)
        if i == 250:
            feed.feed(HIT, when=3.0 + i)  # used again: kept
    assert len(feed.last_used) == 100
    assert ("registry.test", "v2/a/blobs/sha256:ab") in feed.last_used
    assert ("reg299.invalid", "v2/x299/blobs/sha256:ab") in feed.last_used
    assert ("reg0.invalid", "v2/x0/blobs/sha256:ab") not in feed.last_used
