"""Load signals: one number per replica, and one unit per comparison.

A signal reads a :class:`policies.load.LoadView` and returns a float, or
``None`` when this replica does not have it (no KV report yet, no latency
sample yet). Policies compare candidates through :func:`values`, which
returns every compared candidate's value in ONE unit: if any of them lacks the
requested signal, all of them fall back to the signal's ``fallback`` (and so
on down to ``in_flight``, which every replica has). This is SGLang's
``test_reproduce_incompatible_metric_bug`` lesson made structural: token load
on one replica is never compared with a request count on another.

Signals (``name``: unit, fallback):

- ``in_flight``: requests this gateway has dispatched and not settled. Always
  present.
- ``tokens``: outstanding tokens, prompt estimate + expected output, of those
  requests. Always present. A request is not a unit of work.
- ``queue``: the replica's reported queue (waiting + running) plus what this
  gateway sent since that report minus what settled; our own in-flight count
  when there is no fresh report (``LoadView.queue_depth``). Always present,
  so policies on it work from day one without load reports.
- ``kv``: reported KV-cache usage in [0, 1]; absent without a fresh report.
  Falls back to ``queue``.
- ``ttft`` / ``tpot``: time-to-first-token and time-per-output-token EWMAs in
  seconds, kept by the router; absent before the first sample. Fall back to
  ``queue``.

Count signals (in_flight, tokens, queue) are divided by the replica's weight,
so a replica of weight 2 looks half as loaded as one of weight 1 with the same
queue. Fractions and latencies are not weighted: they already describe the
replica's own capacity.

Expert slowdown (MoE, :func:`expert_slowdown`) is not a load but a capacity:
how much longer a replica's step takes than a balanced replica's. Policies
multiply a load by it (:func:`expert_slowdowns`); like the signals, it is
used only when every compared candidate has it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import add, ge, sub

from policies.load import DEFAULT_REPORT_MAX_AGE_S, LoadView

Getter = Callable[[LoadView, float], "float | None"]

# Weight 0 means "send nothing new here" (slow-start at zero, manual): its
# load reads as infinite rather than raising ZeroDivisionError.
INF = float("inf")


@dataclass(frozen=True, slots=True)
class Signal:
    """A named load reading; ``fallback`` names the signal used when a compared
    candidate lacks this one (None only for signals every replica has)."""

    name: str
    get: Getter
    fallback: str | None
    per_weight: bool


def _in_flight(load: LoadView, now: float) -> float:
    return float(load.in_flight)


def _tokens(load: LoadView, now: float) -> float:
    return float(load.outstanding_tokens)


def _queue(load: LoadView, now: float) -> float:
    return load.queue_depth(now)


def _kv(load: LoadView, now: float) -> float | None:
    # KV usage comes with the queue report; a stale report says nothing about
    # the cache now, so it counts as absent (and the comparison falls back).
    if load.kv_usage is None or load.reported_at is None:
        return None
    if now - load.reported_at > DEFAULT_REPORT_MAX_AGE_S:
        return None
    return load.kv_usage


def _ttft(load: LoadView, now: float) -> float | None:
    return load.ttft.value


def _tpot(load: LoadView, now: float) -> float | None:
    return load.tpot.value


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("in_flight", _in_flight, None, True),
        Signal("tokens", _tokens, None, True),
        Signal("queue", _queue, None, True),
        Signal("kv", _kv, "queue", False),
        Signal("ttft", _ttft, "queue", False),
        Signal("tpot", _tpot, "queue", False),
    )
}


# A replica dropping this share of its expert tokens is treated as if it
# dropped this much, no more: the capacity model 1 / (1 - overflow) must
# stay finite when an engine drops (nearly) everything.
MAX_OVERFLOW_RATE = 0.9
# Slowdowns are capped here so one wild report cannot make a replica look
# infinitely slow (it would never get another request to prove otherwise).
MAX_EXPERT_SLOWDOWN = 16.0


def expert_slowdown(step_imbalance: float, overflow_rate: float | None, moe_share: float) -> float:
    """A replica's step time over a balanced replica's, from its expert counters.

    Only the MoE share of a step waits for the busiest expert (the attention
    and dense layers do not), so the step takes
    ``(1 - moe_share) + moe_share * step_imbalance`` of a balanced step: with
    moe_share 0.6, an expert at 3x the mean makes the step 2.2x, not 3x
    (loadtest/engine/moe.py models the engine the same way). Where the engine
    drops tokens over a capacity factor instead of waiting (``overflow_rate``
    reported), the tokens it drops are work it did not do: its useful
    throughput is ``1 - overflow_rate`` of its nominal one, so the factor is
    divided by that. ``step_imbalance`` < 1 reads as 1; the result is capped
    at MAX_EXPERT_SLOWDOWN.
    """
    s = (1.0 - moe_share) + moe_share * max(1.0, step_imbalance)
    if overflow_rate is not None and overflow_rate > 0.0:
        s /= 1.0 - min(overflow_rate, MAX_OVERFLOW_RATE)
    return min(s, MAX_EXPERT_SLOWDOWN)


def expert_slowdowns(candidates: Sequence[LoadView]) -> list[float] | None:
    """Every candidate's ``expert_slowdown``, or None if any lacks one.

    One unit per comparison: a replica whose expert report is missing or
    stale would otherwise look balanced next to measured ones and draw
    their traffic, so then nobody's is used.
    """
    out = [c.expert_slowdown for c in candidates]
    if None in out:
        return None
    return out  # type: ignore[return-value]


def get(name: str) -> Signal:
    """The signal called ``name``; ValueError (config validation) if unknown."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; known: {', '.join(SIGNALS)}") from None


def values(signal: Signal, candidates: Sequence[LoadView], now: float) -> tuple[str, list[float]]:
    """Every candidate's value of ``signal`` in one comparable unit.

    Returns the name of the signal actually used (the requested one, or its
    fallback chain's first signal that every candidate has) and the values in
    candidate order. Weighted signals are divided by weight (weight <= 0 reads
    as infinitely loaded).
    """
    sig: Signal | None = signal
    while sig is not None:
        get_ = sig.get
        raw = [get_(c, now) for c in candidates]
        if None not in raw:
            if sig.per_weight:
                out = [
                    v / c.weight if c.weight > 0 else INF  # type: ignore[operator]
                    for v, c in zip(raw, candidates, strict=True)
                ]
            else:
                out = raw  # type: ignore[assignment]
            return sig.name, out
        sig = SIGNALS[sig.fallback] if sig.fallback is not None else None
    raise AssertionError("unreachable: the fallback chain ends in an always-present signal")


def per_weight(vals: list[float], candidates: Sequence[LoadView]) -> list[float]:
    """``vals`` divided by each candidate's weight (weight <= 0: infinite).

    The all-weights-1 case (the common one) returns ``vals`` untouched after
    one C-speed count, which is what keeps full scans cheap at 1,000 replicas.
    """
    ws = [c.weight for c in candidates]
    if ws.count(1.0) == len(ws):
        return vals
    return [v / w if w > 0 else INF for v, w in zip(vals, ws, strict=True)]


def queue_depths(candidates: Sequence[LoadView], now: float) -> list[float]:
    """The ``queue`` signal per weight for every candidate, on the fast path.

    Exactly ``LoadView.queue_depth(now)`` (a test holds the two equal over
    random states), computed column-wise with C-level ``map``: the method
    call costs ~0.5 us per replica, which at 1,000 replicas is the whole
    budget of a scan. Fast path: every candidate has a fresh report (the
    steady state with scraping) or none has one (no telemetry); mixed fleets
    take the per-replica path.
    """
    inflight = [c.in_flight for c in candidates]
    reported = [c.reported_queue for c in candidates]
    n_none = reported.count(None)
    if n_none == len(reported):
        return per_weight(inflight, candidates)  # type: ignore[arg-type]
    if n_none == 0:
        stamps = [c.reported_at for c in candidates]
        if now - min(stamps) <= DEFAULT_REPORT_MAX_AGE_S:  # type: ignore[type-var, operator]
            corrected = list(
                map(
                    sub,
                    map(add, reported, [c.dispatched_since_report for c in candidates]),
                    [c.settled_since_report for c in candidates],
                )
            )
            if not all(map(ge, corrected, inflight)):  # a report lags our own sends
                corrected = [q if q >= f else f for q, f in zip(corrected, inflight, strict=True)]
            return per_weight(corrected, candidates)  # type: ignore[arg-type]
    age = DEFAULT_REPORT_MAX_AGE_S
    qs: list[float] = [
        c.in_flight
        if (rq := c.reported_queue) is None
        or now - c.reported_at > age  # type: ignore[operator]
        or (v := rq + c.dispatched_since_report - c.settled_since_report) < c.in_flight
        else v
        for c in candidates
    ]
    return per_weight(qs, candidates)


def kv_usages(candidates: Sequence[LoadView], now: float) -> list[float | None]:
    """The ``kv`` signal for every candidate (None where absent or stale), inlined."""
    cut = DEFAULT_REPORT_MAX_AGE_S
    return [
        None if (kv := c.kv_usage) is None or now - c.reported_at > cut else kv  # type: ignore[operator]
        for c in candidates
    ]


def token_loads(candidates: Sequence[LoadView]) -> list[float]:
    """The ``tokens`` signal per weight for every candidate."""
    return per_weight([c.outstanding_tokens for c in candidates], candidates)
