"""Real servers for tests: simulated replicas and gateways, in-process or as
processes, on free loopback ports.

In-process servers share the test's event loop (fast, and the test can read
their state); process servers can be SIGKILLed, SIGSTOPped and restarted.
Processes are started, awaited and stopped by loadtest/procs.py, the harness
the demo, bench and faults tools use too; this module adds the test timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from loadtest import procs
from loadtest.replica import SimReplicaConfig, run_replica
from router import config as config_mod
from router.app import Gateway

REPO = Path(__file__).resolve().parents[1]
MODEL = "sim-model"
# Upstream timeouts short enough that a test of a hung or dead replica takes
# seconds, long enough for a loaded 2-core machine to answer in time.
UPSTREAM_TIMEOUTS = {
    "connect_timeout_s": 1.0,
    "first_byte_timeout_s": 2.0,
    "idle_timeout_s": 2.0,
    "response_timeout_s": 10.0,
}
# Active health checks for process tests: a replica is out after two failed
# checks 0.5 s apart, and back after two good ones.
HEALTH_CHECKS = {
    "interval_s": 0.5,
    "timeout_s": 0.4,
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}
# Interpreter start-up on a busy 2-core machine.
PROCESS_START_S = 15.0


def free_port() -> int:
    return procs.free_ports(1)[0]


def gateway_config(replica_urls: list[str], **sections: Any) -> config_mod.Config:
    """A test config: loopback, ephemeral ports, short timeouts, no health checks."""
    data: dict[str, Any] = {
        "server": {"host": procs.HOST, "port": 0, "access_log": True},
        "admin": {"host": procs.HOST, "port": 0},
        "upstream": dict(UPSTREAM_TIMEOUTS),
        "health": {"enabled": False},
        "replicas": [{"url": u, "models": [MODEL]} for u in replica_urls],
    }
    for name, values in sections.items():
        if name == "replicas":
            data["replicas"] = values
        else:
            data.setdefault(name, {}).update(values)
    return config_mod.from_dict(data, env={})


@contextlib.asynccontextmanager
async def replicas(n: int, **cfg: Any) -> AsyncIterator[list[str]]:
    """n in-process simulated replicas; yields their base URLs."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for i in range(n):
            url, _state = await stack.enter_async_context(
                run_replica(SimReplicaConfig(name=f"r{i}", models=(MODEL,), **cfg))
            )
            urls.append(url)
        yield urls


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """A small aiohttp app of a test's own (a scripted replica) on a free
    loopback port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, procs.HOST, 0)
    await site.start()
    try:
        yield f"http://{procs.HOST}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateway(cfg: config_mod.Config) -> AsyncIterator[Gateway]:
    gw = Gateway(cfg)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.shutdown()


def base(gw: Gateway) -> str:
    return f"http://{procs.HOST}:{gw.data_port}"


def admin(gw: Gateway) -> str:
    return f"http://{procs.HOST}:{gw.admin_port}"


def chat_body(stream: bool = False, max_tokens: int = 8, content: str = "hello") -> dict[str, Any]:
    return {
        "model": MODEL,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    }


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


async def stats(session: aiohttp.ClientSession, replica_url: str) -> dict[str, int]:
    return await get_json(session, replica_url + "/_sim/stats")  # type: ignore[no-any-return]


async def eventually(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll an (async) predicate until true or ``timeout`` seconds pass."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(interval)


def in_flight_total(gw: Gateway) -> int:
    return sum(r.load.in_flight for r in gw.registry)


def tokens_total(gw: Gateway) -> int:
    return sum(r.load.outstanding_tokens for r in gw.registry)


def _child_env() -> dict[str, str]:
    # The repository first on the path: the child runs this checkout's code.
    return {**os.environ, "PYTHONPATH": str(REPO)}


class ReplicaProcess:
    """Simulated replicas in one child process (``dp-router replica``) on fixed
    ports, so that :meth:`start` after :meth:`kill` brings them back where
    the gateway expects them."""

    def __init__(self, ports: list[int], args: list[str]) -> None:
        self.ports = ports
        self.args = args
        self.child: procs.Child | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://{procs.HOST}:{p}" for p in self.ports]

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.child.proc if self.child is not None else None

    async def start(self) -> None:
        # --paced: the fast fixed pacing these tests time against (the
        # command's default is the slower, realistic engine model).
        argv = procs.dp_router("replica", "--model", MODEL, "--paced")
        for p in self.ports:
            argv += ["--port", str(p)]
        self.child = await procs.spawn(
            "replica", [*argv, *self.args], stdout_pipe=True, cwd=REPO, env=_child_env()
        )
        await self.child.ready_ports(len(self.ports), timeout=PROCESS_START_S)

    def signal(self, sig: int) -> None:
        if self.child is not None:
            self.child.send(sig)

    async def kill(self) -> None:
        if self.child is not None:
            await self.child.kill()

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()


@contextlib.asynccontextmanager
async def replica_process(n: int = 1, *args: str) -> AsyncIterator[ReplicaProcess]:
    proc = ReplicaProcess(procs.free_ports(n), list(args))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def toml_config(
    replica_urls: list[str], port: int, admin_port: int, server: dict[str, float] | None = None
) -> str:
    """A gateway config file for a process gateway, with the test timings."""
    return procs.gateway_toml(
        [{"url": url, "models": [MODEL]} for url in replica_urls],
        port=port,
        admin_port=admin_port,
        server=server or {},
        upstream=UPSTREAM_TIMEOUTS,
        health=HEALTH_CHECKS,
    )


class GatewayProcess:
    """``dp-router serve`` as a child process (for SIGTERM tests)."""

    def __init__(self, config_path: Path, port: int, admin_port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.admin_port = admin_port
        self.child: procs.Child | None = None

    @property
    def base(self) -> str:
        return f"http://{procs.HOST}:{self.port}"

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.child.proc if self.child is not None else None

    async def start(self, session: aiohttp.ClientSession) -> None:
        argv = procs.dp_router("serve", "--config", str(self.config_path))
        self.child = await procs.spawn("gateway", argv, cwd=REPO, env=_child_env())
        try:
            await self.child.wait_http(
                self.base + "/readyz", timeout=PROCESS_START_S, session=session
            )
        except procs.StartError as exc:
            raise RuntimeError("gateway process did not become ready") from exc

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(timeout=15)
