"""Queue-depth-aware: the shortest reported queue, corrected locally (default).

When to use: the default. Replicas (vLLM, SGLang) report waiting + running
requests; this gateway adds what it sent since the report and subtracts what
settled, so a burst arriving between two reports sees every request it has
just placed and does not herd onto the replica that looked idle in the last
report. Without reports it is this gateway's in-flight count (least
requests), so it works from day one; a report older than
``policies.load.DEFAULT_REPORT_MAX_AGE_S`` ages out the same way.

Formula: argmin over candidates of queue_depth / weight, where queue_depth =
max(reported + sent_since - settled_since, in_flight, 0); ties go to fewer
outstanding tokens per weight (the cheaper backlog), then at random.
Source: join-the-shortest-queue (Winston 1977: optimal for identical
exponential servers among policies that see queue lengths only; at N = 8,
load 0.9 its mean sojourn, 2.12 service times, lies between the pooled
M/M/N bound's 1.88 and P2C's 3.10, as loadtest/sim/theory.py checks),
SGLang's and llm-d's queue scorers, vLLM production-stack's "least loaded".
With ``d`` > 0 it
samples d candidates first (power of d choices on the same signal) instead
of scanning all: for many gateways sharing replicas, or for 1,000+ replicas.

How it fails: the reported queue counts requests, not their cost (a replica
with one 32k-token prompt queued looks short); with many gateways each one's
correction only covers its own sends, so between reports they can still pile
onto the same replica (use ``d`` = 2 there); a replica that fails fast has a
short queue and attracts traffic (outlier ejection, not this policy, handles
that).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies import signals
from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView
from policies.pick import argmin_ties, sample_indices


class QueueDepth(BasePolicy):
    name = "queue_depth"
    summary = "shortest reported queue + local correction (in-flight without reports); default"

    def __init__(self, *, d: int = 0, **params: object) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise TypeError(f"queue_depth: d must be an integer >= 0 (0 = all), got {d!r}")
        self.d = d

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision:
        n = len(candidates)
        if n == 0:
            return NO_CANDIDATE
        if 0 < self.d < n:
            candidates = [candidates[i] for i in sample_indices(n, self.d, False, self.rng)]
        qs = signals.queue_depths(candidates, now)
        ties = argmin_ties(qs)
        if len(ties) > 1:
            # Equal queues: the cheaper backlog (fewer outstanding tokens) wins.
            toks = signals.token_loads([candidates[i] for i in ties])
            ties = [ties[j] for j in argmin_ties(toks)]
        i = ties[0] if len(ties) == 1 else ties[int(self.rng.random() * len(ties))]
        chosen, best_q = candidates[i], qs[i]
        return Decision(chosen.name, "queue_depth", {"queue": best_q})
