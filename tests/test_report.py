"""Report maths on recorded synthetic timings: no clock, hand-computed values."""

from __future__ import annotations

import json
import math
import sys

import pytest

from loadtest.report import (
    Distribution,
    ErrorKind,
    RequestRecord,
    comparison_table,
    inflight_timeline,
    load_results,
    markdown_summary,
    percentile,
    result_from_json,
    summarize,
    write_plots,
    write_results,
)


def test_percentile_linear_interpolation_by_hand() -> None:
    v = [1.0, 2.0, 3.0, 4.0]
    # h = (n - 1) q = 3q: p50 -> h 1.5 -> 2 + 0.5 * 1; p90 -> h 2.7 -> 3 + 0.7; p99 -> 3.97.
    assert percentile(v, 0.5) == pytest.approx(2.5, abs=1e-12)
    assert percentile(v, 0.9) == pytest.approx(3.7, abs=1e-12)
    assert percentile(v, 0.99) == pytest.approx(3.97, abs=1e-12)
    assert percentile(v, 0.0) == 1.0
    assert percentile(v, 1.0) == 4.0


def test_percentile_of_1_to_100_matches_numpy_definition() -> None:
    v = [float(i) for i in range(1, 101)]
    # h = 99 q: p50 -> 49.5 -> 50.5; p90 -> 89.1 -> 90.1; p99 -> 98.01 -> 99.01.
    assert percentile(v, 0.5) == pytest.approx(50.5)
    assert percentile(v, 0.9) == pytest.approx(90.1)
    assert percentile(v, 0.99) == pytest.approx(99.01)


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 0.5))
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([0.010, 0.010, 0.030], 0.5) == 0.010
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_distribution_of_unsorted_values() -> None:
    d = Distribution.of([0.4, 0.1, 0.3, 0.2])
    assert d.count == 4
    assert d.mean == pytest.approx(0.25)
    assert d.p50 == pytest.approx(0.25)
    assert d.p90 == pytest.approx(0.37)
    assert d.max == 0.4


def _records() -> list[RequestRecord]:
    return [
        # ok, streamed: TPOT = (1.0 - 0.1) / (10 - 1) = 0.1
        RequestRecord("c1", 0, 0.0, 1.0, ttft_s=0.1, output_tokens=10, status=200, replica="a"),
        # ok: TPOT = (2.0 - 0.2) / (4 - 1) = 0.6
        RequestRecord("c1", 1, 1.5, 2.0, ttft_s=0.2, output_tokens=4, status=200, replica="b"),
        # ok, one token: no TPOT
        RequestRecord("c2", 0, 0.5, 0.3, ttft_s=0.3, output_tokens=1, status=200, replica="a"),
        RequestRecord("c3", 0, 1.0, 0.01, status=503, error=ErrorKind.HTTP, replica="b"),
        RequestRecord("c4", 0, 1.0, 0.02, error=ErrorKind.CONNECT),
        RequestRecord("c5", 0, 2.0, 0.5, ttft_s=0.1, output_tokens=3, error=ErrorKind.TRUNCATED),
    ]


def test_summarize_by_hand() -> None:
    r = summarize(_records(), wall_s=4.0, label="x", mode="rate=1/s")
    assert (r.requests, r.ok) == (6, 3)
    assert r.errors == {"connect": 1, "http_503": 1, "truncated": 1}
    assert r.rps == pytest.approx(3 / 4.0)
    assert r.output_tps == pytest.approx(15 / 4.0)
    assert r.ttft.count == 3 and r.ttft.p50 == pytest.approx(0.2)
    assert r.tpot.count == 2 and r.tpot.p50 == pytest.approx(0.35)
    assert r.e2e.p50 == pytest.approx(1.0)
    assert r.e2e.max == pytest.approx(2.0)
    assert r.replicas == {"a": 2, "b": 1}
    assert r.replica_share() == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}


def test_json_shape_and_round_trip(tmp_path) -> None:
    r = summarize(_records(), wall_s=4.0, label="A", prefix_hit_rate=0.5)
    empty = summarize([], wall_s=1.0, label="B")
    paths = write_results([r, empty], tmp_path)
    assert [p.name for p in paths] == ["results.json", "summary.md"]
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN
    run = data["runs"][0]
    for key in ("label", "wall_s", "requests", "ok", "errors", "rps", "output_tps", "ttft"):
        assert key in run
    assert set(run["ttft"]) == {"count", "mean", "p50", "p90", "p99", "max"}
    assert run["replica_share"]["a"] == pytest.approx(2 / 3)
    assert len(run["records"]) == 6
    assert data["runs"][1]["ttft"]["p50"] is None
    back = load_results(tmp_path / "results.json")
    assert back[0].ttft == r.ttft
    assert back[0].records == r.records
    assert math.isnan(back[1].e2e.p99)


def test_markdown_summary_and_comparison() -> None:
    a = summarize(_records(), wall_s=4.0, label="least_request", prefix_hit_rate=0.25)
    b = summarize(_records()[:3], wall_s=2.0, label="round_robin")
    md = markdown_summary(a)
    assert "# Load test: least_request" in md
    assert "| TTFT   | 3 " in md
    assert "25.0%" in md
    table = comparison_table([a, b])
    lines = table.splitlines()
    assert lines[0].startswith("| run ")
    assert "least_request" in lines[2] and "round_robin" in lines[3]
    assert "http_503 1" in lines[2]
    # TTFT p50 in ms: 200.0 for both runs.
    assert lines[3].split("|")[2].strip() == "200.0"


def test_inflight_timeline_counts_overlaps() -> None:
    recs = [
        RequestRecord("c1", 0, 0.0, 1.0, replica="a"),
        RequestRecord("c2", 0, 0.5, 1.0, replica="a"),
        RequestRecord("c3", 0, 0.5, 0.2, replica="b"),
    ]
    times, series = inflight_timeline(recs, step_s=0.5)
    assert times == [0.0, 0.5, 1.0, 1.5]
    assert series == {"a": [1, 2, 2, 1], "b": [0, 1, 0, 0]}


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch) -> None:
    """matplotlib is an optional extra: without it, None (the caller says so)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    r = summarize(_records(), wall_s=4.0, label="A")
    assert write_plots([r, r], tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_plots_are_written_with_matplotlib(tmp_path) -> None:
    pytest.importorskip("matplotlib")  # the optional [plots] extra
    r = summarize(_records(), wall_s=4.0, label="A")
    paths = write_plots([r, r], tmp_path)
    assert paths is not None
    assert [p.name for p in paths] == ["latency_cdf.png", "replica_load.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_first_admission_hit_rate_is_the_headline_and_readmission_apart() -> None:
    r = summarize(_records(), wall_s=4.0, prefix_hit_rate=0.25, readmit_hit_rate=0.9)
    md = markdown_summary(r)
    assert "hit rate at first admission (replica metrics): 25.0%" in md
    assert "re-admissions after a preemption: 90.0%" in md
    assert "prefix hit (1st adm.)" in comparison_table([r])
    old = r.to_json()
    del old["readmit_hit_rate"]  # results saved before the field existed still load
    assert result_from_json(old).readmit_hit_rate is None
