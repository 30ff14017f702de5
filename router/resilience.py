"""The proxy's one handle on health, ejection, retry budgets and admission.

The data path asks four questions and reports one fact; this facade answers
them from the pieces in health.py, outlier.py, retry_budget.py and
admission.py, so proxy.py stays a straight line.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from router.config import Config
from router.errors import ErrorKind, GatewayError
from router.load import Outcome
from router.metrics import Metrics
from router.replicas import Registry, Replica
from router.routing import NoRoute, Routed

# Outcomes that say the replica, not the client, failed (Envoy's gateway errors).
GATEWAY_FAILURES = frozenset(
    {Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_RESET, Outcome.HTTP_5XX}
)


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
        self.retry_after_s = max(1.0, config.health.interval_s)

    def on_request(self) -> None:
        """A client request arrived (deposits into the retry budget)."""

    async def route(self, try_route: Callable[[], Routed | NoRoute]) -> Routed | NoRoute:
        routed = try_route()
        if routed is NoRoute.AT_CAPACITY:
            self.metrics.admission_rejections.labels("queue_full").inc()
            raise GatewayError(
                ErrorKind.OVERLOADED, "every replica is at its concurrency limit",
                retry_after_s=1.0,
            )
        return routed

    async def allow_retry(self, reason: str) -> bool:
        await asyncio.sleep(0)
        return True

    def on_settled(self, replica: Replica, outcome: Outcome, now: float) -> None:
        """A dispatched request finished; feeds ejection and wakes waiters."""
