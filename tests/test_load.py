"""The load vocabulary: Ewma on explicit time, the one load bound, a replica's
queue depth from fresh and stale reports, and tickets that settle once."""

from __future__ import annotations

import math
import sys

import pytest

from policies.load import DEFAULT_REPORT_MAX_AGE_S, Ewma, Outcome, load_bound
from router.load import ReplicaLoad, dispatch

# -- Ewma ------------------------------------------------------------------------


def test_ewma_first_sample_is_the_value() -> None:
    e = Ewma(tau=10.0)
    assert e.value is None
    e.add(0.4, now=3.0)
    assert e.value == 0.4 and e.stamp == 3.0


def test_ewma_initial_value_is_replaced_by_the_first_sample() -> None:
    e = Ewma(tau=10.0, initial=5.0)
    assert e.value == 5.0
    e.add(1.0, now=0.0)
    assert e.value == 1.0


def test_ewma_blends_by_elapsed_time() -> None:
    e = Ewma(tau=10.0)
    e.add(1.0, now=0.0)
    e.add(3.0, now=10.0)  # one tau later: the old value keeps weight e^-1
    w = math.exp(-1.0)
    assert e.value == pytest.approx(1.0 * w + 3.0 * (1 - w))
    assert e.stamp == 10.0


def test_ewma_same_instant_sample_does_not_move_it() -> None:
    e = Ewma(tau=10.0)
    e.add(1.0, now=5.0)
    e.add(100.0, now=5.0)  # dt = 0: weight of the new sample is 1 - e^0 = 0
    assert e.value == 1.0


def test_ewma_time_going_backwards_counts_as_no_time() -> None:
    e = Ewma(tau=10.0)
    e.add(1.0, now=5.0)
    e.add(100.0, now=4.0)
    assert e.value == 1.0


def test_ewma_matches_the_reference_formula_bit_for_bit() -> None:
    """Ewma.add is open-coded for speed: the simulator's seeded runs depend on
    it giving exactly exp(-max(0, dt) / tau) blending, NaN gaps included."""
    import random

    rng = random.Random(5)
    for _ in range(2000):
        e = Ewma(tau=rng.choice([0.5, 10.0]))
        ref: float | None = None
        stamp: float | None = None
        for _ in range(5):
            sample = rng.uniform(0, 2)
            now = rng.choice([rng.uniform(0, 30), -0.0, 0.0, math.nan])
            if ref is None or stamp is None:
                ref = sample
            else:
                w = math.exp(-max(0.0, now - stamp) / e.tau)
                ref = ref * w + sample * (1.0 - w)
            stamp = now
            e.add(sample, now)
            assert e.value == ref or (math.isnan(e.value) and math.isnan(ref))  # type: ignore[arg-type]


def test_ewma_long_gap_forgets_the_past() -> None:
    e = Ewma(tau=1.0)
    e.add(100.0, now=0.0)
    e.add(2.0, now=1000.0)
    assert e.value == pytest.approx(2.0)


# -- load_bound ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "n", "eps", "bound"),
    [
        (0, 4, 0.0, 1),  # the first request may go anywhere
        (0, 4, 0.5, 1),
        (7, 4, 0.0, 2),  # exactly the fair share: (7 + 1) / 4
        (8, 4, 0.0, 3),  # one over the fair share rounds up
        (40, 4, 0.5, 16),  # ceil(1.5 * 41 / 4) = ceil(15.375)
        (15, 4, 0.25, 5),  # 1.25 * 16 / 4 = 5 exactly: no rounding up
        (0, 1, 0.5, 2),  # one replica: (1 + eps) x 1, rounded up
        (10, 1, 0.0, 11),  # one replica takes everything
    ],
)
def test_load_bound_values(total: int, n: int, eps: float, bound: int) -> None:
    assert load_bound(total, n, eps) == bound


def test_load_bound_counts_the_request_being_placed() -> None:
    """With eps = 0 and N replicas holding N - 1 requests in total, the bound is
    1: the request being placed makes N."""
    assert load_bound(3, 4, 0.0) == 1


def test_load_bound_without_replicas_is_zero() -> None:
    assert load_bound(5, 0, 0.5) == 0
    assert load_bound(5, -1, 0.5) == 0


def test_load_bound_infinite_epsilon_is_no_bound() -> None:
    assert load_bound(10**6, 3, math.inf) == sys.maxsize


def test_load_bound_never_below_one_for_a_replica() -> None:
    for n in range(1, 20):
        for total in range(0, 50):
            assert load_bound(total, n, 0.0) >= 1


# -- ReplicaLoad.queue_depth -------------------------------------------------------


def test_queue_depth_without_reports_is_in_flight() -> None:
    load = ReplicaLoad("a")
    dispatch(load, 10)
    dispatch(load, 10)
    assert load.queue_depth(0.0) == 2.0


def test_queue_depth_fresh_report_plus_local_correction() -> None:
    load = ReplicaLoad("a")
    load.record_report(6.0, 0.3, now=100.0)
    t1 = dispatch(load, 10)
    dispatch(load, 10)
    dispatch(load, 10)
    assert load.queue_depth(101.0) == 9.0  # 6 reported + 3 sent since
    t1.close(Outcome.OK)
    assert load.queue_depth(101.0) == 8.0  # - 1 settled since


def test_queue_depth_never_below_what_this_gateway_has_in_flight() -> None:
    load = ReplicaLoad("a")
    for _ in range(4):
        dispatch(load, 10)
    load.record_report(0.0, None, now=0.0)  # a report that lags our own sends
    assert load.queue_depth(1.0) == 4.0


def test_queue_depth_stale_report_falls_back_to_in_flight() -> None:
    load = ReplicaLoad("a")
    load.record_report(9.0, 0.5, now=0.0)
    dispatch(load, 10)
    assert load.queue_depth(DEFAULT_REPORT_MAX_AGE_S) == 10.0  # exactly max age: fresh
    assert load.queue_depth(DEFAULT_REPORT_MAX_AGE_S + 0.001) == 1.0  # older: stale
    assert load.queue_depth(2.0, max_age=1.0) == 1.0  # the caller's own age limit


def test_a_new_report_replaces_the_local_correction() -> None:
    load = ReplicaLoad("a")
    load.record_report(2.0, None, now=0.0)
    dispatch(load, 10)
    dispatch(load, 10)
    load.record_report(5.0, 0.1, now=1.0)  # already counts the two we sent
    assert (load.dispatched_since_report, load.settled_since_report) == (0, 0)
    assert load.queue_depth(1.5) == 5.0
    assert load.kv_usage == 0.1 and load.reported_at == 1.0


def test_has_capacity_follows_max_concurrency() -> None:
    load = ReplicaLoad("a", max_concurrency=2)
    assert load.has_capacity()
    dispatch(load, 1)
    t = dispatch(load, 1)
    assert not load.has_capacity()
    t.close(Outcome.OK)
    assert load.has_capacity()
    assert ReplicaLoad("b").has_capacity()  # no limit configured


# -- Ticket / dispatch --------------------------------------------------------------


def test_dispatch_adds_the_request_and_close_removes_it_once() -> None:
    load = ReplicaLoad("a")
    ticket = dispatch(load, 250)
    assert (load.in_flight, load.outstanding_tokens, load.dispatched_since_report) == (1, 250, 1)
    assert ticket.close(Outcome.TIMEOUT) is True
    assert (load.in_flight, load.outstanding_tokens, load.settled_since_report) == (0, 0, 1)
    # A finally that closes again, with another outcome, changes nothing.
    assert ticket.close(Outcome.CLIENT_DISCONNECT) is False
    assert ticket.close(Outcome.OK) is False
    assert (load.in_flight, load.outstanding_tokens, load.settled_since_report) == (0, 0, 1)
    assert ticket.outcome is Outcome.TIMEOUT and ticket.closed


def test_tickets_on_one_replica_settle_independently() -> None:
    load = ReplicaLoad("a")
    small, big = dispatch(load, 10), dispatch(load, 5000)
    assert (load.in_flight, load.outstanding_tokens) == (2, 5010)
    big.close(Outcome.OK)
    assert (load.in_flight, load.outstanding_tokens) == (1, 10)
    big.close(Outcome.OK)
    assert (load.in_flight, load.outstanding_tokens) == (1, 10)
    small.close(Outcome.UPSTREAM_RESET)
    assert (load.in_flight, load.outstanding_tokens) == (0, 0)


def test_every_outcome_settles_the_same_load() -> None:
    for outcome in Outcome:
        load = ReplicaLoad("a")
        dispatch(load, 7).close(outcome)
        assert (load.in_flight, load.outstanding_tokens) == (0, 0), outcome


def test_load_bound_is_exact_for_decimal_epsilons() -> None:
    """(1 + 0.1) x 50 / 5 is 11, not the 11.000000000000002 of binary floats."""
    from fractions import Fraction

    for eps in ("0.1", "0.2", "0.25", "0.3", "0.5"):
        for n in range(1, 33):
            for total in range(0, 200):
                exact = Fraction(eps) + 1
                want = -(-(exact * (total + 1)) // n)
                assert load_bound(total, n, float(eps)) == want, (eps, n, total)
