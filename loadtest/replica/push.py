"""The simulated replica pushes its own load reports to a gateway.

The report is the gateway's push schema (docs/load-report.md): the model's
waiting and running requests and KV usage, its MoE expert counters, and
``state: draining`` while the replica's ``drain`` knob is on, so a test can
watch a replica take itself out of rotation.

Off unless ``DP_SIM_PUSH_URL`` is set (the gateway's push listener,
``http://host:port/load-report``); ``DP_SIM_PUSH_TOKEN`` is the replica's
token and ``DP_SIM_PUSH_INTERVAL`` the period in seconds (default 0.5). The
token names one replica, so run one replica per process when pushing.
In-process tests use :func:`pushing` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from loadtest.replica.server import SimReplicaState

log = logging.getLogger("dp_sim.push")

ENV_URL = "DP_SIM_PUSH_URL"
ENV_TOKEN = "DP_SIM_PUSH_TOKEN"
ENV_INTERVAL = "DP_SIM_PUSH_INTERVAL"
DEFAULT_INTERVAL_S = 0.5


def report_body(state: SimReplicaState) -> dict[str, Any]:
    """One report of ``state``'s current load."""
    load = state.model.load()
    body: dict[str, Any] = {
        "version": 1,
        "replica": state.cfg.name,
        "timestamp": time.time(),
        "state": "draining" if state.drain else "ready",
        "waiting": load.waiting,
        "running": load.running,
        "kv_usage": min(1.0, max(0.0, load.kv_usage)),
    }
    if load.expert_tokens:
        expert: dict[str, Any] = {"tokens": list(load.expert_tokens)}
        if load.expert_overflow:
            expert["overflow"] = list(load.expert_overflow)
        body["experts"] = [expert]
    return body


@contextlib.asynccontextmanager
async def pushing(
    state: SimReplicaState, url: str, token: str, interval_s: float = DEFAULT_INTERVAL_S
) -> AsyncIterator[None]:
    """Push a report every ``interval_s`` while entered (the first at once)."""

    async def loop(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with session.post(
                    url,
                    json=report_body(state),
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=aiohttp.ClientTimeout(total=max(1.0, interval_s)),
                ) as resp:
                    if resp.status >= 300:
                        log.warning("push refused: %s %s", resp.status, await resp.text())
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("push failed: %r", exc)
            await asyncio.sleep(interval_s)

    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(loop(session), name=f"push-{state.cfg.name}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def install(app: web.Application, state: SimReplicaState) -> None:
    """Push while ``app`` runs, if ``DP_SIM_PUSH_URL`` is set."""
    url = os.environ.get(ENV_URL, "")
    if not url:
        return
    token = os.environ.get(ENV_TOKEN, "")
    interval = float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL_S))

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        async with pushing(state, url, token, interval):
            yield

    app.cleanup_ctx.append(ctx)
