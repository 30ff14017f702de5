"""The ORCA endpoint-load-metrics header, both forms, malformed ones, and what it records."""

from __future__ import annotations

import pytest

from loadtest.replica.metrics import orca_header
from loadtest.replica.model import ModelLoad
from policies.load import Outcome
from router.load import ReplicaLoad, dispatch
from router.telemetry import ORCA_REQUEST_HEADER, Source, on_load_header, record
from router.telemetry.orca import MAX_HEADER_BYTES, parse_orca
from router.telemetry.reading import Reading


def test_request_header_asks_for_the_text_form() -> None:
    assert ORCA_REQUEST_HEADER == (b"endpoint-load-metrics-format", b"TEXT")


def test_vllm_text_form() -> None:
    value = b"TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=2.0"
    r = parse_orca(value)
    assert r is not None
    assert (r.waiting, r.running, r.kv_usage) == (2.0, None, 0.4)


def test_json_form_and_other_names() -> None:
    named = b'{"kv_cache_utilization": 0.3, "num_requests_waiting": 1}'
    r = parse_orca(b'JSON {"named_metrics": ' + named + b"}")
    assert r is not None and (r.waiting, r.kv_usage) == (1.0, 0.3)
    r = parse_orca('json {"namedMetrics": {"num_requests_running": 4, "num_requests_waiting": 0}}')
    assert r is not None and (r.waiting, r.running) == (0.0, 4.0)
    # top-level ORCA fields are well-formed, not ours
    r = parse_orca(b"TEXT cpu_utilization=0.3, rps_fractional=10")
    assert r is not None and r == Reading(waiting=None)


@pytest.mark.parametrize("fmt", ["TEXT", "JSON"])
def test_the_simulated_replica_round_trips(fmt: str) -> None:
    value = orca_header(fmt, ModelLoad(running=3, waiting=2, kv_usage=0.5))
    assert value is not None
    r = parse_orca(value.encode())
    assert r is not None and (r.waiting, r.running, r.kv_usage) == (2.0, 3.0, 0.5)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"XML <a/>",
        b"TEXT named_metrics.num_requests_waiting",  # no =
        b"TEXT named_metrics.num_requests_waiting=abc",
        b"TEXT named_metrics.num_requests_waiting=-1",
        b"TEXT named_metrics.num_requests_waiting=nan",
        b"TEXT named_metrics.num_requests_waiting=inf",
        b"JSON {not json",
        b"JSON [1, 2]",
        b'JSON {"named_metrics": [1]}',
        b'JSON {"named_metrics": {"num_requests_waiting": "2"}}',
        b'JSON {"named_metrics": {"num_requests_waiting": true}}',
        b'JSON {"named_metrics": {"num_requests_waiting": ' + b"9" * 400 + b"}}",
        b"TEXT named_metrics.num_requests_waiting=" + b"9" * 400,  # inf
        b"TEXT " + b"named_metrics.x=1, " * (MAX_HEADER_BYTES // 18),
    ],
)
def test_malformed_headers_record_nothing(value: bytes) -> None:
    load = ReplicaLoad("r")
    assert parse_orca(value) is None
    assert on_load_header(load, value, 1.0) is False
    assert load.reported_at is None and load.kv_usage is None


def test_header_without_running_borrows_a_fresh_one_else_counts_our_in_flight() -> None:
    load = ReplicaLoad("r")
    for _ in range(3):
        dispatch(load, 10)
    # no report ever said running: our 3 in flight count as running
    assert on_load_header(load, b"TEXT named_metrics.num_requests_waiting=2", 10.0)
    assert (load.reported_queue, load.reported_by, load.reported_running) == (5.0, "header", None)
    assert load.queue_depth(10.0) == 5.0
    # a scrape says 7 running; headers within max_age (5 s) carry it on ...
    record(load, Reading(waiting=1, running=7), 11.0, Source.SCRAPE)
    assert on_load_header(load, b"TEXT named_metrics.num_requests_waiting=4", 15.0)
    assert load.reported_queue == 11.0
    # ... and not after: it was reported at 11, not at 15
    assert on_load_header(load, b"TEXT named_metrics.num_requests_waiting=4", 16.5)
    assert load.reported_queue == 4.0 + 3.0


def test_running_without_waiting_is_half_a_queue_and_records_nothing() -> None:
    load = ReplicaLoad("r")
    # well-formed (not counted as malformed), but half a queue: not recorded
    assert on_load_header(load, b"TEXT named_metrics.num_requests_running=3", 1.0)
    assert (load.reported_at, load.reported_running) == (None, None)
    assert record(load, Reading(waiting=None, running=3.0), 1.0, Source.SCRAPE) is False


def test_kv_only_header_updates_kv_and_not_the_queue_time() -> None:
    load = ReplicaLoad("r")
    record(load, Reading(waiting=1, running=1, kv_usage=0.1), 1.0, Source.SCRAPE)
    assert on_load_header(load, b"TEXT named_metrics.kv_cache_utilization=0.9", 3.0)
    assert (load.kv_usage, load.reported_at, load.reported_queue) == (0.9, 1.0, 2.0)


def test_header_report_resets_the_local_correction() -> None:
    load = ReplicaLoad("r")
    record(load, Reading(waiting=0, running=0), 0.0, Source.SCRAPE)
    tickets = [dispatch(load, 1) for _ in range(4)]
    assert load.queue_depth(0.5) == 4.0
    value = b"TEXT named_metrics.num_requests_waiting=1, named_metrics.num_requests_running=3"
    assert on_load_header(load, value, 1.0)
    tickets[0].close(Outcome.OK)
    assert load.queue_depth(1.0) == 3.0  # 4 reported, one settled since, floor 3 in flight


async def test_the_gateway_asks_every_response_for_load_and_keeps_it_to_itself() -> None:
    """Through a real gateway: the request carries the format header (the
    client's own is dropped), the replica's answer lands in its load, and
    neither header reaches the client."""
    import aiohttp
    from aiohttp import web

    from tests.harness import admin, base, chat_body, gateway, gateway_config, serve_app

    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("endpoint-load-metrics-format"))
        return web.json_response(
            {"choices": [], "usage": {"completion_tokens": 1}},
            headers={
                "endpoint-load-metrics": "TEXT named_metrics.num_requests_waiting=7, "
                "named_metrics.num_requests_running=3, named_metrics.kv_cache_usage_perc=0.25"
            },
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_app(app) as url:
        cfg = gateway_config([url], telemetry={"source": "header"})
        async with gateway(cfg) as gw, aiohttp.ClientSession() as s:
            async with s.post(
                base(gw) + "/v1/chat/completions",
                json=chat_body(),
                headers={"endpoint-load-metrics-format": "JSON"},
            ) as r:
                assert r.status == 200
                assert "endpoint-load-metrics" not in r.headers
            assert seen == ["TEXT"]
            (replica,) = list(gw.registry)
            assert replica.load.reported_queue == 10.0
            assert replica.load.kv_usage == 0.25
            metrics = await (await s.get(admin(gw) + "/metrics")).text()
            assert "dp_router_load_headers_total" in metrics
