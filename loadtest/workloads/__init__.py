"""Workloads, shared by the load generator and the policy simulator.

- ``types``: :class:`Conversation` and :class:`Turn`, what a workload yields;
- ``synthetic``: deterministic prompt text, length samplers, generators;
- ``traces``: the vendored public traces (data/), their readers and replay;
- ``catalog``: the named workloads and :func:`load_workload`, the one entry point.
"""

from loadtest.workloads.catalog import WORKLOADS, load_workload
from loadtest.workloads.types import Conversation, Turn

__all__ = ["WORKLOADS", "Conversation", "Turn", "load_workload"]
