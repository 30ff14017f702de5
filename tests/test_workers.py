"""``--workers N``: the wire format, the metric merge, and a supervisor with
two real worker processes on loopback (router/workers.py, router/worker.py).

Which worker serves a connection is the kernel's choice (SO_REUSEPORT hashes
the connection's addresses), so the process tests find one keep-alive
connection per worker first: a request for an unknown model on a fresh
connection adds one to ``dp_router_worker_requests_total`` of the worker that
holds it, and that connection stays with that worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from loadtest import procs
from loadtest.replica import SimReplicaConfig, run_replica
from policies.load import Outcome
from router import cli
from router import config as config_mod
from router.config import ConfigError, ReplicaConfig
from router.metrics import Metrics, ReplicaSample
from router.replicas import Health, Ramp, Registry
from router.workers import (
    SUPERVISOR_FAMILIES,
    Channel,
    RemoteOutlier,
    Supervisor,
    WorkerStartError,
    apply_fleet,
    collect_families,
    exposition,
    fleet_message,
    merge_families,
)
from tests.harness import (
    HEALTH_CHECKS,
    MODEL,
    REPO,
    UPSTREAM_TIMEOUTS,
    GatewayProcess,
    chat_body,
    eventually,
    free_port,
    replicas,
    stats,
)

SLACK = 0.5
PREFIX = "dp_router"

# --- units --------------------------------------------------------------------


def test_uvloop_time_is_the_monotonic_clock() -> None:
    """Deadlines cross processes as loop.time() values: uvloop's must read
    CLOCK_MONOTONIC like time.monotonic() (libuv truncates to ms)."""

    async def offsets() -> list[float]:
        loop = asyncio.get_running_loop()
        out = []
        for _ in range(5):
            out.append(loop.time() - time.monotonic())
            await asyncio.sleep(0.003)
        return out

    assert all(-0.01 < d <= 0.001 for d in uvloop.run(offsets()))


def _replica(name: str, limit: int | None = None) -> ReplicaConfig:
    return ReplicaConfig(f"http://{name}:8000", name, (MODEL,), 1.0, "", limit)


def test_fleet_message_reaches_a_worker_registry_and_keeps_live_load() -> None:
    supervisor = Registry((_replica("a", limit=5), _replica("b")), initial_health=Health.UNKNOWN)
    worker = Registry((_replica("a", limit=5), _replica("b")), initial_health=Health.UNKNOWN)
    load_a = worker.get("a").load  # type: ignore[union-attr]
    load_a.in_flight = 2  # requests this worker has in flight
    ramp = Ramp(100.0, 30.0, 2.0, 0.2)
    supervisor.update("a", health=Health.HEALTHY, ejected_until=123.5, ramp=ramp)
    supervisor.update("b", health=Health.UNHEALTHY)

    def send() -> None:
        message = fleet_message(supervisor.snapshot, supervisor.model_list(), workers=2)
        apply_fleet(worker, pickle.loads(pickle.dumps(message)))

    send()
    a = worker.get("a")
    assert a is not None and a.load is load_a and load_a.in_flight == 2
    assert (a.health, a.ejected_until, a.ramp) == (Health.HEALTHY, 123.5, ramp)
    assert a.models == frozenset({MODEL}) and a.url == "http://a:8000"
    assert load_a.max_concurrency == math.ceil(5 / 2)  # each worker's share
    assert worker.get("b").health is Health.UNHEALTHY  # type: ignore[union-attr]
    assert worker.model_list() == supervisor.model_list()
    version = worker.snapshot.version

    supervisor.remove("b")
    supervisor.add(_replica("c"))
    send()
    assert worker.snapshot.version > version
    assert sorted(worker.snapshot.names) == ["a", "c"]
    assert worker.get("a").load is load_a  # type: ignore[union-attr]
    assert worker.snapshot.serving(MODEL)  # the per-version indexes are rebuilt


def _metrics(in_flight: int, healthy: bool, requests: int = 0) -> Metrics:
    """A process's metrics: replica "a" as it sees it, and ``requests`` served."""
    m = Metrics()
    m.watch_replicas(lambda: [ReplicaSample("a", in_flight, 10, healthy, healthy, False, 1.0)])
    m.watch_experts(lambda: [], dict)  # as every gateway does (no reports yet)
    for _ in range(requests):
        m.count_finished(MODEL, "a", 200, 0.2, None)
        m.count_attempt("a", "ok")
    m.retry_budget_balance.set(3)
    return m


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_merged_metrics_parse_and_add_up() -> None:
    # The supervisor's view of "a" (unhealthy; 7 in flight: the workers' sum
    # it mirrors) against the workers' (stale "healthy"); its retry budget
    # balance is its own, unused one.
    control = _metrics(in_flight=7, healthy=False)
    control.health_transitions.labels("a", "unhealthy").inc()
    w0, w1 = _metrics(3, True, requests=3), _metrics(4, True, requests=5)

    merged = merge_families(
        collect_families(control.registry),
        [collect_families(w0.registry), collect_families(w1.registry)],
    )
    text = exposition(merged).decode()
    # One HELP and TYPE per name (prometheus_client's 0.0.4 text gives a
    # counter's _created samples a family of their own, as it does unmerged).
    for kind in ("# HELP ", "# TYPE "):
        names = [ln.split()[2] for ln in text.splitlines() if ln.startswith(kind)]
        assert len(names) == len(set(names))
    values = _values(text)
    requests = (f"{PREFIX}_requests_total", (("model", MODEL), ("replica", "a"), ("status", "200")))
    assert values[requests] == 8
    assert values[(f"{PREFIX}_request_duration_seconds_count", (("model", MODEL),))] == 8
    assert values[(f"{PREFIX}_retry_budget_balance", ())] == 6  # workers only
    # status and control-plane families: the supervisor's alone
    assert values[(f"{PREFIX}_replica_in_flight", (("replica", "a"),))] == 7
    assert values[(f"{PREFIX}_replica_healthy", (("replica", "a"),))] == 0
    transitions = (f"{PREFIX}_health_transitions_total", (("replica", "a"), ("to", "unhealthy")))
    assert values[transitions] == 1
    # The names the merge treats as the supervisor's exist in metrics.py.
    names = {f[0] for f in collect_families(control.registry)}
    assert names >= SUPERVISOR_FAMILIES


async def test_remote_outlier_sends_one_message_per_loop_turn() -> None:
    a, b = socket.socketpair()
    worker_end, supervisor_end = await Channel.connect(a), await Channel.connect(b)
    try:
        relay = RemoteOutlier(Registry((_replica("a"),)), worker_end)
        assert relay.record("a", Outcome.CONNECT_ERROR, 1.0) is None
        relay.record("a", Outcome.HTTP_5XX, 1.0, status=503)
        relay.record("a", Outcome.OK, 1.0, status=200)
        relay.record("a", Outcome.OK, 1.0, status=200)  # changes nothing: not sent
        relay.record("a", Outcome.TIMEOUT, 1.0)
        message = await asyncio.wait_for(supervisor_end.receive(), 2)
        assert message == (
            "outcomes",
            [
                ("a", "connect_error", None),
                ("a", "http_5xx", 503),
                ("a", "ok", 200),
                ("a", "timeout", None),
            ],
        )
        relay.record("a", Outcome.OK, 2.0, status=200)  # the next turn's batch
        assert await asyncio.wait_for(supervisor_end.receive(), 2) == (
            "outcomes",
            [("a", "ok", 200)],
        )
    finally:
        worker_end.close()
        supervisor_end.close()


def test_workers_config_and_flag() -> None:
    def build(value: Any) -> int:
        data = {"replicas": [{"url": "http://a:1"}], "server": {"workers": value}}
        return config_mod.from_dict(data, env={}).server.workers

    assert build(4) == 4
    assert build("auto") == (os.cpu_count() or 1)
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match=r"server\.workers"):
            build(bad)
    args = cli._serve_parser().parse_args(["--replica", "http://a:1", "--workers", "3"])
    assert cli.build_config(args).server.workers == 3
    args = cli._serve_parser().parse_args(["--replica", "http://a:1", "--workers", "auto"])
    assert cli.build_config(args).server.workers == (os.cpu_count() or 1)


async def test_port_in_use_fails_the_start_with_one_line(tmp_path: Path) -> None:
    """Before any worker starts: SO_REUSEPORT would otherwise let our workers
    share a port with whatever listens there."""
    with socket.socket() as taken:
        taken.bind((procs.HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = procs.dp_router(
            "serve", "--replica", "http://127.0.0.1:9", "--host", procs.HOST,
            "--port", str(port), "--admin-port", str(free_port()), "--workers", "2",
        )  # fmt: skip
        log = tmp_path / "gw.log"
        child = await procs.spawn("gateway", argv, log=log, cwd=REPO)
        assert await asyncio.wait_for(child.proc.wait(), 30) == 1
        assert "cannot listen" in log.read_text()


async def test_workers_that_cannot_start_fail_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit status 1 from ``serve``: what a worker process cannot do (an
    interpreter that exits at once stands in for a broken install)."""
    cfg = config_mod.from_dict(
        {
            "server": {"host": procs.HOST, "port": 0, "workers": 2},
            "admin": {"host": procs.HOST, "port": 0},
            "health": {"enabled": False},
            "replicas": [{"url": "http://127.0.0.1:9", "models": [MODEL]}],
        },
        env={},
    )
    monkeypatch.setattr(sys, "executable", "/bin/false")
    sup = Supervisor(cfg)
    with pytest.raises(WorkerStartError, match="did not start: exit status 1"):
        await sup.start()
    assert sup.pids == [0, 0]


# --- a supervisor and two workers ---------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection (never silently reopened, unlike a
    client pool's, so it stays with one worker)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(procs.HOST, port)
        return cls(reader, writer)

    async def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
        }
        if "content-length" in headers:
            return status, await self.reader.readexactly(int(headers["content-length"]))
        chunks = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(chunks)
            chunks.append(chunk[:-2])

    def close(self) -> None:
        self.writer.close()


async def scrape(client: aiohttp.ClientSession, admin_port: int) -> dict[Any, float]:
    async with client.get(f"http://{procs.HOST}:{admin_port}/metrics") as resp:
        assert resp.status == 200
        return _values(await resp.text())


def worker_values(values: dict[Any, float], name: str) -> dict[str, float]:
    return {dict(k[1])["worker"]: v for k, v in values.items() if k[0] == f"{PREFIX}_{name}"}


def total(values: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v for (n, lbl), v in values.items() if n == name and labels.items() <= dict(lbl).items()
    )


@contextlib.asynccontextmanager
async def supervisor(
    client: aiohttp.ClientSession, tmp_path: Path, urls: list[str], **sections: Any
) -> AsyncIterator[GatewayProcess]:
    """``dp-router serve`` with 2 workers; yields once both listen."""
    port, admin_port = free_port(), free_port()
    server = {"workers": 2, "shutdown_timeout_s": 5.0, **sections.pop("server", {})}
    path = tmp_path / "gw.toml"
    path.write_text(
        procs.gateway_toml(
            [{"url": u, "models": [MODEL]} for u in urls],
            port=port,
            admin_port=admin_port,
            server=server,
            upstream={**UPSTREAM_TIMEOUTS, **sections.pop("upstream", {})},
            health={**HEALTH_CHECKS, "slow_start_s": 0.0, **sections.pop("health", {})},
            **sections,
        )
    )
    gw = GatewayProcess(path, port, admin_port)
    await gw.start(client)
    try:

        async def both_up() -> bool:
            pids = worker_values(await scrape(client, admin_port), "worker_pid")
            return len(pids) == 2 and all(pids.values())

        assert await eventually(both_up, timeout=20)
        yield gw
    finally:
        await gw.stop()


@contextlib.asynccontextmanager
async def one_connection_per_worker(
    client: aiohttp.ClientSession, gw: GatewayProcess
) -> AsyncIterator[list[Connection]]:
    """A keep-alive connection on each worker (worker 0's first), found by
    the per-worker request counter."""
    found: dict[str, Connection] = {}
    try:
        for _ in range(40):
            before = worker_values(await scrape(client, gw.admin_port), "worker_requests_total")
            conn = await Connection.open(gw.port)
            status, _ = await conn.post({"model": "no-such-model", "messages": []})
            assert status == 404
            after = worker_values(await scrape(client, gw.admin_port), "worker_requests_total")
            (worker,) = [w for w in after if after[w] != before.get(w, 0)]
            if worker in found:
                conn.close()
            else:
                found[worker] = conn
            if len(found) == 2:
                break
        assert len(found) == 2, "the kernel put 40 connections on one worker"
        yield [found[w] for w in sorted(found)]
    finally:
        for conn in found.values():
            conn.close()


async def test_requests_spread_over_workers_and_one_metrics(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with replicas(2, token_interval_s=0.0) as urls, supervisor(client, tmp_path, urls) as gw:

        async def one() -> int:
            # A new connection each: the kernel spreads connections, not requests.
            async with aiohttp.ClientSession() as own:
                async with own.post(gw.base + "/v1/chat/completions", json=chat_body()) as resp:
                    await resp.read()
                    return resp.status

        statuses = []
        for _ in range(5):
            statuses += await asyncio.gather(*(one() for _ in range(8)))
        assert statuses == [200] * 40
        values = await scrape(client, gw.admin_port)
        per_worker = worker_values(values, "worker_requests_total")
        assert sum(per_worker.values()) == 40 and all(per_worker.values()), per_worker
        assert total(values, f"{PREFIX}_requests_total") == 40
        assert total(values, f"{PREFIX}_upstream_attempts_total", outcome="ok") == 40
        assert total(values, f"{PREFIX}_request_duration_seconds_count") == 40
        served = [(await stats(client, u))["completed"] for u in urls]
        assert sum(served) == 40


async def test_killed_worker_is_restarted_and_totals_hold(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with replicas(1, token_interval_s=0.0) as urls, supervisor(client, tmp_path, urls) as gw:
        async with one_connection_per_worker(client, gw) as conns:
            for conn in conns:
                assert (await conn.post(chat_body()))[0] == 200
        before = await scrape(client, gw.admin_port)
        pids = worker_values(before, "worker_pid")
        os.kill(int(pids["0"]), signal.SIGKILL)

        async def restarted() -> bool:
            now = worker_values(await scrape(client, gw.admin_port), "worker_pid")
            return now["0"] not in (0, pids["0"])

        # first backoff 0.5 s + an interpreter start on a busy machine
        assert await eventually(restarted, timeout=0.5 + 15 + SLACK)
        after = await scrape(client, gw.admin_port)
        assert worker_values(after, "worker_restarts_total") == {"0": 1, "1": 0}
        # the dead worker's counts stay in the totals (no counter reset)
        assert total(after, f"{PREFIX}_requests_total") >= total(before, f"{PREFIX}_requests_total")
        async with client.post(gw.base + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200


async def test_health_change_reaches_every_worker(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url_a, _ = await stack.enter_async_context(run_replica(SimReplicaConfig(name="a")))
        doomed = contextlib.AsyncExitStack()
        url_b, _ = await doomed.enter_async_context(run_replica(SimReplicaConfig(name="b")))
        gw = await stack.enter_async_context(
            supervisor(client, tmp_path, [url_a, url_b], upstream={"max_retries": 0})
        )
        conns = await stack.enter_async_context(one_connection_per_worker(client, gw))
        loop = asyncio.get_running_loop()
        await doomed.aclose()  # b stops listening
        killed_at = loop.time()
        fall = HEALTH_CHECKS["unhealthy_threshold"] * HEALTH_CHECKS["interval_s"]
        await asyncio.sleep(
            max(0.0, killed_at + fall + HEALTH_CHECKS["timeout_s"] + SLACK - loop.time())
        )
        b = url_b.removeprefix("http://")
        before = await scrape(client, gw.admin_port)
        for _ in range(5):
            for conn in conns:  # each worker, 5 times
                status, body = await conn.post(chat_body())
                assert status == 200, body
        after = await scrape(client, gw.admin_port)
        attempts = f"{PREFIX}_upstream_attempts_total"
        assert total(after, attempts, replica=b) == total(before, attempts, replica=b)
        assert total(after, attempts, outcome="ok") - total(before, attempts, outcome="ok") == 10


async def test_outlier_ejection_is_decided_on_both_workers_outcomes(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """4 failures in a row eject; each worker sees only 2 of them."""
    outlier = {"consecutive_failures": 4, "base_ejection_s": 30.0, "max_ejection_s": 30.0}
    async with contextlib.AsyncExitStack() as stack:
        (url,) = await stack.enter_async_context(replicas(1, token_interval_s=0.0))
        gw = await stack.enter_async_context(
            supervisor(client, tmp_path, [url], upstream={"max_retries": 0}, outlier=outlier)
        )
        conns = await stack.enter_async_context(one_connection_per_worker(client, gw))
        async with client.post(url + "/_sim/config", json={"status": 503}) as resp:
            assert resp.status == 200
        for conn in conns * 2:  # worker 0, worker 1, worker 0, worker 1
            status, body = await conn.post(chat_body())
            assert status == 503 and b"no healthy replica" not in body

        async def ejected() -> bool:
            async with client.get(f"http://{procs.HOST}:{gw.admin_port}/admin/replicas") as r:
                return bool((await r.json())["replicas"][0]["ejected"])

        assert await eventually(ejected, timeout=SLACK)
        await asyncio.sleep(SLACK)  # the next snapshot reaches the workers
        for conn in conns:
            status, body = await conn.post(chat_body())
            assert status == 503 and b"no healthy replica" in body, body
        assert (await stats(client, url))["started"] == 4
        values = await scrape(client, gw.admin_port)
        name = url.removeprefix("http://")
        assert total(values, f"{PREFIX}_outlier_ejections_total", replica=name) == 1


async def test_sigterm_drains_every_worker(client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A stream in flight on each worker finishes; the supervisor exits 0."""
    async with contextlib.AsyncExitStack() as stack:
        (url,) = await stack.enter_async_context(replicas(1, token_interval_s=0.1))
        gw = await stack.enter_async_context(
            supervisor(client, tmp_path, [url], server={"shutdown_timeout_s": 10.0})
        )
        conns = await stack.enter_async_context(one_connection_per_worker(client, gw))
        streams = [
            asyncio.create_task(c.post(chat_body(stream=True, max_tokens=20))) for c in conns
        ]

        async def both_streaming() -> bool:
            return (await stats(client, url))["in_progress"] == 2

        assert await eventually(both_streaming, timeout=5)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with client.get(f"http://{procs.HOST}:{gw.admin_port}/readyz") as resp:
                return resp.status == 503

        assert await eventually(not_ready, timeout=SLACK)
        for status, body in await asyncio.gather(*streams):
            assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body[-200:]
        # 20 tokens at 0.1 s each: well inside shutdown_timeout_s
        assert await asyncio.wait_for(gw.proc.wait(), 10.0 + SLACK) == 0


if sys.platform != "linux":  # SO_REUSEPORT spreading, CLOCK_MONOTONIC across processes
    pytestmark = pytest.mark.skip(reason="workers are tested on Linux")
