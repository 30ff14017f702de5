"""Passive outlier ejection: stop sending to a replica that keeps failing.

Envoy's consecutive-gateway-failure detector (Envoy's outlier detection docs
and ``outlier_detection.proto``), fed by every settled upstream attempt. Time
is an argument and there is no I/O and no task, so the data path, the
simulator and the tests drive it alike.

**Evidence here, status in the registry.** The detector keeps per replica only
what it has seen: failures in a row, how many ejections in a row (n), and when
the last one ends. Whether a replica *is* ejected is its status, owned by
:class:`router.replicas.Registry`: an ejection is one
``registry.update(name, ejected_until=..., ramp=...)``, and it ends by itself
once ``now`` passes ``ejected_until`` (every reader compares), so nothing has
to poll, tick or announce the end. A replica back from an ejection is cold,
like a restarted one, so the same update sets a slow-start ramp that begins
when the ejection ends (``docs/reliability.md`` M7).

- **What counts.** Only evidence that the replica cannot serve: connect
  errors, timeouts, resets, an answer that is not valid HTTP
  (``Outcome.BAD_RESPONSE``) and the gateway statuses 502/503/504. A 4xx is
  the client's fault: SGLang's circuit breaker counted 400s (context length)
  and turned one bad client into a fleet outage (``docs/reliability.md`` M4).
  A 503 with the replica's draining marker (``Outcome.DRAINING``) says "not
  me, not now"; a client disconnect says nothing about the replica; a bug in
  the gateway (``Outcome.INTERNAL``) is not the replica's; all three are
  neutral. A success or a 4xx (the replica answered) resets the count, as in
  Envoy.
- **How long.** The n-th ejection in a row lasts ``base_ejection_s * n``,
  capped at ``max_ejection_s``, so a flapping replica is ejected for longer
  each time (``docs/reliability.md`` M8). n decays by one for every
  ``decay_interval_s`` the replica spends un-ejected (Envoy decrements it on
  each detection interval that finds the host healthy), so a replica that
  recovered for good is forgiven.
- **How many.** At most ``max_ejection_percent`` of the fleet is ejected at
  once, "but at least one" (Envoy), and none at 0 %: a detector that ejects
  the whole fleet turns a partial outage into a total one
  (``docs/reliability.md`` M10). A refused ejection is an ``overflow`` event.

Ejection only removes a replica from new routing; its in-flight requests run
on, and their outcomes, which arrive while it is ejected, are ignored (they
were judged already). A passing active health check does NOT un-eject
(Envoy's ``successful_active_health_check_uneject_host`` defaults to true, but
a replica whose /health is 200 while it cannot serve is exactly
``docs/reliability.md`` M7).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from policies.load import Outcome
from router.metrics import Metrics
from router.replicas import FleetSnapshot, Ramp, Registry

log = logging.getLogger("dp_router.outlier")

# Envoy's outlier_detection defaults.
DEFAULT_CONSECUTIVE_FAILURES = 5  # consecutive_gateway_failure
DEFAULT_BASE_EJECTION_S = 30.0  # base_ejection_time
DEFAULT_MAX_EJECTION_S = 300.0  # max_ejection_time
DEFAULT_MAX_EJECTION_PERCENT = 10.0  # max_ejection_percent
# Envoy's detection `interval` (10 s) is also the unit of ejection-count decay.
DEFAULT_DECAY_INTERVAL_S = 10.0
# Envoy's gateway-failure set. 500 is left out on purpose: an engine's 500 is
# usually a bad request it choked on; configure it in if your engines answer
# 500 when they are broken.
DEFAULT_FAILURE_STATUSES: frozenset[int] = frozenset({502, 503, 504})

# Failures seen by the gateway itself, with no HTTP status to judge.
_LOCAL_FAILURES = frozenset(
    {Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_RESET, Outcome.BAD_RESPONSE}
)
_EVIDENCE_OF_LIFE = frozenset({Outcome.OK, Outcome.HTTP_4XX})


class EventKind(StrEnum):
    EJECTED = "ejected"
    # The replica crossed the threshold but the max-percent cap refused.
    OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True)
class OutlierEvent:
    """What :meth:`OutlierDetector.record` did, for the caller's metric and log line.

    ``reason``: the outcome that tipped it (``connect_error``, ``timeout``,
    ``upstream_reset``, ``bad_response``, ``status_503`` ...). ``ejections``
    is n, the ejections in a row including this one (for an overflow, as it
    stands after decay); ``duration_s`` the ejection's length (0 for an
    overflow).
    """

    kind: EventKind
    replica: str
    reason: str
    at: float
    ejections: int = 0
    duration_s: float = 0.0


class _Evidence:
    __slots__ = ("consecutive", "ejection_end", "ejections")

    def __init__(self) -> None:
        self.consecutive = 0
        self.ejections = 0
        # When the last ejection ends (or was lifted): the start of decay.
        self.ejection_end: float | None = None


class OutlierDetector:
    """Consecutive-failure ejection with growing durations and a fleet cap.

    Feed every settled upstream attempt to :meth:`record`; it writes an
    ejection to the registry itself and returns the event for the caller's
    metric and log line. Routing needs nothing from the detector: it reads
    ``ejected_until`` from the snapshot. Membership is the registry's; the
    evidence of a replica that left is forgotten.

    ``slow_start_*`` shape the ramp that follows an ejection, as the health
    checks' after a recovery (pass the same ``[health]`` values); a window of
    0 brings a replica back at full weight at once. Lift an ejection only
    through :meth:`uneject`, so that decay starts then.
    """

    def __init__(
        self,
        registry: Registry,
        consecutive_failures: int = DEFAULT_CONSECUTIVE_FAILURES,
        base_ejection_s: float = DEFAULT_BASE_EJECTION_S,
        max_ejection_s: float = DEFAULT_MAX_EJECTION_S,
        max_ejection_percent: float = DEFAULT_MAX_EJECTION_PERCENT,
        *,
        decay_interval_s: float = DEFAULT_DECAY_INTERVAL_S,
        failure_statuses: Iterable[int] = DEFAULT_FAILURE_STATUSES,
        slow_start_s: float = 0.0,
        slow_start_aggression: float = 1.0,
        slow_start_min_weight: float = 0.1,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if base_ejection_s <= 0 or decay_interval_s <= 0:
            raise ValueError("base_ejection_s and decay_interval_s must be > 0")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be in [0, 100]")
        if slow_start_s < 0 or slow_start_aggression <= 0 or not 0 < slow_start_min_weight <= 1:
            raise ValueError("slow start: window >= 0, aggression > 0, min_weight in (0, 1]")
        self._registry = registry
        self.consecutive_failures = consecutive_failures
        self.base_ejection_s = base_ejection_s
        # Envoy: the cap is never below the base.
        self.max_ejection_s = max(max_ejection_s, base_ejection_s)
        self.max_ejection_percent = max_ejection_percent
        self.decay_interval_s = decay_interval_s
        self.failure_statuses = frozenset(failure_statuses)
        self._slow_start = (slow_start_s, slow_start_aggression, slow_start_min_weight)
        # n beyond this no longer lengthens an ejection; capping it keeps decay
        # from taking forever after a long outage.
        self._max_n = math.ceil(self.max_ejection_s / base_ejection_s)
        self._evidence: dict[str, _Evidence] = {}
        # The fleet version whose membership the evidence was last pruned to.
        self._pruned_at_version = 0

    # --- the data path --------------------------------------------------------

    def record(
        self, name: str, outcome: Outcome, now: float, *, status: int | None = None
    ) -> OutlierEvent | None:
        """Account one settled upstream attempt; the ejection it caused, if any.

        ``status`` is the upstream HTTP status when there was one. For
        ``HTTP_5XX`` only statuses in ``failure_statuses`` count; a 5XX with no
        status given counts (the caller said it was a server error).
        """
        snapshot = self._registry.snapshot
        if snapshot.version != self._pruned_at_version:
            self._forget_departed(snapshot)
        if outcome is Outcome.OK:
            # The common case, first: evidence of life (for a replica already
            # ejected the count is zero already, and a departed one's is gone).
            evidence = self._evidence.get(name)
            if evidence is not None:
                evidence.consecutive = 0
            return None
        current = snapshot.replicas.get(name)
        if current is None:
            return None  # it left the fleet while the attempt ran
        if current.ejected_until > now:
            return None  # sent before the ejection; already judged
        reason = self._failure_reason(outcome, status)
        if reason is None:
            if outcome in _EVIDENCE_OF_LIFE:
                evidence = self._evidence.get(name)
                if evidence is not None:
                    evidence.consecutive = 0
            return None
        evidence = self._evidence.get(name)
        if evidence is None:
            evidence = self._evidence[name] = _Evidence()
        evidence.consecutive += 1
        if evidence.consecutive < self.consecutive_failures:
            return None
        evidence.consecutive = 0
        return self._eject(name, evidence, reason, now, snapshot)

    # --- the operator ---------------------------------------------------------

    def uneject(self, name: str, now: float) -> bool:
        """Lift an ejection early (an operator's call); False if not ejected.

        The replica ramps from ``now`` (it took no traffic while ejected), and
        the ejection still counts toward n: lifting it is not forgiving it.
        """
        current = self._registry.snapshot.get(name)
        if current is None or current.ejected_until <= now:
            return False
        evidence = self._evidence.get(name)
        if evidence is not None:
            evidence.ejection_end = now
        self._registry.update(name, ejected_until=now, ramp=self._ramp_at(now))
        return True

    # --- queries ----------------------------------------------------------------

    def max_ejected(self, members: int | None = None) -> int:
        """How many replicas may be ejected at once: the percent cap, floor 1.

        ``floor(members * percent / 100)`` but at least one (Envoy's "will
        eject at least one host"), and none when the percent is 0 (disabled).
        ``members`` defaults to the current fleet size.
        """
        if members is None:
            members = len(self._registry.snapshot)
        if self.max_ejection_percent <= 0 or members <= 0:
            return 0
        # The epsilon keeps 10 replicas * 10 % at 1, not 0.9999999.
        return max(1, math.floor(members * self.max_ejection_percent / 100 + 1e-9))

    def ejection_count(self, name: str, now: float) -> int:
        """n, with decay applied as of ``now``: the next ejection lasts base x (n+1)."""
        evidence = self._evidence.get(name)
        return 0 if evidence is None else self._decayed(evidence, now)

    def consecutive(self, name: str) -> int:
        """Failures in a row since the last success, 4xx or ejection."""
        evidence = self._evidence.get(name)
        return 0 if evidence is None else evidence.consecutive

    # --- internals --------------------------------------------------------------

    def _failure_reason(self, outcome: Outcome, status: int | None) -> str | None:
        if outcome in _LOCAL_FAILURES:
            return outcome.value
        if outcome is Outcome.HTTP_5XX:
            if status is None:
                return "http_5xx"
            if status in self.failure_statuses:
                return f"status_{status}"
        return None

    def _decayed(self, evidence: _Evidence, now: float) -> int:
        end = evidence.ejection_end
        if end is None or now < end:
            return evidence.ejections  # never ejected, or still ejected
        return max(0, evidence.ejections - int((now - end) // self.decay_interval_s))

    def _eject(
        self, name: str, evidence: _Evidence, reason: str, now: float, snapshot: FleetSnapshot
    ) -> OutlierEvent:
        n = self._decayed(evidence, now)
        ejected = sum(1 for status in snapshot if status.ejected_until > now)
        if ejected >= self.max_ejected(len(snapshot)):
            return OutlierEvent(EventKind.OVERFLOW, name, reason, now, ejections=n)
        n = min(n + 1, self._max_n)
        duration = min(self.base_ejection_s * n, self.max_ejection_s)
        until = now + duration
        evidence.ejections = n
        evidence.ejection_end = until
        self._registry.update(name, ejected_until=until, ramp=self._ramp_at(until))
        return OutlierEvent(EventKind.EJECTED, name, reason, now, n, duration)

    def _ramp_at(self, start: float) -> Ramp | None:
        duration, aggression, min_weight = self._slow_start
        return Ramp(start, duration, aggression, min_weight) if duration > 0 else None

    def _forget_departed(self, snapshot: FleetSnapshot) -> None:
        names = snapshot.names
        for name in [n for n in self._evidence if n not in names]:
            del self._evidence[name]
        self._pruned_at_version = snapshot.version


def report(event: OutlierEvent, metrics: Metrics) -> None:
    """Count an ejection (or one the max-percent cap refused) and log it once:
    the same wherever the detector runs (the gateway, or a supervisor)."""
    if event.kind is EventKind.EJECTED:
        metrics.ejections.labels(event.replica, event.reason).inc()
        log.warning(
            "ejected replica %s for %.1f s (%s, ejection #%d)",
            event.replica,
            event.duration_s,
            event.reason,
            event.ejections,
        )
    else:
        metrics.ejections.labels(event.replica, "overflow").inc()


__all__ = [
    "DEFAULT_FAILURE_STATUSES",
    "EventKind",
    "OutlierDetector",
    "OutlierEvent",
    "report",
]
