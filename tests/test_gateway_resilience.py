"""Issue 3 rows against real replica processes: SIGKILL, SIGSTOP, restarts,
5xx storms, overload. Times are asserted only as configured timeout + slack."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from typing import Any

import aiohttp

from tests.harness import (
    MODEL,
    ReplicaProcess,
    admin,
    base,
    chat_body,
    eventually,
    free_port,
    gateway,
    gateway_config,
    get_json,
    in_flight_total,
    replica_process,
    replicas,
    stats,
)

HEALTH = {
    "enabled": True,
    "interval_s": 0.5,
    "timeout_s": 0.4,
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
    "slow_start_s": 2.0,
}
OUTLIER = {"consecutive_failures": 3, "base_ejection_s": 1.0, "max_ejection_s": 4.0}
SLACK = 0.5


def name_of(url: str) -> str:
    return url.removeprefix("http://")


async def _send(
    client: aiohttp.ClientSession,
    url: str,
    stream: bool,
    max_tokens: int = 8,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, str | None]:
    async with client.post(
        url + "/v1/chat/completions",
        json=chat_body(stream=stream, max_tokens=max_tokens),
        headers=headers or {},
    ) as resp:
        body = await resp.read()
        return resp.status, body, resp.headers.get("X-Dp-Replica")


def _stream_ok(body: bytes) -> bool:
    return body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body


async def _replica_view(client: aiohttp.ClientSession, gw: Any) -> dict[str, dict]:
    data = await get_json(client, admin(gw) + "/admin/replicas")
    return {r["name"]: r for r in data["replicas"]}


async def test_m1_sigkill_mid_load_costs_no_unstarted_request(
    client: aiohttp.ClientSession,
) -> None:
    """M1: SIGKILL one of three replicas after 50 of 200 requests."""
    async with (
        replica_process(1, "--token-interval", "0.005") as a,
        replica_process(1, "--token-interval", "0.005") as b,
        replica_process(1, "--token-interval", "0.005") as c,
    ):
        cfg = gateway_config(a.urls + b.urls + c.urls, health=HEALTH, outlier=OUTLIER)
        async with gateway(cfg) as gw:
            done = 0
            failures: list[tuple[int, bytes]] = []
            killed_at: float | None = None
            loop = asyncio.get_running_loop()
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> None:
                nonlocal done, killed_at
                async with sem:
                    status, body, _ = await _send(client, base(gw), stream=i % 2 == 0)
                    done += 1
                    if done == 50 and killed_at is None:
                        await a.kill()
                        killed_at = loop.time()
                    started = status == 200 and (i % 2 == 1 or body.startswith(b"data:"))
                    if status != 200 or not started:
                        failures.append((status, body[:200]))

            await asyncio.gather(*(one(i) for i in range(200)))
            assert failures == []
            assert killed_at is not None
            # A stops getting attempts within unhealthy_threshold x interval + slack
            bound = HEALTH["unhealthy_threshold"] * HEALTH["interval_s"] + SLACK
            await asyncio.sleep(max(0.0, killed_at + bound - loop.time()))
            attempts_a = _attempts(gw, name_of(a.urls[0]))
            for i in range(20):
                status, _, served = await _send(client, base(gw), stream=i % 2 == 0)
                assert status == 200 and served != name_of(a.urls[0])
            assert _attempts(gw, name_of(a.urls[0])) == attempts_a
            assert in_flight_total(gw) == 0


def _attempts(gw: Any, replica: str) -> float:
    total = 0.0
    for metric in gw.metrics.attempts.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["replica"] == replica:
                total += sample.value
    return total


async def test_m3_stream_that_fails_to_start_is_served_elsewhere_exactly_once(
    client: aiohttp.ClientSession,
) -> None:
    """M3: A answers 503 (no drain marker); every stream succeeds via B, with
    B's bytes exactly (no duplication)."""
    async with replicas(2, token_interval_s=0.0) as urls:
        async with client.post(urls[0] + "/_sim/config", json={"status": 503}) as resp:
            assert resp.status == 200
        cfg = gateway_config(urls, outlier=OUTLIER)
        async with gateway(cfg) as gw:
            for _ in range(100):
                status, body, served = await _send(client, base(gw), stream=True, max_tokens=5)
                assert status == 200 and served == name_of(urls[1])
                assert _stream_ok(body)
                tokens = [
                    json.loads(e[6:])["choices"][0]["delta"].get("content")
                    for e in body.split(b"\n\n")
                    if e.startswith(b"data: {")
                ]
                assert "".join(t for t in tokens if t) == "t0 t1 t2 t3 t4 "
            b_stats = await stats(client, urls[1])
            assert b_stats["completed"] == 100
            metrics = await (await client.get(admin(gw) + "/metrics")).text()
            ejected = (
                "dp_router_outlier_ejections_total"
                f'{{reason="status_503",replica="{name_of(urls[0])}"}}'
            )
            assert ejected in metrics


async def test_m5_sigstopped_replica(client: aiohttp.ClientSession) -> None:
    """M5: a replica that accepts TCP but never answers. Streams go elsewhere
    after the first-byte timeout; non-streaming requests caught on it get 504
    after the response timeout (never retried); it is taken out, and SIGCONT
    brings it back."""
    async with (
        replica_process(1, "--token-interval", "0.005") as a,
        replicas(2, token_interval_s=0.005) as others,
    ):
        upstream = {"first_byte_timeout_s": 1.0, "response_timeout_s": 1.5}
        cfg = gateway_config(a.urls + others, health=HEALTH, outlier=OUTLIER, upstream=upstream)
        async with gateway(cfg) as gw:
            a.signal(signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            results: list[tuple[bool, int, bytes, float]] = []
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> None:
                async with sem:
                    t0 = loop.time()
                    status, body, _ = await _send(client, base(gw), stream=i % 2 == 0)
                    results.append((i % 2 == 0, status, body, loop.time() - t0))

            try:
                await asyncio.gather(*(one(i) for i in range(100)))
                for stream, status, body, took in results:
                    if stream:
                        assert status == 200 and _stream_ok(body), body[:200]
                        assert took < 1.0 + 0.25 + SLACK + 1.0  # first byte + backoff + slack
                    else:
                        assert status in (200, 504), (status, body[:200])
                        if status == 504:
                            assert json.loads(body)["error"]["code"] == "upstream_timeout"
                            assert took < 1.5 + SLACK + 1.0
                view = await _replica_view(client, gw)
                assert not view[name_of(a.urls[0])]["routable"]
            finally:
                a.signal(signal.SIGCONT)
            back = HEALTH["healthy_threshold"] * HEALTH["interval_s"] + OUTLIER["max_ejection_s"]
            assert await eventually(
                lambda: _routable(client, gw, name_of(a.urls[0])), timeout=back + SLACK + 1.0
            )


async def _routable(client: aiohttp.ClientSession, gw: Any, name: str) -> bool:
    return bool((await _replica_view(client, gw))[name]["routable"])


async def test_m6_stalled_stream_gets_in_band_error(client: aiohttp.ClientSession) -> None:
    """M6: a stream that stops after chunk 3 with the socket open: the client
    gets an in-band error within the idle timeout + slack; upstream closed."""
    async with replicas(1, token_interval_s=0.05) as urls:
        cfg = gateway_config(urls, upstream={"idle_timeout_s": 1.0})
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()
            async with client.post(
                base(gw) + "/v1/chat/completions",
                json=chat_body(stream=True, max_tokens=50),
                headers={"x-sim-fault": "chunks=3;after=hang"},
            ) as resp:
                got = b""
                while got.count(b"data: ") < 3:
                    got += await resp.content.readany()
                stalled_at = loop.time()
                got += await resp.content.read()
                took = loop.time() - stalled_at
            assert took < 1.0 + SLACK
            last = [e for e in got.split(b"\n\n") if e.strip()][-1]
            assert json.loads(last[6:])["error"]["code"] == "upstream_timeout"
            assert b"[DONE]" not in got
            assert await eventually(lambda: _count(client, urls[0], "aborted", 1), timeout=1.0)
            assert in_flight_total(gw) == 0


async def _count(client: aiohttp.ClientSession, url: str, key: str, value: int) -> bool:
    return (await stats(client, url))[key] == value


async def test_m7_loading_replica_is_not_flooded(client: aiohttp.ClientSession) -> None:
    """M7: /health is 200 but /v1 answers 503 for 3 s. Few attempts hit it,
    clients see no error, and once ready it ramps up under slow start."""
    async with (
        replicas(1, token_interval_s=0.0) as good,
        replicas(1, token_interval_s=0.0, not_ready_for_s=3.0) as loading,
    ):
        urls = loading + good
        cfg = gateway_config(urls, health=HEALTH, outlier=OUTLIER)
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()
            end = loop.time() + 6.0
            errors = 0
            served_by_loading: list[float] = []
            factors: list[float] = []
            while loop.time() < end:
                replica = gw.registry.get(name_of(loading[0]))
                assert replica is not None
                factors.append(replica.ramp_factor(loop.time()))
                status, _, served = await _send(client, base(gw), stream=False, max_tokens=2)
                errors += status != 200
                if served == name_of(loading[0]) and status == 200:
                    served_by_loading.append(loop.time())
                await asyncio.sleep(0.01)
            assert errors == 0
            s = await stats(client, loading[0])
            # attempts it refused: at most the ejection threshold per ejection
            # it earned, plus what the budget's reserve allows
            assert s["errors"] <= OUTLIER["consecutive_failures"] * 2 + 3
            assert served_by_loading, "the replica never came back"
            # back from ejection it ramped (slow start) instead of jumping to full share
            assert min(factors) < 1.0


async def test_m9_all_replicas_down_fail_fast_then_recover(
    client: aiohttp.ClientSession,
) -> None:
    """M9: every replica killed: each request is a quick 503 with Retry-After;
    the first success comes within healthy_threshold x interval + slack of
    the replica being back."""
    async with replica_process(1) as a, replica_process(1) as b:
        cfg = gateway_config(a.urls + b.urls, health=HEALTH, outlier=OUTLIER)
        async with gateway(cfg) as gw:
            await a.kill()
            await b.kill()
            assert await eventually(
                lambda: _none_routable(client, gw),
                timeout=HEALTH["unhealthy_threshold"] * HEALTH["interval_s"] + SLACK + 1.0,
            )
            loop = asyncio.get_running_loop()
            for _ in range(50):
                t0 = loop.time()
                async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                    assert resp.status == 503
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["error"]["code"] == "no_healthy_replica"
                assert loop.time() - t0 < 1.0  # no hang (100 ms target, loopback + slack)
            await a.start()
            back_at = loop.time()

            async def served() -> bool:
                status, _, _ = await _send(client, base(gw), stream=False)
                return status == 200

            bound = HEALTH["healthy_threshold"] * HEALTH["interval_s"] + SLACK
            assert await eventually(served, timeout=bound + 1.0, interval=0.05)
            assert loop.time() - back_at < bound + 1.0


async def _none_routable(client: aiohttp.ClientSession, gw: Any) -> bool:
    return not any(r["routable"] for r in (await _replica_view(client, gw)).values())


async def test_m9_panic_mode_routes_to_unhealthy_replicas(
    client: aiohttp.ClientSession,
) -> None:
    """The documented alternative: with when_none_routable = "panic", a fleet
    whose health checks all fail is still tried (Envoy's panic routing)."""
    async with replicas(2) as urls:
        health = {**HEALTH, "path": "/no-such-health-path"}
        for mode, expected in (("panic", 200), ("fail", 503)):
            cfg = gateway_config(urls, health=health, admission={"when_none_routable": mode})
            async with gateway(cfg) as gw:
                status, _, _ = await _send(client, base(gw), stream=False)
                assert status == expected, mode


async def test_m10_ejection_is_capped(client: aiohttp.ClientSession) -> None:
    """M10: two of three replicas fail; at most max_ejection_percent are ejected."""
    async with replicas(3, token_interval_s=0.0) as urls:
        for url in urls[:2]:
            async with client.post(url + "/_sim/config", json={"status": 503}):
                pass
        outlier = {
            **OUTLIER,
            "max_ejection_percent": 34.0,
            "base_ejection_s": 5.0,
            "max_ejection_s": 10.0,
        }
        cfg = gateway_config(urls, outlier=outlier)
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()
            max_seen = 0
            for _ in range(60):
                await _send(client, base(gw), stream=False)
                now = loop.time()
                max_seen = max(max_seen, sum(r.ejected_until > now for r in gw.registry))
            assert max_seen == 1
            assert await eventually(lambda: in_flight_total(gw) == 0, 1.0)


async def test_m11_restarted_replica_is_readmitted(client: aiohttp.ClientSession) -> None:
    """M11: SIGKILL, restart on the same port after a pause, under steady load:
    served again within interval x healthy_threshold + slack of being ready."""
    async with replica_process(1) as a, replicas(1) as others:
        cfg = gateway_config(a.urls + others, health=HEALTH, outlier=OUTLIER)
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()
            await a.kill()
            stop = False
            errors = 0
            served_a: list[float] = []

            async def load() -> None:
                nonlocal errors
                while not stop:
                    status, _, served = await _send(client, base(gw), stream=False, max_tokens=2)
                    errors += status != 200
                    if served == name_of(a.urls[0]):
                        served_a.append(loop.time())
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(load())
            await asyncio.sleep(1.5)
            await a.start()
            ready_at = loop.time()
            bound = HEALTH["healthy_threshold"] * HEALTH["interval_s"] + SLACK
            assert await eventually(lambda: bool(served_a), timeout=bound + 1.0)
            stop = True
            await task
            assert served_a[0] - ready_at < bound + 1.0
            assert errors == 0


async def test_m15_retry_storm_is_bounded(client: aiohttp.ClientSession) -> None:
    """M15: every replica answers 503: upstream attempts <= 1.2 x requests + 3."""
    async with replicas(3, token_interval_s=0.0) as urls:
        for url in urls:
            async with client.post(url + "/_sim/config", json={"status": 503}):
                pass
        cfg = gateway_config(urls, outlier={"enabled": False}, upstream={"max_retries": 2})
        async with gateway(cfg) as gw:
            sem = asyncio.Semaphore(50)

            async def one() -> int:
                async with sem:
                    status, _, _ = await _send(client, base(gw), stream=False)
                    return status

            statuses = await asyncio.gather(*(one() for _ in range(200)))
            assert set(statuses) == {503}
            attempts = sum([(await stats(client, u))["started"] for u in urls])
            assert attempts <= 1.2 * 200 + 3
            metrics = await (await client.get(admin(gw) + "/metrics")).text()
            # Refused by the ratio or the concurrency cap, whichever binds first.
            refused = r"dp_router_retry_budget_exhausted_total\{cause=\"\w+\"\} [1-9]"
            assert re.search(refused, metrics)


async def test_m16_overload_is_bounded_and_answered(client: aiohttp.ClientSession) -> None:
    """M16: 300 concurrent streams against 3 replicas that each take 4: every
    request completes or gets 429/503 + Retry-After within the queue timeout
    + slack; none waits unbounded; capacity is never exceeded."""
    async with replicas(3, token_interval_s=0.02) as urls:
        cfg = gateway_config(
            urls,
            replicas=[{"url": u, "models": [MODEL], "max_concurrency": 4} for u in urls],
            admission={"queue_timeout_s": 1.0, "max_queue": 100},
        )
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, max(r.load.in_flight for r in gw.registry))
                    await asyncio.sleep(0.005)

            # no client-side pool limit: aiohttp's default of 100 would queue
            # requests in the test's own connector and blur what is measured
            wide = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

            async def one() -> tuple[int, float, str | None, bytes]:
                t0 = loop.time()
                async with wide.post(
                    base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=10)
                ) as resp:
                    body = await resp.read()
                    return resp.status, loop.time() - t0, resp.headers.get("Retry-After"), body

            watcher = asyncio.create_task(watch())
            try:
                results = await asyncio.gather(*(one() for _ in range(300)))
            finally:
                watcher.cancel()
                await wide.close()
            stream_time = 10 * 0.02
            for status, took, retry_after, body in results:
                if status == 200:
                    assert _stream_ok(body)
                else:
                    assert status in (429, 503)
                    assert retry_after is not None
                    assert took < 1.0 + SLACK + 1.0
                assert took < 1.0 + stream_time + SLACK + 2.0
            codes = [r[0] for r in results]
            assert codes.count(200) >= 12  # capacity was used
            assert 429 in codes  # the queue bound held
            assert peak <= 4
            assert gw.admission.waiting == 0
            assert await eventually(lambda: in_flight_total(gw) == 0, 1.0)


async def test_m25_sigterm_drains_streams_and_stops_accepting(
    client: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """M25 (gateway part): readiness fails first, the listener closes, the
    streams in flight finish, the process exits cleanly."""
    from tests.harness import GatewayProcess, toml_config

    async with replicas(1, token_interval_s=0.1) as urls:
        port, admin_port = free_port(), free_port()
        path = tmp_path / "gw.toml"
        path.write_text(
            toml_config(
                urls, port, admin_port, server={"shutdown_delay_s": 1.0, "shutdown_timeout_s": 10.0}
            )
        )
        gw = GatewayProcess(path, port, admin_port)
        await gw.start(client)
        try:

            async def stream() -> bytes:
                async with aiohttp.ClientSession() as own:
                    async with own.post(
                        gw.base + "/v1/chat/completions",
                        json=chat_body(stream=True, max_tokens=20),
                    ) as resp:
                        return await resp.read()

            tasks = [asyncio.create_task(stream()) for _ in range(10)]
            assert await eventually(lambda: _count(client, urls[0], "in_progress", 10), timeout=5)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                async with client.get(gw.base + "/readyz") as resp:
                    return resp.status == 503

            # readiness fails first, while the listener still answers
            assert await eventually(not_ready, timeout=1.0)
            await asyncio.sleep(1.0 + SLACK)
            refused = False
            try:
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.post(
                        gw.base + "/v1/chat/completions", json=chat_body()
                    ) as resp:
                        refused = resp.status == 503
            except aiohttp.ClientConnectionError:
                refused = True
            assert refused
            bodies = await asyncio.gather(*tasks)
            assert all(_stream_ok(b) for b in bodies)
            assert await asyncio.wait_for(gw.proc.wait(), 15) == 0
        finally:
            await gw.stop()


async def test_shutdown_refuses_requests_waiting_for_capacity_at_once(
    client: aiohttp.ClientSession,
) -> None:
    """On SIGTERM a request waiting in admission gets 503 shutting_down now,
    not after its queue timeout; the stream in flight still finishes."""
    async with replicas(1, token_interval_s=0.05) as urls:
        cfg = gateway_config(
            urls,
            replicas=[{"url": urls[0], "models": [MODEL], "max_concurrency": 1}],
            admission={"queue_timeout_s": 20.0},
            server={"shutdown_timeout_s": 5.0},
        )
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()

            async def stream() -> bytes:
                async with client.post(
                    base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=30)
                ) as resp:
                    return await resp.read()

            async def waiter() -> tuple[int, dict[str, Any], float]:
                async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                    return resp.status, await resp.json(), loop.time()

            running = asyncio.create_task(stream())
            assert await eventually(lambda: in_flight_total(gw) == 1, timeout=2.0)
            waiting = asyncio.create_task(waiter())
            assert await eventually(lambda: gw.admission.waiting == 1, timeout=2.0)
            t0 = loop.time()
            stopping = asyncio.create_task(gw.shutdown())
            status, body, answered = await asyncio.wait_for(waiting, 5.0)
            assert status == 503 and body["error"]["code"] == "shutting_down"
            assert answered - t0 < SLACK  # not the 20 s queue timeout
            assert _stream_ok(await running)
            await stopping


__all__ = ["ReplicaProcess"]
