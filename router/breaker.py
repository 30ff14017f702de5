"""A circuit breaker: stop waiting on a dependency that fails or freezes.

Closed: calls go through; ``failures`` in a row open it. Open: calls are
refused at once (the caller falls back) until ``open_s`` has passed. Then one
probe at a time is let through (half-open): its success closes the breaker,
its failure opens it for another ``open_s``. Every swallowed error and every
timeout counts as a failure (LiteLLM once counted them as successes and kept
waiting on a dead Redis).

The clock is passed in, so tests and the gateway drive the same code.
"""

from __future__ import annotations

from enum import IntEnum


class BreakerState(IntEnum):
    """Exported as a gauge: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    __slots__ = ("_failures", "_opened_at", "_probing", "failures", "open_s", "opens", "state")

    def __init__(self, failures: int, open_s: float) -> None:
        if failures < 1 or open_s <= 0:
            raise ValueError("failures >= 1 and open_s > 0")
        self.failures = failures
        self.open_s = open_s
        self.state = BreakerState.CLOSED
        self.opens = 0  # times it opened, for metrics and tests
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        """May a call go out now? In half-open, only one probe at a time."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.open_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self.state = BreakerState.CLOSED

    def abandon(self) -> None:
        """A call that ended without a verdict (cancelled, or refused for a
        local reason): a half-open probe may go out again."""
        self._probing = False

    def failure(self, now: float) -> None:
        self._probing = False
        if self.state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        self._failures += 1
        if self.state is BreakerState.CLOSED and self._failures >= self.failures:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = now
        self.opens += 1
