"""Telemetry end to end: reported queues steer queue_depth (one process and
--workers 2), the config keys, and readings shipped to workers."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest import procs
from router import config as config_mod
from router.config import ConfigError
from router.replicas import Registry
from router.telemetry import Reading, Source, plan_for, record
from router.telemetry.share import apply_load_message, load_message
from tests.harness import (
    HEALTH_CHECKS,
    MODEL,
    UPSTREAM_TIMEOUTS,
    GatewayProcess,
    base,
    chat_body,
    eventually,
    free_port,
    gateway,
    gateway_config,
    replicas,
)

FAST = {"scrape_interval_s": 0.05, "scrape_timeout_s": 0.5}
SLACK = 0.5
# Requests held on the loaded replica: 2 running (max_running) + 6 waiting.
HELD = 8


@contextlib.asynccontextmanager
async def loaded_directly(url: str) -> AsyncIterator[None]:
    """HELD long streams straight to the replica, bypassing the gateway,
    cancelled (so the replica aborts them) on exit."""
    body = {**chat_body(stream=True, max_tokens=10_000)}

    async def hold(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            async for _ in resp.content:
                pass

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(hold(session)) for _ in range(HELD)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def served_by(url: str, n: int, *, new_connections: bool = False) -> Counter[str]:
    """n concurrent short requests through the gateway at ``url``; who served them."""

    async def one(session: aiohttp.ClientSession) -> str:
        async with session.post(url + "/v1/chat/completions", json=chat_body(max_tokens=2)) as r:
            await r.read()
            assert r.status == 200
            return r.headers["X-Dp-Replica"]

    if new_connections:  # one connection each: the kernel spreads them over workers

        async def fresh() -> str:
            async with aiohttp.ClientSession() as own:
                return await one(own)

        return Counter(await asyncio.gather(*(fresh() for _ in range(n))))
    async with aiohttp.ClientSession() as session:
        return Counter(await asyncio.gather(*(one(session) for _ in range(n))))


@pytest.mark.parametrize("telemetry", ["auto", "none"])
async def test_reported_queue_steers_queue_depth(telemetry: str) -> None:
    """Another client loads replica 0 directly; this gateway never sent it a
    request, yet with telemetry every new request goes to replica 1. Without
    telemetry both look idle and replica 0 gets its share (the control)."""
    async with replicas(2, max_running=2, token_interval_s=0.01) as urls:
        cfg = gateway_config(urls, telemetry={**FAST, "source": telemetry})
        async with gateway(cfg) as gw:
            r0, r1 = gw.registry
            idle = r1.name
            async with loaded_directly(urls[0]):
                if telemetry == "none":
                    # Both look idle: some requests queue behind the held
                    # streams (they would time out there; cancelled instead).
                    sending = asyncio.create_task(served_by(base(gw), 6))
                    assert await eventually(lambda: r0.load.in_flight >= 1, 1 + SLACK)
                    sending.cancel()
                    return
                assert await eventually(lambda: r0.load.reported_queue == HELD, 2 + SLACK)
                served = await served_by(base(gw), 6)
            assert served == {idle: 6}


async def test_reported_queue_reaches_every_worker(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """--workers 2: the supervisor scrapes; both workers route on what it read."""
    async with replicas(2, max_running=2, token_interval_s=0.01) as urls:
        port, admin_port = free_port(), free_port()
        path = tmp_path / "gw.toml"
        path.write_text(
            procs.gateway_toml(
                [{"url": u, "models": [MODEL]} for u in urls],
                port=port,
                admin_port=admin_port,
                server={"workers": 2, "shutdown_timeout_s": 2.0},
                upstream=UPSTREAM_TIMEOUTS,
                health={**HEALTH_CHECKS, "slow_start_s": 0.0},
                telemetry=FAST,
            )
        )
        gw = GatewayProcess(path, port, admin_port)
        await gw.start(client)
        try:
            loaded, idle = (u.removeprefix("http://") for u in urls)
            metrics = f"http://{procs.HOST}:{admin_port}/metrics"

            async def scraped(expect: str) -> bool:
                async with client.get(metrics) as resp:
                    return expect in await resp.text()

            async def both_workers_up() -> bool:
                async with client.get(metrics) as resp:
                    text = await resp.text()
                down = 'dp_router_worker_pid{worker="1"} 0.0'
                return "dp_router_worker_pid" in text and down not in text

            # Ready means one worker serves; this test wants both.
            assert await eventually(both_workers_up, 20)
            async with loaded_directly(urls[0]):
                queued = f'dp_router_replica_reported_waiting{{replica="{loaded}"}} {HELD - 2}.0'
                assert await eventually(lambda: scraped(queued), 3 + SLACK)
                # The next load message (20 ms batches), with room for a busy machine.
                await asyncio.sleep(0.5)
                # Two waves of 6: one worker's own in-flight on the idle
                # replica must stay below the loaded one's 8 reported, or
                # queue_depth rightly sends the rest there (the kernel may
                # hand all 12 connections to one worker).
                served = await served_by(gw.base, 6, new_connections=True)
                # A scrape during the first wave saw its requests running on
                # the idle replica, and each worker corrects a report only for
                # its own sends: wait for a report of the idle replica at rest
                # (and its load message), or a worker given most of the second
                # wave rightly finds the loaded replica shorter.
                at_rest = f'dp_router_replica_reported_running{{replica="{idle}"}} 0.0'
                assert await eventually(lambda: scraped(at_rest), 3 + SLACK)
                await asyncio.sleep(0.2)
                served += await served_by(gw.base, 6, new_connections=True)
            assert served == {idle: 12}
            async with client.get(metrics) as resp:
                text = await resp.text()
            # one supervisor family, not a sum over workers
            assert text.count(f'dp_router_replica_reported_waiting{{replica="{loaded}"}}') == 1
        finally:
            await gw.stop()


def test_load_messages_carry_readings_and_never_go_back() -> None:
    cfg = gateway_config(["http://127.0.0.1:1", "http://127.0.0.1:2"])
    supervisor, worker = Registry(cfg.replicas), Registry(cfg.replicas)
    a, b = (r.name for r in supervisor)
    record(supervisor.get(a).load, Reading(3, 4, 0.5), 10.0, Source.SCRAPE)  # type: ignore[union-attr]
    message = load_message(supervisor, {a, b})  # b has no reading: not sent
    assert [e[0] for e in message[1]] == [a]
    assert apply_load_message(worker, message) == 1
    got = worker.get(a).load  # type: ignore[union-attr]
    assert (got.reported_queue, got.reported_at, got.kv_usage, got.reported_by) == (
        7.0,
        10.0,
        0.5,
        "scrape",
    )
    record(got, Reading(0, 1), 11.0, Source.HEADER)  # the worker's own, newer
    assert apply_load_message(worker, message) == 0
    assert got.reported_queue == 1.0


def test_plans_and_config_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOK", "secret")
    cfg = gateway_config(
        ["http://h:1"],
        telemetry={"engine": "trtllm", "metric_names": {}},
        replicas=[
            {"url": "http://h:1", "name": "x", "telemetry": "push", "push_token_env": "TOK"},
            {"url": "http://h:2", "name": "y", "engine": "vllm", "metrics_path": "/m"},
        ],
    )
    assert plan_for(cfg, "x").source == "push" and cfg.replicas[0].push_token == "secret"
    assert plan_for(cfg, "y").metrics_path == "/m"
    assert plan_for(cfg, "z").metrics_path == "/prometheus/metrics"  # trtllm's, by default
    assert plan_for(cfg, "z").source == "auto"


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        ({"telemetry": {"source": "carrier_pigeon"}}, "telemetry.source"),
        ({"telemetry": {"engine": "tgi"}}, "telemetry.engine"),
        ({"telemetry": {"push_listen": "nohost"}}, "telemetry.push_listen"),
        ({"telemetry": {"push_listen": "h:99999"}}, "telemetry.push_listen"),
        ({"telemetry": {"scrape_interval_s": 0}}, "telemetry.scrape_interval_s"),
        ({"telemetry": {"metric_names": {"queue": "x"}}}, "telemetry.metric_names.queue"),
        ({"telemetry": {"engine": "custom"}}, "telemetry.metric_names"),
        ({"telemetry": {"metrics_path": "metrics"}}, "telemetry.metrics_path"),
        ({"replicas": [{"url": "http://h:1", "telemetry": "push"}]}, "push_token_env"),
        ({"replicas": [{"url": "http://h:1", "push_token_env": "UNSET_VAR"}]}, "not set"),
        ({"replicas": [{"url": "http://h:1", "telemetry": "x"}]}, "replicas[0].telemetry"),
    ],
)
def test_bad_telemetry_config(sections: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        gateway_config(["http://h:1"], **sections)


def test_one_token_may_not_name_two_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOK", "same")
    entries = [{"url": f"http://h:{i}", "push_token_env": "TOK"} for i in (1, 2)]
    with pytest.raises(ConfigError, match="share a push token"):
        config_mod.from_dict({"replicas": entries}, env={})
