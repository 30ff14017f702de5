"""EngineModel: the engine model as a replica model, stepped in real time."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.engine import Engine, preset
from loadtest.replica import DOMAIN_HEADER, SimReplicaConfig, run_replica
from loadtest.replica.engine_model import DRIVER_TASK_NAME, EngineModel
from loadtest.replica.model import Job, ReplicaModel
from policies.prefix import block_hashes

# Generous: the 7B model runs a 2k-token prompt and 20 tokens in ~0.2 s.
TIMEOUT_S = 10.0


def make_model(**overrides: object) -> EngineModel:
    return EngineModel(Engine(preset("llama2-7b", **overrides), random.Random(0)))


def job(rid: str, text: str, max_tokens: int = 8, domain: str | None = None) -> Job:
    return Job(rid, text, len(text) // 4, block_hashes(text), max_tokens, domain)


async def collect(model: EngineModel, j: Job) -> list[int]:
    return [n async for n in model.generate(j)]


async def test_implements_the_protocol_and_yields_every_token() -> None:
    model = make_model()
    assert isinstance(model, ReplicaModel)
    steps = await asyncio.wait_for(collect(model, job("a", "x" * 4000, 12)), TIMEOUT_S)
    assert sum(steps) == 12 and all(n == 1 for n in steps)
    load = model.load()
    assert (load.running, load.waiting, load.kv_usage) == (0, 0, 0.0)
    assert load.prefix_queries == 1000
    assert not model.engine.has_work()


async def test_concurrent_requests_share_one_engine_and_its_prefix_cache() -> None:
    model = make_model()
    shared = "s" * 8192  # 32 prefix blocks
    await asyncio.wait_for(collect(model, job("warm", shared + "a" * 400)), TIMEOUT_S)
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(model, job(f"r{i}", shared + f"{i}" * 400)) for i in range(5))),
        TIMEOUT_S,
    )
    assert [sum(r) for r in results] == [8] * 5
    load = model.load()
    assert load.prefix_hits >= 5 * 8192 // 4  # every follower hit the shared prefix


async def test_closing_the_stream_aborts_and_frees_the_engine() -> None:
    model = make_model()
    gen = model.generate(job("long", "y" * 2000, 10_000))
    assert await asyncio.wait_for(anext(gen), TIMEOUT_S) == 1  # first token
    assert model.load().running == 1
    assert model.load().kv_usage > 0

    def driving() -> bool:
        return any(t.get_name() == DRIVER_TASK_NAME for t in asyncio.all_tasks())

    assert driving()
    await gen.aclose()
    assert not model.engine.has_work()
    assert model.load().kv_usage == 0.0
    # The cancelled driver finishes within a few loop turns; nothing is left.
    async with asyncio.timeout(1.0):
        while driving():
            await asyncio.sleep(0)


async def test_a_request_that_can_never_fit_is_a_value_error() -> None:
    model = make_model(kv_capacity_tokens=2048)
    with pytest.raises(ValueError, match="tokens of KV"):
        await collect(model, job("big", "z" * 8000, 100))
    with pytest.raises(ValueError):
        model.set_speed(0)


async def test_moe_experts_reach_the_load_report() -> None:
    model = EngineModel(Engine(preset("llama2-7b+moe"), random.Random(0)))
    await asyncio.wait_for(collect(model, job("m", "q" * 2000, 4, domain="code")), TIMEOUT_S)
    load = model.load()
    assert len(load.expert_tokens) == 8
    assert sum(load.expert_tokens) == 2 * (500 + 3)  # top-2 of every computed token
    assert load.expert_overflow == [0] * 8


async def test_replica_serves_with_the_engine_model(client: aiohttp.ClientSession) -> None:
    cfg = SimReplicaConfig(engine="llama2-7b+moe")
    async with run_replica(cfg) as (url, _state):
        body = {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "hello " * 600}],
            "max_tokens": 6,
        }
        for _ in range(2):
            async with client.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={DOMAIN_HEADER: "code"},
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 6
        async with client.get(f"{url}/metrics") as resp:
            text = await resp.text()
        samples = {
            s.name: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name.startswith("vllm:prefix_cache")
        }
        assert samples["vllm:prefix_cache_hits_total"] > 0  # the second request hit
        assert "dp_sim:expert_tokens" in text
        too_big = dict(body, messages=[{"role": "user", "content": "w" * 4 * 130_000}])
        async with client.post(f"{url}/v1/chat/completions", json=too_big) as resp:
            assert resp.status == 400
