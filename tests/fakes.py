"""Test fakes for the policy layer, in one place.

- :class:`Fleet`: a ``policies.base.FleetView`` (version + names), as the
  registry's ``FleetSnapshot`` presents itself to policies.
- :func:`loads_with`: ``ReplicaLoad`` objects with requests already in flight.
- :class:`ScriptedRandom`: an RNG whose ``random()`` returns scripted values
  (Finagle's "override for deterministic tests").
- :func:`choose` / :func:`route`: one pick against a fleet made of the
  candidates unless one is given; ``route`` also dispatches and feeds back.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from policies.base import BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView
from router.load import ReplicaLoad, Ticket, dispatch


@dataclass(frozen=True, slots=True)
class Fleet:
    """A FleetView. Tests that change membership build a new one with a
    higher version, as the registry does."""

    version: int
    names: frozenset[str]

    @staticmethod
    def of(members: Iterable[LoadView | str], version: int = 1) -> Fleet:
        names = frozenset(m if isinstance(m, str) else m.name for m in members)
        return Fleet(version, names)


def loads_with(*in_flight: int, prefix: str = "r") -> list[ReplicaLoad]:
    """``ReplicaLoad`` r0, r1, ... holding the given numbers of 10-token requests."""
    out = []
    for i, k in enumerate(in_flight):
        load = ReplicaLoad(f"{prefix}{i}")
        for _ in range(k):
            dispatch(load, 10)
        out.append(load)
    return out


class ScriptedRandom(random.Random):
    """``random()`` returns the scripted values in order; anything else is seeded."""

    def __init__(self, values: Iterable[float]) -> None:
        super().__init__(0)
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


def choose(
    policy: BasePolicy,
    request: RouteRequest,
    candidates: Sequence[LoadView],
    now: float = 0.0,
    fleet: FleetView | None = None,
) -> Decision:
    """``policy.choose``; by default the candidates are the whole fleet, at version 1
    (pass ``fleet`` when they are a subset, or when membership changes)."""
    return policy.choose(request, candidates, fleet or Fleet.of(candidates), now)


def route(
    policy: BasePolicy,
    candidates: Sequence[ReplicaLoad],
    request: RouteRequest,
    now: float = 0.0,
    fleet: FleetView | None = None,
) -> tuple[Decision, Ticket]:
    """Choose, dispatch to the chosen replica and tell the policy, as the router does."""
    d = choose(policy, request, candidates, now, fleet)
    assert d.replica is not None, d
    load = next(c for c in candidates if c.name == d.replica)
    ticket = dispatch(load, request.cost_tokens)
    policy.on_dispatch(request, d.replica, now)
    return d, ticket
