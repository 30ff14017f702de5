"""Load accounting for replicas: live counters, and the ticket that settles them.

The router owns these objects and mutates them; policies only read them.
Nothing here does I/O or reads a clock, so the gateway and the discrete-event
simulator share it (the simulator passes virtual time as ``now``).

A request is settled through a :class:`Ticket`: ``dispatch`` adds its load,
``Ticket.close`` removes exactly that load once, whatever the outcome. That is
the single place where in-flight and outstanding tokens go down, so a cancel,
an error or a double close cannot leak or go negative (tower's "load is
released when the handle drops").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.load import DEFAULT_REPORT_MAX_AGE_S, Ewma, Outcome


@dataclass(slots=True)
class ReplicaLoad:
    """What one gateway knows about one replica's load, in comparable units.

    - ``in_flight``: requests this gateway has dispatched and not settled.
    - ``outstanding_tokens``: their prompt estimate + expected output tokens.
    - ``reported_queue``: waiting + running from the replica's own report
      (metrics scrape, push or response header), with the requests this gateway
      sent since the report added and those settled since subtracted.
    - ``kv_usage``: reported KV-cache usage in [0, 1].
    - ``reported_waiting`` / ``reported_running``: the report's two parts of
      ``reported_queue``; ``waiting_prompt_tokens``: prompt tokens of the
      waiting requests, when the source knows them (push reports).
    - ``reported_by``: the source of the last report (scrape, push, header).
    - ``ttft`` / ``tpot``: time to first token and time per output token EWMAs.
    - ``weight``: the replica's routing weight in the current fleet
      snapshot; only ``Registry`` writes it, when it publishes a version
      (slow start scales it per decision, in ``routing``).

    Policies see this object through ``policies.load.LoadView`` (read-only);
    only the ticket (below) and telemetry reports write it.
    """

    name: str
    weight: float = 1.0
    in_flight: int = 0
    outstanding_tokens: int = 0
    reported_queue: float | None = None
    reported_at: float | None = None
    dispatched_since_report: int = 0
    settled_since_report: int = 0
    kv_usage: float | None = None
    reported_waiting: float | None = None
    reported_running: float | None = None
    running_at: float | None = None  # when a report last carried running itself
    waiting_prompt_tokens: float | None = None
    reported_by: str | None = None
    ttft: Ewma = field(default_factory=lambda: Ewma(tau=10.0))
    tpot: Ewma = field(default_factory=lambda: Ewma(tau=10.0))
    max_concurrency: int | None = None
    # Step time over a balanced replica's, from per-expert (MoE) counters;
    # None without a fresh report. Written by the gateway from
    # router.experts.ExpertTelemetry, read by policies (policies.signals).
    expert_slowdown: float | None = None

    def record_report(
        self,
        queue: float,
        kv_usage: float | None,
        now: float,
        *,
        waiting: float | None = None,
        running: float | None = None,
        waiting_prompt_tokens: float | None = None,
        source: str | None = None,
    ) -> None:
        """A fresh report replaces the local correction: it already counts them.

        ``now`` is this process's loop clock when the report arrived (never
        the replica's clock), so staleness is measured on one clock.
        """
        self.reported_queue = queue
        self.reported_at = now
        self.kv_usage = kv_usage
        self.reported_waiting = waiting
        self.reported_running = running
        self.waiting_prompt_tokens = waiting_prompt_tokens
        self.reported_by = source
        self.dispatched_since_report = 0
        self.settled_since_report = 0

    def report_age(self, now: float) -> float | None:
        """Seconds since the last report arrived; None if none ever did."""
        return None if self.reported_at is None else max(0.0, now - self.reported_at)

    def queue_depth(self, now: float, max_age: float = DEFAULT_REPORT_MAX_AGE_S) -> float:
        """Reported queue plus local correction; our in-flight when no fresh report."""
        if self.reported_queue is None or self.reported_at is None:
            return float(self.in_flight)
        if now - self.reported_at > max_age:
            return float(self.in_flight)
        corrected = self.reported_queue + self.dispatched_since_report - self.settled_since_report
        # A report can lag our own sends; never claim less than we know is there.
        return max(corrected, float(self.in_flight), 0.0)

    def has_capacity(self) -> bool:
        return self.max_concurrency is None or self.in_flight < self.max_concurrency


class Ticket:
    """The load one request added to one replica; closing it removes that load.

    Idempotent: only the first ``close`` counts, so a ``finally`` that closes
    after an explicit close does no harm.
    """

    __slots__ = ("closed", "load", "outcome", "tokens")

    def __init__(self, load: ReplicaLoad, tokens: int) -> None:
        self.load = load
        self.tokens = tokens
        self.closed = False
        self.outcome: Outcome | None = None

    def close(self, outcome: Outcome) -> bool:
        if self.closed:
            return False
        self.closed = True
        self.outcome = outcome
        load = self.load
        load.in_flight -= 1
        load.outstanding_tokens -= self.tokens
        load.settled_since_report += 1
        return True


def dispatch(load: ReplicaLoad, tokens: int) -> Ticket:
    """Account a request sent to ``load``'s replica; returns its ticket."""
    load.in_flight += 1
    load.outstanding_tokens += tokens
    load.dispatched_since_report += 1
    return Ticket(load, tokens)
