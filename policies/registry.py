"""Policies by config name. Adding a policy: its file, its test, one line here."""

from __future__ import annotations

import random
from typing import Any

from policies.base import BasePolicy
from policies.least_request import LeastRequest
from policies.least_tokens import LeastTokens
from policies.p2c import PowerOfChoices
from policies.peak_ewma import PeakEwmaPolicy
from policies.predicted_ttft import PredictedTtft
from policies.prefix_affinity import PrefixAffinity
from policies.queue_depth import QueueDepth
from policies.round_robin import RoundRobin
from policies.scored import Scored
from policies.weighted_random import WeightedRandom

POLICIES: dict[str, type[BasePolicy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        WeightedRandom,
        LeastRequest,
        LeastTokens,
        PowerOfChoices,
        QueueDepth,
        PeakEwmaPolicy,
        PrefixAffinity,
        PredictedTtft,
        Scored,
    )
}

# What the gateway promises when the config names no policy: queue depth
# works without load reports (it is then this gateway's in-flight count) and
# uses them, locally corrected, as soon as replicas report.
DEFAULT_POLICY = "queue_depth"


def create(name: str, params: dict[str, Any] | None = None, seed: int | None = None) -> BasePolicy:
    """Build a policy by name; unknown names and parameters raise ValueError."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    try:
        return cls(rng=random.Random(seed), **(params or {}))
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def describe() -> list[str]:
    """One line per policy, ``name: summary``, for ``dp-router policies``."""
    return [f"{name}: {cls.summary}" for name, cls in sorted(POLICIES.items())]
