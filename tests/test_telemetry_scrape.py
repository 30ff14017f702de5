"""Reading load from real-format /metrics texts (tests/data/) and from live replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from loadtest.replica.metrics import render_metrics
from loadtest.replica.model import ModelLoad
from router.telemetry.scrape import (
    MAX_LABEL_LENGTH,
    MAX_RANKS,
    MAX_SERIES_LINES,
    PRESETS,
    ScrapeError,
    custom_preset,
    detect,
    parse_metrics,
)
from tests.harness import base, eventually, gateway, gateway_config, replicas, serve_app

DATA = Path(__file__).parent / "data"
# Scrapes in these tests: fast, so reports arrive within a fraction of a second.
FAST = {"scrape_interval_s": 0.05, "scrape_timeout_s": 0.5}
SLACK = 0.5


def text(name: str) -> str:
    return (DATA / name).read_text()


def test_vllm_dp_ranks_are_summed_and_kept_apart() -> None:
    r = parse_metrics(text("vllm_metrics_dp2.txt"), None)
    assert (r.waiting, r.running) == (4.0, 12.0)  # 3 + 1, 7 + 5: never one rank of two
    assert r.kv_usage == pytest.approx(0.4)  # a fraction: the ranks' mean
    assert [(k.rank, k.waiting, k.running, k.kv_usage) for k in r.ranks] == [
        ("0", 3.0, 7.0, 0.6),
        ("1", 1.0, 5.0, 0.2),
    ]


def test_vllm_deprecated_kv_name_is_the_fallback() -> None:
    r = parse_metrics(text("vllm_metrics_v0_deprecated.txt"), None)
    assert (r.waiting, r.running, r.kv_usage, r.ranks) == (4.0, 12.0, 0.87, ())
    both = text("vllm_metrics_v0_deprecated.txt") + 'vllm:kv_cache_usage_perc{x="1"} 0.25\n'
    assert parse_metrics(both, None).kv_usage == 0.25  # the current name wins


def test_sglang_ranks_and_the_eplb_heat_map_is_not_parsed() -> None:
    r = parse_metrics(text("sglang_metrics_eplb.txt"), None)
    assert (r.waiting, r.running, r.kv_usage) == (2.0, 38.0, pytest.approx(0.45))
    assert len(r.ranks) == 2
    # nothing consumes per-GPU-rank counts: not parsed, not handed on
    assert (r.ep_ranks, r.experts) == ((), ())


def test_trtllm_preset_and_its_path() -> None:
    r = parse_metrics(text("trtllm_metrics.txt"), None)
    assert (r.waiting, r.running, r.kv_usage) == (6.0, 9.0, 0.25)
    assert PRESETS["trtllm"].metrics_path == "/prometheus/metrics"


@pytest.mark.parametrize("flavour", ["vllm", "sglang"])
def test_the_simulated_replica_with_expert_counters(flavour: str) -> None:
    load = ModelLoad(running=3, waiting=2, kv_usage=0.5, expert_tokens=[5, 6, 7])
    load.expert_overflow = [0, 1, 0]
    r = parse_metrics(render_metrics(flavour, "m", load), None)
    assert (r.waiting, r.running, r.kv_usage) == (2.0, 3.0, 0.5)
    (sample,) = r.experts
    assert (sample.layer, sample.tokens) == (None, (5.0, 6.0, 7.0))
    assert sample.overflow == (0.0, 1.0, 0.0)


def test_expert_counters_per_layer_and_rank_and_bounded() -> None:
    lines = [
        'dp_sim:expert_tokens_total{engine="0",layer="0",expert="0"} 1',
        'dp_sim:expert_tokens_total{engine="1",layer="0",expert="0"} 2',  # ranks summed
        'dp_sim:expert_tokens_total{engine="0",layer="0",expert="2"} 4',  # gap: expert 1 is 0
        'dp_sim:expert_tokens_total{engine="0",layer="1",expert="0"} 8',
        'dp_sim:expert_tokens_total{engine="0",layer="1",expert="99"} 8',  # beyond max_experts
        'dp_sim:expert_tokens_total{engine="0",layer="7",expert="0"} 8',  # beyond max_layers
        'vllm:num_requests_waiting{engine="0"} 0',
    ]
    r = parse_metrics("\n".join(lines) + "\n", None, max_experts=8, max_layers=4)
    # one sample per (rank, layer): each rank's counters restart on their own
    assert [(s.rank, s.layer, s.tokens) for s in r.experts] == [
        ("0", 0, (1.0, 0.0, 4.0)),
        ("0", 1, (8.0, 0.0, 0.0)),
        ("1", 0, (2.0, 0.0, 0.0)),
    ]


def test_too_many_matching_lines_fail_the_scrape_before_parsing() -> None:
    line = 'vllm:num_requests_waiting{engine="0",x="%d"} 1\n'
    ok = "".join(line % i for i in range(MAX_SERIES_LINES))
    assert parse_metrics(ok, None).waiting == MAX_SERIES_LINES
    with pytest.raises(ScrapeError) as exc:
        parse_metrics(ok + line % -1, None)
    assert exc.value.reason == "too_many_series"


def test_ranks_beyond_the_cap_are_summed_but_not_kept_apart() -> None:
    long_rank = "r" * (MAX_LABEL_LENGTH + 1)
    ranks = [str(i) for i in range(MAX_RANKS + 10)] + [long_rank]
    body = "".join(f'vllm:num_requests_waiting{{engine="{k}"}} 1\n' for k in ranks)
    r = parse_metrics(body, None)
    assert r.waiting == len(ranks)  # every rank still counts in the queue
    assert len(r.ranks) == MAX_RANKS
    assert all(len(k.rank) <= MAX_LABEL_LENGTH for k in r.ranks)
    assert r.ranks_dropped == 11


def test_custom_names_and_bad_values() -> None:
    preset = custom_preset({"waiting": "my:queue", "running": "my:busy", "kv_usage": "my:kv"})
    body = 'my:queue 3\nmy:busy NaN\nmy:busy{shard="1"} 2\nmy:kv -1\nother 9\n'
    r = parse_metrics(body, preset)
    # NaN and negatives are a broken gauge, not a queue: ignored
    assert (r.waiting, r.running, r.kv_usage) == (3.0, 2.0, None)


def test_nothing_to_read_is_an_error_with_a_reason() -> None:
    assert detect("# only comments\nprocess_cpu_seconds_total 1\n") is None
    with pytest.raises(ScrapeError) as exc:
        parse_metrics("process_cpu_seconds_total 1\n", None)
    assert exc.value.reason == "no_load_metrics"
    with pytest.raises(ScrapeError) as exc:
        parse_metrics('vllm:num_requests_waiting{engine="0" 3\n', None)
    assert exc.value.reason == "parse_error"
    with pytest.raises(ScrapeError) as exc:
        parse_metrics("vllm:kv_cache_usage_perc 0.5\n", PRESETS["vllm"])
    assert exc.value.reason == "no_load_metrics"


# --- live: the gateway scrapes ------------------------------------------------------


async def test_gateway_scrapes_simulated_replicas_without_config(
    client: aiohttp.ClientSession,
) -> None:
    """No [telemetry] at all: auto detects vLLM and SGLang names."""
    async with replicas(1, metrics="vllm", max_running=1, token_interval_s=0.03) as a:
        async with replicas(1, metrics="sglang") as b:
            cfg = gateway_config(a + b, telemetry=FAST)
            async with gateway(cfg) as gw:
                loads = [r.load for r in gw.registry]
                assert await eventually(lambda: all(x.reported_by == "scrape" for x in loads), 2)
                # two slow requests straight to a: one running, one waiting
                body = {"model": "sim-model", "max_tokens": 10, "messages": []}
                posts = [
                    asyncio.create_task(client.post(a[0] + "/v1/chat/completions", json=body))
                    for _ in range(2)
                ]
                assert await eventually(
                    lambda: loads[0].reported_waiting == 1 and loads[0].reported_running == 1, 2
                )
                assert loads[0].queue_depth(asyncio.get_running_loop().time()) == 2.0
                for response in await asyncio.gather(*posts):
                    response.close()
                async with client.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as resp:
                    exposition = await resp.text()
                assert 'dp_router_load_reports_total{replica="' in exposition
                assert "dp_router_replica_report_age_seconds{" in exposition
                name = a[0].removeprefix("http://")
                assert f'dp_router_replica_report_stale{{replica="{name}"}} 0.0' in exposition


async def test_scrape_bounds_and_failures_are_counted(client: aiohttp.ClientSession) -> None:
    async def huge(request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_waiting 1\n" + "#" * 200_000)

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="vllm:num_requests_waiting 1\n")

    async def trtllm(request: web.Request) -> web.Response:
        return web.Response(text=text("trtllm_metrics.txt"))

    huge_app, slow_app, trt_app = web.Application(), web.Application(), web.Application()
    huge_app.router.add_get("/metrics", huge)
    slow_app.router.add_get("/metrics", slow)
    trt_app.router.add_get("/prometheus/metrics", trtllm)  # /metrics: 404
    async with serve_app(huge_app) as u1, serve_app(slow_app) as u2, serve_app(trt_app) as u3:
        cfg = gateway_config(
            [u1, u2, u3],
            telemetry={**FAST, "scrape_timeout_s": 0.1, "scrape_max_bytes": 100_000},
        )
        async with gateway(cfg) as gw:
            rejected = gw.metrics.load_reports_rejected

            def count(reason: str) -> float:
                return rejected.labels("scrape", reason)._value.get()

            trt = gw.registry.get(u3.removeprefix("http://"))
            assert trt is not None
            assert await eventually(lambda: trt.load.reported_queue == 15.0, 2 + SLACK)
            for reason in ("too_large", "timeout", "http_status"):  # 404: -> /prometheus/metrics
                assert await eventually(lambda r=reason: count(r) >= 1, 1 + SLACK), reason
            stale = gw.telemetry.stale if gw.telemetry else None
            assert stale is not None
            now = asyncio.get_running_loop().time()
            assert [stale(r, now) for r in gw.registry] == [True, True, False]
            release.set()


async def test_stale_reports_stop_counting(client: aiohttp.ClientSession) -> None:
    """A replica whose scrapes stop: its queue falls back to our in-flight."""
    async with replicas(1, max_running=1, token_interval_s=0.05) as urls:
        cfg = gateway_config(urls, telemetry=FAST)
        async with gateway(cfg) as gw:
            (status,) = list(gw.registry)
            load = status.load
            assert await eventually(lambda: load.reported_at is not None, 2)
            at = load.reported_at
            assert at is not None
            load.record_report(9.0, 0.5, at)  # a busy report ...
            assert gw.telemetry is not None
            await gw.telemetry.stop()  # ... and then the reports stop
            assert load.queue_depth(at + 1.0) == 9.0
            assert load.queue_depth(at + 5.1) == 0.0  # stale: in-flight (0)
            assert gw.telemetry.stale(status, at + 5.1) is True
            assert base(gw)


async def test_running_without_waiting_is_rejected_not_accepted(
    client: aiohttp.ClientSession,
) -> None:
    async def half(request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 3\n")

    app = web.Application()
    app.router.add_get("/metrics", half)
    async with serve_app(app) as url:
        async with gateway(gateway_config([url], telemetry=FAST)) as gw:
            name = url.removeprefix("http://")

            def rejected() -> float:
                return gw.metrics.load_reports_rejected.labels("scrape", "no_waiting")._value.get()

            assert await eventually(lambda: rejected() >= 2, 1 + SLACK)
            accepted = gw.metrics.load_reports.labels(name, "scrape")._value.get()
            status = gw.registry.get(name)
            assert status is not None
            assert (accepted, status.load.reported_at) == (0.0, None)
