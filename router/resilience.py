"""The proxy's one handle on health, ejection, retry budgets and admission.

The data path asks a few questions (may I route, may I retry, how long to
back off) and reports one fact per attempt (how it ended); this facade
answers from the pieces in health.py, outlier.py, retry_budget.py and
admission.py and keeps the replicas' routable flags and the metrics in step,
so proxy.py stays a straight line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from policies.load import Outcome
from router.admission import Admission, Rejected
from router.config import Config
from router.errors import ErrorKind, GatewayError
from router.health import HealthChecker
from router.metrics import Metrics
from router.outlier import EventKind, OutlierDetector, OutlierEvent
from router.replicas import Registry, Replica
from router.retry_budget import RetryBudget, backoff_s

log = logging.getLogger("dp_router.resilience")

T = TypeVar("T")

# How often slow-start weights, ejection expiry and waiting requests are
# revisited between events: fine enough that a ramp looks smooth and an
# expired ejection frees waiters promptly, cheap at any fleet size.
TICK_S = 0.25

# Retries that cost no replica any work (see try_retry).
FREE_RETRY_REASONS = frozenset({"connect_error", "draining"})

_REJECTION_KINDS = {
    "queue_full": ErrorKind.OVERLOADED,
    "queue_timeout": ErrorKind.QUEUE_TIMEOUT,
    "shutting_down": ErrorKind.SHUTTING_DOWN,
}


class Resilience:
    def __init__(
        self, config: Config, registry: Registry, metrics: Metrics, rng: random.Random
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.rng = rng
        self.panic = config.admission.when_none_routable == "panic"
        # What a 503 tells clients to wait: about one health-check round.
        self.retry_after_s = max(1.0, config.health.interval_s if config.health.enabled else 1.0)
        r = config.retry
        self.budget = RetryBudget(r.budget_ratio, r.budget_reserve, r.max_concurrent_retries)
        o = config.outlier
        self.outlier: OutlierDetector | None = None
        if o.enabled:
            self.outlier = OutlierDetector(
                o.consecutive_failures,
                o.base_ejection_s,
                o.max_ejection_s,
                o.max_ejection_percent,
            )
            self.outlier.set_members([rep.name for rep in registry], 0.0)
        a = config.admission
        self.admission = Admission(
            a.max_queue,
            a.queue_timeout_s,
            full_status=a.reject_status,
            retry_after_s=1.0,
            clock=time.monotonic,
        )
        self.checker: HealthChecker | None = None
        self._tick: asyncio.Task[None] | None = None
        metrics.admission_queue.set_function(lambda: self.admission.waiting)
        metrics.retry_budget_balance.set_function(lambda: self.budget.balance)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        h = self.config.health
        loop = asyncio.get_running_loop()
        if h.enabled:
            self.checker = HealthChecker(
                lambda: [(rep.name, rep.base_url) for rep in self.registry],
                self._on_health_change,
                path=h.path,
                interval_s=h.interval_s,
                timeout_s=h.timeout_s,
                rise=h.healthy_threshold,
                fall=h.unhealthy_threshold,
                slow_start_s=h.slow_start_s,
                slow_start_aggression=h.slow_start_aggression,
                slow_start_min_weight=h.slow_start_min_weight,
                rng=random.Random(self.rng.random()),
                clock=loop.time,
            )
            for replica in self.registry:
                replica.healthy = False  # unknown until its first check
            await self.checker.start()  # the first round decides every replica
            for replica in self.registry:
                self._set_healthy(replica, self.checker.is_healthy(replica.name))
        self._tick = asyncio.create_task(self._ticker(), name="resilience-tick")

    async def stop(self) -> None:
        self.admission.reject_all()
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None
        if self.checker is not None:
            await self.checker.stop()

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(loop.time())
            except Exception:  # a bug here must not stop ejections from expiring
                log.exception("resilience tick failed")

    def tick(self, now: float) -> None:
        if self.outlier is not None:
            self._apply(self.outlier.poll(now), now)
        for replica in self.registry:
            factor = 1.0
            if self.checker is not None:
                factor = self.checker.slow_start_factor(replica.name, now)
            if factor != replica.slow_start_factor:
                replica.set_weight_factor(factor)
        self.admission.notify()

    # -- health --------------------------------------------------------------

    def _on_health_change(self, name: str, healthy: bool, reason: str) -> None:
        replica = self.registry.get(name)
        if replica is None:
            return
        self._set_healthy(replica, healthy)
        self.metrics.health_transitions.labels(name, "healthy" if healthy else "unhealthy").inc()
        if healthy:
            self.admission.notify()

    def _set_healthy(self, replica: Replica, healthy: bool) -> None:
        replica.healthy = healthy

    # -- requests ------------------------------------------------------------

    def on_request(self) -> None:
        """A client request arrived: it funds 0.2 of a retry."""
        self.budget.deposit()

    async def admit(
        self, reserve: Callable[[], T | None], key: str, release: Callable[[T], None]
    ) -> T:
        """Route and reserve now, or wait (bounded) for capacity, or refuse."""
        if not self.admission.waiting:  # the common case: nobody queued, no wait
            reserved = reserve()
            if reserved is not None:
                return reserved
        waited_from = time.monotonic()
        queued_before = self.admission.counters["queued"]
        try:
            result = await self.admission.admit(reserve, release=release, key=key)
        except Rejected as exc:
            self.metrics.admission_rejections.labels(exc.reason).inc()
            raise GatewayError(
                _REJECTION_KINDS.get(exc.reason, ErrorKind.OVERLOADED),
                "no replica has capacity for this request now"
                if exc.reason != "shutting_down"
                else "the gateway is shutting down",
                retry_after_s=exc.retry_after_s,
                status=exc.status,
            ) from None
        if self.admission.counters["queued"] != queued_before:
            self.metrics.admission_waits.inc()
            self.metrics.admission_wait_seconds.observe(time.monotonic() - waited_from)
        return result

    def try_retry(self, reason: str) -> bool:
        """May this failed attempt be retried? True means a slot is held
        until ``release_retry`` for budgeted reasons.

        Both the ratio budget and the concurrency cap must allow a retry,
        except for FREE_RETRY_REASONS: a refused connection sent nothing to
        any replica and a draining replica declined before doing work, so
        retrying them cannot amplify load (max_retries still bounds them).
        """
        if reason in FREE_RETRY_REASONS:
            return True
        if self.budget.try_withdraw():
            return True
        cause = self.budget.check() or "budget"
        self.metrics.retry_budget_exhausted.labels(cause).inc()
        return False

    def release_retry(self, reason: str) -> None:
        if reason not in FREE_RETRY_REASONS:
            self.budget.release()

    def backoff(self, retry: int) -> float:
        r = self.config.retry
        return backoff_s(retry, self.rng, base_s=r.backoff_base_s, max_s=r.backoff_max_s)

    def on_settled(
        self, replica: Replica, outcome: Outcome, status: int | None, now: float
    ) -> None:
        """An attempt ended: passive ejection learns from it; capacity freed."""
        if self.outlier is not None:
            self._apply(self.outlier.record(replica.name, outcome, now, status=status), now)
        self.admission.notify()

    def _apply(self, events: list[OutlierEvent], now: float) -> None:
        for event in events:
            replica = self.registry.get(event.replica)
            if replica is None:
                continue
            if event.kind is EventKind.EJECTED:
                replica.ejected_until = event.at + (event.duration_s or 0.0)
                self.metrics.ejections.labels(replica.name, event.reason).inc()
                log.warning(
                    "ejected replica %s for %.1f s (%s, ejection #%d)",
                    replica.name,
                    event.duration_s or 0.0,
                    event.reason,
                    event.ejections,
                )
            elif event.kind is EventKind.UNEJECTED:
                replica.ejected_until = 0.0
                # Back from an ejection: cold, like a restarted replica (M7).
                state = self.checker.state(replica.name) if self.checker else None
                if state is not None and state.slow_start is not None:
                    state.slow_start.begin(now)
                log.info("replica %s is back from ejection", replica.name)
            else:
                self.metrics.ejections.labels(replica.name, "overflow").inc()
