"""The engine model (loadtest/engine/) as a replica model, stepped in real time.

One asyncio task drives the engine in real time: it runs ``Engine.step`` at
the loop's current time, sleeps for the step's modelled duration (times the
``set_speed`` factor), then hands each request its new tokens through a
per-request queue. The task exists only while the engine has work and is
started again by the next request, so an idle replica costs nothing and a
stopped app leaves nothing running.

Why real time and not a virtual clock: the replica is load-tested through
the real gateway, whose queue-depth and latency signals only mean something
if TTFT and token pacing happen on the wall clock.

Closing a request's iterator early (client gone) aborts it in the engine,
which frees its KV at once, as vLLM does on a client disconnect.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from loadtest.engine import Engine, EngineRequest
from loadtest.replica.model import Job, ModelLoad

# asyncio.sleep wakes up late by ~0.1-1 ms, which on 6 ms steps would slow the
# modelled engine by up to 15%. The next step therefore starts when the last
# one was due to end, as long as the loop is less than this far behind; beyond
# that the loop was blocked, and the engine honestly loses the time.
MAX_CATCH_UP_S = 0.02
# The driver task's name, so a test can check that none is left running.
DRIVER_TASK_NAME = "engine-model-driver"


class EngineModel:
    """A :class:`~loadtest.replica.model.ReplicaModel` over an :class:`~loadtest.engine.Engine`."""

    def __init__(self, engine: Engine, *, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed factor must be > 0")
        self.engine = engine
        self._speed = speed
        # Per live request: a queue of new-token counts, or the exception that
        # stopped the driver.
        self._queues: dict[str, asyncio.Queue[int | BaseException]] = {}
        self._driver: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    # -- protocol -----------------------------------------------------------

    def set_speed(self, factor: float) -> None:
        if factor <= 0:
            raise ValueError("speed factor must be > 0")
        self._speed = factor

    def load(self) -> ModelLoad:
        s = self.engine.stats()
        return ModelLoad(
            running=s["running"],
            waiting=s["waiting"],
            kv_usage=min(1.0, s["kv_usage"]),
            prefix_queries=s["prefix_queries"],
            prefix_hits=s["prefix_hits"],
            readmit_queries=s["readmit_queries"],
            readmit_hits=s["readmit_hits"],
            expert_tokens=s["expert_tokens"],
            expert_overflow=s["expert_overflow"],
            preemptions=s["preemptions"],
        )

    def refusal(self, job: Job) -> str | None:
        """Why the engine could never run ``job`` (larger than its KV cache), or None."""
        return self.engine.refusal(job.prompt_tokens, job.max_tokens)

    async def generate(self, job: Job) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        # Our own id: a client may reuse its request id, the engine must not see twice.
        rid = f"{job.request_id}#{next(self._ids)}"
        # Raises ValueError for a request that can never fit (the replica answers 400).
        self.engine.add_request(
            EngineRequest(
                rid, job.prompt_tokens, job.max_tokens, tuple(job.block_hashes), job.domain
            ),
            loop.time(),
        )
        queue: asyncio.Queue[int | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        self._ensure_driver()
        try:
            left = job.max_tokens
            while left > 0:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("engine driver failed") from item
                left -= item
                yield item
        finally:
            del self._queues[rid]
            self.engine.abort(rid)  # no-op once finished
            if not self._queues and not self.engine.has_work() and self._driver is not None:
                self._driver.cancel()
                self._driver = None

    # -- driver -------------------------------------------------------------

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(
                self._drive(), name=DRIVER_TASK_NAME
            )

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        due: float | None = None  # when the previous step was due to end
        try:
            while engine.has_work():
                now = loop.time()
                start = due if due is not None and now - due < MAX_CATCH_UP_S else now
                res = engine.step(start)
                due = start + res.duration_s * self._speed
                await asyncio.sleep(max(0.0, due - loop.time()))
                for rid, n in res.emitted.items():
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(n)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a model bug must not leave requests hanging
            for q in self._queues.values():
                q.put_nowait(e)
        finally:
            if self._driver is asyncio.current_task():
                self._driver = None
