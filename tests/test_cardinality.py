"""M47: nothing a client or a replica sends can grow the gateway's metrics.

Label values come from configuration (replica names, the models replicas
serve, fixed reason sets), never from request input; bad per-expert reports
are refused and counted. Thousands of random models and session keys, and an
expert report claiming a million experts, leave the series count bounded."""

from __future__ import annotations

import asyncio
import random

import aiohttp

from router.experts import ExpertSample
from tests.harness import MODEL, admin, base, chat_body, gateway, gateway_config, replicas


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def test_random_models_sessions_and_expert_reports_do_not_grow_metrics() -> None:
    rng = random.Random(47)
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        async with aiohttp.ClientSession() as s:
            # Warm every code path once, so later series are not "first seen".
            for model in (MODEL, "warm-unknown"):
                body = {**chat_body(), "model": model}
                async with s.post(
                    base(gw) + "/v1/chat/completions", json=body, headers={"X-Session-ID": "w"}
                ) as r:
                    await r.read()
            before = _series(await (await s.get(admin(gw) + "/metrics")).text())
            sem = asyncio.Semaphore(20)
            sent: list[str] = []

            async def one(i: int) -> int:
                model = MODEL if i % 2 else f"model-{rng.getrandbits(64):x}"
                headers = {"X-Session-ID": f"s-{rng.getrandbits(64):x}"}
                sent.extend((model, headers["X-Session-ID"]))
                async with (
                    sem,
                    s.post(
                        base(gw) + "/v1/chat/completions",
                        json={**chat_body(), "model": model},
                        headers=headers,
                    ) as r,
                ):
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(2000)))
            assert set(statuses) == {200, 404}
            (replica,) = gw.registry.snapshot.names
            now = asyncio.get_running_loop().time()
            huge = ExpertSample(layer=None, tokens=tuple(1.0 for _ in range(1_000_000)))
            negative = ExpertSample(layer=None, tokens=(-1.0, 2.0))
            assert gw.experts.record(replica, [huge], now) == 0
            assert gw.experts.record(replica, [negative], now) == 0
            text = await (await s.get(admin(gw) + "/metrics")).text()
            after = _series(text)
            # New series only from fixed sets: session results, rejected
            # expert reasons; never one per model or per key.
            assert after - before <= 12, after - before
            assert not [v for v in sent if v != MODEL and v in text]
            assert "dp_router_expert_samples_rejected_total" in text
