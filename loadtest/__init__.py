"""Load-testing tools: everything that drives, fakes or simulates the gateway's world.

- ``replica/``: the simulated vLLM/SGLang replica (``dp-router replica``, docs/replica.md);
- ``engine/``: the engine model (continuous batching, KV cache, MoE, measured profiles);
- ``workloads/``: named workloads and the vendored public traces;
- ``sim/``: the discrete-event policy simulator (``dp-router simulate``);
- ``procs``: the one process harness (spawn, wait, stop) and gateway config writer;
- ``loadgen`` (``dp-router loadtest``) and ``report``: drive an endpoint, summarize;
- ``bench``, ``demo``, ``faults``: the gateway's overhead, a comparison of
  policies, what clients see when a replica dies.
"""
