"""The fleet: replicas, their status, and the one writer of that status.

A replica is known by its configured ``name``; the URL never leaves the
gateway. Its *status* (models, weight, pool, admin state, health, ejection,
slow-start ramp) lives in exactly one place: the :class:`Registry`, which
publishes it as an immutable, versioned :class:`FleetSnapshot`. Health
checks, outlier ejection, model discovery (and later drains, canary weights
and load reports) change a replica's status only through
:meth:`Registry.update`, which bumps the version when something changed. No
other module keeps a copy, so nothing has to be kept in step by a timer.

Slow start is stored as a :class:`Ramp` (start, duration) and evaluated with
``now`` wherever it matters, so a ramp does not publish a new version four
times a second; the version changes with membership and status only.

Live load counters (:class:`router.load.ReplicaLoad`) are not status: they
change with every request, so they stay mutable objects that every snapshot
of the replica shares. The registry stamps the replica's weight onto them
when it publishes, because the policies' hot loops read weight next to the
counters (``policies.load.LoadView``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from router.config import ReplicaConfig
from router.load import ReplicaLoad

DEFAULT_POOL = ""


class AdminState(StrEnum):
    """An operator's (or the replica's own) intent: HAProxy's ready / drain.

    ``draining``: no new requests, in-flight ones finish. ``drained``: nothing
    left in flight. Neither is a deletion: the replica stays in the fleet,
    checked and visible, until it is removed.
    """

    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


class Health(StrEnum):
    """The active health checks' verdict. ``unknown`` until the first check:
    a replica still loading a 70 GB model must not be flooded on the
    assumption that it is fine (Envoy does the same with active checks)."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Ramp:
    """A slow-start ramp: weight factor max(min_weight, (t / duration) ** (1 / aggression)).

    ``t`` is the time since ``start``; before ``start`` (an ejection that has
    not ended yet) the factor is ``min_weight``, from ``start + duration`` on
    it is 1. Aggression 1 is linear (Envoy's slow start; HAProxy ``slowstart``).
    """

    start: float
    duration: float
    aggression: float = 1.0
    min_weight: float = 0.1

    def factor(self, now: float) -> float:
        t = now - self.start
        if t >= self.duration:
            return 1.0
        if t <= 0.0:
            return self.min_weight
        return max(self.min_weight, (t / self.duration) ** (1.0 / self.aggression))

    def active(self, now: float) -> bool:
        return now - self.start < self.duration


@dataclass(frozen=True, slots=True, eq=False)
class ReplicaStatus:
    """One replica in one fleet version. Immutable, except ``load``: the live
    counters every version of this replica shares. Compared by identity: a
    status belongs to one version (and routing's membership checks stay
    C-speed)."""

    name: str
    url: str
    api_key: str
    models: frozenset[str] | None  # None: not known yet (discovery pending)
    discovers_models: bool  # models come from the replica's GET /v1/models
    weight: float
    pool: str
    admin: AdminState
    health: Health
    ejected_until: float
    ramp: Ramp | None
    load: ReplicaLoad
    # The replica's own word, from its load report (router.telemetry): it is
    # draining and wants no new requests. Kept apart from ``admin`` (the
    # operator's intent), so that a replica reporting "ready" again can never
    # undo an operator's drain, and an operator's "active" cannot override a
    # replica that is shutting down.
    reported_draining: bool = False

    def routable(self, now: float) -> bool:
        """Takes new requests: healthy, active, not self-draining and not ejected at ``now``."""
        return (
            self.health is Health.HEALTHY
            and self.admin is AdminState.ACTIVE
            and not self.reported_draining
            and self.ejected_until <= now
        )

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def ramp_factor(self, now: float) -> float:
        """Slow-start weight multiplier at ``now`` (1 outside a ramp)."""
        ramp = self.ramp
        return 1.0 if ramp is None else ramp.factor(now)

    def describe(self, now: float) -> dict[str, Any]:
        load = self.load
        return {
            "name": self.name,
            "state": self.admin.value,
            "health": self.health.value,
            "healthy": self.health is Health.HEALTHY,
            "ejected": self.ejected(now),
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "routable": self.routable(now),
            "pool": self.pool,
            "weight": self.weight,
            "slow_start_factor": round(self.ramp_factor(now), 4),
            "in_flight": load.in_flight,
            "outstanding_tokens": load.outstanding_tokens,
            "models": sorted(self.models) if self.models is not None else None,
            "queue_depth": load.queue_depth(now),
            "kv_usage": load.kv_usage,
            "reported_draining": self.reported_draining,
            "report_age_s": None if (age := load.report_age(now)) is None else round(age, 3),
            "reported_by": load.reported_by,
            "reported_waiting": load.reported_waiting,
            "reported_running": load.reported_running,
            # This process's EWMAs (with --workers N the supervisor routes
            # nothing, so it has none).
            "ttft_ewma_s": _rounded(load.ttft.value),
            "tpot_ewma_s": _rounded(load.tpot.value),
        }


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """The fleet at one version: what routing, the admin API and metrics read.

    ``names`` and ``version`` are what policies see (``policies.base.FleetView``):
    they key per-replica state by name and reconcile it when the version
    changes.
    """

    version: int
    replicas: Mapping[str, ReplicaStatus]
    names: frozenset[str]
    by_model: Mapping[str, tuple[ReplicaStatus, ...]]
    models_pending: bool  # some replica's models are not known yet
    # Precomputed once per version so that routing at 1,000 replicas does
    # not call a method per replica per request:
    # per model, the replicas that are healthy, active and not self-draining (the clock may
    # still have them ejected: see ejected_until_max) ...
    healthy_by_model: Mapping[str, tuple[ReplicaStatus, ...]]
    # ... the latest end of any ejection (before it, check each replica) ...
    ejected_until_max: float
    # ... the latest end of any slow-start ramp ...
    ramps_until: float
    # ... and whether any replica has a concurrency limit.
    capacity_limited: bool

    def __iter__(self) -> Iterator[ReplicaStatus]:
        return iter(self.replicas.values())

    def __len__(self) -> int:
        return len(self.replicas)

    def get(self, name: str) -> ReplicaStatus | None:
        return self.replicas.get(name)

    def serving(self, model: str) -> tuple[ReplicaStatus, ...]:
        return self.by_model.get(model, ())

    def knows_model(self, model: str) -> bool:
        return model in self.by_model

    @staticmethod
    def build(version: int, replicas: Mapping[str, ReplicaStatus]) -> FleetSnapshot:
        by_model: dict[str, list[ReplicaStatus]] = {}
        for status in replicas.values():
            for model in sorted(status.models or ()):
                by_model.setdefault(model, []).append(status)
        statuses = list(replicas.values())
        return FleetSnapshot(
            version=version,
            replicas=dict(replicas),
            names=frozenset(replicas),
            by_model={m: tuple(rs) for m, rs in by_model.items()},
            models_pending=any(s.models is None for s in statuses),
            healthy_by_model={
                m: tuple(
                    r
                    for r in rs
                    if r.health is Health.HEALTHY
                    and r.admin is AdminState.ACTIVE
                    and not r.reported_draining
                )
                for m, rs in by_model.items()
            },
            ejected_until_max=max((s.ejected_until for s in statuses), default=0.0),
            ramps_until=max(
                (s.ramp.start + s.ramp.duration for s in statuses if s.ramp is not None),
                default=float("-inf"),
            ),
            capacity_limited=any(s.load.max_concurrency is not None for s in statuses),
        )


# What Registry.update may change: the status fields, never identity or load.
_MUTABLE_FIELDS = frozenset(
    {"models", "weight", "pool", "admin", "health", "ejected_until", "ramp", "reported_draining"}
)

Listener = Callable[[FleetSnapshot, FleetSnapshot], None]


def status_from_config(config: ReplicaConfig, health: Health) -> ReplicaStatus:
    return ReplicaStatus(
        name=config.name,
        url=config.url,
        api_key=config.api_key,
        models=frozenset(config.models) if config.models is not None else None,
        discovers_models=config.models is None,
        weight=config.weight,
        pool=DEFAULT_POOL,
        admin=AdminState.ACTIVE,
        health=health,
        ejected_until=0.0,
        ramp=None,
        load=ReplicaLoad(
            name=config.name, weight=config.weight, max_concurrency=config.max_concurrency
        ),
    )


class Registry:
    """Owns the replicas; the one writer of their status.

    ``initial_health``: ``unknown`` when active health checks will decide,
    ``healthy`` when they are off (or in the simulator).
    """

    def __init__(
        self, configs: tuple[ReplicaConfig, ...], *, initial_health: Health = Health.HEALTHY
    ) -> None:
        self._initial_health = initial_health
        self._model_entries: dict[str, dict[str, dict[str, Any]]] = {}
        replicas = {}
        for config in configs:
            replicas[config.name] = status_from_config(config, initial_health)
            self._model_entries[config.name] = _configured_entries(config)
        self._listeners: list[Listener] = []
        # The current fleet, read on every request: a plain attribute (a
        # property is a Python call each time). Only _publish replaces it.
        self.snapshot = FleetSnapshot.build(1, replicas)

    def __iter__(self) -> Iterator[ReplicaStatus]:
        return iter(self.snapshot)

    def __len__(self) -> int:
        return len(self.snapshot)

    def get(self, name: str) -> ReplicaStatus | None:
        return self.snapshot.get(name)

    def subscribe(self, listener: Listener) -> None:
        """``listener(new, old)`` runs after every version change, in order."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def update(self, name: str, **changes: Any) -> bool:
        """Change one replica's status; True (and a new version) if it changed.

        The only way status changes: health checks, outlier ejection, model
        discovery, drains and weights all come through here.
        """
        unknown = changes.keys() - _MUTABLE_FIELDS
        if unknown:
            raise TypeError(f"not replica status fields: {sorted(unknown)}")
        current = self.snapshot.get(name)
        if current is None:
            return False
        if all(getattr(current, k) == v for k, v in changes.items()):
            return False
        updated = dataclasses.replace(current, **changes)
        replicas = dict(self.snapshot.replicas)
        replicas[name] = updated
        self._publish(replicas)
        return True

    def add(self, config: ReplicaConfig) -> ReplicaStatus:
        """A new member (unknown health until checked, like a starting replica)."""
        if config.name in self.snapshot.replicas:
            raise ValueError(f"replica {config.name!r} already exists")
        status = status_from_config(config, self._initial_health)
        self._model_entries[config.name] = _configured_entries(config)
        replicas = dict(self.snapshot.replicas)
        replicas[config.name] = status
        self._publish(replicas)
        return status

    def remove(self, name: str) -> bool:
        if name not in self.snapshot.replicas:
            return False
        replicas = dict(self.snapshot.replicas)
        del replicas[name]
        self._model_entries.pop(name, None)
        self._publish(replicas)
        return True

    def set_models(self, name: str, entries: list[dict[str, Any]]) -> bool:
        """A replica's discovered models (its /v1/models entries); True if the set changed."""
        if name not in self.snapshot.replicas:
            return False
        self._model_entries[name] = {e["id"]: e for e in entries}
        return self.update(name, models=frozenset(e["id"] for e in entries))

    def apply(
        self, statuses: Iterable[Mapping[str, Any]], model_list: Iterable[Mapping[str, Any]] = ()
    ) -> FleetSnapshot:
        """Publish a fleet whose status was decided elsewhere, as the next version.

        The one writer of a ``--workers`` worker's registry: the supervisor
        runs the health checks, outlier detection and discovery, and each of
        its versions arrives here whole (``router.workers``). ``statuses``
        holds every member's status fields (``name``, ``url``, ``api_key``,
        ``models``, ``discovers_models``, ``weight``, ``pool``, ``admin``,
        ``health``, ``ejected_until``, ``ramp``) and ``max_concurrency``;
        a replica left out leaves the fleet. ``model_list`` is the
        supervisor's :meth:`model_list`.

        Live load counters are this process's own: a replica that stays
        (same name and URL) keeps its :class:`ReplicaLoad`, so in-flight
        tickets settle on the counters they were taken from.
        """
        old = self.snapshot.replicas
        replicas: dict[str, ReplicaStatus] = {}
        for fields in statuses:
            name = fields["name"]
            previous = old.get(name)
            max_concurrency = fields.get("max_concurrency")
            if previous is not None and previous.url == fields["url"]:
                load = previous.load
                load.max_concurrency = max_concurrency
            else:
                load = ReplicaLoad(
                    name=name, weight=fields["weight"], max_concurrency=max_concurrency
                )
            replicas[name] = ReplicaStatus(
                load=load, **{k: v for k, v in fields.items() if k != "max_concurrency"}
            )
        entries = {str(e["id"]): dict(e) for e in model_list}
        self._model_entries = {
            name: {m: entries[m] for m in sorted(status.models or ()) if m in entries}
            for name, status in replicas.items()
        }
        self._publish(replicas)
        return self.snapshot

    def model_list(self) -> list[dict[str, Any]]:
        """The union of the replicas' models, as /v1/models entries."""
        entries: dict[str, dict[str, Any]] = {}
        for per_replica in self._model_entries.values():
            for model_id, entry in per_replica.items():
                entries.setdefault(model_id, entry)
        return [entries[m] for m in sorted(entries)]

    def _publish(self, replicas: dict[str, ReplicaStatus]) -> None:
        old = self.snapshot
        new = FleetSnapshot.build(old.version + 1, replicas)
        for status in new:
            status.load.weight = status.weight
        self.snapshot = new
        for listener in self._listeners:
            listener(new, old)


def _configured_entries(config: ReplicaConfig) -> dict[str, dict[str, Any]]:
    return {
        m: {"id": m, "object": "model", "created": 0, "owned_by": "dp-router"}
        for m in (config.models or ())
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
