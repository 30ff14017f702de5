"""Every registered policy is selectable in config and serves live traffic;
the load-aware ones route around a slow replica (M17, live)."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from policies.registry import POLICIES
from tests.harness import base, chat_body, gateway, gateway_config, in_flight_total, replicas


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_policy_serves_through_the_gateway(
    client: aiohttp.ClientSession, policy: str
) -> None:
    async with replicas(3, token_interval_s=0.001) as urls:
        cfg = gateway_config(urls, routing={"policy": policy, "seed": 1})
        async with gateway(cfg) as gw:
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> tuple[int, str | None]:
                async with (
                    sem,
                    client.post(
                        base(gw) + "/v1/chat/completions",
                        json=chat_body(stream=i % 2 == 0, max_tokens=4, content=f"q{i % 5} " * 80),
                    ) as resp,
                ):
                    await resp.read()
                    return resp.status, resp.headers.get("X-Dp-Replica")

            results = await asyncio.gather(*(one(i) for i in range(30)))
            assert {status for status, _ in results} == {200}
            assert in_flight_total(gw) == 0


async def test_m17_slow_replica_gets_a_small_share(client: aiohttp.ClientSession) -> None:
    """M17: one replica 10x slower. Under the default (queue-depth) policy its
    share of new requests falls below 15 %, and requests served by the fast
    replicas stay fast."""
    async with (
        replicas(2, token_interval_s=0.005) as fast,
        replicas(1, token_interval_s=0.05) as slow,
    ):
        urls = fast + slow
        async with gateway(gateway_config(urls)) as gw:
            loop = asyncio.get_running_loop()
            shares: Counter[str] = Counter()
            fast_latency: list[float] = []
            slow_latency: list[float] = []
            sem = asyncio.Semaphore(12)

            async def one() -> None:
                async with sem:
                    t0 = loop.time()
                    async with client.post(
                        base(gw) + "/v1/chat/completions",
                        json=chat_body(stream=True, max_tokens=10),
                    ) as resp:
                        await resp.read()
                        served = resp.headers["X-Dp-Replica"]
                    shares[served] += 1
                    took = loop.time() - t0
                    if served == slow[0].removeprefix("http://"):
                        slow_latency.append(took)
                    else:
                        fast_latency.append(took)

            await asyncio.gather(*(one() for _ in range(240)))
            slow_share = shares[slow[0].removeprefix("http://")] / sum(shares.values())
            assert slow_share < 0.15, shares
            # Fast replicas are not dragged down to the slow one's pace: compared
            # within this run (a fast stream is ~10 x 5 ms, a slow one ~10 x 50 ms).
            fast_latency.sort()
            assert slow_latency, "the slow replica was never tried"
            assert fast_latency[len(fast_latency) // 2] < 0.5 * min(slow_latency)


async def test_time_to_first_token_is_learned_at_the_first_token() -> None:
    """Policies hear a stream's TTFT when its first token comes, not when it
    ends: a policy counting queued prefill must see it leave the queue."""
    import aiohttp

    from tests.harness import base, chat_body, gateway, gateway_config, replicas

    async with replicas(1, token_interval_s=0.2) as urls, gateway(gateway_config(urls)) as gw:
        (replica,) = list(gw.registry)
        async with aiohttp.ClientSession() as s:
            async with s.post(
                base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=10)
            ) as r:
                await r.content.readline()  # the first event
                assert replica.load.ttft.value is not None
                assert replica.load.tpot.value is None  # the stream is still going
                await r.read()
        assert replica.load.tpot.value is not None
