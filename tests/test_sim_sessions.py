"""Sticky sessions in the simulator: the gateway's affinity rules on pins
shared by every simulated gateway, and what they do to the cache."""

from __future__ import annotations

from loadtest.sim import cli as simulate
from loadtest.sim import core
from loadtest.sim.queue_model import LognormalQueue
from loadtest.sim.workload import open_workload
from policies import registry


def _run(sessions: bool, gateways: int = 1) -> core.SimResult:
    cfg = core.SimConfig(
        replicas=4, service="lognormal", cache_blocks=4096, seed=2, sessions=sessions
    )
    arrivals = open_workload("chat", seed=2, requests=600, rate=2.0)
    pols = [registry.create("round_robin", seed=2 + g) for g in range(gateways)]
    return core.run(pols, arrivals, 600, cfg, LognormalQueue(slots=4))


def test_sessions_keep_conversations_on_their_replica_and_their_cache() -> None:
    off = _run(False)
    on = _run(True, gateways=2)
    assert off.sessions == {}
    placed = on.sessions
    assert placed["hit"] > placed["new"]  # later turns held their pin
    assert sum(placed.values()) == on.arrivals
    # round_robin alone scatters a conversation; pinned, its prefix stays warm.
    assert (on.cache_hit or 0.0) > (off.cache_hit or 0.0) + 0.1


def test_the_report_says_which_mode_ran() -> None:
    recs = simulate.run_all(
        simulate.build_parser().parse_args(
            ["--workload", "chat", "--requests", "300", "--policy", "queue_depth", "--sessions"]
        )
    )
    table = simulate.format_table(recs)
    assert "sessions=sticky" in table
    assert recs[0]["session_placements"]["hit"] > 0
