"""The load vocabulary policies share with the router and the simulator.

Policies read load; they never write it. :class:`LoadView` is the read-only
face of one replica's live counters (the router's ``ReplicaLoad``, or the
simulator's, which is the same class): policies are typed against it, so a
policy that assigns to a counter fails type-checking. :class:`Outcome` names
how a dispatched request ended; :func:`load_bound` is the one bounded-load
rule every bounded decision uses, and :func:`load_bound_tokens` the same rule
counted in tokens.

Nothing here does I/O or reads a clock: time is an argument.
"""

from __future__ import annotations

import math
import sys
from enum import StrEnum
from typing import Protocol

# A report older than this no longer describes the replica: after a scrape
# failure we fall back to our own in-flight count rather than trusting a
# queue length from a minute ago (llm-d's stale-metrics overshoot).
DEFAULT_REPORT_MAX_AGE_S = 5.0

_exp = math.exp


class Ewma:
    """Exponentially weighted moving average whose time is an argument.

    ``tau`` is the time constant in seconds: an observation's weight decays as
    exp(-dt / tau). Time is passed in (linkerd2-proxy's shape) so tests and the
    simulator control it.
    """

    __slots__ = ("stamp", "tau", "value")

    def __init__(self, tau: float, initial: float | None = None) -> None:
        self.tau = tau
        self.value = initial
        self.stamp: float | None = None

    def add(self, sample: float, now: float) -> None:
        # Twice per request (ttft, tpot): locals and no max() call, the same
        # arithmetic (dt clamps at 0.0 exactly as max(0.0, dt) did).
        value = self.value
        stamp = self.stamp
        if value is None or stamp is None:
            self.value = sample
        else:
            dt = now - stamp
            w = _exp(-(dt if dt > 0.0 else 0.0) / self.tau)
            self.value = value * w + sample * (1.0 - w)
        self.stamp = now


class Outcome(StrEnum):
    """How a dispatched request ended; closes a ticket and labels metrics."""

    OK = "ok"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    UPSTREAM_RESET = "upstream_reset"
    # The replica answered something that is not valid HTTP: a replica fault.
    BAD_RESPONSE = "bad_response"
    CLIENT_DISCONNECT = "client_disconnect"
    DRAINING = "draining"
    # A bug in the gateway ended the attempt: counted, never blamed on the
    # replica or the client.
    INTERNAL = "internal"


class LoadView(Protocol):
    """One replica's load as a policy may read it (read-only).

    - ``in_flight``: requests this gateway has dispatched and not settled.
    - ``outstanding_tokens``: their prompt estimate + expected output tokens.
    - ``weight``: the replica's routing weight (the fleet's, for this version).
    - ``kv_usage``: reported KV-cache usage in [0, 1], or None.
    - ``ttft`` / ``tpot``: time to first token and per output token EWMAs.
    - ``expert_slowdown``: step time over a balanced replica's (>= 1) from
      per-expert MoE counters, or None (dense model, no fresh report).
    - ``queue_depth(now)``: the reported queue, corrected by what this gateway
      sent and settled since the report; ``in_flight`` without a fresh report.
    """

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> float: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def outstanding_tokens(self) -> int: ...
    @property
    def kv_usage(self) -> float | None: ...
    @property
    def reported_queue(self) -> float | None: ...
    @property
    def reported_at(self) -> float | None: ...
    @property
    def dispatched_since_report(self) -> int: ...
    @property
    def settled_since_report(self) -> int: ...
    @property
    def ttft(self) -> Ewma: ...
    @property
    def tpot(self) -> Ewma: ...
    @property
    def max_concurrency(self) -> int | None: ...
    @property
    def expert_slowdown(self) -> float | None: ...

    def queue_depth(self, now: float, max_age: float = DEFAULT_REPORT_MAX_AGE_S) -> float: ...

    def has_capacity(self) -> bool: ...


# Bounded-load slack for every bounded rule (session affinity, the prefix
# policies): no replica above 1.5x the mean in-flight, HAProxy's
# hash-balance-factor 150 (its documented range is 125-200).
DEFAULT_LOAD_BOUND_EPSILON = 0.5
# Session affinity holds a pin on a replica below this many in-flight
# requests whatever the bound says: ceil((1 + eps) x (total + 1) / n) is 1
# for the second of two requests on three replicas, which would move a
# session off an idle engine that batches dozens of sequences.
DEFAULT_SESSION_LOAD_FLOOR = 4


def load_bound(in_flight_total: int, n: int, epsilon: float) -> int:
    """Most requests one replica may hold: ceil((1 + eps) * (total + 1) / n).

    Mirrokni, Thorup and Zadimoghaddam's bounded-load rule (HAProxy's
    hash-balance-factor), counting the request being placed. The one load bound
    of the design: affinity, prefix policies and fallbacks all call this.
    """
    if n <= 0:
        return 0
    if math.isinf(epsilon):
        return sys.maxsize  # epsilon = inf: no bound, plain hashing
    # Rounded before the ceiling: (1 + 0.1) x 50 / 5 is 11.000000000000002 in
    # binary floating point, and a bound one too loose is a bound not kept.
    return math.ceil(round((1.0 + epsilon) * (in_flight_total + 1) / n, 9))


def load_bound_tokens(total_tokens: int, n: int, epsilon: float) -> int:
    """Most outstanding tokens one replica may hold and still take a request:
    ceil((1 + eps) * total_tokens / n), at least 1.

    :func:`load_bound` counted in tokens (prompt + expected output), with the
    same epsilon (``[routing] load_bound_epsilon``): a request is a poor unit
    when one prompt is 50 tokens and the next 30,000, and a popular prefix
    that draws every long prompt to its holder stays under a request bound
    while that replica holds several times its share of the work.
    ``total_tokens`` counts the request being placed. A replica is eligible
    while its outstanding tokens are BELOW the bound (before adding the
    request), as ``in_flight < load_bound(...)`` is for requests: the least
    loaded replica is then always eligible when the request has any tokens
    (its load is at most the mean without them), so one prompt longer than a
    fair share is never refused everywhere; a replica may end one request
    above the bound, never more.
    """
    if n <= 0:
        return 0
    if math.isinf(epsilon):
        return sys.maxsize
    return max(1, math.ceil(round((1.0 + epsilon) * total_tokens / n, 9)))
