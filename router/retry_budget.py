"""How many failed attempts may be retried, and after what pause.

Two small pieces, synchronous and deterministic (no clock, no global
randomness), so the data path, the simulator and the tests drive them alike:

- :class:`RetryBudget`: bounds the retry *volume* (a ratio of requests, as in
  Finagle) and the retry *concurrency* (as Envoy's ``max_retries`` breaker);
  a retry happens only when both allow it. A concurrency cap alone does not
  bound the total when 503s come back instantly (``docs/reliability.md`` M15).
- :func:`backoff_s`: Envoy's fully jittered exponential backoff.

Which attempts may be retried at all (only those that sent nothing to the
client) and which replica a retry goes to (not one this request already
tried: Envoy's ``previous_hosts`` predicate) is the proxy's business.
"""

from __future__ import annotations

import random

# Finagle's RetryBudget default: retries may add 20 % to the request volume.
DEFAULT_RATIO = 0.2
# Finagle's minRetriesPerSec idea as a token floor: a gateway that has seen
# few requests (just started, or quiet) can still retry a handful of times.
DEFAULT_RESERVE = 3.0
# Credit saved in healthy times is capped, so a long healthy run cannot fund
# a retry burst when the whole fleet fails at once: a storm of n failing
# requests costs at most MAX_BALANCE + ratio * n retries. Finagle gets the same
# effect by letting deposits expire after 10 s. 10 covers one replica's
# in-flight requests failing together at the test concurrencies
# (``docs/reliability.md`` M1).
DEFAULT_MAX_BALANCE = 10.0
# Envoy's retry budget lets 20 % of active requests be retries, floor 3; a
# fixed cap is simpler to reason about and is what ``docs/reliability.md`` M15
# asks to observe.
DEFAULT_MAX_CONCURRENT_RETRIES = 10

# Envoy's router filter: base interval 25 ms, maximum 10x the base (250 ms).
BACKOFF_BASE_S = 0.025
BACKOFF_MAX_S = 0.25


def backoff_s(
    retry: int,
    rng: random.Random,
    *,
    base_s: float = BACKOFF_BASE_S,
    max_s: float = BACKOFF_MAX_S,
) -> float:
    """Pause before retry number ``retry`` (1 for the first retry).

    Envoy's full jitter: uniform in [0, (2**retry - 1) * base), capped at
    ``max_s``. Full jitter spreads the retries of requests that failed
    together (one replica dying under load) instead of sending them back in a
    wave. The caller also clips it to what is left of the route deadline.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    # Cap the exponent: 2**64 * 25 ms is already far past any max_s.
    upper = min(max_s, (2 ** min(retry, 64) - 1) * base_s)
    return rng.random() * upper


class RetryBudget:
    """A ratio budget and a concurrency cap on retries; both must allow one.

    Tokens: the balance starts at ``reserve``; every request deposits
    ``ratio`` (up to ``max_balance``); every retry withdraws 1 token. So after
    n requests at most ``max(reserve, max_balance) + ratio * n`` retries were
    made, and a fresh gateway makes at most ``reserve + ratio * n``
    (``docs/reliability.md`` M15: 200 requests all failing allow at most
    0.2 * 200 + 3 = 43 retries).

    Concurrency: at most ``max_concurrent_retries`` retry attempts are open at
    once; :meth:`release` closes one. The router may release at the retry's
    first byte (from there on it is an ordinary request) or at its end; the
    cap exists to stop a wave of retries from piling onto a struggling fleet.

    Call :meth:`deposit` once per client request (not per attempt), before or
    after its first attempt. Not thread-safe; one event loop owns it.
    """

    __slots__ = ("_balance", "active", "max_balance", "max_concurrent", "ratio", "reserve")

    def __init__(
        self,
        ratio: float = DEFAULT_RATIO,
        reserve: float = DEFAULT_RESERVE,
        max_concurrent_retries: int = DEFAULT_MAX_CONCURRENT_RETRIES,
        max_balance: float = DEFAULT_MAX_BALANCE,
    ) -> None:
        if ratio < 0 or reserve < 0 or max_concurrent_retries < 0 or max_balance < 0:
            raise ValueError("retry budget parameters must be >= 0")
        self.ratio = ratio
        self.reserve = reserve
        self.max_concurrent = max_concurrent_retries
        self.max_balance = max(max_balance, reserve)
        self._balance = float(reserve)
        self.active = 0

    @property
    def balance(self) -> float:
        """Tokens available now (each retry costs 1)."""
        return self._balance

    def deposit(self) -> None:
        """Credit one client request: adds ``ratio`` tokens, up to the cap."""
        self._balance = min(self.max_balance, self._balance + self.ratio)

    def check(self) -> str | None:
        """Why a retry would be refused now ("budget", "concurrency"), or None."""
        if self.active >= self.max_concurrent:
            return "concurrency"
        # A small epsilon: 5 deposits of 0.2 must buy one retry despite
        # floating-point sums like 0.2 * 5 = 0.9999999999999999.
        if self._balance < 1.0 - 1e-9:
            return "budget"
        return None

    def try_withdraw(self) -> bool:
        """Take one retry if both the ratio and the concurrency cap allow it.

        On True the caller owns one concurrency slot and must :meth:`release`
        it (in a ``finally``) when the retry attempt ends. On False nothing
        changed, so :meth:`check` still names the cause for the caller's
        metric (the metric is the one count of refusals).
        """
        if self.check() is not None:
            return False
        self._balance = max(0.0, self._balance - 1.0)
        self.active += 1
        return True

    def release(self) -> None:
        """A granted retry attempt ended (or got its first byte)."""
        if self.active <= 0:
            raise RuntimeError("RetryBudget.release() without a matching try_withdraw()")
        self.active -= 1

    def __repr__(self) -> str:
        return (
            f"RetryBudget(balance={self._balance:.2f}, active={self.active}/{self.max_concurrent})"
        )
