"""Latency-aware Peak-EWMA over TTFT and per-token time (Finagle's P2CPeakEwma).

When to use: replicas of unequal speed (a slower GPU, a noisy neighbour, a
thermally throttled card, a replica with a cold prefix cache) where queue
lengths alone hide that one queue drains 10x slower. Formula, per replica:

    cost(now) = ttft_peak(now) + tpot_peak(now) * max(expected_output_tokens, 1)
    load      = cost * (in_flight + 1)

and the smaller load of ``d`` sampled candidates wins (d = 0: all). Each
``*_peak`` is a peak-sensitive EWMA (:class:`PeakEwma`, Finagle's rule): a
sample above the current value replaces it at once, a smaller one is blended
in with weight 1 - exp(-dt / tau), and with no samples the value decays as
exp(-dt / tau) (so a replica that was slow a while ago is probed again).

Why TTFT and TPOT, not whole-request latency: an LLM stream lasts as long as
its output is long; Finagle notes that Peak-EWMA breaks down for long-lived
requests, and a 2,000-token answer would make a fast replica look slow. TTFT
measures queueing + prefill there, TPOT its decode speed; the request's
expected output scales the second.

Cold start (the documented rule, Finagle's): a replica with no latency
sample yet and nothing in flight has load 0, so it is tried next and gets a
sample; one with no sample but requests in flight has load PENALTY +
in_flight, so the gateway does not pile onto a replica it knows nothing
about, and cold replicas rank among themselves by in-flight count.

Samples: the router (and the simulator) call :meth:`PeakEwmaPolicy.observe`
with each request's TTFT and mean TPOT. If the router never does, the policy
reads the router's plain EWMAs (``LoadView.ttft`` / ``.tpot``) instead,
which are smoother: peaks show up later. The peak EWMAs are kept per
replica name across models and dropped only when the replica leaves the
fleet.

Source: Finagle ``PeakEwma.scala`` / ``Balancers.p2cPeakEwma`` (decayTime
10 s), linkerd2-proxy and tower's ``PeakEwma``. How it fails: latency is a
lagging signal (a replica is slow because it is already loaded, so the
signal arrives after the queue); with many idle replicas the decay sends a
probe to a slow one every ~tau seconds; and a replica that errors fast
looks fast (outlier ejection covers that).

Parameters: ``d`` (default 2), ``tau`` seconds (default 10).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView
from policies.pick import sample_indices

# Finagle's default decayTime: long enough to ride out one slow request,
# short enough that a replica that recovered is trusted again within ~30 s.
DEFAULT_TAU_S = 10.0
# Load of a replica with requests in flight but no latency sample yet:
# larger than any real cost * (pending + 1) (a week of seconds), so it ranks
# after every measured replica; Finagle uses Long.MaxValue >> 16 nanoseconds.
PENALTY = 1e6


class PeakEwma:
    """Finagle's peak-sensitive EWMA with time as an argument.

    ``observe(sample, now)``: above the current value it jumps there; below,
    it is blended in with weight ``1 - exp(-dt / tau)``. ``get(now)`` is the
    value decayed for the time since the last sample (Finagle's ``observe(0)``
    before reading), computed without mutating.
    """

    __slots__ = ("cost", "stamp", "tau")

    def __init__(self, tau: float = DEFAULT_TAU_S) -> None:
        self.tau = tau
        self.cost = 0.0
        self.stamp: float | None = None

    def observe(self, sample: float, now: float) -> None:
        if self.stamp is None or sample > self.cost:
            self.cost = sample
        else:
            w = math.exp(-max(0.0, now - self.stamp) / self.tau)
            self.cost = self.cost * w + sample * (1.0 - w)
        self.stamp = now

    def get(self, now: float) -> float:
        if self.stamp is None:
            return 0.0
        return self.cost * math.exp(-max(0.0, now - self.stamp) / self.tau)


class _Latency:
    __slots__ = ("tpot", "ttft")

    def __init__(self, tau: float) -> None:
        self.ttft = PeakEwma(tau)
        self.tpot = PeakEwma(tau)


def peak_load(cost: float, pending: int) -> float:
    """Finagle's load: cost * (pending + 1), with the cold-start penalty."""
    if cost == 0.0 and pending != 0:
        return PENALTY + pending
    return cost * (pending + 1)


class PeakEwmaPolicy(BasePolicy):
    name = "peak_ewma"
    summary = "P2C over peak-EWMA of TTFT + TPOT x expected tokens, times (in-flight + 1)"

    def __init__(self, *, d: int = 2, tau: float = DEFAULT_TAU_S, **params: object) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise TypeError(f"peak_ewma: d must be an integer >= 0 (0 = all), got {d!r}")
        if not isinstance(tau, int | float) or isinstance(tau, bool) or not tau > 0:
            raise TypeError(f"peak_ewma: tau must be a positive number, got {tau!r}")
        self.d = d
        self.tau = float(tau)
        self._lat: dict[str, _Latency] = {}

    def on_membership(self, names: frozenset[str]) -> None:
        for gone in [k for k in self._lat if k not in names]:
            del self._lat[gone]

    def observe(self, replica: str, ttft_s: float | None, tpot_s: float | None, now: float) -> None:
        """Feed one request's measured TTFT and mean per-token time (either may be None)."""
        lat = self._lat.get(replica)
        if lat is None:
            if not self.is_member(replica):
                return  # it left the fleet: a late completion must not revive it
            lat = self._lat[replica] = _Latency(self.tau)
        if ttft_s is not None:
            lat.ttft.observe(ttft_s, now)
        if tpot_s is not None:
            lat.tpot.observe(tpot_s, now)

    def cost(self, load: LoadView, tokens: int, now: float) -> float:
        """Expected latency of one more request of ``tokens`` output tokens (0: unknown)."""
        lat = self._lat.get(load.name)
        if lat is not None:
            return lat.ttft.get(now) + lat.tpot.get(now) * tokens
        ttft, tpot = load.ttft.value, load.tpot.value
        return (ttft or 0.0) + (tpot or 0.0) * tokens

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
        self.sync_fleet(fleet)
        if n == 1:
            return Decision(candidates[0].name, "single_candidate")
        picks = (
            [candidates[i] for i in sample_indices(n, self.d, False, self.rng)]
            if 0 < self.d < n
            else candidates
        )
        tokens = max(request.expected_output_tokens, 1)
        best: LoadView | None = None
        best_load = float("inf")
        inputs: dict[str, float] = {}
        ties = 0
        for c in picks:
            w = c.weight
            value = peak_load(self.cost(c, tokens, now), c.in_flight)
            value = value / w if w > 0 else float("inf")
            if len(inputs) < 8:
                inputs[c.name] = value
            if value < best_load or best is None:
                best, best_load, ties = c, value, 1
            elif value == best_load:
                # Reservoir-sample among ties: uniform without building a list.
                ties += 1
                if int(self.rng.random() * ties) == 0:
                    best = c
        assert best is not None
        return Decision(best.name, "peak_ewma", inputs)
