"""Power of d choices over any load signal (P2C at the default d = 2).

When to use: large fleets, many gateways, or any place a full scan is too
slow or too synchronised: sampling keeps independent gateways from all
herding onto the one least-loaded replica between two load reports. Formula:
draw d candidates uniformly (distinct by default; ``replacement=True`` draws
independently, as in the theory), read one signal for those d in one unit
(policies/signals.py, with its fallback), and pick the smallest; equal
values go to the one drawn first, which is itself random.

Source: Mitzenmacher, "The Power of Two Choices in Randomized Load
Balancing" (IEEE TPDS 2001) and Vvedenskaya et al. 1996; tower's
``p2c::Balance``, Finagle's P2C, Envoy's LEAST_REQUEST with choice_count.
Theory: in the supermarket model the mean sojourn falls from 1 / (1 - lambda)
(random) to sum_i lambda^((d^i - d) / (d - 1)), e.g. 10 -> 2.61 at
lambda = 0.9, d = 2 (loadtest/sim/theory.py checks the simulator against
this formula at N = 100). With one busy replica out of
three, distinct sampling never picks it; with replacement it does 1/9 of
the time (both draws land on it). How it fails: it only ever avoids the
worse of d, so with a few replicas it is measurably worse than a full scan
(JSQ 2.1 vs P2C 3.1 at N = 8, rho = 0.9), and it is only as good as the
signal (in_flight across many gateways sees a fraction of the load).

Parameters: ``signal`` (default ``queue``), ``d`` (default 2),
``replacement`` (default False).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies import signals
from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView
from policies.pick import sample_indices


class PowerOfChoices(BasePolicy):
    name = "p2c"
    summary = "power of d choices (default 2, distinct) over a load signal (default queue)"

    def __init__(
        self, *, signal: str = "queue", d: int = 2, replacement: bool = False, **params: object
    ) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise TypeError(f"p2c: d must be an integer >= 1, got {d!r}")
        if not isinstance(replacement, bool):
            raise TypeError(f"p2c: replacement must be a boolean, got {replacement!r}")
        try:
            self.signal = signals.get(signal)
        except ValueError as exc:
            raise TypeError(f"p2c: {exc}") from None
        self.d = d
        self.replacement = replacement

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
        if n == 1:
            return Decision(candidates[0].name, "single_candidate")
        picks = [candidates[i] for i in sample_indices(n, self.d, self.replacement, self.rng)]
        used, vals = signals.values(self.signal, picks, now)
        best = 0
        for i in range(1, len(vals)):
            if vals[i] < vals[best]:
                best = i
        inputs = {p.name: v for p, v in zip(picks, vals, strict=True)}
        reason = "p2c" if used == self.signal.name else f"p2c_fallback_{used}"
        return Decision(picks[best].name, reason, inputs)
