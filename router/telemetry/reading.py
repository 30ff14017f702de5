"""One replica's load as any source gives it, and the one place it is recorded.

Every source (a scrape of /metrics, a pushed report, an ORCA response
header) turns what it read into a :class:`Reading`; :func:`record` writes it
on the replica's :class:`~router.load.ReplicaLoad`, stamped with the
gateway's own loop clock at receipt. The replica's clock is never compared
with ours: a report's age is how long ago *we* received it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from policies.load import DEFAULT_REPORT_MAX_AGE_S
from router.experts import ExpertSample
from router.load import ReplicaLoad


class Source(StrEnum):
    """Where a reading came from; the ``source`` label of the report metrics."""

    SCRAPE = "scrape"
    PUSH = "push"
    HEADER = "header"


@dataclass(frozen=True, slots=True)
class RankReading:
    """One DP rank's share (vLLM's ``engine`` label): kept for metrics only,
    routing sees the sum (a replica's ranks are one queue to the gateway)."""

    rank: str
    waiting: float | None
    running: float | None
    kv_usage: float | None


@dataclass(frozen=True, slots=True)
class Reading:
    """What one report says about one replica.

    ``waiting`` / ``running``: requests queued and in the running batch, DP
    ranks summed. ``kv_usage``: KV-cache usage in [0, 1] (the mean of the
    ranks: a sum of fractions means nothing). ``draining``: the replica's
    own state, None when the source does not say (scrapes, headers).
    ``experts``: per-expert counters (router/experts.py); ``ep_ranks``: the
    same shape per GPU rank instead of per expert (no source fills it yet:
    SGLang's EPLB heat map is not scraped, router/telemetry/scrape.py).
    ``ranks_dropped``: DP ranks beyond the scrape's caps, counted in the
    sums but not kept apart (router/telemetry/scrape.py).
    """

    waiting: float | None
    running: float | None = None
    kv_usage: float | None = None
    waiting_prompt_tokens: float | None = None
    draining: bool | None = None
    ranks: tuple[RankReading, ...] = ()
    experts: tuple[ExpertSample, ...] = ()
    ep_ranks: tuple[ExpertSample, ...] = ()
    ranks_dropped: int = 0


def record(
    load: ReplicaLoad,
    reading: Reading,
    now: float,
    source: Source,
    *,
    max_age: float = DEFAULT_REPORT_MAX_AGE_S,
) -> bool:
    """Write ``reading`` on ``load`` as a report received at ``now``.

    False (nothing written) when the reading has no queue figure at all, or
    a running count without a waiting one (half a queue: the caller counts
    it as rejected). A KV-only reading updates ``kv_usage`` alone: it says
    nothing of the queue, so it must not refresh the queue's timestamp.

    A reading without ``running`` (vLLM's ORCA header carries only
    ``num_requests_waiting`` and KV usage) borrows the running count of the
    last report while that one is fresh, else counts this gateway's own
    in-flight requests as running: the queue is never read as just the
    waiting line, which would make a busy replica look idle.
    """
    waiting = reading.waiting
    if waiting is None:
        if reading.kv_usage is None or reading.running is not None:
            return False
        load.kv_usage = reading.kv_usage
        return True
    running = reading.running
    if running is not None:
        load.running_at = now
    else:
        last, at = load.reported_running, load.running_at
        if last is not None and at is not None and now - at <= max_age:
            running = last  # reported within max_age (by a scrape or a push)
    estimated = running if running is not None else float(load.in_flight)
    load.record_report(
        waiting + estimated,
        reading.kv_usage,
        now,
        waiting=waiting,
        running=running,
        waiting_prompt_tokens=reading.waiting_prompt_tokens,
        source=source.value,
    )
    return True


__all__ = ["RankReading", "Reading", "Source", "record"]
