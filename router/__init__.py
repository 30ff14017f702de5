"""dp-router: a gateway in front of data-parallel LLM inference replicas."""
