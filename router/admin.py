"""The admin listener: /metrics, probes and a read-only view of replicas.

It binds 127.0.0.1 by default (docs/reliability.md, M23). When a token is
configured every /admin route requires it (compared in constant time, M22);
it is required whenever the listener is not on loopback (config refuses
otherwise).
"""

from __future__ import annotations

import asyncio
import hmac

from aiohttp import web

from router.errors import ErrorKind, GatewayError, error_response
from router.experts import ExpertTelemetry
from router.proxy import Proxy
from router.session_key import parse_sources, session_key

PROXY_KEY = web.AppKey("proxy", Proxy)
# Set by the gateway (router/app.py): the per-expert telemetry /admin/experts shows.
EXPERTS_KEY = web.AppKey("experts", ExpertTelemetry)


def _authorized(request: web.Request, token: str) -> bool:
    if not token:
        return True
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    return hmac.compare_digest(given.encode(), expected.encode())


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not shutting down, and at least one replica routable."""
    status, payload = request.app[PROXY_KEY].readiness()
    return web.json_response(payload, status=status)


def create_admin_app(proxy: Proxy, token: str) -> web.Application:
    app = web.Application()
    app[PROXY_KEY] = proxy

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=proxy.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def replicas(request: web.Request) -> web.Response:
        if not _authorized(request, token):
            return error_response(ErrorKind.UNAUTHORIZED, "missing or wrong admin token")
        now = asyncio.get_running_loop().time()
        snapshot = proxy.registry.snapshot
        return web.json_response(
            {
                "policy": proxy.policy.name,
                "fleet_version": snapshot.version,
                "replicas": [r.describe(now) for r in snapshot],
            }
        )

    async def experts(request: web.Request) -> web.Response:
        """Per replica: imbalance, hot experts, overflow rate, window, age,
        the routing slowdown; fleet-wide per expert."""
        if not _authorized(request, token):
            return error_response(ErrorKind.UNAUTHORIZED, "missing or wrong admin token")
        telemetry = request.app.get(EXPERTS_KEY)
        if telemetry is None:
            return error_response(ErrorKind.NOT_FOUND, "no expert telemetry in this process")
        now = asyncio.get_running_loop().time()
        views = telemetry.views(now)
        cfg = telemetry.config
        return web.json_response(
            {
                "window_s": cfg.window_s,
                "stale_s": cfg.stale_s,
                "moe_share": cfg.moe_share,
                "replicas": [v.describe() for v in views],
                "fleet": [f.describe() for f in telemetry.fleet(now, views)],
                "rejected": {k: v for k, v in telemetry.rejected.items() if v},
            }
        )

    async def session(request: web.Request) -> web.Response:
        """Where a session is pinned, and whether that pin would hold now.
        ``{id}`` is the client's session id; ``?model=`` the model (pins are
        per model; optional when the fleet serves one); ``?source=`` the
        source it came from (default: the first configured one)."""
        if not _authorized(request, token):
            return error_response(ErrorKind.UNAUTHORIZED, "missing or wrong admin token")
        sessions = proxy.sessions
        if sessions is None:
            return error_response(ErrorKind.NOT_FOUND, "sessions are disabled")
        source = request.query.get("source")
        sources = sessions.sources
        if source is not None:
            try:
                sources = parse_sources((source,))
            except ValueError as exc:
                return error_response(ErrorKind.BAD_FIELD, f"source: {exc}")
        models = [m["id"] for m in proxy.registry.model_list()]
        model = request.query.get("model")
        if model is None:
            if len(models) != 1:
                return error_response(
                    ErrorKind.BAD_FIELD,
                    "give ?model=: session pins are per model, and the fleet serves "
                    f"{len(models)} models",
                )
            model = models[0]
        raw = request.match_info["id"]
        first = sources[0]
        try:
            key = session_key(
                (first,),
                lambda name: raw.encode("utf-8") if first.kind == "header" else None,
                {first.name: raw} if first.kind == "body" else None,
                sessions.max_key_length,
                model,
            )
        except GatewayError as exc:
            return error_response(exc.kind, exc.message)
        assert key is not None
        view = await sessions.describe(key)
        view["source"] = f"{first.kind}:{first.name}"
        view["model"] = model
        pinned = view.get("replica") or view.get("local_pin")
        status = proxy.registry.snapshot.get(pinned) if pinned else None
        now = asyncio.get_running_loop().time()
        view["pinned_replica"] = status.describe(now) if status is not None else None
        if pinned and status is None:
            view["note"] = "the pinned replica left the fleet: the next request re-pins (removed)"
        return web.json_response(view)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/replicas", replicas)
    app.router.add_get("/admin/experts", experts)
    app.router.add_get("/admin/sessions/{id}", session)
    return app
