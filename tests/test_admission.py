"""Admission: FIFO turns per key, bounded waits, no barging, clean shutdown.

A tiny "fleet" of N slots stands in for routing: a request that finds a free
slot takes it (decide + dispatch), otherwise it waits for its turn; freeing
a slot calls ``notify`` as the proxy does when a ticket settles.
"""

from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission, Rejected


class Slots:
    """Capacity as the proxy sees it: decide() succeeds while a slot is free."""

    def __init__(self, admission: Admission, n: int) -> None:
        self.admission = admission
        self.free = n
        self.order: list[str] = []

    async def acquire(self, name: str, key: str = "m") -> None:
        turn = self.admission.turn(key)
        try:
            while True:
                if not turn.must_wait() and self.free > 0:
                    self.free -= 1
                    self.order.append(name)
                    return
                await turn.wait()
        finally:
            turn.close()

    def release(self) -> None:
        self.free += 1
        self.admission.notify()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_immediate_when_capacity() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=1.0)
    slots = Slots(adm, 2)
    await slots.acquire("a")
    await slots.acquire("b")
    assert slots.order == ["a", "b"]
    assert adm.waiting == 0


async def test_waiters_admitted_in_arrival_order() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=5.0)
    slots = Slots(adm, 1)
    await slots.acquire("first")
    tasks = [asyncio.create_task(slots.acquire(f"w{i}")) for i in range(4)]
    await settle()
    assert adm.waiting == 4
    for _ in range(4):
        slots.release()
        await settle()
    await asyncio.gather(*tasks)
    assert slots.order == ["first", "w0", "w1", "w2", "w3"]
    assert adm.waiting == 0


async def test_new_arrival_does_not_barge_past_waiters() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=5.0)
    slots = Slots(adm, 1)
    await slots.acquire("first")
    waiter = asyncio.create_task(slots.acquire("waiter"))
    await settle()
    # A slot frees and, in the same loop iteration, a newcomer arrives: the
    # woken waiter still holds its turn, so the newcomer queues behind it.
    slots.release()
    newcomer = asyncio.create_task(slots.acquire("newcomer"))
    await settle()
    assert slots.order == ["first", "waiter"]
    slots.release()
    await asyncio.gather(waiter, newcomer)
    assert slots.order == ["first", "waiter", "newcomer"]


async def test_capacity_for_several_wakes_them_in_a_chain() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=5.0)
    slots = Slots(adm, 0)
    tasks = [asyncio.create_task(slots.acquire(f"w{i}")) for i in range(3)]
    await settle()
    slots.free = 3  # a replica came back with room for three
    adm.notify()
    await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
    assert slots.order == ["w0", "w1", "w2"]


async def test_woken_turn_without_room_returns_to_the_head() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=5.0)
    slots = Slots(adm, 0)
    tasks = [asyncio.create_task(slots.acquire(f"w{i}")) for i in range(2)]
    await settle()
    adm.notify()  # spurious wake: no slot is free
    await settle()
    assert adm.waiting == 2
    slots.release()
    await settle()
    assert slots.order == ["w0"]
    slots.release()
    await asyncio.gather(*tasks)
    assert slots.order == ["w0", "w1"]


async def test_keys_do_not_block_each_other() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=5.0)
    full = Slots(adm, 0)
    blocked = asyncio.create_task(full.acquire("a", key="model-a"))
    await settle()
    roomy = Slots(adm, 1)
    await asyncio.wait_for(roomy.acquire("b", key="model-b"), 1.0)
    assert roomy.order == ["b"]
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert adm.waiting == 0


async def test_queue_full_is_refused_at_once() -> None:
    adm = Admission(max_queue=2, queue_timeout_s=5.0, full_status=429)
    slots = Slots(adm, 0)
    tasks = [asyncio.create_task(slots.acquire(f"w{i}")) for i in range(2)]
    await settle()
    with pytest.raises(Rejected) as info:
        await slots.acquire("third")
    assert (info.value.status, info.value.reason) == (429, "queue_full")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert adm.waiting == 0


async def test_wait_expires_with_503_and_keeps_its_deadline_across_wakes() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=0.3, timeout_status=503)
    slots = Slots(adm, 0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    task = asyncio.create_task(slots.acquire("w"))
    await asyncio.sleep(0.1)
    adm.notify()  # woken without room: back in line, same deadline
    with pytest.raises(Rejected) as info:
        await task
    elapsed = loop.time() - t0
    assert (info.value.status, info.value.reason) == (503, "queue_timeout")
    assert 0.3 <= elapsed < 0.3 + 0.5
    assert adm.waiting == 0


async def test_cancelled_waiter_leaves_no_trace_and_passes_its_turn() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=5.0)
    slots = Slots(adm, 0)
    first = asyncio.create_task(slots.acquire("first"))
    second = asyncio.create_task(slots.acquire("second"))
    await settle()
    slots.free = 1
    adm.notify()
    first.cancel()  # woken and cancelled in the same iteration
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    assert slots.order == ["second"]
    assert adm.waiting == 0
    assert not adm.busy("m")


async def test_close_refuses_waiters_and_later_waits() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=30.0)
    slots = Slots(adm, 0)
    tasks = [asyncio.create_task(slots.acquire(f"w{i}")) for i in range(3)]
    await settle()
    assert adm.close() == 3
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
    assert all(isinstance(r, Rejected) and r.reason == "shutting_down" for r in results)
    with pytest.raises(Rejected):
        await slots.acquire("late")
    assert adm.waiting == 0


async def test_zero_timeout_never_queues() -> None:
    adm = Admission(max_queue=10, queue_timeout_s=0.0)
    slots = Slots(adm, 0)
    with pytest.raises(Rejected) as info:
        await slots.acquire("w")
    assert info.value.reason == "queue_full"


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        Admission(max_queue=-1)
