"""The route decision: filter -> pool -> affinity -> policy, pure and synchronous.

:meth:`Router.decide` does no I/O and reads no clock, so the discrete-event
simulator calls exactly what the gateway calls. The I/O around it (fetching
a session's pin before, storing it after dispatch) belongs to the caller.

1. **filter**: replicas that serve the model and are routable at ``now``
   (healthy, active, not ejected), minus ``exclude`` (replicas a retry has
   already tried), minus those at their concurrency limit; a replica in slow
   start holds at most its ramp's share of a fair load.
2. **pool**: the canary split. Every replica is in the default pool until
   canary pools exist; the step and its re-pin reason (``pool_changed``)
   are here so that sessions and canaries plug in without changing the
   signature.
3. **affinity**: a pinned session stays on its replica while that replica
   is routable, in the session's pool, not excluded and under the load bound
   (:func:`policies.load.load_bound`, HAProxy's hash-balance-factor; a
   replica holding fewer than ``session_load_floor`` requests is never
   over it); otherwise it is re-pinned and :class:`Repin` says why.
4. **policy**: picks among the candidates.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

from policies.base import BasePolicy, Decision, RouteRequest, slot_setter
from policies.load import (
    DEFAULT_LOAD_BOUND_EPSILON,
    DEFAULT_REPORT_MAX_AGE_S,
    DEFAULT_SESSION_LOAD_FLOOR,
    LoadView,
    load_bound,
)
from router.load import ReplicaLoad
from router.replicas import AdminState, FleetSnapshot, Health, ReplicaStatus


class NoRoute(StrEnum):
    UNKNOWN_MODEL = "unknown_model"
    MODELS_PENDING = "models_pending"  # a replica's models are not known yet
    NONE_ROUTABLE = "none_routable"  # serving replicas exist, none routable
    ALL_TRIED = "all_tried"  # every routable replica was tried for this request
    AT_CAPACITY = "at_capacity"  # every candidate is at its concurrency limit


class Repin(StrEnum):
    """Why a session left (or got) its replica: the one set of reasons."""

    NEW = "new"  # no pin yet: the first placement
    DRAINED = "drained"  # the pinned replica is draining or drained
    UNHEALTHY = "unhealthy"  # failed health checks, or ejected
    OVERLOADED = "overloaded"  # above the load bound, or at its concurrency limit
    FAILED = "failed"  # this request already failed there (a retry)
    REMOVED = "removed"  # no longer in the fleet, or no longer serves the model
    POOL_CHANGED = "pool_changed"  # the session's canary pool moved


@dataclass(frozen=True, slots=True, init=False)
class Routed:
    """Where the request goes. ``repin`` is None when the request has no
    session, or its pin held; otherwise the pin to store is ``replica.name``."""

    replica: ReplicaStatus
    decision: Decision
    repin: Repin | None = None

    def __init__(
        self, replica: ReplicaStatus, decision: Decision, repin: Repin | None = None
    ) -> None:
        # The slots' setters, not object.__setattr__ per field (as Decision).
        _set_replica(self, replica)
        _set_decision(self, decision)
        _set_repin(self, repin)


_set_replica = slot_setter(Routed, "replica")
_set_decision = slot_setter(Routed, "decision")
_set_repin = slot_setter(Routed, "repin")


PIN_HELD = "session_pin"


class Router:
    """The route pipeline around one policy (the gateway has one; the
    simulator one per simulated gateway)."""

    def __init__(
        self,
        policy: BasePolicy,
        *,
        load_bound_epsilon: float = DEFAULT_LOAD_BOUND_EPSILON,
        session_load_floor: int = DEFAULT_SESSION_LOAD_FLOOR,
    ) -> None:
        self.policy = policy
        self.epsilon = load_bound_epsilon
        self.session_floor = session_load_floor
        # Per model, the loads of the snapshot's healthy replicas, built once
        # per snapshot: without ejections, retries, concurrency limits or
        # slow start (the steady state) every request would build the same
        # list.
        self._views_of: FleetSnapshot | None = None
        self._views: dict[str, tuple[LoadView, ...]] = {}

    def decide(
        self,
        request: RouteRequest,
        pin: str | None,
        snapshot: FleetSnapshot,
        now: float,
        *,
        exclude: Collection[str] = (),
        panic: bool = False,
    ) -> Routed | NoRoute:
        model = request.model
        serving = snapshot.by_model.get(model)
        if not serving:
            return NoRoute.MODELS_PENDING if snapshot.models_pending else NoRoute.UNKNOWN_MODEL
        healthy = snapshot.healthy_by_model[model]
        candidates: Sequence[ReplicaStatus] = healthy
        if now < snapshot.ejected_until_max:
            candidates = [r for r in candidates if r.ejected_until <= now]
        if not candidates:
            if not panic:
                return NoRoute.NONE_ROUTABLE
            # Panic (Envoy): with nothing healthy, try every active replica
            # serving the model; a drain is an operator's word and holds.
            candidates = [
                r for r in serving if r.admin is AdminState.ACTIVE and not r.reported_draining
            ]
            if not candidates:
                return NoRoute.NONE_ROUTABLE
        if exclude:
            candidates = [r for r in candidates if r.name not in exclude]
            if not candidates:
                return NoRoute.ALL_TRIED
        if snapshot.capacity_limited:
            candidates = [r for r in candidates if r.load.has_capacity()]
        ramping = now < snapshot.ramps_until and any(
            r.ramp is not None and r.ramp.active(now) for r in candidates
        )
        if ramping:
            candidates = _slow_start_filter(candidates, now)
        if not candidates:
            return NoRoute.AT_CAPACITY

        repin: Repin | None = None
        if request.session_key is not None:
            if pin is None:
                repin = Repin.NEW
            else:
                repin = self._pin_breaks(request, pin, snapshot, candidates, now, exclude)
                if repin is None:
                    held = snapshot.replicas[pin]
                    return Routed(held, Decision(pin, PIN_HELD))
                if repin is Repin.OVERLOADED and len(candidates) > 1:
                    candidates = [r for r in candidates if r.name != pin]

        loads: Sequence[LoadView]
        if ramping:
            loads = [
                _Ramped(r.load, r.ramp_factor(now)) if r.ramp is not None else r.load
                for r in candidates
            ]
        elif candidates is healthy:
            if snapshot is not self._views_of:
                self._views_of = snapshot
                self._views = {}
            views = self._views.get(model)
            if views is None:
                views = self._views[model] = tuple(r.load for r in healthy)
            loads = views
        else:
            loads = [r.load for r in candidates]
        decision = self.policy.choose(request, loads, snapshot, now)
        if decision.replica is None:
            return NoRoute.NONE_ROUTABLE
        chosen = snapshot.replicas.get(decision.replica)
        if chosen is None or chosen not in candidates:  # identity: a C-speed scan
            raise RuntimeError(
                f"policy {self.policy.name} chose {decision.replica!r}, not a candidate"
            )
        return Routed(chosen, decision, repin)

    def follow(
        self,
        request: RouteRequest,
        pin: str,
        snapshot: FleetSnapshot,
        now: float,
        *,
        exclude: Collection[str] = (),
    ) -> Routed | None:
        """Another gateway's pin, just stored for this session, if its replica
        can take the request at all (routable, serves the model, not tried,
        under its concurrency limit). The load bound is waived for this one
        request: two gateways agreeing on a new session's replica matters more
        than one request's balance, and the bound applies from the next turn."""
        replica = snapshot.get(pin)
        if (
            replica is None
            or replica.models is None
            or request.model not in replica.models
            or pin in exclude
            or not replica.routable(now)
            or not replica.load.has_capacity()
            # A warming replica keeps its slow-start share: no waiver there.
            or (replica.ramp is not None and replica.ramp.active(now))
        ):
            return None
        return Routed(replica, Decision(pin, PIN_HELD))

    def _pin_breaks(
        self,
        request: RouteRequest,
        pin: str,
        snapshot: FleetSnapshot,
        candidates: Sequence[ReplicaStatus],
        now: float,
        exclude: Collection[str],
    ) -> Repin | None:
        """Why the pinned replica cannot take this request, or None if it can."""
        pinned = snapshot.get(pin)
        if pinned is None or not any(r.name == pin for r in candidates):
            return _why_not_candidate(pinned, request.model, now, exclude)
        held = pinned.load.in_flight
        if held < self.session_floor:
            return None
        total = sum(r.load.in_flight for r in candidates)
        if held >= load_bound(total, len(candidates), self.epsilon):
            return Repin.OVERLOADED
        return None


def _why_not_candidate(
    pinned: ReplicaStatus | None, model: str, now: float, exclude: Collection[str]
) -> Repin:
    if pinned is None or pinned.models is None or model not in pinned.models:
        return Repin.REMOVED
    if pinned.name in exclude:
        return Repin.FAILED
    if pinned.admin is not AdminState.ACTIVE or pinned.reported_draining:
        return Repin.DRAINED
    if pinned.health is not Health.HEALTHY or pinned.ejected(now):
        return Repin.UNHEALTHY
    if pinned.pool:
        return Repin.POOL_CHANGED
    # Routable and serving the model, but not a candidate: at its concurrency
    # limit, or at its slow-start share.
    return Repin.OVERLOADED


class _Ramped:
    """A warming replica's load as policies see it: weight scaled by its ramp.

    Made only for replicas in slow start, so the common case allocates nothing.
    """

    __slots__ = ("_factor", "_load")

    def __init__(self, load: ReplicaLoad, factor: float) -> None:
        self._load = load
        self._factor = factor

    @property
    def weight(self) -> float:
        return self._load.weight * self._factor

    name = property(lambda self: self._load.name)
    in_flight = property(lambda self: self._load.in_flight)
    outstanding_tokens = property(lambda self: self._load.outstanding_tokens)
    kv_usage = property(lambda self: self._load.kv_usage)
    reported_queue = property(lambda self: self._load.reported_queue)
    reported_at = property(lambda self: self._load.reported_at)
    dispatched_since_report = property(lambda self: self._load.dispatched_since_report)
    settled_since_report = property(lambda self: self._load.settled_since_report)
    ttft = property(lambda self: self._load.ttft)
    tpot = property(lambda self: self._load.tpot)
    max_concurrency = property(lambda self: self._load.max_concurrency)
    expert_slowdown = property(lambda self: self._load.expert_slowdown)

    def queue_depth(self, now: float, max_age: float = DEFAULT_REPORT_MAX_AGE_S) -> float:
        return self._load.queue_depth(now, max_age)

    def has_capacity(self) -> bool:
        return self._load.has_capacity()


def _slow_start_filter(candidates: Sequence[ReplicaStatus], now: float) -> list[ReplicaStatus]:
    """A warming replica holds at most its factor's share of a fair load.

    Weight alone does not slow a least-loaded policy down: an idle replica of
    weight 0.1 still scores 0 and wins every pick. So, like HAProxy, which
    ramps maxconn along with weight, a replica in slow start may hold at most
    max(1, factor x the load bound) requests; it keeps getting some traffic
    (to prove itself) but cannot be flooded while cold.
    """
    total = sum(r.load.in_flight for r in candidates)
    fair = load_bound(total, len(candidates), 0.0)
    kept = []
    for r in candidates:
        factor = r.ramp_factor(now)
        if factor >= 1.0 or r.load.in_flight < max(1, math.floor(factor * fair)):
            kept.append(r)
    return kept or list(candidates)
