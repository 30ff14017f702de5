"""Queue-server replica models for the policy simulator (the engine model is the other kind).

Two kinds of replica model, one contract with the core (loadtest/sim/core.py):

- Queue servers (``exp``, ``lognormal``): ``slots`` requests in service at
  once, FCFS behind them; each request's service time is drawn when it
  starts. ``exp`` is the queueing-theory model (Exp(mu), first token at the
  start of service, so TTFT is the wait); ``lognormal`` is token-proportional
  (prefill of the uncached prompt + decode of the output, times a lognormal
  noise of mean 1), first token when the prefill part is done. Optionally a
  prefix cache per replica (LRU of prefix blocks, capacity in blocks) that
  removes the cached part of the prefill.
- ``engine``: loadtest/engine/'s continuous-batching model, stepped
  iteration by iteration on the virtual clock.

A slow replica multiplies its service times (or iteration durations) by its
factor.
"""

from __future__ import annotations

import random
from collections import OrderedDict

# Token-proportional model defaults for an 8B-class model on one H100: prefill
# ~40k tokens/s on long prompts, a decode step ~7 ms (the engine model's
# Llama-2-7B profile gives the same order: ~6-7 ms per decode step).
PREFILL_TOKENS_PER_S = 40_000.0
DECODE_S_PER_TOKEN = 0.007
# Service-time noise around the token formula (lognormal, mean 1): the same
# request costs more or less with its batch-mates; 0.25 is our guess.
NOISE_SIGMA = 0.25


class PrefixCache:
    """An LRU of prefix-block hashes: how much of a prompt a replica has cached."""

    __slots__ = ("capacity", "hits", "lru", "queries")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.queries = 0

    def lookup_insert(self, hashes: tuple[int, ...]) -> int:
        """Leading blocks already cached; then cache all of them (most recent last)."""
        lru = self.lru
        hit = 0
        for h in hashes:
            if h in lru:
                hit += 1
            else:
                break
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.capacity:
            lru.popitem(last=False)
        self.hits += hit
        self.queries += len(hashes)
        return hit


class QueueModel:
    """A queue server: ``slots`` in service at once, FCFS behind them; ``sample``
    draws one request's (service time, time to its first token)."""

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots

    def sample(
        self, prompt: int, output: int, cached_tokens: int, rng: random.Random
    ) -> tuple[float, float]:
        raise NotImplementedError

    def mean(self, prompt: float, output: float) -> float:
        """Mean service time of a request of these mean lengths, no cache."""
        raise NotImplementedError


class ExpQueue(QueueModel):
    """Exp(mu) service, independent of lengths; first token at the start."""

    def __init__(self, mu: float = 1.0, slots: int = 1) -> None:
        super().__init__(slots)
        self.mu = mu

    def sample(
        self, prompt: int, output: int, cached_tokens: int, rng: random.Random
    ) -> tuple[float, float]:
        return rng.expovariate(self.mu), 0.0

    def mean(self, prompt: float, output: float) -> float:
        return 1.0 / self.mu


class LognormalQueue(QueueModel):
    """(uncached prompt / prefill rate + output x decode time) x LogNormal(mean 1)."""

    def __init__(
        self,
        slots: int = 1,
        prefill_tps: float = PREFILL_TOKENS_PER_S,
        decode_s: float = DECODE_S_PER_TOKEN,
        sigma: float = NOISE_SIGMA,
    ) -> None:
        super().__init__(slots)
        self.prefill_tps = prefill_tps
        self.decode_s = decode_s
        self.sigma = sigma
        self._mu = -sigma * sigma / 2  # lognormal with mean exactly 1

    def sample(
        self, prompt: int, output: int, cached_tokens: int, rng: random.Random
    ) -> tuple[float, float]:
        noise = rng.lognormvariate(self._mu, self.sigma) if self.sigma > 0 else 1.0
        prefill = max(prompt - cached_tokens, 1) / self.prefill_tps * noise
        return prefill + output * self.decode_s * noise, prefill

    def mean(self, prompt: float, output: float) -> float:
        return prompt / self.prefill_tps + output * self.decode_s


def make_queue_model(name: str, *, slots: int = 1, mu: float = 1.0) -> QueueModel:
    if name == "exp":
        return ExpQueue(mu, slots)
    if name == "lognormal":
        return LognormalQueue(slots)
    raise ValueError(f"unknown service model {name!r}")
