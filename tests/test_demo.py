"""The demo's pieces, and one short end-to-end run of the real processes."""

from __future__ import annotations

import tomllib

import pytest

from loadtest import demo
from router import config


def test_generated_gateway_config_is_valid() -> None:
    text = demo.gateway_config(
        "round_robin", 7, 18000, 18001, ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    )
    cfg = config.from_dict(tomllib.loads(text), env={})
    assert [r.name for r in cfg.replicas] == ["r1", "r2-slow"]
    assert cfg.routing.policy == "round_robin" and cfg.routing.seed == 7
    assert cfg.health.slow_start_s == 0.0
    assert all(r.models == (demo.MODEL,) for r in cfg.replicas)


def test_auto_rate_scales_with_fleet_and_run_length() -> None:
    three = demo.auto_rate(3, "chat", 0, demo.SLOW_FACTOR, 15.0)
    six = demo.auto_rate(6, "chat", 0, demo.SLOW_FACTOR, 15.0)
    assert 0 < three < six
    # Fleet capacity in "normal replica" units: 2 + 1/3 vs 5 + 1/3.
    assert six / three == pytest.approx((5 + 1 / 3) / (2 + 1 / 3))
    # In a short run fewer later turns start, so more conversations are needed.
    assert demo.auto_rate(3, "chat", 0, demo.SLOW_FACTOR, 4.0) > three


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
