"""Admission control: a short, bounded wait for capacity, then a clear refusal.

When every candidate replica is at its concurrency limit, a request waits at
the gateway instead of piling onto an engine queue the gateway cannot see or
cancel, but only briefly and only so many (Envoy's ``max_pending_requests``,
HAProxy's ``timeout queue``). Past ``max_queue`` waiters a request is refused
at once (429); past ``queue_timeout_s`` a waiter is refused (503); both carry
a Retry-After. Nothing waits unbounded, and memory is bounded by
``max_queue`` (docs/reliability.md, M16).

**The caller waits, then decides.** Admission never routes. A request holds
a :class:`Turn`; it routes when nobody is ahead of it, and when routing
finds every candidate full it waits for its turn to come round again. So a
request's routing decision is made once per attempt, when it can be acted on
at once, and sees the fleet as it is then (a replica that came back, one
that was ejected meanwhile).

**Fairness.** Waiters queue FIFO per key (the model): a waiter for a full
model never blocks one for a model with room. A new arrival whose key has
waiters, or a woken waiter still deciding, queues behind them rather than
barging ahead. :meth:`Admission.notify` wakes the head of every key; a woken
turn that dispatches wakes the next one (capacity may remain), and one that
still finds no room goes back to the head of its queue, keeping its deadline.

The router calls :meth:`Admission.notify` whenever capacity may have freed:
a ticket closed, a replica's status changed, an ejection ended. Everything
runs on one event loop; no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable

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


class Turn:
    """One request's place in line for one key.

    ``must_wait()``: someone is ahead (decide only when it is False).
    ``await wait()``: wait until woken; raises :class:`Rejected`.
    ``close()``: done deciding (dispatched, refused, or gone): the next
    waiter may try. Idempotent; call it in a ``finally``.
    """

    __slots__ = ("_admission", "_future", "deadline", "key", "waited_s", "woken")

    def __init__(self, admission: Admission, key: Hashable) -> None:
        self._admission = admission
        self.key = key
        self.deadline: float | None = None
        self.woken = False  # holds the key's turn right now
        self.waited_s = 0.0
        self._future: asyncio.Future[None] | None = None

    def must_wait(self) -> bool:
        return not self.woken and self._admission.busy(self.key)

    async def wait(self) -> None:
        await self._admission._wait(self)

    def close(self) -> None:
        self._admission._close(self)


class Admission:
    """Bounded FIFO queues of requests waiting for capacity, per key."""

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
        self._queues: dict[Hashable, deque[Turn]] = {}
        self._woken: dict[Hashable, int] = {}  # woken turns still deciding, per key
        self._waiting = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        """Requests waiting now (the queue-length gauge)."""
        return self._waiting

    def turn(self, key: Hashable) -> Turn:
        return Turn(self, key)

    def busy(self, key: Hashable) -> bool:
        """Someone is queued for ``key``, or woken and still deciding."""
        return bool(self._queues.get(key)) or self._woken.get(key, 0) > 0

    def notify(self) -> None:
        """Capacity may have freed: wake the head of every key with nobody deciding."""
        if not self._waiting:
            return  # every request settles here: nobody queued is the common case
        for key in list(self._queues):
            if not self._woken.get(key):
                self._wake_head(key)

    def close(self, status: int = 503, reason: str = "shutting_down") -> int:
        """Refuse every waiter now, and every later wait (gateway shutdown)."""
        self._closed = True
        count = 0
        for key, queue in list(self._queues.items()):
            while queue:
                turn = queue.popleft()
                self._waiting -= 1
                future = turn._future
                if future is not None and not future.done():
                    future.set_exception(Rejected(status, self.retry_after_s, reason))
                    count += 1
            del self._queues[key]
        return count

    # --- what Turn calls -------------------------------------------------------

    async def _wait(self, turn: Turn) -> None:
        now = self._clock()
        if self._closed:
            raise Rejected(503, self.retry_after_s, "shutting_down")
        if turn.deadline is None:
            if self._waiting >= self.max_queue or self.queue_timeout_s <= 0:
                raise Rejected(self.full_status, self.retry_after_s, "queue_full")
            turn.deadline = now + self.queue_timeout_s
        front = turn.woken  # woken and still no room: back to the head
        if turn.woken:
            self._release_woken(turn)
        remaining = turn.deadline - now
        if remaining <= 0:
            raise Rejected(self.timeout_status, self.retry_after_s, "queue_timeout")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        turn._future = future
        queue = self._queues.setdefault(turn.key, deque())
        if front:
            queue.appendleft(turn)
        else:
            queue.append(turn)
        self._waiting += 1
        timer = loop.call_later(remaining, self._expire, turn)
        try:
            await future
        except BaseException:
            self._dequeue(turn)
            raise
        finally:
            timer.cancel()
            turn._future = None
            turn.waited_s += self._clock() - now

    def _close(self, turn: Turn) -> None:
        self._dequeue(turn)
        if turn.woken:
            self._release_woken(turn)
            # The woken turn found room (or gave up): the next one may too.
            self._wake_head(turn.key)

    # --- internals -----------------------------------------------------------------

    def _wake_head(self, key: Hashable) -> None:
        queue = self._queues.get(key)
        while queue:
            turn = queue.popleft()
            self._waiting -= 1
            future = turn._future
            if future is None or future.done():
                continue  # expired or cancelled in this same loop iteration
            turn.woken = True
            self._woken[key] = self._woken.get(key, 0) + 1
            future.set_result(None)
            break
        if queue is not None and not queue:
            del self._queues[key]

    def _release_woken(self, turn: Turn) -> None:
        turn.woken = False
        left = self._woken.get(turn.key, 0) - 1
        if left > 0:
            self._woken[turn.key] = left
        else:
            self._woken.pop(turn.key, None)

    def _dequeue(self, turn: Turn) -> None:
        queue = self._queues.get(turn.key)
        if queue is None or turn not in queue:
            return
        queue.remove(turn)
        self._waiting -= 1
        if not queue:
            del self._queues[turn.key]

    def _expire(self, turn: Turn) -> None:
        future = turn._future
        if future is None or future.done():
            return
        self._dequeue(turn)
        future.set_exception(Rejected(self.timeout_status, self.retry_after_s, "queue_timeout"))
