"""Wiring only: build the gateway's two listeners and its background work.

``Gateway`` starts everything in one place, in a known order, and stops it in
the reverse order (STYLE 11): upstream session, background tasks, admin
listener, data listener. ``shutdown`` follows uvicorn's order: readiness goes
false, the listener stops accepting, in-flight requests get
``shutdown_timeout_s`` to finish, the rest are cancelled, then everything
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiohttp
from aiohttp import web

from policies import registry as policy_registry
from router import discovery
from router.admin import PROXY_KEY, create_admin_app, healthz, readyz
from router.config import Config
from router.errors import ErrorKind, error_response
from router.metrics import Metrics, ReplicaSample
from router.proxy import Proxy
from router.replicas import Registry
from router.resilience import Resilience

log = logging.getLogger("dp_router")

# aiohttp's own parser limits, stated so they are visible (RELIABILITY 12).
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128

DATA_ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
    "/v1/models": "GET",
    "/healthz": "GET",
    "/readyz": "GET",
}


async def not_found(request: web.Request) -> web.Response:
    """Every other path or method, in OpenAI's error shape.

    A catch-all route rather than a middleware: a middleware wraps every
    request, and on the data path that wrapper cost measurable CPU; the
    proxy handlers answer their own errors (proxy.Proxy._handle).
    """
    allowed = DATA_ROUTES.get(request.path)
    if allowed is not None:
        return error_response(
            ErrorKind.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            headers={"Allow": allowed},
        )
    return error_response(ErrorKind.NOT_FOUND, "no such endpoint")


def create_data_app(proxy: Proxy, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app[PROXY_KEY] = proxy
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/embeddings", proxy.embeddings)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", not_found)  # last: the catch-all
    return app


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.registry = Registry(config.replicas)
        seed = config.routing.seed
        self.policy = policy_registry.create(
            config.routing.policy, dict(config.routing.params), seed
        )
        self.resilience = Resilience(config, self.registry, self.metrics, random.Random(seed))
        self.proxy = Proxy(config, self.registry, self.policy, self.metrics, self.resilience)
        self.metrics.watch_replicas(self._replica_samples)
        self.data_app = create_data_app(self.proxy, config.server.max_body_bytes)
        self.admin_app = create_admin_app(self.proxy, config.admin.token)
        self._stack = contextlib.AsyncExitStack()
        self._data_runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.data_port = 0
        self.admin_port = 0

    def _replica_samples(self) -> list[ReplicaSample]:
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # scraped outside the loop (a test, a debugger)
            now = time.monotonic()
        return [
            ReplicaSample(
                r.name,
                r.load.in_flight,
                r.load.outstanding_tokens,
                r.healthy,
                r.routable(now),
                r.ejected_until > now,
                r.load.weight,
            )
            for r in self.registry
        ]

    async def start(self) -> None:
        cfg = self.config
        up = cfg.upstream
        connector = aiohttp.TCPConnector(
            # No pool limit: a limit would silently queue streams behind others
            # in aiohttp's connector; concurrency is bounded by admission
            # control instead, where it is visible and has a deadline (M16).
            limit=0,
            limit_per_host=0,
            keepalive_timeout=up.keepalive_timeout_s,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            # total=None: streams may run for many minutes; the proxy applies
            # its own first-byte, idle and response timeouts (M6).
            timeout=aiohttp.ClientTimeout(
                total=None, connect=up.connect_timeout_s, sock_connect=up.connect_timeout_s
            ),
            # Bytes and Content-Encoding pass through unchanged (M37).
            auto_decompress=False,
            # Forward what the client sent; invent no headers of our own.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.proxy.session = session
        self._stack.push_async_callback(session.close)
        await self._stack.enter_async_context(
            discovery.model_discovery(
                session,
                self.registry,
                self.metrics,
                up.models_refresh_s,
                timeout_s=max(up.connect_timeout_s, 2.0),
            )
        )
        await self.resilience.start()
        self._stack.push_async_callback(self.resilience.stop)
        self._admin_runner, self.admin_port = await self._listen(
            self.admin_app, cfg.admin.host, cfg.admin.port
        )
        self._data_runner, self.data_port = await self._listen(
            self.data_app, cfg.server.host, cfg.server.port
        )

    async def _listen(
        self, app: web.Application, host: str, port: int
    ) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,  # the proxy writes its own structured line
            # Cancel the handler when the client disconnects, so a
            # non-streaming upstream request is closed too (M13).
            handler_cancellation=True,
            auto_decompress=False,
            shutdown_timeout=self.config.server.shutdown_timeout_s,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        await site.start()
        bound = int(runner.addresses[0][1]) if port == 0 else port
        return runner, bound

    async def shutdown(self) -> None:
        """Readiness false, stop accepting, drain in-flight, cancel the rest, close."""
        self.proxy.shutting_down = True
        if self.config.server.shutdown_delay_s > 0:
            await asyncio.sleep(self.config.server.shutdown_delay_s)
        if self._data_runner is not None:
            await self._data_runner.cleanup()
            self._data_runner = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self._stack.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
