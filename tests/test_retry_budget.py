"""Retry budget arithmetic and backoff: pure, no clock.

Row numbers (M15) are the test matrix in ``docs/reliability.md``.
"""

from __future__ import annotations

import random

import pytest

from router.retry_budget import BACKOFF_BASE_S, BACKOFF_MAX_S, RetryBudget, backoff_s

# --- budget ---------------------------------------------------------------------


def test_storm_of_failures_is_bounded_by_ratio_plus_reserve() -> None:
    """M15: 200 requests, each failing every attempt, retrying until refused."""
    budget = RetryBudget(ratio=0.2, reserve=3, max_concurrent_retries=1000)
    retries = 0
    refusals: list[str | None] = []
    for _ in range(200):
        budget.deposit()
        while budget.try_withdraw():  # every attempt fails: retry as long as allowed
            retries += 1
            budget.release()
        refusals.append(budget.check())
    assert retries == int(0.2 * 200 + 3)  # exactly 43, float sums included
    assert refusals == ["budget"] * 200  # never the concurrency cap


def test_fresh_gateway_can_retry_reserve_times_without_traffic() -> None:
    budget = RetryBudget(ratio=0.2, reserve=3)
    granted = [budget.try_withdraw() for _ in range(5)]
    assert granted == [True, True, True, False, False]


def test_five_requests_fund_one_retry() -> None:
    budget = RetryBudget(ratio=0.2, reserve=0)
    for _ in range(4):
        budget.deposit()
    assert not budget.try_withdraw()
    budget.deposit()
    assert budget.try_withdraw()


def test_saved_credit_is_capped() -> None:
    """A long healthy run must not fund an unbounded retry burst later."""
    budget = RetryBudget(ratio=0.2, reserve=3, max_balance=10, max_concurrent_retries=1000)
    for _ in range(10_000):
        budget.deposit()
    assert budget.balance == 10
    burst = 0
    while budget.try_withdraw():
        burst += 1
    assert burst == 10


def test_concurrency_cap_refuses_until_release() -> None:
    budget = RetryBudget(ratio=0.2, reserve=100, max_balance=100, max_concurrent_retries=2)
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    assert budget.check() == "concurrency"
    # A refused retry spends no tokens.
    assert budget.balance == 98
    budget.release()
    assert budget.active == 1
    assert budget.try_withdraw()


def test_both_limits_must_allow() -> None:
    budget = RetryBudget(ratio=0.2, reserve=1, max_concurrent_retries=5)
    assert budget.check() is None
    assert budget.try_withdraw()
    assert budget.check() == "budget"  # concurrency has room, tokens do not
    budget.release()
    for _ in range(5):
        budget.deposit()
    assert budget.check() is None


def test_release_without_withdraw_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        RetryBudget().release()


def test_zero_ratio_and_reserve_disables_retries() -> None:
    budget = RetryBudget(ratio=0, reserve=0)
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()


def test_negative_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1)


# --- backoff --------------------------------------------------------------------


def test_backoff_is_full_jitter_within_envoy_bounds() -> None:
    rng = random.Random(12345)
    for retry in range(1, 8):
        upper = min(BACKOFF_MAX_S, (2**retry - 1) * BACKOFF_BASE_S)
        samples = [backoff_s(retry, rng) for _ in range(2000)]
        assert all(0 <= s < upper for s in samples)
        # Full jitter: the samples spread over the whole interval.
        assert min(samples) < 0.1 * upper
        assert max(samples) > 0.9 * upper


def test_backoff_first_retry_is_under_base_and_later_ones_cap() -> None:
    rng = random.Random(1)
    assert max(backoff_s(1, rng) for _ in range(1000)) < BACKOFF_BASE_S
    assert max(backoff_s(50, rng) for _ in range(1000)) < BACKOFF_MAX_S
    assert backoff_s(10_000, rng) < BACKOFF_MAX_S  # no overflow on absurd counts


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    a = [backoff_s(3, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError):
        backoff_s(0, random.Random(0))
