"""Least outstanding requests, weighted, ties broken at random.

When to use: a fleet of similar replicas where request counts are a fair proxy
for work, and no replica reports its own queue. Formula: pick argmin of
in_flight / weight over the candidates (this gateway's own in-flight count);
equal scores are broken uniformly with the injected RNG so that many idle
replicas do not all lose to the first one listed. Source: Envoy's
LEAST_REQUEST (full-scan variant), HAProxy ``leastconn``. Fails when
requests differ widely in cost (a replica with one 8k-token generation looks
as free as one with one 10-token request) and, across many gateways, because
each only sees its own in-flight requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView


class LeastRequest(BasePolicy):
    name = "least_request"
    summary = "fewest in-flight requests per unit weight, random tie-break"

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision:
        if not candidates:
            return NO_CANDIDATE
        best: list[LoadView] = []
        best_score = float("inf")
        for c in candidates:
            score = c.in_flight / c.weight if c.weight > 0 else float("inf")
            if score < best_score:
                best, best_score = [c], score
            elif score == best_score:
                best.append(c)
        if not best:  # every weight is 0: fall back to plain counts
            best = list(candidates)
        chosen = best[0] if len(best) == 1 else best[self.rng.randrange(len(best))]
        return Decision(chosen.name, "least_request", {"in_flight": float(chosen.in_flight)})
