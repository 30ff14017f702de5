"""M8 and M15 as small discrete-event runs: outlier ejection plus retry budget.

A hand-advanced clock, round-robin over the replicas the registry's snapshot
says are routable, one retry on a different replica within the budget. No
sockets: this checks that the pure pieces compose into the behaviour
``docs/reliability.md`` asks for; the gateway tests check the wiring. Slow
start is off, so the starvation measured is the ejections' alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from policies.load import Outcome
from router.config import ReplicaConfig
from router.outlier import EventKind, OutlierDetector
from router.replicas import Health, Registry
from router.retry_budget import RetryBudget

REPLICAS = ("a", "b", "c")
# The proxy's rule, restated: a gateway error (nothing generated, nothing sent
# to the client yet) may be retried on another replica.
RETRYABLE_STATUSES = frozenset({502, 503, 504})

Fails = Callable[[str, float], bool]


def fleet() -> Registry:
    return Registry(
        tuple(ReplicaConfig(url="http://127.0.0.1:1", name=n, models=("m",)) for n in REPLICAS),
        initial_health=Health.HEALTHY,
    )


def flapping_fails(name: str, now: float, period: float) -> bool:
    """c answers OK for ``period`` s, then 503 for ``period`` s, repeating."""
    return name == "c" and int(now // period) % 2 == 1


def retryable(outcome: Outcome, status: int) -> bool:
    return outcome is Outcome.HTTP_5XX and status in RETRYABLE_STATUSES


class Run:
    """One simulated run: attempts per replica, client errors, c's ejections."""

    def __init__(self, **detector: Any) -> None:
        self.registry = fleet()
        self.detector = OutlierDetector(self.registry, **detector)
        self.budget = RetryBudget(max_concurrent_retries=50)
        self.attempts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.errors = 0
        self.durations: list[float] = []  # c's ejections, in order

    def run(self, *, seconds: float, rate: float, fails: Fails) -> Run:
        rr = 0
        step = 1.0 / rate
        for i in range(int(seconds * rate)):
            now = i * step
            self.budget.deposit()
            tried: list[str] = []
            while True:
                snapshot = self.registry.snapshot
                routable = [
                    r for r in REPLICAS if snapshot.replicas[r].routable(now) and r not in tried
                ]
                if not routable:
                    self.errors += 1
                    break
                name = routable[rr % len(routable)]
                rr += 1
                self.attempts[name] += 1
                failed = fails(name, now)
                outcome, status = (Outcome.HTTP_5XX, 503) if failed else (Outcome.OK, 200)
                event = self.detector.record(name, outcome, now, status=status)
                if event is not None and event.kind is EventKind.EJECTED and name == "c":
                    self.durations.append(event.duration_s)
                    ejected = self.registry.snapshot.replicas["c"]
                    assert ejected.ejected_until == now + event.duration_s
                if tried:
                    self.budget.release()  # that attempt was a retry
                if not failed:
                    break
                tried.append(name)
                if not retryable(outcome, status):
                    self.errors += 1
                    break
                if not self.budget.try_withdraw():
                    self.refusals[self.budget.check() or "none"] += 1
                    self.errors += 1
                    break
        return self


def flapping_run(seconds: float) -> Run:
    """M8's fault with the test config: ejection base 2 s, cap 20 s."""
    return Run(
        consecutive_failures=5, base_ejection_s=2.0, max_ejection_s=20.0, max_ejection_percent=50
    ).run(seconds=seconds, rate=50.0, fails=lambda n, t: flapping_fails(n, t, 2.0))


def test_flapping_replica_is_ejected_longer_each_time_and_starved() -> None:
    """M8: flap_period 2 s for 60 s."""
    r = flapping_run(60.0)
    assert r.durations == sorted(r.durations)  # non-decreasing, by base x n
    assert r.durations[:4] == [2.0, 4.0, 6.0, 8.0]
    healthy = (r.attempts["a"] + r.attempts["b"]) / 2
    assert r.attempts["c"] < 0.2 * healthy
    assert r.errors == 0  # every failure was retried within the budget


def test_flapping_replica_ejections_stop_growing_at_the_cap() -> None:
    """Three minutes: 2 + 4 + ... + 20 s of ejections alone take 110 s."""
    r = flapping_run(180.0)
    assert r.durations == sorted(r.durations)
    assert r.durations[-3:] == [20.0, 20.0, 20.0]
    assert r.errors == 0


def test_retry_storm_is_bounded_by_the_budget() -> None:
    """M15: every replica answers 503; attempts <= 1.2 x requests + 3."""
    r = Run(max_ejection_percent=0)  # ejection off: the budget alone
    r.run(seconds=4.0, rate=50.0, fails=lambda n, t: True)
    requests = 200
    assert sum(r.attempts.values()) <= 1.2 * requests + 3
    assert r.errors == requests
    assert r.refusals["budget"] > 0 and r.refusals["concurrency"] == 0


@pytest.mark.parametrize("base", [1.0, 30.0])
def test_healthy_fleet_sees_no_ejections_and_no_retries(base: float) -> None:
    r = Run(base_ejection_s=base).run(seconds=10.0, rate=30.0, fails=lambda n, t: False)
    assert r.errors == 0 and r.durations == []
    assert sum(r.attempts.values()) == 300  # no retries: one attempt per request
    assert max(r.attempts.values()) - min(r.attempts.values()) <= 1
    assert r.registry.snapshot.version == 1  # nothing changed any status
