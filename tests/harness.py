"""Real servers for tests: simulated replicas and gateways, in-process or as
processes, on free loopback ports. Fakes live here and nowhere else.

In-process servers share the test's event loop (fast, and the test can read
their state); process servers can be SIGKILLed, SIGSTOPped and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.demo import free_ports
from loadtest.replica import ReplicaConfig, run_replica
from router import config as config_mod
from router.app import Gateway

REPO = Path(__file__).resolve().parents[1]
MODEL = "sim-model"


def free_port() -> int:
    return free_ports(1)[0]


def gateway_config(replica_urls: list[str], **sections: Any) -> config_mod.Config:
    """A test config: loopback, ephemeral ports, short timeouts (RELIABILITY 6)."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "access_log": True},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {
            "connect_timeout_s": 1.0,
            "first_byte_timeout_s": 2.0,
            "idle_timeout_s": 2.0,
            "response_timeout_s": 10.0,
        },
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
                run_replica(ReplicaConfig(name=f"r{i}", models=(MODEL,), **cfg))
            )
            urls.append(url)
        yield urls


@contextlib.asynccontextmanager
async def gateway(cfg: config_mod.Config) -> AsyncIterator[Gateway]:
    gw = Gateway(cfg)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.shutdown()


def base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.data_port}"


def admin(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.admin_port}"


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


class ReplicaProcess:
    """Simulated replicas in one child process (``dp-router replica``)."""

    def __init__(self, ports: list[int], args: list[str]) -> None:
        self.ports = ports
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def start(self) -> None:
        argv = [sys.executable, "-m", "router", "replica", "--model", MODEL]
        for p in self.ports:
            argv += ["--port", str(p)]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            *self.args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        ready = 0
        while ready < len(self.ports):
            line = await asyncio.wait_for(self.proc.stdout.readline(), 15)
            if not line:
                raise RuntimeError("replica process exited before it was ready")
            if line.startswith(b"ready"):
                ready += 1

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            await self.kill()


@contextlib.asynccontextmanager
async def replica_process(n: int = 1, *args: str) -> AsyncIterator[ReplicaProcess]:
    proc = ReplicaProcess([free_port() for _ in range(n)], list(args))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def toml_config(
    replica_urls: list[str], port: int, admin_port: int, server: dict[str, float] | None = None
) -> str:
    """A gateway config file for a process gateway, with the test timings."""
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        *(f"{k} = {v}" for k, v in (server or {}).items()),
        "[admin]",
        f"port = {admin_port}",
        "[upstream]",
        "connect_timeout_s = 1.0",
        "first_byte_timeout_s = 2.0",
        "idle_timeout_s = 2.0",
        "response_timeout_s = 10.0",
        "[health]",
        "interval_s = 0.5",
        "timeout_s = 0.4",
        "healthy_threshold = 2",
        "unhealthy_threshold = 2",
    ]
    for url in replica_urls:
        lines += ["[[replicas]]", f'url = "{url}"', f'models = ["{MODEL}"]']
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``dp-router serve`` as a child process (for SIGTERM tests)."""

    def __init__(self, config_path: Path, port: int, admin_port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.admin_port = admin_port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            "serve",
            "--config",
            str(self.config_path),
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=asyncio.subprocess.PIPE,
        )

        async def ready() -> bool:
            try:
                async with session.get(self.base + "/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        if not await eventually(ready, timeout=15, interval=0.1):
            raise RuntimeError("gateway process did not become ready")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
