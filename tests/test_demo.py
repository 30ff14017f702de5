"""The demo's pieces, and one short end-to-end run of the real processes."""

from __future__ import annotations

import json
import tomllib

import pytest

from loadtest import demo
from router import config


def test_generated_gateway_config_is_valid() -> None:
    text = demo.gateway_config(
        "round_robin", 7, 18000, 18001, ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    )
    cfg = config.from_dict(tomllib.loads(text), env={})
    assert [r.name for r in cfg.replicas] == ["r1", "r2-skewed"]
    assert cfg.routing.policy == "round_robin" and cfg.routing.seed == 7
    assert cfg.health.slow_start_s == 0.0
    assert all(r.models == (demo.MODEL,) for r in cfg.replicas)


def test_the_scored_pair_differs_in_the_expert_signal_only() -> None:
    pair = [r for r in demo.DEFAULT_RUNS if r.policy == "scored"]
    assert [r.expert_signal for r in pair] == [False, True]
    for run in pair:
        text = demo.gateway_config(run, 0, 18000, 18001, ["http://127.0.0.1:1"], skewed=False)
        cfg = config.from_dict(tomllib.loads(text), env={})
        assert dict(cfg.routing.params) == {"expert_capacity": run.expert_signal}
        assert [r.name for r in cfg.replicas] == ["r1"]


def test_auto_rate_scales_with_fleet_skew_and_run_length() -> None:
    three = demo.auto_rate(3, "chat", 0, 15.0)
    six = demo.auto_rate(6, "chat", 0, 15.0)
    assert 0 < three < six
    # The skewed replica serves about half as much as a balanced one (its
    # busiest expert takes ~4x the mean, which its MoE layers wait for).
    even = demo.auto_rate(3, "chat", 0, 15.0, skew=None)
    skewed_vs_balanced = 1 - (even - three) * 3 / even
    assert 0.3 < skewed_vs_balanced < 0.7
    # In a short run fewer later turns start, so more conversations are needed.
    assert demo.auto_rate(3, "chat", 0, 4.0) > three


def test_the_last_replica_is_skewed() -> None:
    from loadtest.replica import cli
    from loadtest.replica.config import SimReplicaConfig
    from loadtest.replica.engine_model import EngineModel
    from loadtest.replica.server import make_model

    def zipf(cfg: SimReplicaConfig) -> float:
        model = make_model(cfg)
        assert isinstance(model, EngineModel) and model.engine.config.moe is not None
        return model.engine.config.moe.zipf_s

    argv = demo.replica_argv(demo.DemoOptions(2, demo.DEFAULT_RUNS, 1.0, 1.0, 0, "chat", None))
    assert argv[3:5] == ["--skew", str(demo.SKEW_ZIPF)]
    first, last = cli.configs_from_args(cli.build_parser().parse_args(argv[5:]))
    assert (zipf(first), zipf(demo.skew_last(last, 1.5))) == (0.5, 1.5)
    dense = cli.configs_from_args(cli.build_parser().parse_args(["--port", "0", "--paced"]))
    with pytest.raises(ValueError, match="engine model"):
        demo.skew_last(dense[0], 1.5)


def test_outputs_are_clamped() -> None:
    from loadtest.loadgen import conversations

    convs = list(demo.clamp_outputs(conversations("sharegpt", seed=0, requests=200, rate=1.0)))
    assert max(t.output_tokens for c in convs for t in c.turns) <= demo.MAX_OUTPUT_TOKENS


def test_unknown_policy_is_refused(capsys) -> None:
    assert demo.main(["--policy", "no_such_policy"]) == 2
    assert "unknown policy" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys) -> None:
    code = demo.main(
        ["--replicas", "2", "--policy", "round_robin", "--duration", "1.5", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| round_robin" in out
    assert (tmp_path / "results.json").exists() and (tmp_path / "summary.md").exists()
    # The gateway read the skewed replica's expert counters: its busiest
    # expert well above the mean (Zipf 1.5 over 8 experts: ~4x; the others ~1.8x).
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    experts = run["extra"]["experts"]
    assert experts["r2-skewed"]["imbalance"] > 2.5 > experts["r1"]["imbalance"]
    assert "r2-skewed imbalance" in out and "dp-router top" in out
