"""queue_depth's one-pass path for small fleets must pick exactly what the
column-wise path (signals.queue_depths + argmin_ties) picks, RNG draws included."""

from __future__ import annotations

import random

import pytest

from policies import queue_depth
from policies.base import RouteRequest
from policies.queue_depth import QueueDepth
from router.load import ReplicaLoad
from tests.fakes import Fleet


def _random_fleet(rng: random.Random, now: float) -> list[ReplicaLoad]:
    n = rng.randrange(1, 12)
    mode = rng.choice(["fresh", "fresh", "none", "mixed", "stale", "weights"])
    loads = []
    for i in range(n):
        c = ReplicaLoad(f"r{i}")
        if mode == "weights" and rng.random() < 0.3:
            c.weight = rng.choice([0.0, 0.5, 2.0])
        c.in_flight = rng.randrange(4)
        c.outstanding_tokens = rng.choice([0, 10, 10, 20])
        reported = mode != "none" and (mode != "mixed" or rng.random() < 0.5)
        if reported:
            age = rng.uniform(0, 4) if mode != "stale" or rng.random() < 0.5 else 6.0
            c.record_report(float(rng.randrange(4)), None, now - age)
            c.dispatched_since_report = rng.randrange(3)
            c.settled_since_report = rng.randrange(4)
        loads.append(c)
    return loads


@pytest.mark.parametrize("seed", range(5))
def test_small_fleet_path_picks_as_the_column_path(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    req = RouteRequest("m", prompt_tokens=10)
    for _ in range(400):
        now = rng.uniform(10, 20)
        loads = _random_fleet(rng, now)
        fleet = Fleet.of(loads)
        picks = []
        for small in (64, 0):
            monkeypatch.setattr(queue_depth, "SMALL_FLEET", small)
            policy = QueueDepth(rng=random.Random(seed))
            picks.append([policy.choose(req, loads, fleet, now) for _ in range(3)])
        fast, slow = picks
        assert [(d.replica, d.reason, dict(d.inputs)) for d in fast] == [
            (d.replica, d.reason, dict(d.inputs)) for d in slow
        ]
        assert [type(d.inputs["queue"]) for d in fast] == [type(d.inputs["queue"]) for d in slow]
