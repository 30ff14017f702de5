"""Sessions in a real Redis shared by two gateways, and what happens when
Redis dies, freezes or restarts (docs/sessions.md; docs/reliability.md rows
M26, M27, M32, M33). Requests never fail and never wait past the store's
operation timeout because of Redis; sessions stay put through an outage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from loadtest import procs
from router.app import Gateway
from router.session_key import parse_sources, session_key
from tests.harness import (
    MODEL,
    GatewayProcess,
    admin,
    base,
    chat_body,
    eventually,
    gateway,
    gateway_config,
    replicas,
)
from tests.redis_server import RedisServer, redis_server

OP_TIMEOUT_S = 0.1
BREAKER_OPEN_S = 0.5


def _redis(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "op_timeout_s": OP_TIMEOUT_S,
        "breaker_open_s": BREAKER_OPEN_S,
        "pool_timeout_s": OP_TIMEOUT_S,
        **extra,
    }


@contextlib.asynccontextmanager
async def _two_gateways(
    urls: list[str], redis_url: str, op_timeout_s: float = OP_TIMEOUT_S, **routing: Any
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    # Different seeds and a random policy: left alone, the two would place
    # most new sessions differently; only the shared store makes them agree.
    async with (
        gateway(
            gateway_config(
                urls,
                redis=_redis(redis_url, op_timeout_s=op_timeout_s),
                routing={"policy": "weighted_random", "seed": 1, **routing},
            )
        ) as a,
        gateway(
            gateway_config(
                urls,
                redis=_redis(redis_url, op_timeout_s=op_timeout_s),
                routing={"policy": "weighted_random", "seed": 2, **routing},
            )
        ) as b,
    ):
        yield a, b


async def _turn(
    s: aiohttp.ClientSession, gw: Gateway, key: str
) -> tuple[int, str | None, str | None, float]:
    t0 = time.perf_counter()
    async with s.post(
        base(gw) + "/v1/chat/completions", json=chat_body(), headers={"X-Session-ID": key}
    ) as r:
        await r.read()
        return (
            r.status,
            r.headers.get("X-Dp-Replica"),
            r.headers.get("X-Dp-Session"),
            time.perf_counter() - t0,
        )


def _stored_key(session_id: str) -> str:
    key = session_key(
        parse_sources(("header:x-session-id",)),
        lambda _: session_id.encode(),
        None,
        256,
        MODEL,
    )
    assert key is not None
    return "dp:sess:" + key


async def test_two_gateways_agree_on_new_sessions_sent_to_both_at_once() -> None:
    """M33: 200 new keys, each sent through both gateways at the same moment:
    both requests go to one replica, and the stored pin is that replica."""
    async with (
        redis_server() as srv,
        replicas(3) as urls,
        # A loose budget: every server of this test shares one event loop,
        # and this test is about the race, not about timeouts.
        _two_gateways(urls, srv.url, op_timeout_s=1.0) as (a, b),
        aiohttp.ClientSession() as s,
    ):
        # Warm: connections made and the Lua scripts loaded, so that the
        # race below is between gateways, not against connection set-up.
        for i in range(20):
            await asyncio.gather(_turn(s, a, f"warm-{i}"), _turn(s, b, f"warm-{i}"))
        keys = [f"m33-{i}" for i in range(200)]
        sem = asyncio.Semaphore(20)

        async def both(key: str) -> tuple[str, Any, Any]:
            async with sem:
                ra, rb = await asyncio.gather(_turn(s, a, key), _turn(s, b, key))
                return key, ra, rb

        results = await asyncio.gather(*(both(k) for k in keys))
        for gw in (a, b):
            text = await (await s.get(admin(gw) + "/metrics")).text()
            errors = [
                x for x in text.splitlines() if x.startswith("dp_router_session_store_errors")
            ]
            assert errors == [], errors  # else the store, not the race, decided
        client = aioredis.Redis.from_url(srv.url, decode_responses=True)
        try:
            for key, ra, rb in results:
                assert ra[0] == rb[0] == 200
                assert ra[1] == rb[1], key
                assert await client.get(_stored_key(key)) == ra[1]
            # M32: every key the gateways wrote carries a TTL.
            keys_found = 0
            async for k in client.scan_iter(match="dp:sess:*", count=500):
                keys_found += 1
                assert await client.pttl(k) > 0, k
            assert keys_found == 220
        finally:
            await client.aclose()
        # Each key was placed once, as new; its twin either lost the claim
        # race and followed (also "new") or arrived after the claim ("hit",
        # when one gateway answers faster than the other looks up).
        for key, ra, rb in results:
            assert "new" in (ra[2], rb[2]), key
            assert {ra[2], rb[2]} <= {"new", "hit"}, key


async def test_sessions_survive_a_gateway_restart() -> None:
    async with redis_server() as srv, replicas(3) as urls, aiohttp.ClientSession() as s:
        cfg = gateway_config(urls, redis=_redis(srv.url), routing={"policy": "weighted_random"})
        placed = {}
        async with gateway(cfg) as gw:
            for i in range(20):
                status, replica, how, _ = await _turn(s, gw, f"restart-{i}")
                assert (status, how) == (200, "new")
                placed[f"restart-{i}"] = replica
        async with gateway(cfg) as gw:
            for key, replica in placed.items():
                status, again, how, _ = await _turn(s, gw, key)
                assert (status, again, how) == (200, replica, "hit")
            async with s.get(admin(gw) + "/admin/sessions/restart-3") as r:
                view = await r.json()
            assert view["store"] == "redis" and view["replica"] == placed["restart-3"]


async def _under_load(
    s: aiohttp.ClientSession, gws: tuple[Gateway, Gateway], keys: list[str], rounds: int
) -> list[tuple[str, int, str | None, str | None, float]]:
    """Every key through both gateways, ``rounds`` times, 10 at a time."""
    out: list[tuple[str, int, str | None, str | None, float]] = []
    sem = asyncio.Semaphore(10)

    async def one(key: str, gw: Gateway) -> None:
        async with sem:
            status, replica, how, took = await _turn(s, gw, key)
            out.append((key, status, replica, how, took))

    for _ in range(rounds):
        await asyncio.gather(*(one(k, gw) for k in keys for gw in gws))
    return out


async def test_redis_killed_under_load_nothing_fails_and_sessions_stay() -> None:
    """M26: Redis SIGKILLed while sessions are in use: no request fails, the
    breaker opens, every known session stays on its replica through both
    gateways, new sessions agree across gateways (rendezvous), and the
    breaker closes once Redis is back."""
    async with (
        redis_server() as srv,
        replicas(3) as urls,
        _two_gateways(urls, srv.url, load_bound_epsilon=10.0) as gws,
        aiohttp.ClientSession() as s,
    ):
        known = [f"m26-{i}" for i in range(30)]
        # (A generous load bound: this test is about the outage, and a
        # bounded-load move is a legitimate move; M18 tests the bound.)
        before = await _under_load(s, gws, known, 1)
        pinned = {key: replica for key, _, replica, _, _ in before}
        assert all(status == 200 for _, status, *_ in before)

        await srv.kill()
        during = await _under_load(s, gws, known, 2)
        assert [r for r in during if r[1] != 200] == []
        for key, _, replica, _, _ in during:
            assert replica == pinned[key], key
        fresh = [f"m26-new-{i}" for i in range(30)]
        new_during = await _under_load(s, gws, fresh, 1)
        assert all(r[1] == 200 for r in new_during)
        by_key: dict[str, set[str | None]] = {}
        for key, _, replica, how, _ in new_during:
            by_key.setdefault(key, set()).add(replica)
            assert how == "fallback"
        assert all(len(v) == 1 for v in by_key.values())
        for gw in gws:
            assert gw.proxy.sessions is not None
            assert gw.proxy.sessions.breaker.opens >= 1

        await srv.start()
        # The breaker probes after breaker_open_s and closes on success.
        for gw in gws:
            sessions = gw.proxy.sessions
            assert sessions is not None

            async def closed(gw: Gateway = gw) -> bool:
                await _turn(s, gw, "probe")
                return int(gw.proxy.sessions.breaker.state) == 0  # type: ignore[union-attr]

            assert await eventually(closed, BREAKER_OPEN_S + 1.0)
        after = await _under_load(s, gws, known, 1)
        assert all(r[1] == 200 for r in after)


async def test_frozen_redis_never_holds_a_request_past_the_op_timeout() -> None:
    """M27: SIGSTOP (connections open, no replies): each request waits at
    most the operation timeout for Redis, the breaker opens, and requests
    flow; after SIGCONT the store is used again."""
    async with (
        redis_server() as srv,
        replicas(3) as urls,
        _two_gateways(urls, srv.url, load_bound_epsilon=10.0) as gws,
        aiohttp.ClientSession() as s,
    ):
        keys = [f"m27-{i}" for i in range(20)]
        baseline = await _under_load(s, gws, keys, 1)
        slowest_before = max(r[4] for r in baseline)
        srv.freeze()
        try:
            during = await _under_load(s, gws, keys, 2)
        finally:
            srv.thaw()
        assert all(r[1] == 200 for r in during)
        slowest = max(r[4] for r in during)
        # One lookup, plus at most one write (a re-pin), each bounded.
        assert slowest <= slowest_before + 2 * OP_TIMEOUT_S + 0.5, slowest
        for gw in gws:
            assert gw.proxy.sessions is not None
            assert gw.proxy.sessions.breaker.opens >= 1
        metrics = await (await s.get(admin(gws[0]) + "/metrics")).text()
        assert 'dp_router_session_store_errors_total{error="timeout",op="get"}' in metrics
        await asyncio.sleep(BREAKER_OPEN_S)
        after = await _under_load(s, gws, keys, 1)
        assert all(r[1] == 200 and r[3] == "hit" for r in after[-10:])


async def test_a_gateway_starts_while_redis_is_down() -> None:
    async with redis_server() as srv:
        url = srv.url
        port = srv.port
        await srv.kill()
        async with replicas(2) as urls:
            async with gateway(gateway_config(urls, redis=_redis(url))) as gw:
                async with aiohttp.ClientSession() as s:
                    for i in range(5):
                        status, _, how, _ = await _turn(s, gw, f"down-{i}")
                        assert (status, how) == (200, "fallback")
                    restarted = RedisServer(port, srv.workdir)
                    await restarted.start()
                    try:
                        await asyncio.sleep(BREAKER_OPEN_S)

                        async def stored() -> bool:
                            _, _, how, _ = await _turn(s, gw, "after")
                            return how == "hit"

                        assert await eventually(stored, BREAKER_OPEN_S + 2.0)
                    finally:
                        await restarted.stop()


async def test_redis_stalling_in_bursts_costs_at_most_the_op_timeout() -> None:
    """M30 (shortened): Redis stalls 200 ms of every second. Requests keep
    flowing, none waits past the op timeouts, and the gateways' Redis
    connections stay within their pools."""
    async with (
        redis_server() as srv,
        replicas(3) as urls,
        _two_gateways(urls, srv.url, load_bound_epsilon=10.0) as gws,
        aiohttp.ClientSession() as s,
    ):
        keys = [f"m30-{i}" for i in range(20)]
        baseline = await _under_load(s, gws, keys, 1)
        slowest_before = max(r[4] for r in baseline)
        stop = asyncio.Event()

        async def stalls() -> None:
            while not stop.is_set():
                srv.freeze()
                await asyncio.sleep(0.2)
                srv.thaw()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.8)

        stalling = asyncio.create_task(stalls())
        try:
            during: list[Any] = []
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                during += await _under_load(s, gws, keys, 1)
        finally:
            stop.set()
            await stalling
            srv.thaw()
        assert all(r[1] == 200 for r in during)
        assert max(r[4] for r in during) <= slowest_before + 2 * OP_TIMEOUT_S + 0.5
        connected = int((await srv.info("clients"))["connected_clients"])
        assert connected <= 2 * 32 + 1  # two pools at max_connections, plus this check


async def test_a_sentinel_failover_keeps_requests_flowing() -> None:
    """M34: the gateway finds the master through Sentinel; SIGKILL it, and
    requests keep being served (breaker and fallback) while the sentinels
    fail over, then sessions are stored in the new master."""
    from tests.redis_server import redis_sentinel

    async with redis_sentinel() as sentinel, replicas(2) as urls:
        redis_cfg = _redis("")
        del redis_cfg["url"]
        redis_cfg |= {
            "sentinels": list(sentinel.sentinel_addresses),
            "master_name": sentinel.master_name,
            "op_timeout_s": 0.2,
        }
        async with (
            gateway(gateway_config(urls, redis=redis_cfg)) as gw,
            aiohttp.ClientSession() as s,
        ):
            for i in range(10):
                status, _, how, _ = await _turn(s, gw, f"m34-{i}")
                assert (status, how) == (200, "new")
            await sentinel.master.kill()
            statuses = []
            stored_again = False
            deadline = time.monotonic() + 20.0
            i = 0
            while time.monotonic() < deadline:
                i += 1
                status, _, how, _ = await _turn(s, gw, f"m34-after-{i}")
                statuses.append(status)
                if how == "new":  # a first pin went into a master again
                    stored_again = True
                    break
                await asyncio.sleep(0.05)
            assert set(statuses) == {200}
            assert stored_again, "no write reached a new master within 20 s"
            assert await sentinel.master_port() == sentinel.replica.port


async def test_workers_share_sessions_through_redis(tmp_path: Path) -> None:
    """``--workers 2`` with Redis: a session's turns land on one replica,
    whichever worker process the kernel hands each connection to."""
    async with redis_server() as srv, replicas(3) as urls:
        port, admin_port = procs.free_ports(2)
        config = tmp_path / "gateway.toml"
        config.write_text(
            procs.gateway_toml(
                [{"url": url, "models": [MODEL]} for url in urls],
                port=port,
                admin_port=admin_port,
                server={"workers": 2},
                health={"enabled": False},
                routing={"policy": "weighted_random"},
                redis=_redis(srv.url, op_timeout_s=0.5),
            )
        )
        gw = GatewayProcess(config, port, admin_port)
        # A new connection per request, so both workers serve each session.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            await gw.start(s)
            try:
                seen: dict[str, set[str | None]] = {}
                for turn in range(4):
                    for i in range(30):
                        async with s.post(
                            gw.base + "/v1/chat/completions",
                            json=chat_body(),
                            headers={"X-Session-ID": f"w-{i}"},
                        ) as r:
                            assert r.status == 200
                            seen.setdefault(f"w-{i}", set()).add(r.headers.get("X-Dp-Replica"))
                            assert r.headers["X-Dp-Session"] == ("new" if turn == 0 else "hit")
                assert all(len(v) == 1 for v in seen.values())
                async with s.get(f"http://{procs.HOST}:{admin_port}/metrics") as r:
                    text = await r.text()
                # Both workers took part (each connection went to one of them).
                workers = [
                    line
                    for line in text.splitlines()
                    if line.startswith("dp_router_worker_requests_total")
                ]
                assert len(workers) == 2 and all(float(w.split()[-1]) > 0 for w in workers)
            finally:
                await gw.stop()


async def test_redis_restarted_empty_keeps_sessions_and_is_reseeded() -> None:
    """A Redis without persistence comes back empty: the sessions this
    gateway placed stay on their replicas (its local pins), and their pins
    are written again."""
    async with (
        redis_server() as srv,
        replicas(3) as urls,
        gateway(
            gateway_config(urls, redis=_redis(srv.url), routing={"policy": "weighted_random"})
        ) as gw,
        aiohttp.ClientSession() as s,
    ):
        placed = {}
        for i in range(10):
            status, replica, how, _ = await _turn(s, gw, f"empty-{i}")
            assert (status, how) == (200, "new")
            placed[f"empty-{i}"] = replica
        await srv.restart()  # no persistence: empty
        assert int((await srv.info("keyspace")).get("db0", "keys=0").split(",")[0][5:]) == 0

        async def all_kept() -> bool:
            for key, replica in placed.items():
                status, again, how, _ = await _turn(s, gw, key)
                assert status == 200 and again == replica, (key, how)
            return True

        assert await eventually(all_kept, BREAKER_OPEN_S + 2.0)
        client = aioredis.Redis.from_url(srv.url, decode_responses=True)
        try:
            for key, replica in placed.items():
                assert await client.get(_stored_key(key)) == replica
        finally:
            await client.aclose()


async def test_new_sessions_never_overfill_a_replica_while_pins_are_stored() -> None:
    """The first pin is stored (a Redis round trip) before the request goes
    out; the replica's load is counted before that wait, so concurrent new
    sessions see it and a concurrency limit holds."""
    async with redis_server() as srv, replicas(2, token_interval_s=0.02) as urls:
        limited = [{"url": u, "models": [MODEL], "max_concurrency": 2} for u in urls]
        cfg = gateway_config(urls, replicas=limited, redis=_redis(srv.url, op_timeout_s=1.0))
        async with gateway(cfg) as gw, aiohttp.ClientSession() as s:
            peak = 0
            done = asyncio.Event()

            async def watch() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, *(r.load.in_flight for r in gw.registry))
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(_turn(s, gw, f"fill-{i}") for i in range(12)))
            done.set()
            await watcher
            assert all(r[0] == 200 for r in results)
            assert peak <= 2
