"""100,000 picks against probabilities worked out by hand (Envoy's simulation tests).

Tolerance: 0.005 absolute on each share, about 3 standard deviations of a
proportion near 0.45 over 100,000 picks (sqrt(0.45 * 0.55 / 1e5) = 0.0016).
"""

from __future__ import annotations

from collections import Counter

import pytest

from policies import registry
from policies.base import RouteRequest
from router.load import ReplicaLoad, dispatch
from tests.fakes import Fleet

PICKS = 100_000
TOL = 0.005
REQ = RouteRequest("m", prompt_tokens=100, expected_output_tokens=100)


def shares(name: str, params: dict[str, object], loads: list[ReplicaLoad]) -> dict[str, float]:
    policy = registry.create(name, params, seed=12345)
    fleet = Fleet.of(loads)
    counts = Counter(policy.choose(REQ, loads, fleet, 0.0).replica for _ in range(PICKS))
    return {c.name: counts[c.name] / PICKS for c in loads}


def one_busy_of_three() -> list[ReplicaLoad]:
    loads = [ReplicaLoad("a"), ReplicaLoad("b"), ReplicaLoad("busy")]
    for _ in range(5):
        dispatch(loads[2], 10)
    return loads


def test_p2c_with_replacement_one_busy_of_three() -> None:
    """Busy is chosen only when both draws land on it: 1/9; the others 4/9 each."""
    s = shares("p2c", {"replacement": True}, one_busy_of_three())
    assert s["a"] == pytest.approx(4 / 9, abs=TOL)  # 44.45 %
    assert s["b"] == pytest.approx(4 / 9, abs=TOL)
    assert s["busy"] == pytest.approx(1 / 9, abs=TOL)  # 11.1 %


def test_p2c_distinct_one_busy_of_three() -> None:
    """Two distinct draws always include an idle replica: 50 / 50 / 0."""
    s = shares("p2c", {}, one_busy_of_three())
    assert s["a"] == pytest.approx(0.5, abs=TOL)
    assert s["b"] == pytest.approx(0.5, abs=TOL)
    assert s["busy"] == 0.0


def test_p3c_distinct_over_four_with_one_idle() -> None:
    """d = 3 of 4 distinct misses the idle replica with probability 1/4."""
    loads = [ReplicaLoad(n) for n in "abcd"]
    for i, c in enumerate(loads[1:], start=1):
        for _ in range(i):
            dispatch(c, 1)
    s = shares("p2c", {"d": 3}, loads)
    # a (load 0) is in the sample 3/4 of the time; otherwise b (load 1) wins,
    # and b is always in a sample that misses a.
    assert s["a"] == pytest.approx(0.75, abs=TOL)
    assert s["b"] == pytest.approx(0.25, abs=TOL)
    assert s["c"] == 0.0 and s["d"] == 0.0


def test_weighted_random_follows_weights() -> None:
    loads = [ReplicaLoad("a", weight=1), ReplicaLoad("b", weight=2), ReplicaLoad("c", weight=3)]
    s = shares("weighted_random", {}, loads)
    assert s == pytest.approx({"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}, abs=TOL)


def test_round_robin_is_exact_over_a_cycle() -> None:
    loads = [ReplicaLoad("a", weight=1), ReplicaLoad("b", weight=2), ReplicaLoad("c", weight=3)]
    policy = registry.create("round_robin")
    fleet = Fleet.of(loads)
    picks = [policy.choose(REQ, loads, fleet, 0.0).replica for _ in range(600)]
    assert Counter(picks) == {"a": 100, "b": 200, "c": 300}
    # Smooth: the heaviest never gets more than two in a row at weights 1:2:3.
    assert "ccc" not in "".join(p[0] for p in picks if p)  # type: ignore[index]


@pytest.mark.parametrize("name", ["least_request", "least_tokens", "queue_depth"])
def test_full_scans_break_ties_uniformly(name: str) -> None:
    loads = [ReplicaLoad(n) for n in "abcd"]
    dispatch(loads[3], 1)
    s = shares(name, {}, loads)
    assert s == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3, "d": 0.0}, abs=TOL)
