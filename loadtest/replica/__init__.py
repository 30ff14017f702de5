"""The simulated vLLM/SGLang replica (``dp-router replica``): docs/replica.md.

- ``server``: state, counters, handlers, the aiohttp app, :func:`run_replica`;
- ``config``: :class:`SimReplicaConfig`, what defines one replica;
- ``faults``: the ``x-sim-fault`` header grammar;
- ``openai``: the OpenAI-compatible request and response bodies;
- ``metrics``: vLLM/SGLang ``/metrics`` and the ORCA header, from one table;
- ``model``: the replica-model protocol; ``paced`` and ``engine_model``: the two models;
- ``cli``: ``dp-router replica``.
"""

from loadtest.replica.config import SimReplicaConfig
from loadtest.replica.server import DOMAIN_HEADER, SimReplicaState, create_replica_app, run_replica

__all__ = [
    "DOMAIN_HEADER",
    "SimReplicaConfig",
    "SimReplicaState",
    "create_replica_app",
    "run_replica",
]
