"""Least outstanding tokens: the work-weighted least-request.

When to use: one gateway (or a few) in front of replicas whose requests
differ widely in cost, which LLM requests do (100x in prompt and output
length), and no replica reports its own queue. Formula: argmin over the
candidates of outstanding_tokens / weight, where a request's tokens are its
prompt estimate plus its expected output (max_tokens, or the model's observed
mean); equal scores are broken by in-flight count, then at random. Source:
the token-load variants of SGLang's router and llm-d's queue scorers: a
request is not a unit of work, so queue depth is counted in tokens as well
as in requests.
Fails when the output estimate is badly off (max_tokens = 32k on every
request makes all replicas look alike) and, across many gateways, because
each only counts its own requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies import signals
from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView
from policies.pick import argmin_ties


class LeastTokens(BasePolicy):
    name = "least_tokens"
    summary = "fewest outstanding tokens (prompt + expected output) per unit weight"

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision:
        if not candidates:
            return NO_CANDIDATE
        ties = argmin_ties(signals.token_loads(candidates))
        if len(ties) > 1:  # equal tokens: fewer requests, then at random
            counts = signals.per_weight(
                [float(candidates[i].in_flight) for i in ties], [candidates[i] for i in ties]
            )
            ties = [ties[j] for j in argmin_ties(counts)]
        i = ties[0] if len(ties) == 1 else ties[int(self.rng.random() * len(ties))]
        chosen = candidates[i]
        return Decision(chosen.name, "least_tokens", {"tokens": float(chosen.outstanding_tokens)})
