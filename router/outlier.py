"""Passive outlier ejection: stop sending to a replica that keeps failing.

Envoy's consecutive-gateway-failure detector [E1][E2], as a pure state
machine (time is an argument, no I/O, no tasks), so the data path feeds it
outcomes and the tests drive it with a hand-advanced clock.

- **What counts.** Only evidence that the replica cannot serve: connect
  errors, resets, timeouts and the gateway statuses 502/503/504. A 4xx is the
  client's fault: SGLang's breaker counted 400s (context length) and turned
  one bad client into a fleet outage [I9]. A 503 carrying the replica's
  draining marker (``Outcome.DRAINING``) is the replica saying "not me, not
  now", and a client disconnect says nothing about the replica; both are
  neutral. A success or a 4xx (the replica answered) resets the count, as in
  Envoy.
- **How long.** The n-th ejection in a row lasts ``base_ejection_s * n``,
  capped at ``max_ejection_s``; so a flapping replica is ejected for longer
  each time (M8). n decays by one for every ``decay_interval_s`` the replica
  spends un-ejected (Envoy decrements it on each detection interval that
  finds the host healthy), so a replica that recovered for good is forgiven.
- **How many.** At most ``max_ejection_percent`` of the known replicas are
  ejected at once, "but at least one" [E2] (M10): a detector that ejects the
  whole fleet turns a partial outage into a total one. A refused ejection is
  reported as an ``overflow`` event.

Ejection only removes a replica from new routing; its in-flight requests run
on. Outcomes that arrive while a replica is ejected (requests sent before the
ejection) are ignored. An active health check that passes does NOT un-eject
(Envoy's ``successful_active_health_check_uneject_host`` defaults to true,
but a replica whose /health is 200 while it cannot serve is exactly M7).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from policies.load import Outcome

# Envoy's outlier_detection defaults [E2].
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

_LOCAL_FAILURES = frozenset({Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_RESET})
_EVIDENCE_OF_LIFE = frozenset({Outcome.OK, Outcome.HTTP_4XX})


class EventKind(StrEnum):
    EJECTED = "ejected"
    UNEJECTED = "unejected"
    # The replica crossed the threshold but the max-percent cap refused.
    OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True)
class OutlierEvent:
    """A state change for the caller to turn into a metric and one log line.

    ``reason``: for ``ejected``/``overflow``, the outcome that tipped it
    (``connect_error``, ``timeout``, ``upstream_reset``, ``status_503`` ...);
    for ``unejected``: ``expired``, ``removed`` or what :meth:`uneject` got.
    ``ejections`` is n, the ejection count in a row after this event;
    ``duration_s`` the ejection length (for ``unejected``: how long it lasted).
    """

    kind: EventKind
    replica: str
    reason: str
    at: float
    ejections: int = 0
    duration_s: float = 0.0


class _Host:
    __slots__ = ("consecutive", "ejected_at", "ejected_until", "ejections", "healthy_since")

    def __init__(self) -> None:
        self.consecutive = 0
        self.ejections = 0
        self.ejected_at: float | None = None
        self.ejected_until: float | None = None
        # When the replica was last un-ejected: the start of decay.
        self.healthy_since: float | None = None


class OutlierDetector:
    """Consecutive-failure ejection with growing durations and a fleet cap.

    Feed every settled upstream attempt to :meth:`record`; call :meth:`poll`
    before routing (or on a timer) to collect expirations; route only to
    replicas for which :meth:`is_ejected` is False. Keep membership current
    with :meth:`set_members` so the percent cap has the right denominator
    (replicas seen in :meth:`record` are added automatically).
    """

    def __init__(
        self,
        consecutive_failures: int = DEFAULT_CONSECUTIVE_FAILURES,
        base_ejection_s: float = DEFAULT_BASE_EJECTION_S,
        max_ejection_s: float = DEFAULT_MAX_EJECTION_S,
        max_ejection_percent: float = DEFAULT_MAX_EJECTION_PERCENT,
        *,
        decay_interval_s: float = DEFAULT_DECAY_INTERVAL_S,
        failure_statuses: Iterable[int] = DEFAULT_FAILURE_STATUSES,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if base_ejection_s <= 0 or decay_interval_s <= 0:
            raise ValueError("base_ejection_s and decay_interval_s must be > 0")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be in [0, 100]")
        self.consecutive_failures = consecutive_failures
        self.base_ejection_s = base_ejection_s
        # Envoy: the cap is never below the base.
        self.max_ejection_s = max(max_ejection_s, base_ejection_s)
        self.max_ejection_percent = max_ejection_percent
        self.decay_interval_s = decay_interval_s
        self.failure_statuses = frozenset(failure_statuses)
        # n beyond this no longer lengthens an ejection; capping it keeps decay
        # from taking forever after a long outage.
        self._max_n = math.ceil(self.max_ejection_s / base_ejection_s)
        self._hosts: dict[str, _Host] = {}
        self._ejected: set[str] = set()
        # (kind, reason) -> count, for the metrics module.
        self.counters: Counter[tuple[str, str]] = Counter()

    # --- membership -------------------------------------------------------------

    def set_members(self, names: Iterable[str], now: float) -> list[OutlierEvent]:
        """Make the known replicas exactly ``names``; forget the others.

        A removed replica that was ejected yields an ``unejected``/``removed``
        event so its gauge can be cleared.
        """
        wanted = set(names)
        events = []
        for name in list(self._hosts):
            if name not in wanted:
                if name in self._ejected:
                    events.append(self._uneject(name, now, "removed"))
                del self._hosts[name]
        for name in wanted:
            self._hosts.setdefault(name, _Host())
        return events

    # --- queries ----------------------------------------------------------------

    def is_ejected(self, name: str, now: float) -> bool:
        """True while ``name`` is ejected; pure (expiry is applied by poll)."""
        host = self._hosts.get(name)
        return host is not None and host.ejected_until is not None and now < host.ejected_until

    def ejected(self, now: float) -> list[str]:
        """Names ejected at ``now``, sorted."""
        return sorted(n for n in self._ejected if self.is_ejected(n, now))

    def max_ejected(self) -> int:
        """How many replicas may be ejected at once: the percent cap, floor 1.

        ``floor(members * percent / 100)`` but at least one (Envoy's "will
        eject at least one host"), and none when the percent is 0 (disabled).
        """
        if self.max_ejection_percent <= 0 or not self._hosts:
            return 0
        # The epsilon keeps 10 hosts * 10 % at 1, not 0.9999999.
        return max(1, math.floor(len(self._hosts) * self.max_ejection_percent / 100 + 1e-9))

    def ejection_count(self, name: str, now: float) -> int:
        """n, with decay applied as of ``now``: the next ejection lasts base x (n+1)."""
        host = self._hosts.get(name)
        return 0 if host is None else self._decayed(host, now)

    def consecutive(self, name: str) -> int:
        host = self._hosts.get(name)
        return 0 if host is None else host.consecutive

    # --- transitions ------------------------------------------------------------

    def poll(self, now: float) -> list[OutlierEvent]:
        """Un-eject replicas whose ejection ended; returns those events."""
        events = []
        for name in sorted(self._ejected):
            until = self._hosts[name].ejected_until
            if until is not None and now >= until:
                events.append(self._uneject(name, now, "expired"))
        return events

    def record(
        self, name: str, outcome: Outcome, now: float, *, status: int | None = None
    ) -> list[OutlierEvent]:
        """Account one settled upstream attempt; returns the events it caused.

        ``status`` is the upstream HTTP status when there was one. For
        ``HTTP_5XX`` only statuses in ``failure_statuses`` count; a 5XX with no
        status given counts (the caller said it was a server error).
        """
        events = self.poll(now)
        host = self._hosts.setdefault(name, _Host())
        if self.is_ejected(name, now):
            return events  # sent before the ejection; already judged
        reason = self._failure_reason(outcome, status)
        if reason is None:
            if outcome in _EVIDENCE_OF_LIFE:
                host.consecutive = 0
            return events
        host.consecutive += 1
        if host.consecutive >= self.consecutive_failures:
            host.consecutive = 0
            events.append(self._eject(name, host, reason, now))
        return events

    def uneject(self, name: str, now: float, reason: str = "manual") -> OutlierEvent | None:
        """Lift an ejection early (an operator's call through the admin API)."""
        if not self.is_ejected(name, now):
            return None
        return self._uneject(name, now, reason)

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

    def _decayed(self, host: _Host, now: float) -> int:
        if host.ejected_until is not None or host.healthy_since is None:
            return host.ejections
        healthy_for = max(0.0, now - host.healthy_since)
        return max(0, host.ejections - int(healthy_for // self.decay_interval_s))

    def _eject(self, name: str, host: _Host, reason: str, now: float) -> OutlierEvent:
        n = self._decayed(host, now)
        if len(self.ejected(now)) >= self.max_ejected():
            event = OutlierEvent(EventKind.OVERFLOW, name, reason, now, ejections=n)
        else:
            n = min(n + 1, self._max_n)
            duration = min(self.base_ejection_s * n, self.max_ejection_s)
            host.ejections = n
            host.ejected_at = now
            host.ejected_until = now + duration
            host.healthy_since = None
            self._ejected.add(name)
            event = OutlierEvent(EventKind.EJECTED, name, reason, now, n, duration)
        self.counters[(event.kind.value, reason)] += 1
        return event

    def _uneject(self, name: str, now: float, reason: str) -> OutlierEvent:
        host = self._hosts[name]
        lasted = 0.0 if host.ejected_at is None else now - host.ejected_at
        host.ejected_at = None
        host.ejected_until = None
        host.healthy_since = now
        host.consecutive = 0
        self._ejected.discard(name)
        self.counters[(EventKind.UNEJECTED.value, reason)] += 1
        return OutlierEvent(EventKind.UNEJECTED, name, reason, now, host.ejections, lasted)
