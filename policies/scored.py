"""Scored composition: filters, then weighted scorers in [0, 1], then a picker.

When to use: when one signal is not enough, typically prefix-cache affinity
traded against queue depth and KV-cache pressure, with weights an operator
can tune in config instead of in code.

Source: llm-d's scheduler (filter -> scorer -> picker, scorers in [0, 1]
weighted by the framework). Formula: each step below states its own.

1. Filters drop candidates; if they drop all, the unfiltered list is used
   (reason suffix ``_unfiltered``) rather than failing a request that some
   replica could serve.
   - ``capacity``: ``LoadView.has_capacity()`` (below max_concurrency).
   - ``load_bound``: in_flight < ``policies.load.load_bound(total, n, epsilon)``,
     the design's one load bound.
2. Scorers, each in [0, 1], higher is better, combined as
   sum_k weight_k * score_k / sum_k weight_k:
   - ``queue``: (max_q - q) / (max_q - min_q) over the candidates, queue per
     weight (LoadView.queue_depth); 1 for all when all are equal (llm-d's
     queue scorer).
   - ``tokens``: the same over outstanding tokens per weight.
   - ``kv``: 1 - kv_usage; if any candidate has no fresh KV report, the
     queue score is used in its place for every candidate (one unit).
   - ``prefix``: matched leading blocks / the prompt's blocks, from the
     approximate cache map (:class:`PrefixIndex`), 0 for prompts without a
     full block. The map is kept per replica name across models; a
     replica's entries are dropped only when it leaves the fleet.
   With ``expert_capacity`` (on by default) and an expert slowdown ``s``
   for every candidate (``LoadView.expert_slowdown``, from MoE per-expert
   counters: ``policies.signals.expert_slowdown``), the queue and tokens
   scorers compare ``(load + this request) / weight * s`` instead of
   ``load / weight``: the time to work through the queue on a replica whose
   steps take ``s`` times as long (join-the-shortest-expected-delay over
   servers of different speeds). The request's own unit makes an idle slow
   replica lose to an idle fast one; without slowdowns (dense models, no
   telemetry, one stale report) the scores are exactly those without it,
   because min-max is blind to the shift. On by default because it is a
   no-op without MoE telemetry and, with it, corrects a capacity the queue
   shows only after requests have piled up (``python -m
   loadtest.expert_compare`` measures it).
3. Picker: ``max`` (highest total, ties at random; llm-d's max-score picker)
   or ``weighted`` (probability proportional to total score, llm-d's random
   picker, which spreads when scores are close).

Default weights ``{"queue": 1, "kv": 1, "prefix": 2}``: prefix weighs double
because a hit saves prefill outright while queue and KV differences between
near-equal replicas are noise; the load_bound filter keeps that preference
from melting a replica. How it fails: min-max normalisation exaggerates tiny
differences (queues 3 and 4 score 1 and 0), so weights are relative, not
absolute; the cost is O(N) per pick with a constant several times a plain
scan (target < 1 ms at 1,000 replicas).

Parameters: ``weights`` (table), ``filters`` (list), ``picker``,
``epsilon`` (for load_bound, 0.5), ``capacity_blocks``, ``max_blocks``,
``expert_capacity`` (true).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from policies import signals
from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView, Outcome, load_bound
from policies.prefix_affinity import DEFAULT_EPSILON, check_epsilon
from policies.prefix_index import DEFAULT_CAPACITY_BLOCKS, DEFAULT_MAX_BLOCKS, PrefixIndex

SCORERS = ("queue", "tokens", "kv", "prefix")
FILTERS = ("capacity", "load_bound")
PICKERS = ("max", "weighted")
DEFAULT_WEIGHTS: Mapping[str, float] = {"queue": 1.0, "kv": 1.0, "prefix": 2.0}
DEFAULT_FILTERS = ("capacity", "load_bound")
INF = float("inf")


def _minmax(values: list[float]) -> list[float]:
    """(max - v) / (max - min): 1 for the least loaded, 0 for the most; all 1
    when all are equal. Infinite loads (weight 0) score 0 and do not stretch
    the scale of the others."""
    if INF not in values:  # the common case: one pass, no per-item INF test
        lo, hi = min(values), max(values)
        if hi == lo:
            return [1.0] * len(values)
        scale = 1.0 / (hi - lo)
        return [(hi - v) * scale for v in values]
    finite = [v for v in values if v != INF]
    if not finite:
        return [1.0] * len(values)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        return [0.0 if v == INF else 1.0 for v in values]
    span = hi - lo
    return [0.0 if v == INF else (hi - v) / span for v in values]


def _slowed(
    vals: list[float], extra: float, candidates: Sequence[LoadView], slow: list[float]
) -> list[float]:
    """(load per weight + ``extra`` per weight) x slowdown, per candidate."""
    return [
        (v + extra / c.weight) * s if c.weight > 0 else INF
        for v, c, s in zip(vals, candidates, slow, strict=True)
    ]


def _combine(ws: list[float], cols: list[list[float]]) -> list[float]:
    """sum_k ws[k] * cols[k][i] for every i, in one pass (one pass per scorer
    was the largest cost of a 1,000-replica pick)."""
    if len(cols) == 1:
        (w0,), (a,) = ws, cols
        return [w0 * x for x in a]
    if len(cols) == 2:
        w0, w1 = ws
        return [w0 * x + w1 * y for x, y in zip(*cols, strict=True)]
    if len(cols) == 3:
        w0, w1, w2 = ws
        return [w0 * x + w1 * y + w2 * z for x, y, z in zip(*cols, strict=True)]
    totals = [0.0] * len(cols[0])
    for w, col in zip(ws, cols, strict=True):
        totals = [t + w * v for t, v in zip(totals, col, strict=True)]
    return totals


class Scored(BasePolicy):
    name = "scored"
    summary = "filters -> weighted scorers in [0, 1] (queue, tokens, kv, prefix) -> picker"

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        filters: Sequence[str] = DEFAULT_FILTERS,
        picker: str = "max",
        epsilon: float = DEFAULT_EPSILON,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        expert_capacity: bool = True,
        **params: object,
    ) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        if weights is not None and not isinstance(weights, Mapping):
            raise TypeError(f"scored: weights must be a table of scorer = weight, got {weights!r}")
        w = dict(DEFAULT_WEIGHTS if weights is None else weights)
        for k, v in w.items():
            if k not in SCORERS:
                raise TypeError(f"scored: unknown scorer {k!r}; known: {', '.join(SCORERS)}")
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise TypeError(f"scored: weight of {k!r} must be a number >= 0, got {v!r}")
        if not any(v > 0 for v in w.values()):
            raise TypeError("scored: at least one scorer needs a positive weight")
        if isinstance(filters, str) or any(f not in FILTERS for f in filters):
            raise TypeError(f"scored: filters must be a list of {', '.join(FILTERS)}")
        if not isinstance(expert_capacity, bool):
            raise TypeError(
                f"scored: expert_capacity must be true or false, got {expert_capacity!r}"
            )
        if picker not in PICKERS:
            raise TypeError(f"scored: picker must be one of {', '.join(PICKERS)}")
        self.weights = {k: float(v) for k, v in w.items() if v > 0}
        self.filters = tuple(filters)
        self.picker = picker
        self.expert_capacity = expert_capacity
        self.epsilon = check_epsilon(self.name, epsilon)
        self.index = PrefixIndex(capacity_blocks, max_blocks)

    def on_membership(self, names: frozenset[str]) -> None:
        self.index.forget(names)

    def _filter(self, candidates: Sequence[LoadView]) -> Sequence[LoadView]:
        out = candidates
        if "capacity" in self.filters:
            # LoadView.has_capacity, inlined (a method call per replica is
            # a third of the budget at 1,000 replicas).
            out = [c for c in out if (m := c.max_concurrency) is None or c.in_flight < m]
        if "load_bound" in self.filters and out:
            total = sum([c.in_flight for c in candidates])
            bound = load_bound(total, len(candidates), self.epsilon)
            out = [c for c in out if c.in_flight < bound]
        return out

    def scores(
        self, request: RouteRequest, candidates: Sequence[LoadView], now: float
    ) -> dict[str, list[float]]:
        """Each configured scorer's scores, in candidate order (for tests and debugging)."""
        out: dict[str, list[float]] = {}
        queue: list[float] | None = None
        weights = self.weights
        slow = signals.expert_slowdowns(candidates) if self.expert_capacity else None
        if "queue" in weights or "kv" in weights:
            qs = signals.queue_depths(candidates, now)
            queue = _minmax(qs if slow is None else _slowed(qs, 1.0, candidates, slow))
            if "queue" in weights:
                out["queue"] = queue
        if "tokens" in weights:
            ts = signals.token_loads(candidates)
            if slow is not None:
                ts = _slowed(ts, float(request.cost_tokens), candidates, slow)
            out["tokens"] = _minmax(ts)
        if "kv" in weights:
            kv = signals.kv_usages(candidates, now)
            if None in kv or queue is None:
                out["kv"] = queue if queue is not None else [1.0] * len(candidates)
            else:
                out["kv"] = [1.0 - v for v in kv]  # type: ignore[operator]
        if "prefix" in weights:
            hashes = request.block_hashes[: self.index.max_blocks]
            if hashes:
                depths = self.index.match_depths(hashes, {c.name for c in candidates})
                k = float(len(hashes))
                out["prefix"] = [depths.get(c.name, 0) / k for c in candidates]
            else:
                out["prefix"] = [0.0] * len(candidates)
        return out

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
        reason = "scored"
        pool = self._filter(candidates)
        if not pool:
            pool, reason = candidates, "scored_unfiltered"
        if len(pool) == 1:
            return Decision(pool[0].name, reason)
        per = self.scores(request, pool, now)
        weights = self.weights
        total_w = sum(weights.values())
        totals = _combine([weights[k] / total_w for k in per], list(per.values()))
        if self.picker == "weighted" and sum(totals) > 0:
            x = self.rng.random() * sum(totals)
            i = 0
            acc = totals[0]
            while acc <= x and i < len(totals) - 1:
                i += 1
                acc += totals[i]
        else:
            best = max(totals)
            ties = [j for j, t in enumerate(totals) if t == best]
            i = ties[0] if len(ties) == 1 else ties[int(self.rng.random() * len(ties))]
        inputs = {k: v[i] for k, v in per.items()}
        inputs["score"] = totals[i]
        slowdown = pool[i].expert_slowdown
        if self.expert_capacity and slowdown is not None:
            inputs["expert_slowdown"] = slowdown
        return Decision(pool[i].name, reason, inputs)

    def on_dispatch(self, request: RouteRequest, replica: str, now: float) -> None:
        if "prefix" in self.weights:
            hashes = request.block_hashes
            if hashes and self.is_member(replica):
                self.index.insert(replica, hashes)

    def on_complete(
        self, request: RouteRequest, replica: str, outcome: Outcome, now: float
    ) -> None:
        return None
