"""Per-expert (MoE) telemetry: counters to window, derived signals, bounds,
the slowdown formula, the scored policy's use of it, and the gateway's
exports (/metrics, /admin/experts, ReplicaLoad.expert_slowdown)."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest

from policies import registry
from policies.base import RouteRequest
from policies.signals import MAX_EXPERT_SLOWDOWN, expert_slowdown, expert_slowdowns
from router import config as config_mod
from router.config import ConfigError, ExpertsConfig
from router.experts import (
    MIN_TOKENS_PER_EXPERT,
    REJECT_REASONS,
    WINDOW_BUCKETS,
    ExpertSample,
    ExpertTelemetry,
)
from router.load import ReplicaLoad
from router.metrics import EXPERT_FAMILIES, Metrics
from tests.fakes import Fleet
from tests.harness import admin, eventually, gateway, gateway_config, replicas

CFG = ExpertsConfig(window_s=10.0, top_k=2, stale_s=5.0)


def telemetry(cfg: ExpertsConfig = CFG, members: tuple[str, ...] = ("a", "b")) -> ExpertTelemetry:
    t = ExpertTelemetry(cfg)
    t.set_members(members)
    return t


def agg(*tokens: float, overflow: tuple[float, ...] | None = None) -> list[ExpertSample]:
    return [ExpertSample(None, tuple(tokens), overflow)]


# -- counters and the window ------------------------------------------------------


def test_first_report_is_a_baseline_then_deltas_make_the_window() -> None:
    t = telemetry()
    t.record("a", agg(1000, 1000, 1000, 1000), 0.0)
    v = t.view("a", 0.0)
    assert v is not None and v.imbalance is None and v.window_s == 0.0  # no interval yet
    # 2 s later: expert 0 got 600 tokens, the others 200 each (mean 300).
    t.record("a", agg(1600, 1200, 1200, 1200), 2.0)
    v = t.view("a", 2.0)
    assert v is not None
    assert v.imbalance == pytest.approx(600 / 300)
    assert v.step_imbalance == pytest.approx(2.0)
    assert v.tokens_per_s == pytest.approx((300.0, 100.0, 100.0, 100.0))
    assert v.window_s == pytest.approx(2.0)
    assert [h.expert for h in v.hot] == [0, 1]  # top_k 2, ties by index
    assert v.hot[0].load == pytest.approx(2.0) and v.hot[0].share == pytest.approx(0.5)
    assert v.overflow_rate is None  # a dropless engine reports no drops
    # step = 0.4 + 0.6 x 2 = 1.6 (moe_share 0.6)
    assert v.slowdown == pytest.approx(1.6)


def test_a_lost_report_loses_nothing_and_a_decrease_is_a_restart() -> None:
    t = telemetry()
    t.record("a", agg(0, 0), 0.0)
    t.record("a", agg(100, 100), 1.0)
    # the report at 2.0 was lost; the one at 3.0 covers both intervals
    t.record("a", agg(300, 300), 3.0)
    v = t.view("a", 3.0)
    assert v is not None and sum(v.tokens_per_s) * v.window_s == pytest.approx(600)
    # The engine restarted: its counters start again from zero (Prometheus's rate()).
    t.record("a", agg(50, 10), 4.0)
    v = t.view("a", 4.0)
    assert v is not None and sum(v.tokens_per_s) * v.window_s == pytest.approx(660)


def test_one_dp_rank_restarting_leaves_imbalance_and_slowdown_unchanged() -> None:
    """Deltas per rank, then summed: a sum of counters taken first would read
    rank 1's restart as the whole replica's and lose rank 0's interval."""

    def ranks(r0: tuple[float, ...], r1: tuple[float, ...]) -> list[ExpertSample]:
        return [ExpertSample(None, r0, rank="0"), ExpertSample(None, r1, rank="1")]

    steady, restarted = telemetry(), telemetry()
    for t in (steady, restarted):
        t.record("a", ranks((1000, 1000), (1000, 1000)), 0.0)
        t.record("a", ranks((1300, 1100), (1300, 1100)), 1.0)
    steady.record("a", ranks((1600, 1200), (1600, 1200)), 2.0)
    restarted.record("a", ranks((1600, 1200), (300, 100)), 2.0)  # rank 1 restarted at 1.0
    a, b = steady.view("a", 2.0), restarted.view("a", 2.0)
    assert a is not None and b is not None
    assert b.tokens_per_s == pytest.approx(a.tokens_per_s) == (600.0, 200.0)
    assert b.imbalance == pytest.approx(a.imbalance) == pytest.approx(1.5)
    assert b.slowdown == pytest.approx(a.slowdown)


def test_a_report_at_the_same_instant_adds_to_the_current_bucket() -> None:
    t = telemetry()
    t.record("a", agg(0, 0), 0.0)
    t.record("a", agg(100, 100), 1.0)
    t.record("a", agg(150, 250), 1.0)  # a second source in the same loop turn
    v = t.view("a", 1.0)
    assert v is not None and v.window_s == pytest.approx(1.0)
    assert v.tokens_per_s == pytest.approx((150.0, 250.0))  # nothing thrown away


def test_old_buckets_leave_the_window_and_memory_stays_bounded() -> None:
    t = telemetry()
    for k in range(500):
        t.record("a", agg(100.0 * k, 100.0 * k), 0.1 * k)
    state = t._replicas["a"]
    assert len(state.buckets) <= WINDOW_BUCKETS + 2
    v = t.view("a", 49.9)
    assert v is not None and v.window_s <= CFG.window_s + CFG.window_s / WINDOW_BUCKETS
    # Nothing for longer than the window: no imbalance to speak of, no signal.
    v = t.view("a", 49.9 + CFG.window_s + 1.0)
    assert v is not None and v.imbalance is None and v.slowdown is None


def test_few_tokens_read_as_balanced_not_as_noise() -> None:
    t = telemetry()
    t.record("a", agg(0, 0, 0, 0), 0.0)
    t.record("a", agg(10, 0, 0, 0), 1.0)  # 10 tokens, all on one expert
    v = t.view("a", 1.0)
    assert v is not None and v.imbalance == pytest.approx(1.0)
    assert MIN_TOKENS_PER_EXPERT > 10


def test_overflow_rate_and_the_capacity_engines_slowdown() -> None:
    t = telemetry()
    t.record("a", agg(0, 0, 0, 0, overflow=(0, 0, 0, 0)), 0.0)
    # Expert 0 was routed 1000, dropped 500 (processed 500); the rest 200 each.
    t.record("a", agg(1000, 200, 200, 200, overflow=(500, 0, 0, 0)), 1.0)
    v = t.view("a", 1.0)
    assert v is not None
    assert v.imbalance == pytest.approx(1000 / 400)
    assert v.overflow_rate == pytest.approx(500 / 1600)
    # The MoE layers wait for 500 processed tokens over a mean of 400 routed ...
    assert v.step_imbalance == pytest.approx(500 / 400)
    # ... and the drops are work not done.
    assert v.slowdown == pytest.approx((0.4 + 0.6 * 1.25) / (1 - 500 / 1600))


def test_per_layer_is_summed_unless_configured_and_each_layer_waits_for_its_own() -> None:
    def layers(k: float) -> list[ExpertSample]:
        # Layer 0 is hot on expert 0, layer 1 on expert 1: summed, they look balanced.
        return [
            ExpertSample(0, (300 * k, 100 * k, 100 * k, 100 * k)),
            ExpertSample(1, (100 * k, 300 * k, 100 * k, 100 * k)),
        ]

    summed = telemetry()
    split = telemetry(ExpertsConfig(window_s=10.0, per_layer=True))
    for t in (summed, split):
        t.record("a", layers(0), 0.0)
        t.record("a", layers(1), 1.0)
    v = summed.view("a", 1.0)
    assert v is not None and v.layers == {}
    assert v.imbalance == pytest.approx(400 / 300)  # the aggregate hides it
    w = split.view("a", 1.0)
    assert w is not None and w.layers == pytest.approx({0: 2.0, 1: 2.0})
    assert w.step_imbalance == pytest.approx((300 + 300) / (150 + 150))


@pytest.mark.parametrize(
    ("samples", "reason"),
    [
        (agg(), "empty"),
        ([ExpertSample(None, (1.0,) * 257)], "too_many_experts"),
        ([ExpertSample(-1, (1.0, 2.0))], "bad_layer"),
        ([ExpertSample(128, (1.0, 2.0))], "bad_layer"),
        (agg(1, 2, overflow=(0,)), "length_mismatch"),
        ([ExpertSample(0, (1.0, 2.0)), ExpertSample(1, (1.0, 2.0, 3.0))], "length_mismatch"),
        ([ExpertSample(0, (1.0, 2.0)), ExpertSample(0, (1.0, 2.0))], "duplicate_layer"),
        ([ExpertSample(0, (1.0, 2.0)), ExpertSample(None, (1.0, 2.0))], "duplicate_layer"),
        (agg(1, math.nan), "not_finite"),
        (agg(1, math.inf), "not_finite"),
        (agg(1, -2), "negative"),
        (agg(1, 2, overflow=(0, 3)), "overflow_exceeds_tokens"),
    ],
)
def test_bad_samples_are_rejected_and_counted(samples: list[ExpertSample], reason: str) -> None:
    t = telemetry(ExpertsConfig(max_experts=256, max_layers=128))
    t.record("a", samples, 0.0)
    assert t.rejected[reason] >= 1
    assert set(t.rejected) == set(REJECT_REASONS)
    if t.accepted == 0:
        assert "a" not in t._replicas  # refused samples never grow memory


def test_unknown_replicas_are_refused_and_removed_ones_forgotten() -> None:
    t = telemetry()
    for i in range(1000):
        t.record(f"stranger{i}", agg(1, 2), 0.0)
    assert t.rejected["unknown_replica"] == 1000 and t._replicas == {}
    t.record("a", agg(1, 2), 0.0)
    t.record("b", agg(1, 2), 0.0)
    t.set_members(["b"])
    assert t.view("a", 1.0) is None and t.view("b", 1.0) is not None


def test_a_new_layout_or_expert_count_starts_a_new_baseline() -> None:
    t = telemetry()
    t.record("a", agg(0, 0), 0.0)
    t.record("a", agg(100, 100), 1.0)
    t.record("a", agg(0, 0, 0, 0), 2.0)  # another model: 4 experts
    v = t.view("a", 2.0)
    assert v is not None and v.experts == 4 and v.window_s == 0.0


def test_the_signal_goes_stale() -> None:
    t = telemetry()
    t.record("a", agg(0, 0), 0.0)
    t.record("a", agg(900, 300), 1.0)
    assert t.slowdown("a", 1.0) == pytest.approx(0.4 + 0.6 * 1.5)
    assert t.slowdown("a", 1.0 + CFG.stale_s + 0.1) is None
    assert t.slowdown("nobody", 1.0) is None


def test_fleet_sums_replicas_with_the_same_experts() -> None:
    t = telemetry()
    for name, hot in (("a", 0), ("b", 1)):
        t.record(name, agg(0, 0, 0, 0), 0.0)
        tokens = [100.0] * 4
        tokens[hot] = 500.0
        t.record(name, agg(*tokens), 1.0)
    (fleet,) = t.fleet(1.0)
    assert fleet.replicas == 2 and fleet.tokens_per_s == pytest.approx((600, 600, 200, 200))
    assert fleet.imbalance == pytest.approx(600 / 400)
    assert {h.expert for h in fleet.hot} == {0, 1}


# -- the signal and the policy ------------------------------------------------------


def test_only_the_moe_share_waits_for_the_busiest_expert() -> None:
    assert expert_slowdown(3.0, None, 0.6) == pytest.approx(2.2)  # not 3
    assert expert_slowdown(3.0, None, 1.0) == pytest.approx(3.0)
    assert expert_slowdown(3.0, None, 0.0) == pytest.approx(1.0)  # a dense model
    assert expert_slowdown(0.5, None, 0.6) == pytest.approx(1.0)
    assert expert_slowdown(1.0, 0.5, 0.6) == pytest.approx(2.0)  # half the tokens dropped
    assert expert_slowdown(1.0, 1.0, 0.6) == pytest.approx(10.0)  # capped at 90 % drops
    assert expert_slowdown(1000.0, None, 1.0) == MAX_EXPERT_SLOWDOWN


def _loads(*slowdowns: float | None) -> list[ReplicaLoad]:
    out = []
    for i, s in enumerate(slowdowns):
        load = ReplicaLoad(f"r{i}")
        load.expert_slowdown = s
        out.append(load)
    return out


def test_scored_sends_work_where_it_finishes_first() -> None:
    req = RouteRequest("m", prompt_tokens=100, expected_output_tokens=100, request_id="x")
    idle = _loads(2.2, 1.0)
    policy = registry.create("scored", {"weights": {"queue": 1.0}}, seed=1)
    # Both idle: the slow one loses (the request's own time counts).
    assert policy.choose(req, idle, Fleet.of(idle), 0.0).replica == "r1"
    # Queue 1 on the fast one: 2 x 1.0 < 1 x 2.2, it still wins; at queue 2 it does not.
    busy = _loads(2.2, 1.0)
    busy[1].record_report(1.0, None, 0.0)
    d = policy.choose(req, busy, Fleet.of(busy), 0.0)
    assert d.replica == "r1" and d.inputs["expert_slowdown"] == 1.0
    busy[1].record_report(2.0, None, 0.0)
    assert policy.choose(req, busy, Fleet.of(busy), 0.0).replica == "r0"


def test_scored_without_every_slowdown_scores_exactly_as_before() -> None:
    req = RouteRequest("m", prompt_tokens=100, expected_output_tokens=100, request_id="x")
    on = registry.create("scored", {"weights": {"queue": 1.0, "tokens": 1.0}}, seed=1)
    off = registry.create(
        "scored", {"weights": {"queue": 1.0, "tokens": 1.0}, "expert_capacity": False}, seed=1
    )
    for slowdowns in ((None, None, None), (3.0, None, 1.0)):
        loads = _loads(*slowdowns)
        for k, load in enumerate(loads):
            load.record_report(float(k), None, 0.0)
        assert expert_slowdowns(loads) is None
        assert on.scores(req, loads, 0.0) == off.scores(req, loads, 0.0)
    # All present, but the switch is off: ignored.
    loads = _loads(3.0, 1.0)
    assert off.choose(req, loads, Fleet.of(loads), 0.0).inputs.get("expert_slowdown") is None


def test_scored_rejects_a_non_boolean_switch() -> None:
    with pytest.raises(ValueError, match="expert_capacity"):
        registry.create("scored", {"expert_capacity": "yes"})


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"max_experts": 0}, "experts.max_experts"),
        ({"max_experts": 100_000}, "experts.max_experts"),
        ({"window_s": 0}, "experts.window_s"),
        ({"top_k": 0}, "experts.top_k"),
        ({"moe_share": 1.5}, "experts.moe_share"),
        ({"per_layer": "yes"}, "experts.per_layer"),
        ({"max_layrs": 3}, "experts.max_layrs: unknown key"),
    ],
)
def test_experts_config_is_validated(section: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_mod.from_dict(
            {"replicas": [{"url": "http://127.0.0.1:1"}], "experts": section}, env={}
        )


# -- exports --------------------------------------------------------------------------


def test_prometheus_export_is_bounded_by_config() -> None:
    t = telemetry(ExpertsConfig(max_experts=4, window_s=10.0, per_layer=True))
    t.record("a", [ExpertSample(0, (0, 0, 0, 0))], 0.0)
    t.record("a", [ExpertSample(0, (300, 100, 100, 100))], 1.0)
    t.record("b", agg(*([1.0] * 5)), 1.0)  # beyond max_experts: refused
    t.record("zzz", agg(1, 2), 1.0)  # not a member
    m = Metrics()
    m.watch_experts(lambda: t.views(1.0), lambda: t.rejected)
    text = m.render().decode()
    assert 'dp_router_expert_imbalance{replica="a"} 2.0' in text
    assert 'dp_router_expert_layer_imbalance{layer="0",replica="a"} 2.0' in text
    rates = [ln for ln in text.splitlines() if ln.startswith("dp_router_expert_tokens_per_second{")]
    assert len(rates) == 4 and all('replica="a"' in ln for ln in rates)
    assert 'dp_router_expert_samples_rejected_total{reason="too_many_experts"} 1.0' in text
    assert 'dp_router_expert_samples_rejected_total{reason="unknown_replica"} 1.0' in text
    assert "zzz" not in text
    assert "dp_router_expert_overflow_ratio{" not in text  # not reported: no series


TOKEN = "t0ken"


async def test_gateway_exports_experts_and_feeds_the_policy(
    client: aiohttp.ClientSession,
) -> None:
    async with (
        replicas(2) as urls,
        gateway(gateway_config(urls, admin={"token": TOKEN})) as gw,
    ):
        names = [r.name for r in gw.registry]
        now = asyncio.get_running_loop().time()
        gw.experts.record(names[0], agg(0, 0, 0, 0), now - 1.0)
        gw.experts.record(names[0], agg(3000, 1000, 1000, 1000), now)
        url = admin(gw) + "/admin/experts"
        async with client.get(url) as resp:
            assert resp.status == 401
        async with client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        (rep,) = body["replicas"]
        assert rep["replica"] == names[0] and rep["imbalance"] == 2.0
        assert rep["hot"][0] == {"expert": 0, "load": 2.0, "share": 0.5}
        assert body["fleet"][0]["experts"] == 4
        async with client.get(admin(gw) + "/metrics") as resp:
            text = await resp.text()
        assert f'dp_router_expert_slowdown{{replica="{names[0]}"}} 1.6' in text
        # The gateway copies the slowdown into the routing view (once a second) ...
        load = gw.registry.get(names[0]).load  # type: ignore[union-attr]
        assert await eventually(lambda: load.expert_slowdown == pytest.approx(1.6), 1.5)
        # ... and forgets a replica that left the fleet.
        gw.registry.remove(names[0])
        assert gw.experts.view(names[0], now) is None


def test_expert_families_name_every_family_the_collector_exports() -> None:
    t = telemetry()
    m = Metrics()
    m.watch_experts(lambda: t.views(0.0), lambda: t.rejected)
    exported = {f.name for f in m.registry.collect() if f.name.startswith("dp_router_expert")}
    assert exported == set(EXPERT_FAMILIES)
