"""Model discovery: GET /v1/models of replicas that do not configure models."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from router import discovery
from router.config import ReplicaConfig
from router.metrics import Metrics
from router.replicas import Registry
from tests.harness import serve_app


@contextlib.asynccontextmanager
async def models_server(state: dict[str, Any]) -> AsyncIterator[str]:
    """A replica whose /v1/models answer the test controls through ``state``."""

    async def models(request: web.Request) -> web.Response:
        state["auth"] = request.headers.get("Authorization")
        if state.get("status", 200) != 200:
            return web.Response(status=state["status"])
        return web.json_response(state["payload"])

    app = web.Application()
    app.router.add_get("/v1/models", models)
    async with serve_app(app) as url:
        yield url


async def test_discovered_models_become_routable_and_failures_keep_the_last_list() -> None:
    state: dict[str, Any] = {"payload": {"data": [{"id": "llama", "object": "model"}]}}
    async with models_server(state) as url, aiohttp.ClientSession() as session:
        reg = Registry((ReplicaConfig(url=url, name="a", models=None, api_key="k1"),))
        metrics = Metrics()
        await discovery.refresh_once(session, reg, metrics, timeout_s=2.0)
        assert [s.name for s in reg.snapshot.serving("llama")] == ["a"]
        assert state["auth"] == "Bearer k1"  # the replica's own key, not a client's
        state["status"] = 500
        await discovery.refresh_once(session, reg, metrics, timeout_s=2.0)
        # Down is not "no such model": the last-known list stays (503, not 404).
        assert reg.snapshot.knows_model("llama")
        assert metrics.models_refresh_failures.labels("a")._value.get() == 1


async def test_a_hostile_model_list_is_bounded_and_filtered() -> None:
    many = [{"id": f"m{i}"} for i in range(1000)]
    junk: list[Any] = [{"id": ""}, {"id": 7}, "text", None]
    state: dict[str, Any] = {"payload": {"data": junk + many}}
    async with models_server(state) as url, aiohttp.ClientSession() as session:
        reg = Registry((ReplicaConfig(url=url, name="a", models=None),))
        await discovery.refresh_once(session, reg, Metrics(), timeout_s=2.0)
        models = reg.snapshot.get("a").models  # type: ignore[union-attr]
        assert models is not None
        assert len(models) <= discovery.MAX_MODELS_PER_REPLICA
        assert all(isinstance(m, str) and m for m in models)


async def test_configured_models_are_never_asked() -> None:
    state: dict[str, Any] = {"payload": {"data": [{"id": "other"}]}}
    async with models_server(state) as url, aiohttp.ClientSession() as session:
        reg = Registry((ReplicaConfig(url=url, name="a", models=("llama",)),))
        version = reg.snapshot.version
        async with discovery.model_discovery(session, reg, Metrics(), 0.05, timeout_s=1.0):
            pass
        await discovery.refresh_once(session, reg, Metrics(), timeout_s=2.0)
        assert "auth" not in state
        assert reg.snapshot.version == version
