"""Which failed attempts may be retried, how many, and after what pause.

Three small pieces, all synchronous and deterministic (no clock, no global
randomness), so the data path and the tests drive them the same way:

- :func:`retry_reason` / :func:`is_retryable`: the classification. Only an
  attempt that has sent nothing to the client is retried (Envoy applies its
  per-try timeout only "before any part of the response is sent downstream";
  LLM clients that replayed started SSE streams duplicated tokens, I14).
- :class:`RetryBudget`: bounds the retry *volume* (a ratio of requests, as in
  Finagle) and the retry *concurrency* (as Envoy's ``max_retries`` breaker);
  a retry happens only when both allow it. A concurrency cap alone does not
  bound the total when 503s come back instantly (RELIABILITY M15).
- :func:`backoff_s`: Envoy's fully jittered exponential backoff.

Which replica the retry goes to is the router's business: it must exclude the
replicas this request already tried (Envoy's ``previous_hosts`` predicate).
"""

from __future__ import annotations

import random
from collections import Counter

from policies.load import Outcome

# Envoy's gateway-error set: the statuses a proxy or an overloaded engine
# answers before doing any work. 500 is not here: an engine's 500 usually
# means "this request broke me" and replaying it elsewhere breaks that too.
RETRYABLE_STATUSES: frozenset[int] = frozenset({502, 503, 504})

# Finagle's RetryBudget default: retries may add 20 % to the request volume.
DEFAULT_RATIO = 0.2
# Finagle's minRetriesPerSec idea as a token floor: a gateway that has seen
# few requests (just started, or quiet) can still retry a handful of times.
DEFAULT_RESERVE = 3.0
# Credit saved in healthy times is capped, so a long healthy run cannot fund
# a retry burst when the whole fleet fails at once: a storm of n failing
# requests costs at most MAX_BALANCE + ratio * n retries. Finagle gets the same
# effect by letting deposits expire after 10 s. 10 covers one replica's
# in-flight requests failing together at the test concurrencies (M1).
DEFAULT_MAX_BALANCE = 10.0
# Envoy's retry budget lets 20 % of active requests be retries, floor 3; a
# fixed cap is simpler to reason about and is what M15 asks to observe.
DEFAULT_MAX_CONCURRENT_RETRIES = 10

# Envoy's router filter: base interval 25 ms, maximum 10x the base (250 ms).
BACKOFF_BASE_S = 0.025
BACKOFF_MAX_S = 0.25


def retry_reason(
    outcome: Outcome,
    *,
    status: int | None = None,
    streaming: bool,
    response_started: bool = False,
) -> str | None:
    """Why this failed attempt may be retried elsewhere, or None if it may not.

    ``outcome`` is how the attempt ended; ``status`` the upstream HTTP status
    if headers arrived; ``streaming`` whether the client asked for a stream;
    ``response_started`` whether any byte (status line included) already went
    to the client. The returned reason is a short fixed string for a metric
    label.

    - ``CONNECT_ERROR``: nothing was sent; always safe.
    - ``UPSTREAM_RESET`` before headers: the engine died or closed on us. For
      a non-streaming request the client has seen nothing either, so replaying
      costs GPU time but cannot duplicate output.
    - ``TIMEOUT`` on a stream: the first-byte timeout (a streaming engine sends
      headers when it starts). On a non-streaming request the same timeout
      means "the generation is long", and a replay would double the work and
      the wait, so it is never retried (M5).
    - ``HTTP_5XX`` with 502/503/504: gateway errors, nothing generated.
    - ``DRAINING``: the replica refused new work (503 + draining marker); the
      request was not started and the replica is not at fault (M20).
    - ``HTTP_4XX``, ``CLIENT_DISCONNECT``, ``OK``: never (M4; the client left).
    """
    if response_started:
        return None
    if outcome is Outcome.CONNECT_ERROR:
        return "connect_error"
    if outcome is Outcome.UPSTREAM_RESET:
        return "reset"
    if outcome is Outcome.TIMEOUT:
        return "first_byte_timeout" if streaming else None
    if outcome is Outcome.DRAINING:
        return "draining"
    if outcome is Outcome.HTTP_5XX and status in RETRYABLE_STATUSES:
        return f"status_{status}"
    return None


def is_retryable(
    outcome: Outcome,
    *,
    status: int | None = None,
    streaming: bool,
    response_started: bool = False,
) -> bool:
    """True when :func:`retry_reason` gives a reason."""
    return (
        retry_reason(outcome, status=status, streaming=streaming, response_started=response_started)
        is not None
    )


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
    made, and a fresh gateway makes at most ``reserve + ratio * n`` (M15:
    200 requests all failing allow at most 0.2 * 200 + 3 = 43 retries).

    Concurrency: at most ``max_concurrent_retries`` retry attempts are open at
    once; :meth:`release` closes one. The router may release at the retry's
    first byte (from there on it is an ordinary request) or at its end; the
    cap exists to stop a wave of retries from piling onto a struggling fleet.

    Call :meth:`deposit` once per client request (not per attempt), before or
    after its first attempt. Not thread-safe; one event loop owns it.
    """

    __slots__ = (
        "_balance",
        "active",
        "denied",
        "deposits",
        "max_balance",
        "max_concurrent",
        "ratio",
        "reserve",
        "withdrawals",
    )

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
        # Plain counters for the metrics module: requests seen, retries
        # granted, and refusals by cause ("budget" or "concurrency").
        self.deposits = 0
        self.withdrawals = 0
        self.denied: Counter[str] = Counter()

    @property
    def balance(self) -> float:
        """Tokens available now (each retry costs 1)."""
        return self._balance

    def deposit(self) -> None:
        """Credit one client request: adds ``ratio`` tokens, up to the cap."""
        self.deposits += 1
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
        it (in a ``finally``) when the retry attempt ends. On False the refusal
        is counted in ``denied`` by cause.
        """
        refusal = self.check()
        if refusal is not None:
            self.denied[refusal] += 1
            return False
        self._balance = max(0.0, self._balance - 1.0)
        self.active += 1
        self.withdrawals += 1
        return True

    def release(self) -> None:
        """A granted retry attempt ended (or got its first byte)."""
        if self.active <= 0:
            raise RuntimeError("RetryBudget.release() without a matching try_withdraw()")
        self.active -= 1

    def __repr__(self) -> str:
        return (
            f"RetryBudget(balance={self._balance:.2f}, active={self.active}/"
            f"{self.max_concurrent}, granted={self.withdrawals}, denied={dict(self.denied)})"
        )
