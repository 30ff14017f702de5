"""Per-expert (MoE) telemetry: routed-token and overflow counters per replica.

Why a gateway cares: with expert parallelism a replica's MoE layers run at
the pace of their busiest expert (one expert at 3x the mean cuts those
layers to a third of their throughput), and capacity-factor engines drop the
tokens an expert cannot take, which degrades answers without an error.
Backends report cumulative per-expert counters (telemetry sources in
router/telemetry/ turn them into :class:`ExpertSample` values); this module
keeps them and derives, per replica over a sliding window:

- ``imbalance``: max / mean routed tokens per expert (1 = balanced);
- the ``top_k`` hot experts (their load as a multiple of the mean);
- ``overflow_rate``: dropped / routed tokens, where the engine reports drops;
- ``slowdown``: the step time relative to a balanced replica
  (``policies.signals.expert_slowdown``), which the gateway writes into
  ``ReplicaLoad.expert_slowdown`` for the policies.

and fleet-wide per expert (replicas with the same number of experts summed).

Counters are cumulative, so a lost report loses nothing: the next delta
covers both intervals. A counter that goes down is a restart and, as in
Prometheus's ``rate()``, its new value is the delta. Pure of I/O: time comes
in as ``now``.

Memory is bounded whatever the sources send: only fleet members are kept
(``set_members``), at most ``max_experts`` experts and ``max_layers``
layers per replica, and the window is a fixed ring of ``WINDOW_BUCKETS``
buckets. Layers are summed into one vector unless ``per_layer``. Bad samples
(negative or non-finite counts, too many experts, mismatched lengths, an
out-of-range layer) are rejected and counted by reason, never stored.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from policies.signals import expert_slowdown
from router.config import ExpertsConfig

# The window is kept as this many time buckets (plus the one filling): the
# memory of a replica is fixed, and the window's edge is accurate to a tenth.
WINDOW_BUCKETS = 10
# Below this mean of tokens per expert in the window, max / mean is sampling
# noise (Poisson: the max of E experts at mean m sits ~sqrt(2 ln E / m)
# above the mean), and an engine's grouped GEMM is bound on loading the
# expert's weights rather than on its tokens (loadtest/engine/moe.py floors at
# 16 per step). Loads are floored here before max / mean, so a quiet replica
# reads as balanced instead of "25x imbalanced" on ten tokens.
MIN_TOKENS_PER_EXPERT = 32.0

# Why a sample was refused; label values of dp_router_expert_samples_rejected_total.
REJECT_REASONS = (
    "unknown_replica",  # not a fleet member (memory must not grow per name)
    "empty",  # no experts
    "too_many_experts",  # more than [experts] max_experts
    "bad_layer",  # negative, or >= [experts] max_layers
    "length_mismatch",  # overflow vs tokens, or experts differ within one report
    "duplicate_layer",  # one layer twice in one report
    "not_finite",  # NaN or infinity
    "negative",  # a counter below zero
    "overflow_exceeds_tokens",  # more dropped than routed
)


@dataclass(frozen=True, slots=True)
class ExpertSample:
    """One replica's cumulative per-expert counters, as one report gives them.

    ``tokens[i]``: tokens routed to expert ``i`` since the engine started
    (a counter: deltas survive lost reports; a decrease means a restart).
    ``overflow``: tokens dropped by a capacity factor, per expert, or None
    for dropless engines (vLLM, SGLang), whose imbalance is the signal.
    ``layer``: the MoE layer, or None when the source aggregates layers.
    ``rank``: the DP rank whose counters these are, or None for the whole
    replica. Each rank restarts on its own, so deltas are taken per
    (layer, rank) and summed after: summing counters first would read one
    rank's restart as the whole replica's (Prometheus: rate, then sum).
    """

    layer: int | None
    tokens: tuple[float, ...]
    overflow: tuple[float, ...] | None = None
    rank: str | None = None


@dataclass(frozen=True, slots=True)
class HotExpert:
    """One of a replica's busiest experts: ``load`` is its tokens over the
    mean per expert (3.0 = three times its share), ``share`` its fraction of
    all routed tokens."""

    expert: int
    load: float
    share: float


@dataclass(frozen=True, slots=True)
class ExpertView:
    """One replica's experts over the window, for routing, metrics and display.

    ``imbalance``, ``step_imbalance``, ``overflow_rate`` and ``slowdown`` are
    None while the window holds no routed tokens (or, for ``overflow_rate``,
    when the engine does not report drops). ``step_imbalance`` is what the
    MoE layers wait for: the busiest expert's *processed* tokens (routed
    minus dropped) over the mean routed, and with per-layer data the sum over
    layers of each layer's busiest expert over the sum of the means (the
    aggregate max / mean is a lower bound of that). ``slowdown`` is the
    routing signal (None when the report is older than ``stale_s``).
    """

    replica: str
    experts: int
    window_s: float
    age_s: float
    tokens_per_s: tuple[float, ...]
    overflow_per_s: tuple[float, ...] | None
    imbalance: float | None
    step_imbalance: float | None
    overflow_rate: float | None
    hot: tuple[HotExpert, ...]
    slowdown: float | None
    layers: Mapping[int, float] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        """The admin API's JSON for this replica."""
        return {
            "replica": self.replica,
            "experts": self.experts,
            "window_s": round(self.window_s, 3),
            "age_s": round(self.age_s, 3),
            "imbalance": _round(self.imbalance),
            "step_imbalance": _round(self.step_imbalance),
            "overflow_rate": _round(self.overflow_rate, 6),
            "slowdown": _round(self.slowdown),
            "tokens_per_s": round(sum(self.tokens_per_s), 3),
            "hot": [
                {"expert": h.expert, "load": round(h.load, 3), "share": round(h.share, 4)}
                for h in self.hot
            ],
            "layers": {str(k): round(v, 4) for k, v in sorted(self.layers.items())},
        }


@dataclass(frozen=True, slots=True)
class FleetExperts:
    """Every replica with ``experts`` experts, summed per expert."""

    experts: int
    replicas: int
    tokens_per_s: tuple[float, ...]
    overflow_per_s: tuple[float, ...] | None
    imbalance: float | None
    hot: tuple[HotExpert, ...]

    def describe(self) -> dict[str, object]:
        return {
            "experts": self.experts,
            "replicas": self.replicas,
            "imbalance": _round(self.imbalance),
            "tokens_per_s": [round(x, 3) for x in self.tokens_per_s],
            "overflow_per_s": None
            if self.overflow_per_s is None
            else [round(x, 3) for x in self.overflow_per_s],
            "hot": [
                {"expert": h.expert, "load": round(h.load, 3), "share": round(h.share, 4)}
                for h in self.hot
            ],
        }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


class _Bucket:
    """Deltas of the reports that arrived in one slice of the window."""

    __slots__ = ("end", "layers", "overflow", "since", "start", "tokens")

    def __init__(self, start: float, since: float, experts: int, with_overflow: bool) -> None:
        self.start = start  # when the first report of this bucket arrived
        self.since = since  # the report before it: the bucket covers [since, end]
        self.end = start
        self.tokens = [0.0] * experts
        self.overflow: list[float] | None = [0.0] * experts if with_overflow else None
        self.layers: dict[int, list[float]] = {}  # per_layer only


class _Replica:
    __slots__ = ("buckets", "cached", "experts", "last", "layered", "reported_at")

    def __init__(self) -> None:
        self.experts = 0
        self.layered: bool | None = None  # per-layer samples, or one aggregate
        # (layer (None: aggregate), rank) -> the last cumulative (tokens, overflow)
        self.last: dict[
            tuple[int | None, str | None], tuple[tuple[float, ...], tuple[float, ...] | None]
        ] = {}
        self.buckets: deque[_Bucket] = deque(maxlen=WINDOW_BUCKETS + 2)
        self.reported_at: float | None = None
        self.cached: tuple[float, float | None] | None = None  # (at, step slowdown)

    def restart(self, experts: int, layered: bool) -> None:
        self.experts = experts
        self.layered = layered
        self.last.clear()
        self.buckets.clear()


class ExpertTelemetry:
    """Per-expert counters of every fleet member, and what they mean.

    Sources call :meth:`record` with one report's samples; the gateway keeps
    membership with :meth:`set_members`; routing, metrics and the admin API
    read :meth:`view` / :meth:`views` / :meth:`fleet`.
    """

    def __init__(self, config: ExpertsConfig) -> None:
        self.config = config
        self._width = config.window_s / WINDOW_BUCKETS
        self._replicas: dict[str, _Replica] = {}
        self._members: frozenset[str] = frozenset()
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.accepted = 0

    # -- membership -----------------------------------------------------------

    def set_members(self, names: Iterable[str]) -> None:
        """The fleet's replica names: reports for others are refused, and the
        state of replicas that left is dropped."""
        self._members = frozenset(names)
        for name in [n for n in self._replicas if n not in self._members]:
            del self._replicas[name]

    # -- input ----------------------------------------------------------------

    def _reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] += n

    def _check(self, s: ExpertSample) -> str | None:
        cfg = self.config
        n = len(s.tokens)
        if n == 0:
            return "empty"
        if n > cfg.max_experts:
            return "too_many_experts"
        if s.layer is not None and not 0 <= s.layer < cfg.max_layers:
            return "bad_layer"
        if s.overflow is not None and len(s.overflow) != n:
            return "length_mismatch"
        values = s.tokens if s.overflow is None else (*s.tokens, *s.overflow)
        if not all(math.isfinite(v) for v in values):
            return "not_finite"
        if min(values) < 0:
            return "negative"
        if s.overflow is not None and any(o > t for o, t in zip(s.overflow, s.tokens, strict=True)):
            return "overflow_exceeds_tokens"
        return None

    def record(self, replica: str, samples: Sequence[ExpertSample], now: float) -> int:
        """One report of ``replica``'s counters at ``now``; returns samples accepted.

        A report holds either one aggregate sample (``layer`` None) or one
        sample per layer. The first report is a baseline (no delta yet); a
        change of layout or of the number of experts starts a new baseline.
        """
        if replica not in self._members:
            self._reject("unknown_replica", max(1, len(samples)))
            return 0
        good: list[ExpertSample] = []
        seen: set[tuple[int | None, str | None]] = set()
        for s in samples:
            reason = self._check(s)
            if reason is None and good and len(s.tokens) != len(good[0].tokens):
                reason = "length_mismatch"
            if reason is None and (
                (s.layer, s.rank) in seen or (good and (good[0].layer is None) != (s.layer is None))
            ):
                # A layer twice, or an aggregate mixed with layers (double counting).
                reason = "duplicate_layer"
            if reason is not None:
                self._reject(reason)
                continue
            seen.add((s.layer, s.rank))
            good.append(s)
        if not good:
            return 0
        state = self._replicas.get(replica)
        if state is None:
            state = self._replicas[replica] = _Replica()
        experts = len(good[0].tokens)
        layered = good[0].layer is not None
        if state.experts != experts or state.layered != layered:
            state.restart(experts, layered)
        self._add(state, good, now)
        state.reported_at = now
        state.cached = None
        self.accepted += len(good)
        return len(good)

    def _add(self, state: _Replica, samples: list[ExpertSample], now: float) -> None:
        deltas: list[tuple[int | None, list[float], list[float] | None]] = []
        for s in samples:
            prev = state.last.get((s.layer, s.rank))
            state.last[s.layer, s.rank] = (s.tokens, s.overflow)
            if prev is None:
                continue  # a baseline: no interval to attribute yet
            d_tok = _delta(s.tokens, prev[0])
            d_over = None if s.overflow is None or prev[1] is None else _delta(s.overflow, prev[1])
            deltas.append((s.layer, d_tok, d_over))
        if not deltas or state.reported_at is None:
            return
        if now > state.reported_at:
            bucket = self._bucket(state, now, all(d[2] is not None for d in deltas))
        elif state.buckets:
            # Two reports at one clock reading (a scrape and a push in one
            # loop turn): no new interval, but the tokens did happen.
            bucket = state.buckets[-1]
        else:
            return  # no interval yet to put them in; the counters carry them on
        per_layer = self.config.per_layer
        for layer, d_tok, d_over in deltas:
            _add_into(bucket.tokens, d_tok)
            if bucket.overflow is not None and d_over is not None:
                _add_into(bucket.overflow, d_over)
            if layer is not None and per_layer:
                acc = bucket.layers.get(layer)
                if acc is None:
                    bucket.layers[layer] = list(d_tok)
                else:
                    _add_into(acc, d_tok)
        bucket.end = max(bucket.end, now)

    def _bucket(self, state: _Replica, now: float, with_overflow: bool) -> _Bucket:
        buckets = state.buckets
        last = buckets[-1] if buckets else None
        if (
            last is not None
            and now - last.start < self._width
            and (last.overflow is not None) == with_overflow
        ):
            return last
        assert state.reported_at is not None
        bucket = _Bucket(now, state.reported_at, state.experts, with_overflow)
        buckets.append(bucket)
        return bucket

    # -- output ---------------------------------------------------------------

    def view(self, replica: str, now: float) -> ExpertView | None:
        """``replica``'s experts over the window ending at ``now``; None before
        its first report."""
        state = self._replicas.get(replica)
        if state is None or state.reported_at is None:
            return None
        cfg = self.config
        horizon = now - cfg.window_s
        buckets = state.buckets
        while buckets and buckets[0].end < horizon:
            buckets.popleft()
        n = state.experts
        age = max(0.0, now - state.reported_at)
        if not buckets:
            return ExpertView(replica, n, 0.0, age, (0.0,) * n, None, None, None, None, (), None)
        tokens = [0.0] * n
        overflow: list[float] | None = [0.0] * n
        layers: dict[int, list[float]] = {}
        for b in buckets:
            _add_into(tokens, b.tokens)
            if overflow is not None:
                if b.overflow is None:
                    overflow = None
                else:
                    _add_into(overflow, b.overflow)
            for layer, vec in b.layers.items():
                acc = layers.get(layer)
                if acc is None:
                    layers[layer] = list(vec)
                else:
                    _add_into(acc, vec)
        span = max(buckets[-1].end - buckets[0].since, 1e-9)
        total = sum(tokens)
        floor = MIN_TOKENS_PER_EXPERT
        mean = total / n
        imbalance = step = rate = None
        hot: tuple[HotExpert, ...] = ()
        if total > 0:
            imbalance = max(max(tokens), floor) / max(mean, floor)
            processed = (
                tokens
                if overflow is None
                else [t - o for t, o in zip(tokens, overflow, strict=True)]
            )
            step = max(max(processed), floor) / max(mean, floor)
            if layers and overflow is None:
                # Each layer waits for its own busiest expert.
                step = sum(max(max(v), floor) for v in layers.values()) / sum(
                    max(sum(v) / n, floor) for v in layers.values()
                )
            if overflow is not None:
                rate = min(1.0, sum(overflow) / total)
            hot = _hot(tokens, cfg.top_k)
        slowdown = None
        if step is not None and age <= cfg.stale_s:
            slowdown = expert_slowdown(step, rate, cfg.moe_share)
        return ExpertView(
            replica=replica,
            experts=n,
            window_s=span,
            age_s=age,
            tokens_per_s=tuple(t / span for t in tokens),
            overflow_per_s=None if overflow is None else tuple(o / span for o in overflow),
            imbalance=imbalance,
            step_imbalance=step,
            overflow_rate=rate,
            hot=hot,
            slowdown=slowdown,
            layers={
                layer: max(max(v), floor) / max(sum(v) / n, floor)
                for layer, v in layers.items()
                if sum(v) > 0
            },
        )

    def views(self, now: float) -> list[ExpertView]:
        """Every replica with a report, in name order."""
        out = [self.view(name, now) for name in sorted(self._replicas)]
        return [v for v in out if v is not None]

    def slowdown(self, replica: str, now: float) -> float | None:
        """The routing signal: ``view(replica, now).slowdown``, recomputed only
        after a report or once a bucket's width has passed (the gateway asks
        every second for every replica)."""
        state = self._replicas.get(replica)
        if (
            state is None
            or state.reported_at is None
            or now - state.reported_at > self.config.stale_s
        ):
            return None
        cached = state.cached
        if cached is not None and 0.0 <= now - cached[0] < self._width:
            return cached[1]
        v = self.view(replica, now)
        value = None if v is None else v.slowdown
        state.cached = (now, value)
        return value

    def fleet(self, now: float, views: Sequence[ExpertView] | None = None) -> list[FleetExperts]:
        """Per expert over the fleet, one entry per number of experts."""
        groups: dict[int, list[ExpertView]] = {}
        for v in self.views(now) if views is None else views:
            if v.window_s > 0:
                groups.setdefault(v.experts, []).append(v)
        out = []
        for n, vs in sorted(groups.items()):
            tokens = [0.0] * n
            for v in vs:
                _add_into(tokens, v.tokens_per_s)
            overflow: list[float] | None = None
            if all(v.overflow_per_s is not None for v in vs):
                overflow = [0.0] * n
                for v in vs:
                    _add_into(overflow, v.overflow_per_s)  # type: ignore[arg-type]
            total = sum(tokens)
            imbalance = max(tokens) / (total / n) if total > 0 else None
            out.append(
                FleetExperts(
                    n,
                    len(vs),
                    tuple(tokens),
                    None if overflow is None else tuple(overflow),
                    imbalance,
                    _hot(tokens, self.config.top_k) if total > 0 else (),
                )
            )
        return out


def _delta(new: tuple[float, ...], old: tuple[float, ...]) -> list[float]:
    """Counter increase per expert; a decrease is a restart (Prometheus's rate())."""
    return [n - o if n >= o else n for n, o in zip(new, old, strict=True)]


def _add_into(acc: list[float], vec: Sequence[float]) -> None:
    for i, x in enumerate(vec):
        acc[i] += x


def _hot(tokens: Sequence[float], k: int) -> tuple[HotExpert, ...]:
    total = sum(tokens)
    mean = total / len(tokens)
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))[:k]
    return tuple(HotExpert(i, tokens[i] / mean, tokens[i] / total) for i in order)
