"""dp-router bench: the report arithmetic, and the wrk Lua script against the fast upstream."""

from __future__ import annotations

import shutil
import tomllib

import pytest

from loadtest import bench, procs
from loadtest.bench import BenchResult, WrkRun
from router import config


def run(rps: float, p50: float, cpu: float | None = None) -> WrkRun:
    return WrkRun(
        requests=int(rps * 2),
        duration_s=2.0,
        errors=0,
        p50_us=p50,
        p90_us=p50 * 1.5,
        p99_us=p50 * 3,
        mean_us=p50,
        cpu_us_per_request=cpu,
    )


def test_targets_and_table_by_hand() -> None:
    result = BenchResult(upstream="minimal", run_s=2.0, gateway_cpu=0, client_cpu=1)
    result.runs = {
        "c1_small": {"direct": run(5000, 150), "gateway": run(2000, 350, cpu=180)},
        "c64_small": {"direct": run(9000, 7000), "gateway": run(5000, 12000, cpu=150)},
        "c64_100k": {"direct": run(2000, 30000), "gateway": run(1500, 40000, cpu=360)},
    }
    result.ttft_us = {
        "direct": {"p50": 500.0, "p90": 600.0, "p99": 900.0, "mean": 520.0},
        "gateway": {"p50": 1700.0, "p90": 2000.0, "p99": 3000.0, "mean": 1800.0},
    }
    t = result.targets()
    assert t["cpu_per_small_request_us"] == {"value": 150, "target": 200.0, "ok": True}
    assert t["added_p50_us"]["value"] == 200 and t["added_p50_us"]["ok"]
    assert (
        t["added_stream_ttft_p50_us"]["value"] == 1200 and not t["added_stream_ttft_p50_us"]["ok"]
    )
    assert t["cpu_100k_vs_small_ratio"]["value"] == pytest.approx(2.4)
    table = result.table()
    assert "| c=1, small body: latency p50" in table
    assert "+200 us (x2.33)" in table
    assert "x0.56" in table  # c=64 throughput ratio 5000 / 9000
    assert "MISSED" in table
    assert result.to_json()["runs"]["c1_small"]["gateway"]["rps"] == 2000


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
async def test_lua_script_drives_the_fast_upstream() -> None:
    upstream = await procs.spawn(
        "upstream", procs.dp_router("bench", "_upstream", "0"), stdout_pipe=True
    )
    try:
        (port,) = await upstream.ready_ports(1)
        url = f"http://127.0.0.1:{port}"
        small = await bench.wrk(url, connections=2, seconds=1, prompt_bytes=64, cpu=None)
        large = await bench.wrk(url, connections=2, seconds=1, prompt_bytes=100 * 1024, cpu=None)
        ttfts = await bench.stream_ttfts(url, 10)
    finally:
        await upstream.stop()
    assert small.requests > 0 and small.errors == 0 and small.p50_us > 0
    assert large.requests > 0 and large.errors == 0
    assert len(ttfts) == 10 and all(t > 0 for t in ttfts)


async def test_streaming_heavy_phase_counts_paced_chunks() -> None:
    """Concurrent paced streams: every stream's first token and every chunk
    counted, at the pace asked for."""
    upstream = await procs.spawn(
        "upstream", procs.dp_router("bench", "_upstream", "0"), stdout_pipe=True
    )
    try:
        (port,) = await upstream.ready_ports(1)
        load = await bench.stream_load(f"http://127.0.0.1:{port}", 4, 5, 20.0, 0.3, upstream)
    finally:
        await upstream.stop()
    streams = len(load.ttft_s)
    assert streams >= 4
    # 5 paced chunks + the final usage/[DONE] event, per stream
    assert load.chunks >= streams * 6
    summary = load.summary()
    # Measured (not None); it may read 0 here: /proc counts CPU in 10 ms
    # ticks, and this short run can stay under one (the bench runs seconds).
    assert summary["cpu_us_per_chunk"] is not None and summary["cpu_us_per_chunk"] >= 0
    assert load.seconds >= 5 * 0.020  # one stream at least ran its paced course


def test_generated_gateway_config_is_valid() -> None:
    text = bench._gateway_config("http://127.0.0.1:1", 18000, 18001, "p2c", access_log=True)
    cfg = config.from_dict(tomllib.loads(text), env={})
    assert [(r.name, r.url, r.models) for r in cfg.replicas] == [
        ("upstream", "http://127.0.0.1:1", (bench.MODEL,))
    ]
    assert cfg.routing.policy == "p2c" and cfg.server.access_log is True
    assert cfg.health.slow_start_s == 0.0


def test_median_of_repeated_runs() -> None:
    runs = [run(1000, 300, cpu=200), run(3000, 100, cpu=100), run(2000, 200, cpu=900)]
    m = WrkRun.median(runs)
    assert m.rps == pytest.approx(2000)
    assert (m.p50_us, m.p99_us, m.cpu_us_per_request) == (200, 600, 200)
    assert WrkRun.median(runs[:1]) is runs[0]
