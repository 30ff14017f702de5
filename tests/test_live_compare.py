"""``dp-router compare-live``: targets, the generated config, the table, one short live run."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from loadtest import live_compare as lc
from router import config

NO_PYTHON = Path("/nonexistent/bin/python")


def test_targets_are_gateway_policies_or_sglang_ones() -> None:
    assert lc.parse_target("queue_depth") == lc.Target("queue_depth", "gateway", "queue_depth")
    assert lc.parse_target("sglang:cache_aware").router == lc.SGLANG
    for bad in ("sglang:no_such", "vllm:cache_aware", "sglang:"):
        with pytest.raises(ValueError, match="unknown target"):
            lc.parse_target(bad)


def test_default_targets_that_cannot_run_are_skipped_named_ones_refused() -> None:
    targets, skipped = lc.resolve_targets(
        ["queue_depth", "no_such_policy", "sglang:cache_aware"], False, NO_PYTHON
    )
    assert [t.name for t in targets] == ["queue_depth"]
    assert "not a registered gateway policy" in skipped["no_such_policy"]
    assert "not installed" in skipped["sglang:cache_aware"]
    with pytest.raises(ValueError, match="not installed"):
        lc.resolve_targets(["sglang:cache_aware"], True, NO_PYTHON)


def test_generated_gateway_config_is_valid() -> None:
    text = lc.gateway_config("queue_depth", 3, 18000, 18001, ["http://127.0.0.1:1"] * 2)
    cfg = config.from_dict(tomllib.loads(text), env={})
    assert cfg.routing.policy == "queue_depth" and cfg.routing.seed == 3
    assert [r.name for r in cfg.replicas] == ["r1", "r2"]
    assert cfg.health.slow_start_s == 0.0


def test_sglang_command_stays_on_loopback() -> None:
    argv = lc.sglang_argv(NO_PYTHON, "cache_aware", ["http://127.0.0.1:1"], 9, 10)
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert argv[argv.index("--host") + 1] == argv[argv.index("--prometheus-host") + 1] == lc.HOST


def test_spread_is_median_min_max_without_nan() -> None:
    assert lc.spread([3.0, 1.0, math.nan, 2.0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in lc.spread([math.nan]))


SGLANG_INSTALLED = lc.sglang_installed(lc.DEFAULT_SGLANG_VENV / "bin" / "python")


@pytest.mark.parametrize(
    "target",
    [
        "queue_depth",
        pytest.param(
            "sglang:cache_aware",
            marks=pytest.mark.skipif(
                not SGLANG_INSTALLED, reason="sglang-router not installed (docs/live-compare.md)"
            ),
        ),
    ],
)
def test_quick_run(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The real processes, briefly: replicas, the router, load, replica metrics."""
    argv = ["--quick", "--target", target, "--replicas", "2", "--duration", "2", "--json"]
    assert lc.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (entry,) = out["targets"]
    (run,) = entry["runs"]
    assert run["ok"] > 0 and run["errors"] == {}
    assert run["prefix_hit_rate"] is not None  # scraped from both replicas
    assert sum(run["completed_per_replica"]) == run["ok"]
    assert entry["summary"]["ttft_p50_s"]["median"] == run["ttft"]["p50"]
