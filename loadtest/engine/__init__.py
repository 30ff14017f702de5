"""The engine model: one continuous-batching LLM engine, pure and discrete.

- ``engine``: batching, paged KV cache with prefix caching, preemption, step times;
- ``moe``: mixture-of-experts routing, its skew and its cost;
- ``profiles``: iteration-time profiles from Vidur's measured tables (data/);
  docs/simulator.md says how each preset is derived and how far to trust it.

The policy simulator steps it on a virtual clock (loadtest/sim/core.py); the
simulated replica steps it in real time (loadtest/replica/engine_model.py).
"""

from loadtest.engine.engine import (
    DEFAULT_PRESET,
    DEFAULT_REPLICA_PRESET,
    Engine,
    EngineConfig,
    EngineRequest,
    RequestRefused,
    StepResult,
    preset,
    saturated_throughput,
)
from loadtest.engine.moe import MoEConfig

__all__ = [
    "DEFAULT_PRESET",
    "DEFAULT_REPLICA_PRESET",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "MoEConfig",
    "RequestRefused",
    "StepResult",
    "preset",
    "saturated_throughput",
]
