"""Smooth weighted round-robin (earliest deadline first): the baseline to beat.

When to use: identical replicas and requests of similar cost, or as a control
in the simulator. Formula (Envoy's EDF scheduler): each replica has a virtual
deadline; the earliest wins (ties: candidate order) and its deadline moves
1 / weight later. Over any window each replica gets its weight's share,
interleaved rather than in bursts (weights 1:2:3 never give the heaviest
three in a row), and a pick costs O(log N) heap work plus an O(N) C-speed
lookup of the candidate set's schedule.

One schedule per candidate set (the tuple of candidate names, in order), each
with its own virtual time: a fleet serving two models sees two candidate sets
in turn, and each model's requests rotate over that model's replicas. A set
seen for the first time (a new model, a replica that left or came back, a
retry excluding a replica) starts from the deadlines of the schedule used
last: replicas it shares keep their place, newcomers start one period after
that schedule's current time, so churn neither starves nor floods anyone.
A weight change rebuilds that set's schedule the same way. Schedules that
name a replica which left the fleet are dropped when the membership changes.

Source: Envoy ``edf_scheduler.h`` and nginx's smooth WRR, which produce the
same interleaving. Theory: with equal weights each of N replicas sees
Erlang-N inter-arrivals, an E_N/M/1 queue, roughly halving random's mean
sojourn (5.78 vs 10 service times at N = 8, load 0.9; loadtest/sim/theory.py
checks the simulator against it). Fails when requests differ in cost (LLM requests
do, by 100x): it keeps feeding a replica stuck on long generations, and a
slow replica gets its full share whatever its queue (unstable at 1.5x
slower, load 0.8).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView

# Candidate sets remembered at once. Steady state is one per model (times
# canary pools); retries and health changes add transient ones. The bound
# keeps a long run of distinct retry sets from growing memory without limit;
# an evicted set that comes back restarts from the last-used schedule's
# deadlines, which costs at most one period of unevenness, not correctness.
MAX_SCHEDULES = 1024


class _Schedule:
    """The EDF state of one candidate set: deadlines and virtual time."""

    __slots__ = ("deadline", "heap", "names", "now", "weights")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.weights: list[float] = []
        # (deadline, position in the candidate list) per schedulable replica.
        self.heap: list[tuple[float, int]] = []
        self.deadline: dict[str, float] = {}
        self.now = 0.0  # virtual time: the last deadline served

    def rebuild(self, weights: list[float], seed: _Schedule | None) -> None:
        """(Re)start the heap with ``weights``, keeping ``seed``'s deadlines
        (capped at one period ahead) and virtual time."""
        old = seed.deadline if seed is not None else {}
        now = seed.now if seed is not None else 0.0
        deadline: dict[str, float] = {}
        heap = []
        for i, (name, w) in enumerate(zip(self.names, weights, strict=True)):
            if w <= 0:
                continue
            d = old.get(name)
            if d is None or d > now + 1.0 / w:
                d = now + 1.0 / w
            deadline[name] = d
            heap.append((d, i))
        heapq.heapify(heap)
        self.heap, self.deadline, self.weights, self.now = heap, deadline, weights, now


class RoundRobin(BasePolicy):
    name = "round_robin"
    summary = "smooth weighted round-robin (EDF, as Envoy); baseline, ignores load"

    def __init__(self, **params: object) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        self._schedules: OrderedDict[tuple[str, ...], _Schedule] = OrderedDict()
        self._last: _Schedule | None = None

    def on_membership(self, names: frozenset[str]) -> None:
        gone = [key for key in self._schedules if not names.issuperset(key)]
        for key in gone:
            del self._schedules[key]

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision:
        if not candidates:
            return NO_CANDIDATE
        self.sync_fleet(fleet)
        key = tuple([c.name for c in candidates])
        weights = [c.weight for c in candidates]
        schedules = self._schedules
        sched = schedules.get(key)
        if sched is None:
            sched = schedules[key] = _Schedule(key)
            sched.rebuild(weights, self._last)
            if len(schedules) > MAX_SCHEDULES:
                schedules.popitem(last=False)
        else:
            schedules.move_to_end(key)
            if weights != sched.weights:
                sched.rebuild(weights, sched)
        self._last = sched
        heap = sched.heap
        if not heap:  # every weight is 0: plain rotation by position
            sched.now += 1.0
            i = int(sched.now) % len(candidates)
            return Decision(candidates[i].name, "round_robin_all_zero")
        d, i = heap[0]
        name = key[i]
        nxt = d + 1.0 / weights[i]
        heapq.heapreplace(heap, (nxt, i))
        sched.deadline[name] = nxt
        sched.now = d
        return Decision(name, "round_robin")
