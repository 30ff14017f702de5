"""The policy contract shared by the gateway and the simulator.

A policy reads a load snapshot and returns a :class:`Decision`. It does no I/O,
awaits nothing and reads no clock (``now`` is an argument); randomness comes
from the ``random.Random`` given at construction. The router, not the policy,
owns the ticket that settles load, so a policy cannot leak it. The same object
runs in the live gateway and in loadtest's discrete-event simulator.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from policies import prefix
from policies.load import LoadView, Outcome


class RouteRequest:
    """What routing may know about a request: parsed once by the data path.

    ``expected_output_tokens`` is max_tokens when given, else the per-model
    EWMA of observed output. ``block_hashes`` are the chained prefix-block
    hashes of ``prompt_text`` (policies/prefix.py), computed on first use and
    kept: only prefix-aware policies pay for hashing a 100 KB prompt.
    """

    __slots__ = (
        "_block_hashes",
        "expected_output_tokens",
        "max_tokens",
        "model",
        "prompt_text",
        "prompt_tokens",
        "request_id",
        "session_key",
        "stream",
    )

    def __init__(
        self,
        model: str,
        *,
        stream: bool = False,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
        expected_output_tokens: int = 0,
        session_key: str | None = None,
        prompt_text: str = "",
        block_hashes: tuple[int, ...] | None = None,
        request_id: str = "",
    ) -> None:
        self.model = model
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.expected_output_tokens = expected_output_tokens
        self.session_key = session_key
        self.prompt_text = prompt_text
        self._block_hashes = block_hashes
        self.request_id = request_id

    @property
    def block_hashes(self) -> tuple[int, ...]:
        hashes = self._block_hashes
        if hashes is None:
            hashes = self._block_hashes = prefix.block_hashes(self.prompt_text)
        return hashes

    @property
    def cost_tokens(self) -> int:
        """Outstanding-token weight of this request: prompt + expected output."""
        return self.prompt_tokens + self.expected_output_tokens

    def __repr__(self) -> str:
        return (
            f"RouteRequest(model={self.model!r}, stream={self.stream}, "
            f"prompt_tokens={self.prompt_tokens}, max_tokens={self.max_tokens})"
        )


@dataclass(frozen=True, slots=True, init=False)
class Decision:
    """A policy's answer: the chosen replica's name (None: nothing eligible),
    the inputs it compared (for debug logs) and a short, bounded reason (for a
    metric label)."""

    replica: str | None
    reason: str
    inputs: Mapping[str, float] = field(default_factory=dict)

    def __init__(
        self, replica: str | None, reason: str, inputs: Mapping[str, float] | None = None
    ) -> None:
        # One per request: the frozen dataclass's own __init__ goes through
        # object.__setattr__ per field, 7.1k instructions against 4.9k for
        # the slots' setters (callgrind). Still frozen: assignment raises.
        _set_replica(self, replica)
        _set_reason(self, reason)
        _set_inputs(self, {} if inputs is None else inputs)


def slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    """The ``__set__`` of ``cls``'s slot ``name``: how a frozen slots
    dataclass's hand-written ``__init__`` sets a field cheaply."""
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


_set_replica = slot_setter(Decision, "replica")
_set_reason = slot_setter(Decision, "reason")
_set_inputs = slot_setter(Decision, "inputs")


class FleetView(Protocol):
    """What a policy may know of the fleet: its membership, and a version that
    changes whenever membership or a replica's status changes.

    Policies key per-replica state (schedules, prefix index, EWMAs) by replica
    name and reconcile it with ``names`` when ``version`` changes, never with
    one request's candidate list: a request for model A sees only A's
    replicas, and pruning by it would forget every other model's state.
    """

    @property
    def version(self) -> int: ...
    @property
    def names(self) -> frozenset[str]: ...


class Policy(Protocol):
    """What the router calls. ``candidates`` are already filtered (model,
    health, drain, pool, retries) and non-empty; ``fleet`` is the whole fleet
    they were drawn from."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision: ...

    def on_dispatch(self, request: RouteRequest, replica: str, now: float) -> None: ...

    def on_complete(
        self, request: RouteRequest, replica: str, outcome: Outcome, now: float
    ) -> None: ...

    def observe(
        self, replica: str, ttft_s: float | None, tpot_s: float | None, now: float
    ) -> None: ...


class BasePolicy:
    """Default no-op feedback hooks, the common constructor, and fleet tracking.

    A policy with per-replica state calls :meth:`sync_fleet` first thing in
    ``choose`` and overrides :meth:`on_membership`: when the fleet's version
    changes and its names differ from the last ones seen, the hook gets the
    new membership and drops the state of replicas that left. Feedback
    (``on_dispatch``, ``observe``) about a replica outside the last membership
    seen is ignored (:meth:`is_member`), so a late completion from a removed
    replica cannot bring its state back.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, rng: random.Random | None = None, **params: Any) -> None:
        if params:
            raise TypeError(f"unknown parameter(s) for policy {self.name}: {sorted(params)}")
        self.rng = rng if rng is not None else random.Random(0)
        self._fleet_version: int | None = None
        # None until the first choose(): feedback before that is accepted and
        # reconciled with the first membership seen.
        self._members: frozenset[str] | None = None

    def sync_fleet(self, fleet: FleetView) -> None:
        """Call :meth:`on_membership` if ``fleet`` is a new version with new names.

        One integer comparison per call; the names are compared only when the
        version moved (health or drain changes bump it without changing them).
        """
        version = fleet.version
        if version == self._fleet_version:
            return
        self._fleet_version = version
        names = fleet.names
        if names != self._members:
            self._members = names
            self.on_membership(names)

    def on_membership(self, names: frozenset[str]) -> None:
        """The fleet now has exactly these replicas: forget state about any other."""
        return None

    def is_member(self, replica: str) -> bool:
        """True unless a membership is known and ``replica`` is not in it."""
        members = self._members
        return members is None or replica in members

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision:
        raise NotImplementedError

    def on_dispatch(self, request: RouteRequest, replica: str, now: float) -> None:
        return None

    def observe(self, replica: str, ttft_s: float | None, tpot_s: float | None, now: float) -> None:
        """A successful request's time to first token and mean time per output
        token (either may be None): the latency feedback Peak-EWMA needs."""
        return None

    def on_complete(
        self, request: RouteRequest, replica: str, outcome: Outcome, now: float
    ) -> None:
        return None


NO_CANDIDATE = Decision(replica=None, reason="no_candidate")
