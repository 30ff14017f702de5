"""MoE routing: exact samplers, capacity overflow, Zipf imbalance."""

from __future__ import annotations

import math
import random

import pytest

from loadtest.engine.moe import (
    ExpertRouter,
    MoEConfig,
    binomial,
    expected_drop_fraction_uniform,
    multinomial,
    zipf_max_over_mean,
)

# -- capacity overflow: uniform top-1, T = 4096, E = 64 ----------------------------


def test_capacity_overflow_analytic() -> None:
    assert expected_drop_fraction_uniform(4096, 64, 1.0) == pytest.approx(0.0494, abs=0.0003)
    assert expected_drop_fraction_uniform(4096, 64, 1.25) == pytest.approx(0.0013, abs=0.0001)
    assert expected_drop_fraction_uniform(4096, 64, 2.0) < 1e-9


@pytest.mark.parametrize(("cf", "expected", "tol"), [(1.0, 0.0494, 0.003), (1.25, 0.0013, 0.0005)])
def test_capacity_overflow_sampled(cf: float, expected: float, tol: float) -> None:
    cfg = MoEConfig(num_experts=64, top_k=1, zipf_s=0.0, mode="capacity", capacity_factor=cf)
    router = ExpertRouter(cfg, random.Random(16))
    for _ in range(300):
        assert router.route({None: 4096}) == 1.0  # capacity mode never slows down
    dropped = sum(router.expert_overflow) / sum(router.expert_tokens)
    assert dropped == pytest.approx(expected, abs=tol)
    assert dropped == pytest.approx(expected_drop_fraction_uniform(4096, 64, cf), rel=0.1)


# -- imbalance: Zipf(0.5) over 12 experts -------------------------------------------


def test_zipf_imbalance_limit() -> None:
    assert zipf_max_over_mean(12, 0.5) == pytest.approx(2.14, rel=0.02)
    assert zipf_max_over_mean(12, 0.0) == pytest.approx(1.0)


def test_zipf_imbalance_sampled_and_dropless_slowdown() -> None:
    cfg = MoEConfig(num_experts=12, top_k=1, zipf_s=0.5, mode="dropless", moe_share=0.6)
    router = ExpertRouter(cfg, random.Random(17))
    factors = [router.route({None: 200_000}) for _ in range(10)]
    ratio = max(router.expert_tokens) / (sum(router.expert_tokens) / 12)
    assert ratio == pytest.approx(2.14, rel=0.02)
    # The per-step slowdown is the same max/mean.
    assert sum(factors) / len(factors) == pytest.approx(2.14, rel=0.02)
    assert sum(router.expert_overflow) == 0


def test_small_steps_are_not_called_imbalanced() -> None:
    # 5 decode tokens over 256 experts: the grouped GEMM is weight-bound.
    cfg = MoEConfig(num_experts=256, top_k=8)
    router = ExpertRouter(cfg, random.Random(1))
    assert router.route({None: 5}) == 1.0


def test_ep_ranks_average_out_expert_skew() -> None:
    per_expert = ExpertRouter(MoEConfig(num_experts=256, top_k=8), random.Random(2))
    per_rank = ExpertRouter(MoEConfig(num_experts=256, top_k=8, ep_ranks=8), random.Random(2))
    assert per_expert.route({None: 4096}) > 3 * per_rank.route({None: 4096})


def test_domains_permute_the_hot_experts_deterministically() -> None:
    cfg = MoEConfig(num_experts=16, top_k=1, zipf_s=1.5)
    hot: dict[str, int] = {}
    for domain in ("code", "chat", "math"):
        router = ExpertRouter(cfg, random.Random(0))
        router.route({domain: 100_000})
        hot[domain] = max(range(16), key=router.expert_tokens.__getitem__)
        again = ExpertRouter(cfg, random.Random(99))
        again.route({domain: 100_000})
        assert max(range(16), key=again.expert_tokens.__getitem__) == hot[domain]
    assert len(set(hot.values())) > 1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MoEConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError):
        MoEConfig(mode="sometimes")
    with pytest.raises(ValueError):
        MoEConfig(num_experts=8, ep_ranks=16)


# -- samplers ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p"), [(30, 0.1), (4096, 1 / 64), (1000, 0.7), (50, 0.5)])
def test_binomial_moments(n: int, p: float) -> None:
    rng = random.Random(n)
    xs = [binomial(n, p, rng) for _ in range(40_000)]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    assert mean == pytest.approx(n * p, rel=0.01)
    assert var == pytest.approx(n * p * (1 - p), rel=0.05)
    assert all(0 <= x <= n for x in xs)


def test_binomial_pmf_small_case() -> None:
    n, p, draws = 12, 0.3, 60_000
    rng = random.Random(5)
    counts = [0] * (n + 1)
    for _ in range(draws):
        counts[binomial(n, p, rng)] += 1
    for k in range(n + 1):
        pmf = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        assert counts[k] / draws == pytest.approx(pmf, abs=4 * math.sqrt(pmf / draws) + 1e-4)


def test_binomial_edges() -> None:
    rng = random.Random(0)
    assert binomial(0, 0.5, rng) == 0
    assert binomial(10, 0.0, rng) == 0
    assert binomial(10, 1.0, rng) == 10


def test_multinomial_conserves_draws() -> None:
    rng = random.Random(3)
    probs = [0.5, 0.25, 0.125, 0.125]
    totals = [0] * 4
    for _ in range(500):
        xs = multinomial(1000, probs, rng)
        assert sum(xs) == 1000
        totals = [a + b for a, b in zip(totals, xs, strict=True)]
    assert [t / 500_000 for t in totals] == pytest.approx(probs, abs=0.003)
