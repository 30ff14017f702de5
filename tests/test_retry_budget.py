"""Retry classification, budget arithmetic and backoff: pure, no clock."""

from __future__ import annotations

import random

import pytest

from policies.load import Outcome
from router.retry_budget import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    RetryBudget,
    backoff_s,
    is_retryable,
    retry_reason,
)

# --- classification ---------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_connect_errors_and_resets_before_headers_are_retried(streaming: bool) -> None:
    assert retry_reason(Outcome.CONNECT_ERROR, streaming=streaming) == "connect_error"
    assert retry_reason(Outcome.UPSTREAM_RESET, streaming=streaming) == "reset"


def test_first_byte_timeout_is_retried_only_for_streams() -> None:
    assert retry_reason(Outcome.TIMEOUT, streaming=True) == "first_byte_timeout"
    # A non-streaming engine sends nothing until it is done: a timeout there
    # means a long generation, and replaying it doubles the work (M5).
    assert retry_reason(Outcome.TIMEOUT, streaming=False) is None


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_are_retried(status: int) -> None:
    assert retry_reason(Outcome.HTTP_5XX, status=status, streaming=True) == f"status_{status}"
    assert is_retryable(Outcome.HTTP_5XX, status=status, streaming=False)


@pytest.mark.parametrize("status", [500, 501, 505, None])
def test_other_5xx_are_not_retried(status: int | None) -> None:
    assert not is_retryable(Outcome.HTTP_5XX, status=status, streaming=True)


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429])
def test_client_errors_are_never_retried(status: int) -> None:
    # M4: a 400 (context length) is the client's fault, not the replica's.
    assert not is_retryable(Outcome.HTTP_4XX, status=status, streaming=True)


def test_draining_marker_is_retried() -> None:
    assert retry_reason(Outcome.DRAINING, status=503, streaming=False) == "draining"


@pytest.mark.parametrize("outcome", [Outcome.OK, Outcome.CLIENT_DISCONNECT])
def test_success_and_client_disconnect_are_not_retried(outcome: Outcome) -> None:
    assert not is_retryable(outcome, streaming=True)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_nothing_is_retried_once_the_response_started(outcome: Outcome) -> None:
    # M2 / M14: a started stream is never replayed.
    assert not is_retryable(outcome, status=503, streaming=True, response_started=True)


# --- budget ---------------------------------------------------------------------


def test_storm_of_failures_is_bounded_by_ratio_plus_reserve() -> None:
    """M15: 200 requests, each failing every attempt, retrying until refused."""
    budget = RetryBudget(ratio=0.2, reserve=3, max_concurrent_retries=1000)
    retries = 0
    for _ in range(200):
        budget.deposit()
        while budget.try_withdraw():  # every attempt fails: retry as long as allowed
            retries += 1
            budget.release()
    assert retries == int(0.2 * 200 + 3)  # exactly 43, float sums included
    assert budget.withdrawals == retries
    assert budget.denied["budget"] == 200
    assert budget.denied["concurrency"] == 0


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
    assert budget.denied["concurrency"] == 1
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
