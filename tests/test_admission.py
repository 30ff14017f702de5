"""Admission queue: bounded, FIFO, deadline-bound, cancellation-safe, late-binding."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.admission import Admission, Rejected

SLACK = 0.5


class Fleet:
    """Replicas with a concurrency limit; ``try_route`` reserves a slot.

    Stands in for the router: routing and reservation happen in one
    synchronous call, and a release hands the slot to the admission queue.
    """

    def __init__(self, admission: Admission, **limits: int) -> None:
        self.admission = admission
        self.limits = dict(limits)
        self.in_flight = dict.fromkeys(limits, 0)
        self.peak = 0

    def try_route(self) -> str | None:
        free = [n for n, lim in self.limits.items() if self.in_flight[n] < lim]
        if not free:
            return None
        name = min(free, key=lambda n: self.in_flight[n])
        self.in_flight[name] += 1
        self.peak = max(self.peak, sum(self.in_flight.values()))
        return name

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1
        self.admission.notify()

    async def admit(self, key: str | None = None, timeout_s: float | None = None) -> str:
        return await self.admission.admit(
            self.try_route, release=self.release, key=key, timeout_s=timeout_s
        )


async def settle() -> None:
    """Let every ready task run (admission hands results over via futures)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_routes_at_once_when_there_is_capacity() -> None:
    fleet = Fleet(Admission(), a=1, b=1)
    assert {await fleet.admit(), await fleet.admit()} == {"a", "b"}
    assert fleet.admission.counters["admitted_immediately"] == 2
    assert fleet.admission.waiting == 0


async def test_waits_for_capacity_and_is_admitted_fifo() -> None:
    fleet = Fleet(Admission(max_queue=10, queue_timeout_s=5.0), a=1)
    first = await fleet.admit()
    order: list[int] = []

    async def wait(i: int) -> None:
        name = await fleet.admit()
        order.append(i)
        await asyncio.sleep(0)
        fleet.release(name)

    tasks = [asyncio.create_task(wait(i)) for i in range(5)]
    await settle()
    assert fleet.admission.waiting == 5
    fleet.release(first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert fleet.admission.counters["admitted_after_wait"] == 5
    assert fleet.peak == 1  # the limit held throughout
    assert fleet.admission.waiting == 0


async def test_deadline_rejects_with_503_within_timeout_plus_slack() -> None:
    timeout = 0.3
    fleet = Fleet(Admission(queue_timeout_s=timeout, retry_after_s=2.0), a=1)
    await fleet.admit()
    start = time.monotonic()
    with pytest.raises(Rejected) as info:
        await fleet.admit()
    elapsed = time.monotonic() - start
    assert timeout - 0.05 <= elapsed <= timeout + SLACK
    assert (info.value.status, info.value.reason) == (503, "queue_timeout")
    assert info.value.retry_after_s == 2.0
    assert fleet.admission.waiting == 0
    assert fleet.admission.counters["rejected_queue_timeout"] == 1


async def test_caller_deadline_shortens_the_wait() -> None:
    fleet = Fleet(Admission(queue_timeout_s=30.0), a=1)
    await fleet.admit()
    start = time.monotonic()
    with pytest.raises(Rejected):
        await fleet.admit(timeout_s=0.1)
    assert time.monotonic() - start <= 0.1 + SLACK


async def test_full_queue_rejects_at_once_with_429() -> None:
    fleet = Fleet(Admission(max_queue=2, queue_timeout_s=30.0), a=1)
    await fleet.admit()
    waiters = [asyncio.create_task(fleet.admit()) for _ in range(2)]
    await settle()
    start = time.monotonic()
    with pytest.raises(Rejected) as info:
        await fleet.admit()
    assert time.monotonic() - start < SLACK  # no waiting at all
    assert (info.value.status, info.value.reason) == (429, "queue_full")
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert fleet.admission.waiting == 0


async def test_zero_queue_never_waits() -> None:
    fleet = Fleet(Admission(max_queue=0), a=1)
    await fleet.admit()
    with pytest.raises(Rejected) as info:
        await fleet.admit()
    assert info.value.reason == "queue_full"


async def test_cancelled_waiter_leaves_the_queue() -> None:
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=1)
    held = await fleet.admit()
    doomed = asyncio.create_task(fleet.admit())
    survivor = asyncio.create_task(fleet.admit())
    await settle()
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    assert admission.waiting == 1
    assert admission.counters["cancelled"] == 1
    fleet.release(held)
    assert await survivor == "a"
    assert admission.waiting == 0
    assert not admission._queues  # no empty queues left behind
    assert fleet.in_flight == {"a": 1}


async def test_cancelled_while_being_admitted_gives_the_slot_back() -> None:
    """The client leaves in the same loop turn as its admission: no leak."""
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=1)
    held = await fleet.admit()
    racer = asyncio.create_task(fleet.admit())
    next_in_line = asyncio.create_task(fleet.admit())
    await settle()
    fleet.release(held)  # racer is admitted (slot reserved) ...
    racer.cancel()  # ... and cancelled before it could run
    await asyncio.gather(racer, return_exceptions=True)
    assert racer.cancelled()
    # The slot went back and on to the next waiter (a leak would hang here).
    async with asyncio.timeout(SLACK):
        assert await next_in_line == "a"
    assert fleet.in_flight == {"a": 1}
    assert admission.waiting == 0


async def test_routing_reruns_when_capacity_frees_late_binding() -> None:
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=1)
    await fleet.admit()
    waiter = asyncio.create_task(fleet.admit())
    await settle()
    # A replica joins while the request waits: the decision is made now.
    fleet.limits["b"] = 1
    fleet.in_flight["b"] = 0
    admission.notify()
    assert await waiter == "b"


async def test_a_full_key_does_not_block_another_key() -> None:
    admission = Admission(queue_timeout_s=30.0)
    model_x = Fleet(admission, x1=1)
    model_y = Fleet(admission, y1=1)
    await model_x.admit(key="x")
    stuck = asyncio.create_task(model_x.admit(key="x"))
    await settle()
    assert await model_y.admit(key="y") == "y1"  # at once, despite x's waiter
    stuck.cancel()
    await asyncio.gather(stuck, return_exceptions=True)


async def test_arrivals_do_not_barge_past_waiters_of_their_key() -> None:
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=1)
    held = await fleet.admit()
    early = asyncio.create_task(fleet.admit())
    await settle()
    # Capacity frees without a notify (say, a limit was raised); a newcomer
    # must not take it ahead of the waiter.
    fleet.in_flight["a"] -= 1
    late = asyncio.create_task(fleet.admit())
    await settle()
    assert not early.done() and not late.done()
    admission.notify()
    assert await early == "a"
    assert not late.done()  # the one slot is early's now
    fleet.release("a")
    assert await late == "a"
    del held


async def test_notify_admits_as_many_as_fit_across_keys_in_arrival_order() -> None:
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=0)
    tasks = [asyncio.create_task(fleet.admit(key=k)) for k in ("x", "y", "x", "y")]
    await settle()
    fleet.limits["a"] = 3
    assert admission.notify() == 3
    await settle()
    assert [t.done() for t in tasks] == [True, True, True, False]
    tasks[3].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_routing_error_while_waiting_reaches_the_waiter() -> None:
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=1)
    await fleet.admit()
    calls = 0

    def route() -> str | None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise LookupError("no healthy replica")
        return None

    waiter = asyncio.create_task(admission.admit(route, release=fleet.release))
    await settle()
    admission.notify()
    with pytest.raises(LookupError):
        await waiter
    assert admission.waiting == 0


async def test_reject_all_on_shutdown() -> None:
    admission = Admission(queue_timeout_s=30.0)
    fleet = Fleet(admission, a=0)
    tasks = [asyncio.create_task(fleet.admit()) for _ in range(3)]
    await settle()
    assert admission.reject_all() == 3
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Rejected) and r.reason == "shutting_down" for r in results)
    assert admission.waiting == 0


async def test_overload_300_streams_small_capacity_all_answered_and_bounded() -> None:
    """M16 in miniature: 300 concurrent requests, 3 replicas x 4 slots."""
    timeout, max_queue = 0.5, 100
    admission = Admission(max_queue=max_queue, queue_timeout_s=timeout)
    fleet = Fleet(admission, a=4, b=4, c=4)
    peak_waiting = 0
    outcomes: list[str] = []
    latencies: list[float] = []

    async def request() -> None:
        nonlocal peak_waiting
        start = time.monotonic()
        try:
            name = await fleet.admit()
        except Rejected as exc:
            outcomes.append(f"{exc.status}")
        else:
            peak_waiting = max(peak_waiting, admission.waiting)
            try:
                await asyncio.sleep(0.1)  # a short generation
            finally:
                fleet.release(name)
            outcomes.append("ok")
        latencies.append(time.monotonic() - start)

    await asyncio.gather(*(request() for _ in range(300)))
    assert len(outcomes) == 300  # every request answered
    # Some served, the excess over the queue shed at once (429), and the
    # queue tail refused at its deadline (503): 12 slots x 0.1 s cannot
    # drain 100 waiters in 0.5 s.
    assert set(outcomes) == {"ok", "429", "503"}
    assert outcomes.count("429") == 300 - 12 - max_queue
    assert max(latencies) <= timeout + 0.1 + SLACK
    assert peak_waiting <= max_queue
    assert fleet.peak <= 12  # never over capacity
    assert fleet.in_flight == {"a": 0, "b": 0, "c": 0}
    assert admission.waiting == 0 and not admission._queues


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        Admission(max_queue=-1)
