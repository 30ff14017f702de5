"""The policy simulator: determinism, slow replicas, workloads, engine model, CLI."""

from __future__ import annotations

import json

import pytest

from loadtest.sim import cli as simulate
from loadtest.sim import core
from loadtest.sim.queue_model import ExpQueue, LognormalQueue
from loadtest.sim.workload import arrival_mode, open_workload
from loadtest.workloads import traces
from policies import registry


def run_exp(
    policy: str, n: int, rate: float, requests: int, *, slow: float = 1.0, seed: int = 1
) -> core.SimResult:
    cfg = core.SimConfig(replicas=n, service="exp", slow_factor=slow, seed=seed)
    arrivals = open_workload("exp", seed=seed, requests=requests, rate=rate)
    return core.run(registry.create(policy, seed=seed), arrivals, requests, cfg, ExpQueue())


def test_same_seed_same_result_and_every_request_settles() -> None:
    a = run_exp("p2c", 8, 6.0, 3000)
    b = run_exp("p2c", 8, 6.0, 3000)
    assert a.e2e == b.e2e and a.per_replica == b.per_replica
    assert a.arrivals == 3000
    assert a.measured == 3000 - 300  # 10% warm-up left out


@pytest.mark.parametrize("policy", ["queue_depth", "least_request", "p2c", "peak_ewma"])
def test_slow_replica_gets_a_small_share_and_does_not_drag_the_fast_ones(policy: str) -> None:
    """One replica 10x slower. Load-aware policies starve it and
    the other seven serve about as fast as a fleet of seven alone would."""
    n, rate, reqs = 8, 0.7 * 7.1, 20_000  # 0.7 of capacity (7 + 0.1 service units)
    slowed = run_exp(policy, n, rate, reqs, slow=10.0)
    alone = run_exp(policy, n - 1, rate, reqs)
    assert not slowed.unstable
    share = slowed.per_replica[0] / sum(slowed.per_replica)
    assert share < 0.5 / n, f"slow replica kept {share:.1%}"
    fast = sum(slowed.per_replica_e2e[1:]) / (n - 1)
    base = sum(alone.e2e) / len(alone.e2e)
    assert fast < 1.25 * base, (fast, base)


def test_round_robin_is_reported_unstable_with_a_slow_replica() -> None:
    res = run_exp("round_robin", 8, 0.8 * (7 + 1 / 1.5), 20_000, slow=1.5)
    assert res.unstable and res.unstable_replicas == [0]
    stable = run_exp("weighted_random", 8, 7.2, 20_000)  # rho = 0.9, identical: stable
    assert not stable.unstable


def test_multi_turn_sessions_follow_their_answers_and_prefix_affinity_hits() -> None:
    """chat: later turns arrive after the previous answer and reuse its prefix."""
    hits = {}
    for policy in ("round_robin", "prefix_affinity"):
        cfg = core.SimConfig(replicas=4, service="lognormal", cache_blocks=4096, seed=2)
        arrivals = open_workload("chat", seed=2, requests=600, rate=2.0)
        res = core.run(registry.create(policy, seed=2), arrivals, 600, cfg, LognormalQueue(slots=4))
        assert res.arrivals == 600
        hits[policy] = res.cache_hit or 0.0
    assert hits["prefix_affinity"] > hits["round_robin"] + 0.1, hits


def test_engine_model_runs_and_reports_kv() -> None:
    cfg = core.SimConfig(
        replicas=3,
        service="engine",
        report_interval=0.5,
        seed=3,
        engine_overrides={"kv_capacity_tokens": 60_000},
    )
    arrivals = open_workload("sglang-shared-prefix", seed=3, requests=120, rate=20.0)
    res = core.run(registry.create("scored", seed=3), arrivals, 120, cfg)
    assert res.arrivals == 120 and res.measured == 108
    assert res.cache_hit is not None and res.cache_hit > 0.3
    assert all(t > 0 for t in res.ttft)


def test_thousand_replicas_sampling_policy_is_fast() -> None:
    res = run_exp("p2c", 1000, 900.0, 20_000)
    assert res.measured == 18_000
    assert max(res.per_replica) < 60  # ~18 each; no replica hoards


def test_cli_json_one_object_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--policy", "round_robin", "--policy", "p2c:d=3,replacement=true", "--json",
            "--requests", "2000", "--replicas", "4", "--load", "0.7"]  # fmt: skip
    assert simulate.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["policy"] for r in recs] == ["round_robin", "p2c:d=3,replacement=True"]
    for r in recs:
        assert r["load"] == pytest.approx(0.7)
        assert r["requests"] == 2000 and len(r["share"]) == 4
        assert {"mean", "p50", "p99"} <= set(r["ttft"]) and {"mean", "p50", "p99"} <= set(r["e2e"])


def test_cli_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--policy", "queue_depth", "--requests", "1500", "--workload", "sharegpt",
            "--service", "lognormal", "--slow-replica", "3"]  # fmt: skip
    assert simulate.main(argv) == 0
    out = capsys.readouterr().out
    assert "queue_depth" in out and "per-replica share" in out
    assert simulate.main(["--policy", "nope", "--requests", "10"]) == 2
    assert simulate.main(["--policy", "p2c:d=0", "--requests", "10"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_several_gateways_each_keep_their_own_view() -> None:
    """Four gateways, one policy object and one ReplicaLoad view each, shared reports."""
    cfg = core.SimConfig(replicas=8, service="exp", report_interval=1.0, seed=4)
    gateways = [registry.create("queue_depth", seed=g) for g in range(4)]
    arrivals = open_workload("exp", seed=4, requests=8000, rate=7.2)
    res = core.run(gateways, arrivals, 8000, cfg, ExpQueue())
    assert res.arrivals == 8000 and not res.unstable
    assert res.reasons == {"queue_depth": 8000}
    # Between JSQ with one gateway (2.1) and random (10): local correction holds.
    assert sum(res.e2e) / len(res.e2e) < 4.5


def test_policy_spec_parsing() -> None:
    assert simulate.parse_policy("p2c:d=3,replacement=true") == (
        "p2c",
        {"d": 3, "replacement": True},
    )
    name, params = simulate.parse_policy('scored:weights={"queue": 1, "prefix": 4};filters=[]')
    assert name == "scored" and params == {"weights": {"queue": 1, "prefix": 4}, "filters": []}
    assert simulate.parse_policy("prefix_affinity:epsilon=inf")[1] == {"epsilon": float("inf")}
    with pytest.raises(ValueError):
        simulate.parse_policy("p2c:d")


def test_quality_check_runner_smoke() -> None:
    """The prefix benchmarks' runner, small; full runs: --quality-checks."""
    from loadtest.sim import quality

    rr = quality._run("round_robin", "sglang-shared-prefix", 4, 128, 0.0, 0, {})
    ca = quality._run("prefix_affinity", "sglang-shared-prefix", 4, 128, 0.0, 0, {})
    assert ca["hit"] > rr["hit"]
    assert rr["throughput"] > 0 and ca["ttft_p90"] > 0


@pytest.mark.parametrize("policy", ["prefix_affinity", "scored"])
def test_every_request_sharing_one_system_prompt_spreads_and_still_hits(policy: str) -> None:
    """The collapse trap with 100% sharing: shares stay near 1/N, the prompt stays cached."""
    cfg = core.SimConfig(replicas=8, service="lognormal", cache_blocks=4096, seed=6)
    svc = LognormalQueue(slots=4)
    rate = 0.7 * 8 * 4 / svc.mean(2225, 175)
    arrivals = open_workload("system-prompt", seed=6, requests=6000, rate=rate)
    res = core.run(registry.create(policy, seed=6), arrivals, 6000, cfg, svc)
    shares = [c / sum(res.per_replica) for c in res.per_replica]
    assert max(shares) < 1.5 / 8, shares
    assert res.cache_hit is not None and res.cache_hit > 0.8  # 31 of ~34 blocks are shared
    assert not res.unstable


# -- trace replay, refusals, several policies at once ---------------------------


def test_trace_replays_its_own_timestamps_rescaled_to_the_rate() -> None:
    rows = traces.read_mooncake(traces.MOONCAKE)
    n = 400
    own = traces.replay_times(rows, n)
    native = traces.native_rate(rows, n)
    assert native == pytest.approx((n - 1) / (own[-1] - own[0]))
    got = [a.t for a in open_workload("mooncake", seed=0, requests=n, rate=3 * native)]
    assert got == pytest.approx([t / 3 for t in own])  # bursts kept, three times as fast
    assert [a.t for a in open_workload("mooncake", seed=0, requests=n, speed=3.0)] == pytest.approx(
        got
    )
    poisson = [a.t for a in open_workload("mooncake", seed=0, requests=n, rate=3 * native,
                                          arrivals="poisson")]  # fmt: skip
    assert poisson != got and len(poisson) == n
    assert arrival_mode("mooncake", None) == "trace" and arrival_mode("chat", None) == "poisson"
    with pytest.raises(ValueError, match="no timestamps"):
        arrival_mode("chat", "trace")


def test_a_request_that_never_fits_is_rejected_and_the_run_goes_on() -> None:
    """Prompts longer than a replica's whole KV cache: vLLM's 400, counted, not an abort."""
    cfg = core.SimConfig(
        replicas=2, service="engine", seed=5, engine_overrides={"kv_capacity_tokens": 16_384}
    )
    rows = traces.read_mooncake(traces.MOONCAKE)[:60]
    too_big = sum(r.prompt_tokens + r.output_tokens > 16_384 for r in rows)
    assert 0 < too_big < 60
    arrivals = open_workload("mooncake", seed=5, requests=60, rate=4.0, arrivals="poisson")
    res = core.run(registry.create("queue_depth", seed=5), arrivals, 60, cfg)
    assert res.rejected == too_big and res.arrivals == 60
    assert len(res.ttft) == sum(r.prompt_tokens + r.output_tokens <= 16_384 for r in rows[6:])


def test_policies_flag_and_report_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate.split_policies("a,p2c:d=3,replacement=true,b:x=1") == [
        "a",
        "p2c:d=3,replacement=true",
        "b:x=1",
    ]
    argv = ["--policies", "weighted_random,round_robin", "--service", "engine",
            "--workload", "mooncake", "--requests", "120", "--replicas", "2",
            "--load", "0.5"]  # fmt: skip
    assert simulate.main(argv) == 0
    out = capsys.readouterr().out
    assert "preset=llama3-8b arrivals=trace (its own timestamps x" in out
    assert "preempt" in out and "rej" in out
    assert simulate.main([*argv, "--arrivals", "poisson", "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in recs] == ["weighted_random", "round_robin"]
    assert all(r["arrivals"] == "poisson" and r["rejected"] == 0 for r in recs)
    assert simulate.main(["--workload", "chat", "--speed", "2", "--requests", "10"]) == 2
