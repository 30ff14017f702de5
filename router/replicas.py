"""Replicas and the registry: identity, models, routability, load.

A replica is known by its configured ``name``; the URL never leaves the
gateway. Routability is one predicate (healthy, not ejected, active) so the
routing filter, the admin API and the metrics agree on it. Draining is a state
in the snapshot, not a deletion (STYLE 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from router.config import ReplicaConfig
from router.load import ReplicaLoad


class ReplicaState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


class Replica:
    __slots__ = (
        "api_key",
        "base_url",
        "config",
        "ejected_until",
        "healthy",
        "load",
        "model_entries",
        "models",
        "name",
        "slow_start_factor",
        "state",
    )

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.name = config.name
        self.base_url = config.url
        self.api_key = config.api_key
        self.load = ReplicaLoad(
            name=config.name, weight=config.weight, max_concurrency=config.max_concurrency
        )
        # None until known: configured, or read from the replica's /v1/models.
        self.models: frozenset[str] | None = (
            frozenset(config.models) if config.models is not None else None
        )
        self.model_entries: dict[str, dict[str, Any]] = {
            m: {"id": m, "object": "model", "created": 0, "owned_by": "dp-router"}
            for m in (config.models or ())
        }
        self.healthy = True
        self.ejected_until = 0.0
        self.state = ReplicaState.ACTIVE
        self.slow_start_factor = 1.0

    @property
    def discovers_models(self) -> bool:
        return self.config.models is None

    def routable(self, now: float) -> bool:
        return self.healthy and self.state is ReplicaState.ACTIVE and self.ejected_until <= now

    def set_weight_factor(self, factor: float) -> None:
        self.slow_start_factor = factor
        self.load.weight = self.config.weight * factor

    def describe(self, now: float) -> dict[str, Any]:
        load = self.load
        return {
            "name": self.name,
            "state": self.state.value,
            "healthy": self.healthy,
            "ejected": self.ejected_until > now,
            "routable": self.routable(now),
            "in_flight": load.in_flight,
            "outstanding_tokens": load.outstanding_tokens,
            "weight": load.weight,
            "models": sorted(self.models) if self.models is not None else None,
            "queue_depth": load.queue_depth(now),
            "kv_usage": load.kv_usage,
        }


class Registry:
    """All replicas, plus a model -> replicas index rebuilt when models change."""

    def __init__(self, configs: tuple[ReplicaConfig, ...]) -> None:
        self.replicas: dict[str, Replica] = {c.name: Replica(c) for c in configs}
        self._by_model: dict[str, tuple[Replica, ...]] = {}
        self.reindex()

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas.values())

    def __len__(self) -> int:
        return len(self.replicas)

    def get(self, name: str) -> Replica | None:
        return self.replicas.get(name)

    def reindex(self) -> None:
        by_model: dict[str, list[Replica]] = {}
        for replica in self.replicas.values():
            for model in replica.models or ():
                by_model.setdefault(model, []).append(replica)
        self._by_model = {m: tuple(rs) for m, rs in by_model.items()}

    def set_models(self, replica: Replica, entries: list[dict[str, Any]]) -> bool:
        """Record a replica's discovered models; True if the set changed."""
        models = frozenset(e["id"] for e in entries)
        changed = models != replica.models
        replica.models = models
        replica.model_entries = {e["id"]: e for e in entries}
        if changed:
            self.reindex()
        return changed

    def serving(self, model: str) -> tuple[Replica, ...]:
        return self._by_model.get(model, ())

    def knows_model(self, model: str) -> bool:
        return model in self._by_model

    def models_pending(self) -> bool:
        """Some replica's models are not known yet (never answered /v1/models)."""
        return any(r.models is None for r in self.replicas.values())

    def model_list(self) -> list[dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        for replica in self.replicas.values():
            for model_id, entry in replica.model_entries.items():
                entries.setdefault(model_id, entry)
        return [entries[m] for m in sorted(entries)]
