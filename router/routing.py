"""The route decision: filter -> policy, pure and synchronous.

``decide`` does no I/O and reads no clock, so the discrete-event simulator
calls exactly what the gateway calls. The filter keeps replicas that serve the
model and are routable, minus those already tried for this request (retries
go to a different replica). Canary pools and session affinity slot in here
between filter and policy when they land.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from policies.base import BasePolicy, Decision, RouteRequest
from router.load import load_bound
from router.replicas import Registry, Replica


class NoRoute(StrEnum):
    UNKNOWN_MODEL = "unknown_model"
    MODELS_PENDING = "models_pending"  # a replica's models are not known yet
    NONE_ROUTABLE = "none_routable"  # serving replicas exist, none routable
    ALL_TRIED = "all_tried"  # every routable replica was tried for this request
    AT_CAPACITY = "at_capacity"  # every candidate is at its concurrency limit


@dataclass(frozen=True, slots=True)
class Routed:
    replica: Replica
    decision: Decision


def decide(
    request: RouteRequest,
    registry: Registry,
    policy: BasePolicy,
    now: float,
    *,
    exclude: Collection[str] = (),
    panic: bool = False,
) -> Routed | NoRoute:
    serving = registry.serving(request.model)
    if not serving:
        return NoRoute.MODELS_PENDING if registry.models_pending() else NoRoute.UNKNOWN_MODEL
    routable = [r for r in serving if r.routable(now)]
    if not routable:
        if not panic:
            return NoRoute.NONE_ROUTABLE
        # Panic (Envoy): with nothing healthy, try every replica serving the model.
        routable = list(serving)
    if exclude:
        routable = [r for r in routable if r.name not in exclude]
        if not routable:
            return NoRoute.ALL_TRIED
    candidates = [r for r in routable if r.load.has_capacity()]
    if any(r.slow_start_factor < 1.0 for r in candidates):
        candidates = _slow_start_filter(candidates)
    if not candidates:
        return NoRoute.AT_CAPACITY
    decision = policy.choose(request, [r.load for r in candidates], now)
    if decision.replica is None:
        return NoRoute.NONE_ROUTABLE
    for replica in candidates:
        if replica.name == decision.replica:
            return Routed(replica, decision)
    raise RuntimeError(f"policy {policy.name} chose {decision.replica!r}, not a candidate")


def _slow_start_filter(candidates: list[Replica]) -> list[Replica]:
    """A warming replica holds at most its factor's share of a fair load.

    Weight alone does not slow a least-loaded policy down: an idle replica of
    weight 0.1 still scores 0 and wins every pick. So, like HAProxy, which
    ramps maxconn along with weight, a replica in slow start may hold at most
    max(1, factor x the load bound) requests; it keeps getting some traffic
    (to prove itself) but cannot be flooded while cold (M7, M11).
    """
    total = sum(r.load.in_flight for r in candidates)
    fair = load_bound(total, len(candidates), 0.0)
    kept = [
        r
        for r in candidates
        if r.slow_start_factor >= 1.0
        or r.load.in_flight < max(1, math.floor(r.slow_start_factor * fair))
    ]
    return kept or candidates
