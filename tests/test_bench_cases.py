"""bench.cases: the bench's table is derived from its case records."""

from __future__ import annotations

from bench.cases import CASES, Ratio, Results, Series, rows, sample_lines
from bench.report import MIB


def test_a_ratio_compares_series_of_one_unit() -> None:
    for case in CASES:
        if isinstance(case, Ratio):
            assert case.ours.unit == case.ref.unit, case.case


def test_every_series_measured_is_reported_in_some_row() -> None:
    used = {s for case in CASES if isinstance(case, Ratio) for s in (case.ours, case.ref)}
    assert used == set(Series)


def test_one_row_per_case_in_order_with_the_blob_size_named() -> None:
    table = rows(Results(), mib=64)
    assert [row.case for row in table] == [
        case.case.format(mib=64) for case in CASES
    ]
    assert table[0].case == "blob hit, mirror over HTTP (curl, 64 MiB)"


def test_a_ratio_row_passes_or_misses_its_bar_by_medians() -> None:
    results = Results()
    for value in (900 * MIB, 1000 * MIB, 1100 * MIB):
        results.add(Series.HIT_HTTP_OURS, value)
    for value in (990 * MIB, 1000 * MIB, 5000 * MIB):
        results.add(Series.HIT_HTTP_PLAIN, value)
    first = rows(results, mib=256)[0]
    assert (first.ours, first.against) == ("1,000 MiB/s", "1,000 MiB/s plain nginx sendfile")
    assert (first.ratio, first.bar, first.result) == ("1.00x", ">= 0.95x", "PASS")
    results.add(Series.HIT_HTTP_PLAIN, 5000 * MIB)  # median now 3000 MiB/s
    assert rows(results, mib=256)[0].result == "MISS"


def test_rows_without_samples_say_so() -> None:
    by_case = {row.case: row for row in rows(Results(), mib=1)}
    assert by_case["manifest hit (wrk -t2 -c32)"].result == "n/a (no samples)"
    assert by_case["warm blob, curl"].bar == "(info)"
    # An absolute row too (a case left out with `bench.run --only`).
    assert by_case["16 clients miss one blob: upstream GETs"].result == "n/a (no samples)"
    assert by_case["fetcher peak RSS (cold + concurrent)"].result == "n/a (no samples)"


def test_absolute_rows_judge_the_tallies() -> None:
    results = Results(upstream_gets=[1, 1], front_cpu=[(0.1, 1 << 30), (0.1, 1 << 30)],
                      conn_cpu=[(0.5, 1000)])
    results.rss["cold curl"].append(60 * MIB)
    results.rss["concurrent"].append(70 * MIB)
    by_case = {row.case: row for row in rows(results, mib=1)}
    gets = by_case["16 clients miss one blob: upstream GETs"]
    assert (gets.ours, gets.result) == ("1, 1", "PASS")
    rss = by_case["fetcher peak RSS (cold + concurrent)"]
    assert (rss.ours, rss.against, rss.result) == ("70.0 MiB", "worst in: concurrent", "PASS")
    cpu = by_case["front CPU per GiB (serve process, utime+stime)"]
    assert (cpu.ours, cpu.result) == ("0.100 s/GiB", "PASS")
    conn = by_case["front CPU per new connection (serve process)"]
    assert (conn.ours, conn.against, conn.result) == ("0.50 ms", "over 1,000 connections", "-")
    results.upstream_gets.append(2)  # a round where two clients went upstream
    by_case = {row.case: row for row in rows(results, mib=1)}
    assert by_case["16 clients miss one blob: upstream GETs"].result == "MISS"


def test_sample_lines_show_each_series_in_its_unit_in_measured_order() -> None:
    results = Results()
    results.add(Series.CONN1_FRONT, 0.0025)
    results.add(Series.HIT_HTTP_OURS, 2 * MIB)
    results.add(Series.COLD_CURL_OURS, 0.5)
    assert sample_lines(results) == [
        "conn1_front (ms, median 2.50): 2.50",
        "hit_http_ours (MiB/s, median 2.00): 2.00",
        "cold_curl_ours (s, median 0.50): 0.50",
    ]


def test_the_mqtt_rows_judge_bytes_against_the_floor() -> None:
    results = Results(mqtt=[(2.0, 70 * MIB, 50 * MIB), (3.0, 67 * MIB, 50 * MIB)])
    by_case = {row.case: row for row in rows(results, mib=1)}
    wall, sent = (row for case, row in by_case.items() if "over MQTT" in case)
    assert (wall.ours, wall.result) == ("2.50 s", "-")
    assert (sent.ours, sent.result) == ("1.40x", "PASS")
    results.mqtt.append((2.0, 134 * MIB, 50 * MIB))  # a wave that sent every chunk twice
    sent = next(row for case, row in {r.case: r for r in rows(results, mib=1)}.items()
                if "bytes" in case and "MQTT" in case)
    assert sent.result == "MISS"
