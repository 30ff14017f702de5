"""Admission control: a short, bounded wait for capacity, then a clear refusal.

When every candidate replica is at its concurrency limit, a request waits at
the gateway instead of piling onto an engine queue the gateway cannot see or
cancel, but only briefly and only so many (Envoy's ``max_pending_requests``
[E3], HAProxy's ``timeout queue`` [H7]). Past ``max_queue`` waiters a request
is refused at once (429); past ``queue_timeout_s`` a waiter is refused (503);
both carry a Retry-After. Nothing waits unbounded and memory is bounded by
``max_queue`` (M16).

**Late binding.** A waiter does not hold a routing decision made when it
arrived: it holds ``try_route``, and routing re-runs when capacity frees, so
it sees the fleet as it is then (a replica that came back, one that was
ejected meanwhile). ``try_route`` must *decide and reserve* in one synchronous
call (dispatch the ticket), so nothing can take the capacity between the
decision and the send (vllm-project/router #235, I19: "selection and
reservation share one mutex").

**Fairness.** Waiters queue FIFO per ``key``; pass the model (or model and
pool) as the key so a waiter for a full model never blocks one for a model
with room. A new arrival whose key already has waiters queues behind them
rather than barging ahead. :meth:`Admission.notify` admits, in arrival order
across keys, every queue head whose ``try_route`` now succeeds; it costs one
routing call per admitted request plus one per key.

The router calls :meth:`Admission.notify` whenever capacity may have freed:
a ticket closed, a replica turned healthy, was un-ejected or un-drained, or
a limit was raised. Everything runs on one event loop; no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Enough to absorb a burst a few times the fleet's concurrency without letting
# a sustained overload grow memory: each waiter is a future and a timer.
DEFAULT_MAX_QUEUE = 1000
# Long enough to ride out a short burst (a few decode steps of the requests
# ahead); short next to a client's own timeout, so it can go elsewhere.
DEFAULT_QUEUE_TIMEOUT_S = 5.0
# 429 when the queue is full: "too many requests right now", which OpenAI
# SDKs retry with backoff honouring Retry-After. 503 when the wait expired,
# like HAProxy's ``timeout queue``.
DEFAULT_FULL_STATUS = 429
DEFAULT_TIMEOUT_STATUS = 503
DEFAULT_RETRY_AFTER_S = 1.0


class Rejected(Exception):
    """No capacity: answer ``status`` with ``Retry-After: retry_after_s``.

    ``reason`` is ``queue_full``, ``queue_timeout`` or ``shutting_down`` (a
    fixed set, for the rejections metric).
    """

    def __init__(self, status: int, retry_after_s: float, reason: str) -> None:
        super().__init__(f"{reason}: answer {status}, retry after {retry_after_s:g} s")
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason


class _Waiter:
    __slots__ = ("enqueued_at", "future", "key", "queued", "seq", "timer", "try_route")

    def __init__(
        self,
        future: asyncio.Future[Any],
        try_route: Callable[[], Any],
        key: Hashable,
        seq: int,
        enqueued_at: float,
    ) -> None:
        self.future = future
        self.try_route = try_route
        self.key = key
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.timer: asyncio.TimerHandle | None = None
        self.queued = True


class Admission:
    """A bounded FIFO of requests waiting for capacity, with a deadline each.

    ``await admit(try_route, release=...)`` returns what ``try_route``
    returned (not None) or raises :class:`Rejected`. ``release`` gives back a
    reservation that was made for a waiter which was cancelled at the same
    moment (a client that left while being admitted), so nothing leaks.
    """

    def __init__(
        self,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
        *,
        full_status: int = DEFAULT_FULL_STATUS,
        timeout_status: int = DEFAULT_TIMEOUT_STATUS,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queue < 0 or queue_timeout_s < 0 or retry_after_s < 0:
            raise ValueError("max_queue, queue_timeout_s and retry_after_s must be >= 0")
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.full_status = full_status
        self.timeout_status = timeout_status
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._queues: dict[Hashable, deque[_Waiter]] = {}
        self._waiting = 0
        self._seq = 0
        # Plain counters for the metrics module: admitted_immediately,
        # queued, admitted_after_wait, rejected_queue_full,
        # rejected_queue_timeout, rejected_shutting_down, cancelled,
        # route_error. ``wait_s_total`` sums the waits of admitted waiters.
        self.counters: Counter[str] = Counter()
        self.wait_s_total = 0.0

    @property
    def waiting(self) -> int:
        """Requests waiting now (the queue-length gauge)."""
        return self._waiting

    def oldest_wait_s(self) -> float:
        """How long the longest waiter has waited (0 with no waiters)."""
        heads = [q[0].enqueued_at for q in self._queues.values() if q]
        return self._clock() - min(heads) if heads else 0.0

    async def admit(
        self,
        try_route: Callable[[], T | None],
        *,
        release: Callable[[T], None],
        key: Hashable = None,
        timeout_s: float | None = None,
    ) -> T:
        """Route now if possible, else wait in line for capacity.

        ``try_route()`` returns a reservation (a dispatched ticket, typically)
        or None when every candidate is at its limit; an exception it raises
        (say, "no healthy replica") propagates to this caller. ``timeout_s``
        can shorten the wait (what is left of the request's own deadline).
        """
        queue = self._queues.get(key)
        if not queue:
            routed = try_route()
            if routed is not None:
                self.counters["admitted_immediately"] += 1
                return routed
        timeout = (
            self.queue_timeout_s if timeout_s is None else min(timeout_s, self.queue_timeout_s)
        )
        if self._waiting >= self.max_queue or timeout <= 0:
            self.counters["rejected_queue_full"] += 1
            raise Rejected(self.full_status, self.retry_after_s, "queue_full")

        loop = asyncio.get_running_loop()
        self._seq += 1
        waiter = _Waiter(loop.create_future(), try_route, key, self._seq, self._clock())
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(waiter)
        self._waiting += 1
        self.counters["queued"] += 1
        waiter.timer = loop.call_later(timeout, self._expire, waiter)
        try:
            result: T = await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter, release)
            raise
        finally:
            waiter.timer.cancel()
            self._remove(waiter)
        return result

    def notify(self) -> int:
        """Capacity may have freed: admit every queue head that now routes.

        Heads are tried in arrival order across keys; within a key, admission
        stops at the first head that does not fit (strict FIFO per key).
        Returns how many waiters were admitted.
        """
        admitted = 0
        heads = sorted((q[0].seq, key) for key, q in self._queues.items() if q)
        for _, key in heads:
            queue = self._queues[key]
            while queue:
                waiter = queue[0]
                if waiter.future.done():  # cancelled or expired; cleanup pending
                    self._remove(waiter)
                    continue
                try:
                    result = waiter.try_route()
                except Exception as exc:  # routing refused for good: tell the waiter
                    self.counters["route_error"] += 1
                    self._remove(waiter)
                    waiter.future.set_exception(exc)
                    continue
                if result is None:
                    break
                self._remove(waiter)
                self.counters["admitted_after_wait"] += 1
                self.wait_s_total += self._clock() - waiter.enqueued_at
                waiter.future.set_result(result)
                admitted += 1
        return admitted

    def reject_all(self, status: int = 503, reason: str = "shutting_down") -> int:
        """Refuse every waiter now (gateway shutdown); returns how many."""
        count = 0
        for queue in list(self._queues.values()):
            for waiter in list(queue):
                self._remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(Rejected(status, self.retry_after_s, reason))
                    self.counters[f"rejected_{reason}"] += 1
                    count += 1
        return count

    # --- internals --------------------------------------------------------------

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._remove(waiter)
        self.counters["rejected_queue_timeout"] += 1
        waiter.future.set_exception(
            Rejected(self.timeout_status, self.retry_after_s, "queue_timeout")
        )

    def _abandon(self, waiter: _Waiter, release: Callable[[Any], None]) -> None:
        """The waiting task was cancelled (client gone, server stopping)."""
        self.counters["cancelled"] += 1
        future = waiter.future
        if not future.done() or future.cancelled():
            return
        if future.exception() is not None:
            return  # refused at the same moment; nothing was reserved
        # Admitted and cancelled in the same loop iteration: the reservation
        # is ours to give back, and the capacity to hand to the next waiter.
        try:
            release(future.result())
        except Exception:
            log.exception("admission: releasing an abandoned reservation failed")
        self.notify()

    def _remove(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        queue = self._queues[waiter.key]
        if queue[0] is waiter:
            queue.popleft()  # the common case: admitted at the head
        else:
            queue.remove(waiter)
        self._waiting -= 1
        if not queue:
            del self._queues[waiter.key]
