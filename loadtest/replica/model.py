"""A replica model: how the simulated replica times its tokens, behind one protocol.

The HTTP side of the simulated replica (loadtest/replica/server.py) knows
nothing about how tokens are timed: it asks a :class:`ReplicaModel` for a
stream of "new tokens at this engine step" and reads its :class:`ModelLoad`
for ``/metrics`` and the ORCA header. That split lets the same server run
a trivially paced model (loadtest/replica/paced.py: fault tests, the
overhead benchmark) or the engine model stepped in real time
(loadtest/replica/engine_model.py: continuous batching, KV cache, prefix
reuse, MoE experts) for policy work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Job:
    """One generation request, as the model sees it (already parsed)."""

    request_id: str
    prompt_text: str
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    max_tokens: int
    domain: str | None = None


@dataclass(slots=True)
class ModelLoad:
    """A replica model's load, in the units real engines report.

    ``running``/``waiting``/``kv_usage`` are gauges; the rest are counters
    (monotonic since start), as in vLLM's Prometheus metrics.
    """

    running: int
    waiting: int
    kv_usage: float  # fraction of KV cache in use, in [0, 1]
    prefix_queries: int = 0  # tokens looked up in the prefix cache at first admission
    prefix_hits: int = 0  # of which found cached
    # The same, when a preempted request is admitted again (it finds its own blocks).
    readmit_queries: int = 0
    readmit_hits: int = 0
    expert_tokens: list[int] = field(default_factory=list)  # routed tokens per expert
    expert_overflow: list[int] = field(default_factory=list)  # dropped tokens per expert
    preemptions: int = 0


@runtime_checkable
class ReplicaModel(Protocol):
    """What the replica server needs from a model of token generation."""

    def generate(self, job: Job) -> AsyncIterator[int]:
        """Yield the number of NEW output tokens at each engine step.

        The first yield is the first token (its timing is the TTFT);
        exhaustion means finished. Closing the iterator early (``aclose()``,
        or cancelling the task iterating it) means the request was aborted,
        and the model must free what the job held.
        """
        ...

    def load(self) -> ModelLoad: ...

    # Optional: ``refusal(job) -> str | None``, why the model could never run
    # ``job`` (the server answers 400 with it before any header, as vLLM
    # refuses a request larger than its KV cache). Models without it accept all.

    def set_speed(self, factor: float) -> None:
        """Slow the model down at runtime: 1.0 is normal, 10 is 10x slower."""
        ...
