"""M8 and M15 as small discrete-event runs: outlier ejection plus retry budget.

A hand-advanced clock, round-robin over routable replicas, one retry on a
different replica within the budget. No sockets: this checks that the pure
pieces compose into the behaviour the matrix asks for; the gateway tests
check the wiring.
"""

from __future__ import annotations

from collections import Counter

import pytest

from policies.load import Outcome
from router.outlier import EventKind, OutlierDetector
from router.retry_budget import RetryBudget

REPLICAS = ("a", "b", "c")
# The proxy's rule, restated: a gateway error (nothing generated, nothing sent
# to the client yet) may be retried on another replica.
RETRYABLE_STATUSES = frozenset({502, 503, 504})


def flapping_fails(name: str, now: float, period: float) -> bool:
    """c answers OK for ``period`` s, then 503 for ``period`` s, repeating."""
    return name == "c" and int(now // period) % 2 == 1


def run(
    detector: OutlierDetector,
    budget: RetryBudget,
    *,
    seconds: float,
    rate: float,
    fails: object,
) -> tuple[Counter[str], int, list[float]]:
    """Returns (attempts per replica, client errors, ejection durations of c)."""
    attempts: Counter[str] = Counter()
    errors = 0
    durations: list[float] = []
    rr = 0
    step = 1.0 / rate
    for i in range(int(seconds * rate)):
        now = i * step
        for event in detector.poll(now):
            assert event.kind is EventKind.UNEJECTED
        budget.deposit()
        tried: list[str] = []
        while True:
            routable = [r for r in REPLICAS if not detector.is_ejected(r, now) and r not in tried]
            if not routable:
                errors += 1
                break
            name = routable[rr % len(routable)]
            rr += 1
            attempts[name] += 1
            failed = fails(name, now)  # type: ignore[operator]
            outcome = Outcome.HTTP_5XX if failed else Outcome.OK
            for event in detector.record(name, outcome, now, status=503 if failed else 200):
                if event.kind is EventKind.EJECTED and name == "c":
                    durations.append(event.duration_s)
            if tried:
                budget.release()  # that attempt was a retry
            if not failed:
                break
            tried.append(name)
            retryable = outcome is Outcome.HTTP_5XX and 503 in RETRYABLE_STATUSES
            if not retryable or not budget.try_withdraw():
                errors += 1
                break
    return attempts, errors, durations


def test_flapping_replica_is_ejected_longer_each_time_and_starved() -> None:
    """M8: flap_period 2 s for 60 s, with the test config (base 2 s, cap 20 s)."""
    detector = OutlierDetector(
        consecutive_failures=5, base_ejection_s=2.0, max_ejection_s=20.0, max_ejection_percent=50
    )
    detector.set_members(REPLICAS, 0.0)
    budget = RetryBudget()
    attempts, errors, durations = run(
        detector, budget, seconds=60.0, rate=50.0, fails=lambda n, t: flapping_fails(n, t, 2.0)
    )
    assert len(durations) >= 4
    assert durations == sorted(durations)  # non-decreasing
    assert max(durations) <= 20.0
    healthy = (attempts["a"] + attempts["b"]) / 2
    assert attempts["c"] < 0.2 * healthy
    assert errors == 0  # every failure was retried within the budget


def test_retry_storm_is_bounded_by_the_budget() -> None:
    """M15: every replica answers 503; attempts <= 1.2 x requests + 3."""
    detector = OutlierDetector(max_ejection_percent=0)  # ejection off: pure budget
    detector.set_members(REPLICAS, 0.0)
    budget = RetryBudget(ratio=0.2, reserve=3, max_concurrent_retries=50)
    attempts, errors, _ = run(detector, budget, seconds=4.0, rate=50.0, fails=lambda n, t: True)
    requests = 200
    assert sum(attempts.values()) <= 1.2 * requests + 3
    assert errors == requests
    assert budget.check() == "budget"  # refused by the ratio, not the concurrency cap


@pytest.mark.parametrize("base", [1.0, 30.0])
def test_healthy_fleet_sees_no_ejections_and_no_retries(base: float) -> None:
    detector = OutlierDetector(base_ejection_s=base)
    detector.set_members(REPLICAS, 0.0)
    budget = RetryBudget()
    attempts, errors, durations = run(
        detector, budget, seconds=10.0, rate=30.0, fails=lambda n, t: False
    )
    assert errors == 0 and durations == []
    assert sum(attempts.values()) == 300  # no retries: one attempt per request
    assert max(attempts.values()) - min(attempts.values()) <= 1
