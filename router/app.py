"""Wiring only: build the gateway's parts, its listeners and its background work.

``Gateway`` enters everything in one place, in a known order, each part an
async context manager: upstream session, fleet watch, model discovery,
health checks, admin listener, data listener; and leaves them in the reverse
order. A listener that fails to bind unwinds what had started. ``shutdown``
follows uvicorn's order: readiness goes false (and requests waiting for
capacity are refused), the data listener stops accepting, in-flight requests
get ``shutdown_timeout_s`` to finish, the rest are cancelled, then the
background work stops.

With ``[server] workers`` > 1 the same parts are split over processes by
:class:`Role` (docs/workers.md, ``router.workers``): the supervisor runs
everything but the data path (its data plane is the worker processes), and
each worker runs the data path on a registry fed by the supervisor's
snapshots, with no health checks, discovery or admin listener of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from enum import StrEnum
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from policies import registry as policy_registry
from router import config as config_mod
from router import discovery, tracing
from router.admin import EXPERTS_KEY, create_admin_app
from router.admission import Admission
from router.config import Config, ServerConfig, UpstreamConfig
from router.experts import ExpertTelemetry
from router.health import health_checks
from router.http_server import HttpServer, ServerLimits
from router.metrics import Metrics, ReplicaSample
from router.outlier import OutlierDetector
from router.proxy import Proxy
from router.replicas import FleetSnapshot, Health, Registry
from router.retry_budget import RetryBudget
from router.routing import Router
from router.session_store import create_store
from router.sessions import Sessions
from router.telemetry import ExpertSink, Telemetry, load_telemetry
from router.upstream import UpstreamPool

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("dp_router")


class Role(StrEnum):
    """Which parts of the gateway a process runs."""

    # Everything in one process (``workers = 1``).
    SINGLE = "single"
    # The control plane of ``--workers N``: registry, health checks, discovery,
    # outlier detection, admin listener; the data plane is given to it.
    SUPERVISOR = "supervisor"
    # The data plane of ``--workers N``: the data listener (SO_REUSEPORT) and
    # the proxy, on a registry only the supervisor's snapshots write.
    WORKER = "worker"


# The supervisor's data plane: entered where the data listener would be,
# yields the data port.
DataPlane = Callable[[], AbstractAsyncContextManager[int]]


class Gateway:
    """The gateway process's parts, wired once; started and stopped in one order.

    ``role`` picks the parts (:class:`Role`). ``outlier``: a worker's outlier
    detection, built on its registry (``router.workers.RemoteOutlier`` sends
    the evidence to the supervisor); by default it is built from config.
    ``data_plane``: the supervisor's, entered instead of a data listener.
    ``span_exporter``: where this process's spans go instead of the
    configured exporter, when ``[tracing]`` is enabled (tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        role: Role = Role.SINGLE,
        outlier: Callable[[Registry], OutlierDetector | None] | None = None,
        data_plane: DataPlane | None = None,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        if (role is Role.SUPERVISOR) != (data_plane is not None):
            raise ValueError("a supervisor, and only a supervisor, is given a data plane")
        self.config = config
        self.role = role
        self._data_plane = data_plane
        self._span_exporter = span_exporter
        self.metrics = Metrics()
        self.registry = Registry(
            config.replicas,
            initial_health=Health.UNKNOWN if config.health.enabled else Health.HEALTHY,
        )
        routing = config.routing
        seed = routing.seed
        self.policy = policy_registry.create(
            routing.policy,
            config_mod.policy_params(
                routing.policy, dict(routing.params), routing.load_bound_epsilon
            ),
            seed,
        )
        self.router = Router(
            self.policy,
            load_bound_epsilon=routing.load_bound_epsilon,
            session_load_floor=routing.session_load_floor,
        )
        self.rng = random.Random(seed)
        a = config.admission
        self.admission = Admission(
            a.max_queue, a.queue_timeout_s, full_status=a.reject_status, retry_after_s=1.0
        )
        r = config.retry
        self.budget = RetryBudget(r.budget_ratio, r.budget_reserve, r.max_concurrent_retries)
        o = config.outlier
        h = config.health
        self.outlier: OutlierDetector | None = None
        # Load reports (router/telemetry): run by the control plane.
        self.telemetry: Telemetry | None = None
        if outlier is not None:
            self.outlier = outlier(self.registry)
        elif o.enabled:
            self.outlier = OutlierDetector(
                self.registry,
                o.consecutive_failures,
                o.base_ejection_s,
                o.max_ejection_s,
                o.max_ejection_percent,
                slow_start_s=h.slow_start_s,
                slow_start_aggression=h.slow_start_aggression,
                slow_start_min_weight=h.slow_start_min_weight,
            )
        self.proxy = Proxy(
            config,
            self.registry,
            self.router,
            self.metrics,
            self.admission,
            self.budget,
            self.outlier,
            random.Random(self.rng.random()),
        )
        self.metrics.watch_replicas(self._replica_samples)
        # Per-expert (MoE) counters: telemetry sources call self.experts.record;
        # the scored policy reads the slowdown written by _expert_signal.
        self.experts = ExpertTelemetry(config.experts)
        # Where telemetry sources deliver expert counters.
        self.on_experts: ExpertSink | None = self.experts.record
        # Who else hears each round of slowdowns (the --workers supervisor).
        self.on_expert_signal: Callable[[dict[str, float | None]], None] | None = None
        self.experts.set_members(self.registry.snapshot.names)
        self.metrics.watch_experts(
            lambda: self.experts.views(loop_time()), lambda: self.experts.rejected
        )
        self.metrics.admission_queue.set_function(lambda: self.admission.waiting)
        self.metrics.retry_budget_balance.set_function(lambda: self.budget.balance)
        self.data_server = HttpServer(
            self.proxy.handle, server_limits(config.server), on_reject=self._edge_rejected
        )
        self.admin_app = create_admin_app(self.proxy, config.admin.token)
        self.admin_app[EXPERTS_KEY] = self.experts
        self._stack = contextlib.AsyncExitStack()
        self.reuse_port = role is Role.WORKER  # worker processes share the data port
        self.admin_runner: web.AppRunner | None = None
        self.data_port = 0
        self.admin_port = 0

    def _edge_rejected(self, status: int, code: str) -> None:
        """A request the data listener refused before routing (bad framing,
        oversized head or body, too slow): counted by its reason."""
        self.metrics.errors.labels(code).inc()

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
                r.health is Health.HEALTHY,
                r.routable(now),
                r.ejected(now),
                r.weight * r.ramp_factor(now),
                reported_waiting=r.load.reported_waiting,
                reported_running=r.load.reported_running,
                reported_kv_usage=r.load.kv_usage,
                report_age=r.load.report_age(now),
                report_stale=None if self.telemetry is None else self.telemetry.stale(r, now),
                reported_draining=r.reported_draining,
            )
            for r in self.registry
        ]

    async def start(self) -> None:
        """Upstream session, fleet watch, model discovery, health checks, then the
        admin and data listeners (the parts of this process's :class:`Role`).
        Anything that fails unwinds what had started."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        cfg = self.config
        up = cfg.upstream
        stack = self._stack
        control = self.role is not Role.WORKER
        if control:
            session = await stack.enter_async_context(control_session(cfg.upstream))
            await stack.enter_async_context(self._expert_signal())
        if cfg.sessions.enabled:
            # Every role: workers route with it, the supervisor's admin API reads it.
            self.proxy.sessions = await stack.enter_async_context(session_store(cfg, self.metrics))
        if self.role is not Role.SUPERVISOR:
            # Spans from the data path only: before the pool, so that it is
            # flushed after the data listener has drained.
            self.proxy.tracer = await stack.enter_async_context(
                tracing.provider(cfg.tracing, self._span_exporter)
            )
            self.proxy.pool = await stack.enter_async_context(upstream_pool(cfg.upstream))
            self.proxy.loop = asyncio.get_running_loop()
            stack.enter_context(self.proxy.access)
            stack.enter_context(self._watch_fleet())
        if control:
            await stack.enter_async_context(
                discovery.model_discovery(
                    session,
                    self.registry,
                    self.metrics,
                    up.models_refresh_s,
                    timeout_s=max(up.connect_timeout_s, 2.0),
                )
            )
            if cfg.health.enabled:
                await stack.enter_async_context(
                    health_checks(
                        self.registry,
                        # Its own small session: checks must not queue behind
                        # long streams in the data path's connection pool.
                        None,
                        cfg.health,
                        self.metrics,
                        random.Random(self.rng.random()),
                    )
                )
            self.telemetry = await stack.enter_async_context(
                load_telemetry(
                    self.registry,
                    cfg,
                    self.metrics,
                    random.Random(self.rng.random()),
                    on_experts=self.on_experts,
                )
            )
            self.admin_runner = await stack.enter_async_context(
                listener(
                    self.admin_app, cfg.admin.host, cfg.admin.port, cfg.server.shutdown_timeout_s
                )
            )
            self.admin_port = bound_port(self.admin_runner, cfg.admin.port)
        if self._data_plane is not None:
            self.data_port = await stack.enter_async_context(self._data_plane())
        else:
            await stack.enter_async_context(
                data_listener(self.data_server, cfg.server, reuse_port=self.reuse_port)
            )
            self.data_port = self.data_server.port

    @contextlib.asynccontextmanager
    async def _expert_signal(self) -> AsyncIterator[None]:
        """Keep ExpertTelemetry's members in step with the fleet, and copy each
        replica's expert slowdown (None once stale) into its ReplicaLoad once a
        second: the window is tens of seconds, so a second of lag is noise."""
        experts = self.experts

        def on_change(new: FleetSnapshot, old: FleetSnapshot) -> None:
            experts.set_members(new.names)

        async def refresh() -> None:
            while True:
                now = loop_time()
                slowdowns: dict[str, float | None] = {}
                for status in self.registry:
                    slowdown = experts.slowdown(status.name, now)
                    status.load.expert_slowdown = slowdowns[status.name] = slowdown
                if self.on_expert_signal is not None:
                    self.on_expert_signal(slowdowns)
                await asyncio.sleep(EXPERT_REFRESH_S)

        self.registry.subscribe(on_change)
        task = asyncio.create_task(refresh(), name="expert-signal")
        try:
            yield
        finally:
            self.registry.unsubscribe(on_change)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.contextmanager
    def _watch_fleet(self) -> Iterator[None]:
        """Wake requests waiting for capacity when the fleet changes, and when
        an ejection ends (an ejection ends by the clock, not by a new version)."""
        loop = asyncio.get_running_loop()
        timers: set[asyncio.TimerHandle] = set()
        admission = self.admission

        def on_change(new: FleetSnapshot, old: FleetSnapshot) -> None:
            admission.notify()
            now = loop.time()
            for status in new:
                before = old.get(status.name)
                if status.ejected_until > now and (
                    before is None or before.ejected_until != status.ejected_until
                ):
                    timers.add(loop.call_at(status.ejected_until, admission.notify))
            for timer in [t for t in timers if t.when() <= now]:
                timers.discard(timer)

        self.registry.subscribe(on_change)
        try:
            yield
        finally:
            self.registry.unsubscribe(on_change)
            for timer in timers:
                timer.cancel()

    async def shutdown(self) -> None:
        """Readiness false and waiters refused, then after ``shutdown_delay_s``
        stop accepting, drain in-flight requests for ``shutdown_timeout_s``,
        cancel the rest, and close everything in reverse order."""
        self.proxy.begin_shutdown()
        # A supervisor's data plane is its workers: they get SIGTERM at once
        # and each waits the delay itself, while the supervisor's readiness
        # is already false.
        if self.config.server.shutdown_delay_s > 0 and self.role is not Role.SUPERVISOR:
            await asyncio.sleep(self.config.server.shutdown_delay_s)
        await self._stack.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


# How often expert slowdowns are copied into the routing view (see _expert_signal).
EXPERT_REFRESH_S = 1.0


def loop_time() -> float:
    """The running loop's clock (every ``now`` of the gateway), or the
    monotonic clock it is based on when read outside the loop (a test)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def server_limits(server: ServerConfig) -> ServerLimits:
    return ServerLimits(
        max_body_bytes=server.max_body_bytes,
        header_timeout_s=server.header_timeout_s,
        body_timeout_s=server.body_timeout_s,
        keepalive_timeout_s=server.keepalive_timeout_s,
    )


@contextlib.asynccontextmanager
async def upstream_pool(up: UpstreamConfig) -> AsyncIterator[UpstreamPool]:
    """The data path's keep-alive connections to the replicas. No concurrency
    limit: admission control bounds that, visibly and with a deadline
    (docs/reliability.md, M16); streams may run for many minutes, so there is
    no total timeout either, only the proxy's first-byte, idle and response
    timeouts (M6). Bytes and Content-Encoding pass through unchanged (M37)."""
    pool = UpstreamPool(keepalive_timeout_s=up.keepalive_timeout_s)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def session_store(cfg: Config, metrics: Metrics) -> AsyncIterator[Sessions]:
    """The session store: Redis when configured, else in memory. Never waits
    for Redis: a store that is down at start is an outage like any other."""
    store = create_store(cfg, time.monotonic)
    sessions = Sessions(store, cfg.sessions, cfg.redis, metrics)
    try:
        yield sessions
    finally:
        await sessions.close()


@contextlib.asynccontextmanager
async def control_session(up: UpstreamConfig) -> AsyncIterator[aiohttp.ClientSession]:
    """aiohttp for the control traffic (model discovery): a few requests a
    minute, where convenience beats CPU."""
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None, connect=up.connect_timeout_s, sock_connect=up.connect_timeout_s
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        yield session
    finally:
        await session.close()


@contextlib.asynccontextmanager
async def data_listener(
    server: HttpServer, config: ServerConfig, *, reuse_port: bool
) -> AsyncIterator[HttpServer]:
    """Serve the data path. On exit: stop accepting, give in-flight requests
    ``shutdown_timeout_s``, cancel the rest."""
    await server.start(config.host, config.port, reuse_port=reuse_port)
    try:
        yield server
    finally:
        await server.shutdown(config.shutdown_timeout_s)


@contextlib.asynccontextmanager
async def listener(
    app: web.Application, host: str, port: int, shutdown_timeout_s: float
) -> AsyncIterator[web.AppRunner]:
    """Serve ``app`` on host:port. On exit: stop accepting, give in-flight
    requests ``shutdown_timeout_s``, cancel the rest."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the proxy writes its own structured line
        # Cancel the handler when the client disconnects, so a
        # non-streaming upstream request is closed too (docs/reliability.md, M13).
        handler_cancellation=True,
        auto_decompress=False,
        shutdown_timeout=shutdown_timeout_s,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()


def bound_port(runner: web.AppRunner, configured: int) -> int:
    """The port a listener got (the configured one, or the OS's pick for 0)."""
    return int(runner.addresses[0][1]) if configured == 0 else configured
