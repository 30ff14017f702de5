"""Models of replicas that do not configure them: read from GET /v1/models.

Re-read periodically. A failed read keeps the last-known list, so a replica
that is down makes its model's requests answer 503 (no healthy replica), not
404 (no such model), as a user pointing the gateway at vLLM expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from router.metrics import Metrics
from router.replicas import Registry, ReplicaStatus

log = logging.getLogger("dp_router.discovery")

MAX_MODELS_PER_REPLICA = 64  # bounds metric labels and memory (docs/reliability.md, M47)
# A replica that has never answered is asked again soon rather than after a
# full refresh period, so a fleet starting together becomes routable quickly.
RETRY_UNKNOWN_S = 1.0


async def fetch_models(
    session: aiohttp.ClientSession, replica: ReplicaStatus, timeout_s: float
) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {replica.api_key}"} if replica.api_key else {}
    async with (
        asyncio.timeout(timeout_s),
        session.get(replica.url + "/v1/models", headers=headers) as resp,
    ):
        resp.raise_for_status()
        payload = await resp.json(content_type=None)
    entries = []
    for entry in payload.get("data", [])[:MAX_MODELS_PER_REPLICA]:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
            entries.append(entry)
    return entries


async def refresh_once(
    session: aiohttp.ClientSession, registry: Registry, metrics: Metrics, timeout_s: float
) -> None:
    async def one(replica: ReplicaStatus) -> None:
        try:
            entries = await fetch_models(session, replica, timeout_s)
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            metrics.models_refresh_failures.labels(replica.name).inc()
            log.debug("models refresh of %s failed: %s", replica.name, type(exc).__name__)
            return
        if registry.set_models(replica.name, entries):
            log.info("replica %s serves %s", replica.name, sorted(e["id"] for e in entries))

    await asyncio.gather(*(one(r) for r in registry if r.discovers_models))


@contextlib.asynccontextmanager
async def model_discovery(
    session: aiohttp.ClientSession,
    registry: Registry,
    metrics: Metrics,
    interval_s: float,
    timeout_s: float,
) -> AsyncIterator[None]:
    if not any(r.discovers_models for r in registry):
        yield
        return

    async def loop() -> None:
        while True:
            await refresh_once(session, registry, metrics, timeout_s)
            pending = registry.snapshot.models_pending
            await asyncio.sleep(min(interval_s, RETRY_UNKNOWN_S) if pending else interval_s)

    task = asyncio.create_task(loop(), name="model-discovery")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
