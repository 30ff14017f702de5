"""The policy simulator (``dp-router simulate``): discrete events on a virtual clock.

- ``core``: the event loop; it routes through the gateway's own pipeline
  (``router.routing.Router``) over a ``router.replicas.Registry`` per gateway;
- ``queue_model``: queue-server replica models (``exp``, ``lognormal``);
  the engine model (loadtest/engine/) is the other kind;
- ``workload``: arrivals, from loadtest.workloads or two built-ins;
- ``theory``: checks against queueing theory; ``quality``: prefix-routing
  benchmarks with the engine model; ``decisions``: the cost of one decision;
- ``cli``: ``dp-router simulate``.
"""
