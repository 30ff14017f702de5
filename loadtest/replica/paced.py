"""The paced replica model: a fixed time to first token, then a fixed pace.

Sleep the time to first token, then one token every ``token_interval_s``;
with ``max_running`` the extra jobs queue in FIFO order and are reported as
``waiting``, like an engine whose batch is full. Cheap and exact, so fault
tests and the overhead benchmark use it; policy work wants the engine model
(loadtest/replica/engine_model.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from loadtest.replica.model import Job, ModelLoad
from policies.prefix import BLOCK_TOKENS

# With token_interval_s == 0 nothing sleeps, so a long generation would never
# give the event loop back: other replicas in the same process, health checks
# and client-disconnect cancellation would all stall behind it. Yielding once
# every this many tokens keeps the loop responsive at a negligible cost.
_YIELD_EVERY_TOKENS = 32

# Blocks remembered by PacedModel's toy prefix cache (LRU). 4096 blocks of
# 64 tokens is ~256k tokens: enough for tests and demos to see hits, small
# enough that the memory stays flat in a long soak.
_PREFIX_CACHE_BLOCKS = 4096


class PacedModel:
    """TTFT, then one token per ``token_interval_s``; optional FIFO queue.

    - TTFT is ``ttft_s`` plus, with ``prefill_tokens_per_s`` > 0, the prompt
      tokens not found in the prefix cache at that prefill rate: a returning
      multi-turn session that lands on the replica holding its context starts
      faster, as on a real engine (0 keeps TTFT fixed, for exact tests).

    - ``token_interval_s == 0``: no sleeping at all (a fast upstream for the
      overhead benchmark); the loop is still yielded every few tokens.
    - ``max_running``: at most that many jobs generate at once; the others
      wait in arrival order and count as ``waiting``.
    - ``kv_usage`` is ``running / max_running`` (0 when unbounded): a crude
      stand-in that at least moves with load.
    - A small LRU of prefix block hashes feeds the prefix-cache counters, so
      prefix-aware routing shows up in ``/metrics`` even with this model.
    """

    def __init__(
        self,
        token_interval_s: float,
        ttft_s: float = 0.0,
        max_running: int | None = None,
        prefill_tokens_per_s: float = 0.0,
    ) -> None:
        if token_interval_s < 0 or ttft_s < 0 or prefill_tokens_per_s < 0:
            raise ValueError("token_interval_s, ttft_s and prefill_tokens_per_s must be >= 0")
        if max_running is not None and max_running < 1:
            raise ValueError("max_running must be >= 1 or None")
        self.token_interval_s = token_interval_s
        self.ttft_s = ttft_s
        self.max_running = max_running
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self._speed = 1.0
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._prefix_lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._prefix_queries = 0
        self._prefix_hits = 0

    # -- protocol -----------------------------------------------------------

    def set_speed(self, factor: float) -> None:
        if factor <= 0:
            raise ValueError("speed factor must be > 0")
        self._speed = factor

    def load(self) -> ModelLoad:
        kv = self._running / self.max_running if self.max_running else 0.0
        return ModelLoad(
            running=self._running,
            waiting=len(self._waiters),
            kv_usage=min(1.0, kv),
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
        )

    async def generate(self, job: Job) -> AsyncIterator[int]:
        await self._acquire()
        try:
            cached = self._lookup_prefix(job)
            ttft = self.ttft_s
            if self.prefill_tokens_per_s > 0:
                ttft += max(0, job.prompt_tokens - cached) / self.prefill_tokens_per_s
            await self._pause(ttft)
            for i in range(job.max_tokens):
                if i:
                    await self._pause(self.token_interval_s, i)
                yield 1
        finally:
            self._release()

    # -- internals ----------------------------------------------------------

    async def _pause(self, seconds: float, i: int = 0) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds * self._speed)
        elif i % _YIELD_EVERY_TOKENS == 0:
            await asyncio.sleep(0)

    async def _acquire(self) -> None:
        if self.max_running is None or (self._running < self.max_running and not self._waiters):
            self._running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _release() hands its slot over: _running is unchanged
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # slot handed over, _running stays
                return
        self._running -= 1

    def _lookup_prefix(self, job: Job) -> int:
        """Count the prompt's cached leading tokens (and return them); cache it."""
        self._prefix_queries += job.prompt_tokens
        lru = self._prefix_lru
        hit_blocks = 0
        for h in job.block_hashes:
            if h not in lru:
                break
            hit_blocks += 1
        cached = min(job.prompt_tokens, hit_blocks * BLOCK_TOKENS)
        self._prefix_hits += cached
        for h in job.block_hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > _PREFIX_CACHE_BLOCKS:
            lru.popitem(last=False)
        return cached
