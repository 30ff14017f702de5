"""The push listener: valid and refused reports, one token per replica, self-drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from loadtest.replica import SimReplicaConfig, run_replica
from loadtest.replica.push import pushing
from router.app import Gateway
from router.experts import ExpertSample
from router.replicas import ReplicaStatus
from router.telemetry.push import PATH, create_push_app, push_listener, token_key
from router.telemetry.report import LoadReport
from tests.harness import MODEL, base, chat_body, eventually, gateway_config, replicas

TOKENS = {"a": "token-of-a", "b": "token-of-b"}
SLACK = 0.5


@pytest.fixture(autouse=True)
def _tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, token in TOKENS.items():
        monkeypatch.setenv(f"PUSH_TOKEN_{name.upper()}", token)


@contextlib.asynccontextmanager
async def pushed_gateway(
    experts: list[tuple[str, Sequence[ExpertSample]]] | None = None, **telemetry: Any
) -> AsyncIterator[tuple[Gateway, str, list[str]]]:
    """Two replicas a and b that push (no scrapes); yields (gateway, push URL, replica URLs)."""
    async with replicas(2) as urls:
        cfg = gateway_config(
            urls,
            telemetry={"push_listen": "127.0.0.1:0", **telemetry},
            replicas=[
                {
                    "url": url,
                    "name": name,
                    "models": [MODEL],
                    "telemetry": "push",
                    "push_token_env": f"PUSH_TOKEN_{name.upper()}",
                }
                for name, url in zip("ab", urls, strict=True)
            ],
        )
        gw = Gateway(cfg)
        if experts is not None:
            gw.on_experts = lambda name, samples, now: experts.append((name, samples))
        await gw.start()
        try:
            assert gw.telemetry is not None and gw.telemetry.push_port
            yield gw, f"http://127.0.0.1:{gw.telemetry.push_port}{PATH}", urls
        finally:
            await gw.shutdown()


def replica(gw: Gateway, name: str) -> ReplicaStatus:
    status = gw.registry.get(name)
    assert status is not None
    return status


def report(replica: str = "a", **fields: Any) -> dict[str, Any]:
    return {"replica": replica, "timestamp": 1000.0, "waiting": 2, "running": 5, **fields}


async def post(
    client: aiohttp.ClientSession, url: str, body: Any, token: str | None = TOKENS["a"]
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with client.post(url, data=data, headers=headers) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else {})


def rejected(gw: Gateway, reason: str) -> float:
    return float(gw.metrics.load_reports_rejected.labels("push", reason)._value.get())


async def test_a_valid_report_is_recorded(client: aiohttp.ClientSession) -> None:
    experts: list[tuple[str, Sequence[ExpertSample]]] = []
    async with pushed_gateway(experts) as (gw, url, _):
        body = report(
            kv_usage=0.25,
            waiting_prompt_tokens=4096,
            version=1,
            state="ready",
            experts=[
                {"layer": 0, "tokens": [1, 2, 3], "overflow": [0, 0, 1]},
                {"layer": 3, "tokens": [4]},
            ],
        )
        status, _ = await post(client, url, body)
        assert status == 204
        load = replica(gw, "a").load
        assert (load.reported_queue, load.reported_waiting, load.reported_running) == (
            7.0,
            2.0,
            5.0,
        )
        assert (load.kv_usage, load.waiting_prompt_tokens, load.reported_by) == (
            0.25,
            4096.0,
            "push",
        )
        now = asyncio.get_running_loop().time()
        assert load.reported_at is not None and 0 <= now - load.reported_at < SLACK
        assert gw.metrics.load_reports.labels("a", "push")._value.get() == 1
        ((name, samples),) = experts
        assert name == "a"
        assert [(s.layer, s.tokens, s.overflow) for s in samples] == [
            (0, (1.0, 2.0, 3.0), (0.0, 0.0, 1.0)),
            (3, (4.0,), None),
        ]


async def test_tokens_name_the_replica(client: aiohttp.ClientSession) -> None:
    async with pushed_gateway() as (gw, url, _):
        b = replica(gw, "b")
        assert b is not None
        assert (await post(client, url, report(), token=None))[0] == 401
        status, body = await post(client, url, report(), token="guessed")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        # a's token, b's name: a must not drain or overload-mark b
        status, body = await post(client, url, report("b", waiting=999, state="draining"))
        assert status == 403, body
        assert "'a'" in body["error"]["message"]
        assert b.load.reported_at is None and replica(gw, "b").reported_draining is False
        assert (rejected(gw, "unauthorized"), rejected(gw, "wrong_replica")) == (2, 1)
        assert (await post(client, url, report("b"), token=TOKENS["b"]))[0] == 204


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 400, "bad_json"),
        ([1, 2], 400, "invalid"),
        (report(waiting="3"), 400, "invalid"),
        (report(waiting=True), 400, "invalid"),
        (report(waiting=2.5), 400, "invalid"),
        (report(running=-1), 400, "invalid"),
        (report(kv_usage=1.5), 400, "invalid"),
        (report(timestamp=float("nan")), 400, "invalid"),
        (report(state="sleeping"), 400, "invalid"),
        (report(version=2), 400, "invalid"),
        (report(color="blue"), 400, "invalid"),
        ({"replica": "a", "timestamp": 1.0, "waiting": 1}, 400, "invalid"),
        (report(experts=[{"tokens": [1] * 9}]), 400, "invalid"),  # max 8 experts here
        (report(experts=[{"layer": i, "tokens": [1]} for i in range(5)]), 400, "invalid"),
        (
            report(experts=[{"layer": 0, "tokens": [1]}, {"layer": 0, "tokens": [1]}]),
            400,
            "invalid",
        ),
        (report(experts=[{"tokens": [1, 2], "overflow": [1]}]), 400, "invalid"),
        (report(experts=[{"tokens": [-1]}]), 400, "invalid"),
        # JSON integers are unbounded; beyond a float's range is bad input, not a 500
        (report(timestamp=10**400), 400, "invalid"),
        (report(waiting=10**400), 400, "invalid"),
        (report(experts=[{"tokens": [10**400]}]), 400, "invalid"),
        (b"{" + b" " * 5000 + b"}", 413, "too_large"),
    ],
)
async def test_bad_reports_are_refused_whole_and_counted(
    client: aiohttp.ClientSession, body: Any, status: int, reason: str
) -> None:
    async with pushed_gateway(push_max_bytes=4096, push_max_experts=8, push_max_layers=4) as (
        gw,
        url,
        _,
    ):
        got, answer = await post(client, url, body)
        assert got == status, answer
        assert set(answer["error"]) == {"message", "type", "code", "param"}
        assert rejected(gw, reason) == 1
        assert replica(gw, "a").load.reported_at is None


async def test_order_methods_and_paths(client: aiohttp.ClientSession) -> None:
    async with pushed_gateway() as (gw, url, _):
        assert (await post(client, url, report(timestamp=100.0)))[0] == 204
        assert (await post(client, url, report(timestamp=99.0)))[0] == 409  # reordered
        assert (await post(client, url, report(timestamp=50.0)))[0] == 204  # restart / clock step
        assert rejected(gw, "out_of_order") == 1
        async with client.get(url) as resp:
            assert resp.status == 405
        async with client.post(url.replace(PATH, "/other"), json={}) as resp:
            assert resp.status == 404


async def test_a_replica_reporting_draining_gets_no_new_requests(
    client: aiohttp.ClientSession,
) -> None:
    async with pushed_gateway() as (gw, url, urls):
        assert (await post(client, url, report(state="draining")))[0] == 204
        a = replica(gw, "a")
        assert a is not None and a.reported_draining and not a.routable(0.0)
        for _ in range(6):
            async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
                assert resp.headers["X-Dp-Replica"] == "b"
        async with client.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as resp:
            assert 'dp_router_replica_reported_draining{replica="a"} 1.0' in await resp.text()
        assert (await post(client, url, report(state="ready", timestamp=1001.0)))[0] == 204
        assert replica(gw, "a").routable(0.0)
        assert urls


async def test_the_simulated_replica_pushes(client: aiohttp.ClientSession) -> None:
    """loadtest/replica/push.py: a replica named a, with a's token, its drain knob."""
    async with pushed_gateway() as (gw, url, _):
        async with run_replica(SimReplicaConfig(name="a")) as (_, state):
            async with pushing(state, url, TOKENS["a"], interval_s=0.05):
                a = functools.partial(replica, gw, "a")  # each version's status
                assert await eventually(lambda: a().load.reported_by == "push", 1 + SLACK)
                state.apply_config({"drain": True})
                assert await eventually(lambda: a().reported_draining, 1 + SLACK)
                state.apply_config({"drain": False})
                assert await eventually(lambda: not a().reported_draining, 1 + SLACK)


# --- the listener's own bounds: slow senders and too many connections ---------------


@contextlib.asynccontextmanager
async def bare_listener(
    counted: list[str], **bounds: Any
) -> AsyncIterator[tuple[int, list[LoadReport]]]:
    """The push app alone, with short bounds; yields (port, accepted reports)."""
    accepted: list[LoadReport] = []
    app = create_push_app(
        {token_key(TOKENS["a"]): "a"},
        lambda owner, rep: accepted.append(rep),
        counted.append,
        max_bytes=4096,
        max_experts=8,
        max_layers=4,
        body_timeout=bounds.pop("body_timeout", 0.3),
    )
    async with push_listener(app, "127.0.0.1:0", count_rejected=counted.append, **bounds) as port:
        yield port, accepted


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before closing; fails if it is still open at ``timeout``."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_a_half_sent_head_is_closed_within_the_keepalive_timeout() -> None:
    timeout = 0.3
    async with bare_listener([], keepalive_timeout=timeout) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /load-report HTTP/1.1\r\nHost: x\r\n")  # never finished
        await closed_within(reader, timeout + SLACK)
        writer.close()


async def test_a_slow_body_gets_408_within_the_body_timeout() -> None:
    counted: list[str] = []
    async with bare_listener(counted, body_timeout=0.3) as (port, accepted):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /load-report HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + TOKENS["a"].encode() + b"\r\n\r\n{"
        )
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.3 + SLACK)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert counted == ["timeout"] and accepted == []


async def test_connections_beyond_the_limit_are_closed_and_counted(
    client: aiohttp.ClientSession,
) -> None:
    counted: list[str] = []
    async with bare_listener(counted, max_connections=2) as (port, accepted):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for r, w in held:  # an answer on each: both accepted, kept alive
            w.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await r.readuntil(b"\r\n")).startswith(b"HTTP/1.1 404")
        counted.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(reader, SLACK) == b""
        writer.close()
        assert counted == ["too_many_connections"]
        counted.clear()
        for _, writer in held:
            writer.close()
        url = f"http://127.0.0.1:{port}{PATH}"

        async def room_again() -> bool:  # once the server has seen both close
            with contextlib.suppress(aiohttp.ClientConnectionError):
                return (await post(client, url, report()))[0] == 204
            return False

        assert await eventually(room_again, SLACK)
        assert len(accepted) == 1


async def test_a_drain_nobody_renews_expires(client: aiohttp.ClientSession) -> None:
    async with pushed_gateway() as (gw, url, _):
        assert gw.telemetry is not None
        lease = gw.telemetry.drain_lease_s = 0.6
        assert (await post(client, url, report(state="draining")))[0] == 204
        assert replica(gw, "a").reported_draining
        await asyncio.sleep(lease * 2 / 3)
        # renewed: the lease runs from this push on
        assert (await post(client, url, report(state="draining", timestamp=1001.0)))[0] == 204
        await asyncio.sleep(lease * 2 / 3)  # past the first lease's end
        assert replica(gw, "a").reported_draining
        # the pusher died: back in rotation
        assert await eventually(lambda: not replica(gw, "a").reported_draining, lease + SLACK)
        assert replica(gw, "a").routable(0.0)
