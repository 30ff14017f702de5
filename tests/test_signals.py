"""Load signals: one unit per comparison, fallback when a candidate lacks one."""

from __future__ import annotations

import math

import pytest

from policies import signals
from router.load import ReplicaLoad, dispatch


def test_count_signals_are_divided_by_weight() -> None:
    a, b = ReplicaLoad("a", weight=2.0), ReplicaLoad("b")
    for _ in range(4):
        dispatch(a, 100)
        dispatch(b, 100)
    assert signals.values(signals.get("in_flight"), [a, b], 0.0) == ("in_flight", [2.0, 4.0])
    assert signals.values(signals.get("tokens"), [a, b], 0.0) == ("tokens", [200.0, 400.0])


def test_zero_weight_reads_as_infinitely_loaded() -> None:
    a = ReplicaLoad("a", weight=0.0)
    assert signals.values(signals.get("queue"), [a], 0.0) == ("queue", [math.inf])


def test_queue_uses_report_plus_local_correction_and_ages_out() -> None:
    a = ReplicaLoad("a")
    a.record_report(7.0, 0.4, now=10.0)
    dispatch(a, 1)
    dispatch(a, 1)
    assert signals.values(signals.get("queue"), [a], 11.0) == ("queue", [9.0])
    # Ten seconds later the report is stale: our own in-flight count only.
    assert signals.values(signals.get("queue"), [a], 20.0) == ("queue", [2.0])


def test_missing_kv_on_one_candidate_falls_back_to_queue_for_all() -> None:
    """SGLang's incompatible-metric bug: never compare kv on one with queue on another."""
    a, b = ReplicaLoad("a"), ReplicaLoad("b")
    a.record_report(3.0, 0.9, now=0.0)
    dispatch(b, 1)
    assert signals.values(signals.get("kv"), [a, b], 1.0) == ("queue", [3.0, 1.0])
    b.record_report(1.0, 0.2, now=1.0)
    assert signals.values(signals.get("kv"), [a, b], 1.0) == ("kv", [0.9, 0.2])
    # A stale KV report counts as absent.
    assert signals.values(signals.get("kv"), [a, b], 6.5)[0] == "queue"


def test_latency_signals_fall_back_until_every_candidate_has_a_sample() -> None:
    a, b = ReplicaLoad("a"), ReplicaLoad("b")
    a.ttft.add(0.3, 0.0)
    assert signals.values(signals.get("ttft"), [a, b], 0.0)[0] == "queue"
    b.ttft.add(0.1, 0.0)
    assert signals.values(signals.get("ttft"), [a, b], 0.0) == ("ttft", [0.3, 0.1])
    assert signals.values(signals.get("tpot"), [a, b], 0.0)[0] == "queue"


def test_unknown_signal_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        signals.get("vibes")


def test_every_fallback_chain_ends_in_an_always_present_signal() -> None:
    empty = ReplicaLoad("x")
    for sig in signals.SIGNALS.values():
        name, vals = signals.values(sig, [empty], 0.0)
        assert signals.SIGNALS[name].fallback is None or vals[0] is not None
        assert vals[0] is not None


def test_fast_queue_depths_equal_replica_load_queue_depth() -> None:
    """signals.queue_depths inlines ReplicaLoad.queue_depth: they must agree."""
    import random

    rng = random.Random(7)
    for _ in range(2000):
        c = ReplicaLoad("x", weight=rng.choice([1.0, 1.0, 2.0, 0.5]))
        c.in_flight = rng.randrange(6)
        if rng.random() < 0.7:
            c.record_report(float(rng.randrange(8)), None, rng.uniform(0, 10))
            c.dispatched_since_report = rng.randrange(4)
            c.settled_since_report = rng.randrange(6)
        now = rng.uniform(0, 20)
        assert signals.queue_depths([c], now) == [c.queue_depth(now) / c.weight]


def test_fast_kv_usages_equal_the_kv_signal() -> None:
    """signals.kv_usages inlines the kv signal: None exactly where it falls back."""
    import random

    rng = random.Random(3)
    kv = signals.get("kv")
    for _ in range(500):
        c = ReplicaLoad("x")
        if rng.random() < 0.7:
            c.record_report(1.0, rng.choice([None, rng.random()]), rng.uniform(0, 10))
        now = rng.uniform(0, 20)
        used, vals = signals.values(kv, [c], now)
        assert signals.kv_usages([c], now) == (vals if used == "kv" else [None])
