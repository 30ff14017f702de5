"""The engine model: batching, prefix cache, preemption, iteration time, TP/PP presets."""

from __future__ import annotations

import random

import pytest

from loadtest.engine.engine import (
    ALLREDUCE_SHARE,
    Engine,
    EngineConfig,
    EngineRequest,
    RequestRefused,
    StepResult,
    active_experts,
    preset,
)
from loadtest.engine.moe import MoEConfig
from loadtest.engine.profiles import MODELS, IterationProfile
from policies.prefix import BLOCK_TOKENS


def run_until_done(
    engine: Engine, now: float = 0.0
) -> tuple[float, dict[str, float], list[StepResult]]:
    """Step to completion; return the end time, each request's first-token time, the steps."""
    first: dict[str, float] = {}
    steps: list[StepResult] = []
    while engine.has_work():
        res = engine.step(now)
        now += res.duration_s
        steps.append(res)
        for rid in res.emitted:
            first.setdefault(rid, now)
    return now, first, steps


def hashes(tag: int, n: int) -> tuple[int, ...]:
    return tuple(tag * 1_000_000 + i for i in range(n))


# -- iteration time ------------------------------------------------------------


def test_profile_matches_the_defaults_table() -> None:
    p7 = MODELS["llama2-7b"].profile(1)
    for n in (1, 32, 64, 128):  # table: ~6 ms up to 128 tokens
        assert 5.5e-3 <= p7.time_s(n) <= 7.0e-3
    assert all(a <= b for a, b in zip(p7.seconds, p7.seconds[1:], strict=False))
    assert p7.slope_s_per_token(1024, 4096) == pytest.approx(0.021e-3, rel=0.06)
    p70 = MODELS["llama2-70b"].profile(4)
    for n in (1, 32, 64, 128):  # table: 15 ms
        assert 14e-3 <= p70.time_s(n) <= 16.5e-3
    assert p70.slope_s_per_token(1024, 4096) == pytest.approx(0.054e-3, rel=0.06)
    # Beyond the table the compute-bound slope continues.
    assert p7.time_s(8192) == pytest.approx(
        p7.time_s(4096) + 4096 * p7.slope_s_per_token(2048, 4096), rel=0.02
    )


def test_decode_step_time_is_profile_plus_kv_read() -> None:
    cfg = preset("llama2-7b")
    engine = Engine(cfg, random.Random(0))
    for i in range(100):
        engine.add_request(EngineRequest(f"r{i}", 20, 5), 0.0)
    prefill = engine.step(0.0)  # all 100 prompts in one iteration (2,000 tokens)
    assert prefill.tokens == 2000 and prefill.batch == 100
    decode = engine.step(prefill.duration_s)
    assert decode.tokens == 100 and len(decode.emitted) == 100
    kv_read = 100 * 21  # each decode attends over its 20 + 1 tokens
    expected = cfg.profile.time_s(100) + kv_read * cfg.kv_bytes_per_token / 3.35e12
    assert decode.duration_s == pytest.approx(expected, rel=1e-9)
    assert 6e-3 < decode.duration_s < 7.5e-3  # table: "decode step, B <= 128: 6-7 ms"


def test_chunked_prefill_and_token_budget() -> None:
    engine = Engine(preset("llama2-7b"), random.Random(0))
    engine.add_request(EngineRequest("long", 2048, 3), 0.0)
    engine.add_request(EngineRequest("short", 10, 3), 0.0)
    first = engine.step(0.0)
    # 512 tokens of the long prompt (its chunk cap) + the whole short prompt.
    assert first.tokens == 512 + 10
    assert first.emitted == {"short": 1}
    _, ttft, steps = run_until_done(engine, first.duration_s)
    assert all(s.tokens <= 4096 for s in steps)
    assert ttft["long"] > 0


# -- prefix cache --------------------------------------------------------------


def test_ttft_drops_when_the_prefix_is_cached() -> None:
    engine = Engine(preset("llama2-7b"), random.Random(0))
    prompt = 4096
    engine.add_request(EngineRequest("cold", prompt, 4, hashes(1, prompt // BLOCK_TOKENS)), 0.0)
    t, first, _ = run_until_done(engine)
    cold_ttft = first["cold"]
    engine.add_request(EngineRequest("warm", prompt, 4, hashes(1, prompt // BLOCK_TOKENS)), t)
    t2, first2, _ = run_until_done(engine, t)
    warm_ttft = first2["warm"] - t
    # Cold: 8 chunks of 512. Warm: everything but the last block is cached.
    assert cold_ttft > 5 * warm_ttft
    s = engine.stats()
    assert s["prefix_queries"] == 2 * prompt
    assert s["prefix_hits"] == prompt - BLOCK_TOKENS  # one block recomputed for the logits
    # A different prompt of the same length gets no hits and pays in full.
    engine.add_request(EngineRequest("moved", prompt, 4, hashes(2, prompt // BLOCK_TOKENS)), t2)
    _, first3, _ = run_until_done(engine, t2)
    assert first3["moved"] - t2 == pytest.approx(cold_ttft, rel=0.01)


def test_returning_session_hits_on_its_previous_prompt() -> None:
    engine = Engine(preset("llama2-7b"), random.Random(0))
    turn1 = hashes(7, 20)  # 1,280 tokens
    turn2 = turn1 + hashes(8, 10)  # previous context + 640 new tokens
    engine.add_request(EngineRequest("t1", 20 * BLOCK_TOKENS, 50, turn1), 0.0)
    t, _, _ = run_until_done(engine)
    engine.add_request(EngineRequest("t2", 30 * BLOCK_TOKENS, 50, turn2), t)
    run_until_done(engine, t)
    assert engine.stats()["prefix_hits"] == 20 * BLOCK_TOKENS


def test_lru_evicts_unreferenced_blocks_when_the_cache_is_full() -> None:
    cfg = preset("llama2-7b", kv_capacity_tokens=64 * BLOCK_TOKENS, admission_watermark=0.0)
    engine = Engine(cfg, random.Random(0))
    t = 0.0
    for tag in range(3):  # 3 x 32 blocks through a 64-block cache
        engine.add_request(EngineRequest(f"r{tag}", 32 * BLOCK_TOKENS, 1, hashes(tag, 32)), t)
        t, _, _ = run_until_done(engine, t)
    assert engine.stats()["kv_cached_blocks"] <= cfg.kv_capacity_tokens // cfg.block_size
    assert engine.kv_usage() == 0.0  # all idle: cached blocks are free to evict
    engine.add_request(EngineRequest("again0", 32 * BLOCK_TOKENS, 1, hashes(0, 32)), t)
    run_until_done(engine, t)
    before = engine.stats()["prefix_hits"]
    assert before == 0  # tag 0 was the least recently used: evicted
    engine.add_request(EngineRequest("again2", 32 * BLOCK_TOKENS, 1, hashes(2, 32)), t)
    run_until_done(engine, t)
    assert engine.stats()["prefix_hits"] > before


# -- preemption ------------------------------------------------------------------


def test_preemption_when_kv_is_exhausted_and_everything_still_finishes() -> None:
    # 4,096 tokens of KV; 8 requests of 300 prompt + 400 output need 5,600.
    cfg = preset("llama2-7b", kv_capacity_tokens=4096)
    engine = Engine(cfg, random.Random(0))
    for i in range(8):
        engine.add_request(EngineRequest(f"r{i}", 300, 400), 0.0)
    finished: list[str] = []
    emitted: dict[str, int] = {}
    preempted: list[str] = []
    now = 0.0
    while engine.has_work():
        res = engine.step(now)
        now += res.duration_s
        finished += res.finished
        preempted += res.preempted
        for rid, n in res.emitted.items():
            emitted[rid] = emitted.get(rid, 0) + n
        assert engine.kv_usage() <= 1.0
    assert preempted, "the KV cache should have run out"
    assert engine.stats()["preemptions"] == len(preempted)
    assert sorted(finished) == sorted(f"r{i}" for i in range(8))
    assert all(n == 400 for n in emitted.values())  # recompute resumes, no token lost or repeated
    assert engine.kv_usage() == 0.0


def test_request_larger_than_the_kv_cache_is_refused() -> None:
    engine = Engine(preset("llama2-7b", kv_capacity_tokens=4096), random.Random(0))
    assert engine.refusal(4000, 96) is None
    assert "tokens of KV" in (engine.refusal(4000, 200) or "")
    with pytest.raises(RequestRefused, match="tokens of KV"):
        engine.add_request(EngineRequest("big", 4000, 200), 0.0)
    assert engine.rejected == 1 and not engine.has_work()
    engine.add_request(EngineRequest("ok", 4000, 96), 0.0)  # the engine goes on
    run_until_done(engine)


def test_readmission_after_preemption_is_not_a_first_admission_hit() -> None:
    """A preempted request comes back to find its own prompt blocks cached:
    that is counted apart, so the first-admission rate stays what routing won."""
    cfg = preset("llama2-7b", kv_capacity_tokens=4096, admission_watermark=0.0)
    engine = Engine(cfg, random.Random(0))
    for i in range(8):  # 8 x (320 + 400) tokens > 4,096: preemptions
        engine.add_request(EngineRequest(f"r{i}", 320, 400, hashes(i, 5)), 0.0)
    run_until_done(engine)
    s = engine.stats()
    assert s["preemptions"] > 0
    assert (s["prefix_queries"], s["prefix_hits"]) == (8 * 320, 0)  # distinct prompts
    assert s["readmit_queries"] > 0 and s["readmit_hits"] > 0


def test_max_model_len_is_enforced_when_set() -> None:
    engine = Engine(preset("llama2-7b", max_model_len=4096), random.Random(0))
    engine.add_request(EngineRequest("fits", 4000, 96), 0.0)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(EngineRequest("long", 4000, 97), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request(EngineRequest("fits", 10, 1), 0.0)


def test_abort_frees_kv_and_unknown_ids_are_ignored() -> None:
    engine = Engine(preset("llama2-7b"), random.Random(0))
    engine.add_request(EngineRequest("a", 1000, 100), 0.0)
    engine.add_request(EngineRequest("b", 1000, 100), 0.0)
    engine.step(0.0)
    assert engine.kv_usage() > 0
    engine.abort("a")
    engine.abort("b")
    engine.abort("nope")
    assert not engine.has_work()
    assert engine.kv_usage() == 0.0


def test_max_num_seqs_caps_the_batch() -> None:
    engine = Engine(preset("llama2-7b", max_num_seqs=4), random.Random(0))
    for i in range(10):
        engine.add_request(EngineRequest(f"r{i}", 10, 5), 0.0)
    res = engine.step(0.0)
    assert res.batch == 4
    assert engine.num_running == 4 and engine.num_waiting == 6


# -- presets: TP / PP / interconnect ---------------------------------------------


def test_kv_capacity_matches_the_defaults_table() -> None:
    assert preset("llama2-7b").kv_capacity_tokens == pytest.approx(107_000, rel=0.03)
    assert preset("llama2-70b", tp=4).kv_capacity_tokens == pytest.approx(450_000, rel=0.06)
    # Higher TP: weights per GPU shrink, KV grows.
    assert preset("llama2-7b", tp=2).kv_capacity_tokens > 2 * preset("llama2-7b").kv_capacity_tokens


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1)])
def test_a_model_that_does_not_fit_is_refused(tp: int, pp: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        preset("llama2-70b", tp=tp, pp=pp)


def test_compute_uses_the_measured_tp_rows() -> None:
    tp1 = preset("llama2-7b", tp=1)
    tp4 = preset("llama2-7b", tp=4)
    assert tp4.profile == MODELS["llama2-7b"].profile(4)
    ratio = tp1.profile.time_s(128) / tp4.profile.time_s(128)
    assert 2.0 < ratio < 3.5  # measured rows: far from the naive 4x


@pytest.mark.parametrize("interconnect", ["nvlink", "pcie5"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_allreduce_overhead_share(interconnect: str, tp: int) -> None:
    cfg = preset("llama2-7b", tp=tp, interconnect=interconnect)
    bare = preset("llama2-7b", tp=tp, interconnect=interconnect, allreduce_share=0.0)
    t_with = Engine(cfg, random.Random(0))
    t_bare = Engine(bare, random.Random(0))
    for e in (t_with, t_bare):
        e.add_request(EngineRequest("x", 1000, 2), 0.0)
    d_with = t_with.step(0.0).duration_s
    d_bare = t_bare.step(0.0).duration_s
    share = (d_with - d_bare) / d_with
    assert share == pytest.approx(ALLREDUCE_SHARE[interconnect][tp], abs=1e-9)
    expected = {"pcie5": {2: 0.08, 4: 0.25, 8: 0.38}}.get(interconnect)
    if expected:
        assert share == pytest.approx(expected[tp])
    else:
        assert 0.02 - 1e-9 <= share <= 0.09 + 1e-9


def test_pipeline_bubble() -> None:
    flat = IterationProfile.linear(0.01, 0.0)  # 10 ms whatever the tokens: isolates the bubble
    base = EngineConfig(profile=flat, kv_capacity_tokens=100_000, kv_bytes_per_token=0)
    for pp, m in [(2, 4), (4, 4), (4, 8)]:
        cfg = EngineConfig(
            profile=flat, kv_capacity_tokens=100_000, kv_bytes_per_token=0, pp=pp, pp_microbatches=m
        )
        durations = []
        for c in (base, cfg):
            e = Engine(c, random.Random(0))
            for i in range(16):
                e.add_request(EngineRequest(f"r{i}", 10, 2), 0.0)
            durations.append(e.step(0.0).duration_s)
        # (m + pp - 1) stage slots of 1/pp of the layers each; the idle share
        # of the pipeline is the bubble (pp - 1) / (m + pp - 1).
        assert durations[1] == pytest.approx(durations[0] * (m + pp - 1) / pp)
        busy = m * durations[0] / pp
        assert 1 - busy / durations[1] == pytest.approx((pp - 1) / (m + pp - 1))


def test_unknown_preset_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown engine preset"):
        preset("gpt-5")
    with pytest.raises(ValueError, match="interconnect"):
        preset("llama2-7b", tp=2, interconnect="carrier-pigeon")
    with pytest.raises(ValueError, match="tp must be"):
        preset("llama2-7b", tp=3)


# -- MoE in the engine -----------------------------------------------------------


def test_moe_dropless_slows_the_step_and_counts_experts() -> None:
    moe = MoEConfig(num_experts=8, top_k=2, zipf_s=1.2, mode="dropless")
    skewed = Engine(preset("llama2-7b", moe=moe), random.Random(1))
    dense = Engine(preset("llama2-7b"), random.Random(1))
    for e in (skewed, dense):
        for i in range(4):
            e.add_request(EngineRequest(f"x{i}", 500, 2, domain="code"), 0.0)
    d_moe = skewed.step(0.0).duration_s
    d_dense = dense.step(0.0).duration_s
    assert d_moe > 1.3 * d_dense
    stats = skewed.stats()
    assert sum(stats["expert_tokens"]) == 2000 * 2
    assert sum(stats["expert_overflow"]) == 0


def test_moe_capacity_mode_drops_instead_of_slowing() -> None:
    moe = MoEConfig(num_experts=8, top_k=2, zipf_s=1.2, mode="capacity", capacity_factor=1.0)
    capped = Engine(preset("llama2-7b", moe=moe), random.Random(1))
    dense = Engine(preset("llama2-7b"), random.Random(1))
    for e in (capped, dense):
        for i in range(4):
            e.add_request(EngineRequest(f"x{i}", 500, 2), 0.0)
    assert capped.step(0.0).duration_s == pytest.approx(dense.step(0.0).duration_s)
    assert sum(capped.stats()["expert_overflow"]) > 0


def test_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[float]:
        e = Engine(preset("llama2-7b+moe"), random.Random(seed))
        rng = random.Random(5)
        for i in range(50):
            e.add_request(EngineRequest(f"r{i}", rng.randint(10, 900), rng.randint(1, 60)), 0.0)
        return [s.duration_s for s in run_until_done(e)[2]]

    assert run(3) == run(3)


def test_bookkeeping_survives_a_random_mix_of_adds_aborts_and_steps() -> None:
    # Small cache, shared prefixes and aborts: every path of the KV accounting.
    cfg = preset("llama2-7b", kv_capacity_tokens=6000, max_num_seqs=16)
    engine = Engine(cfg, random.Random(0))
    rng = random.Random(42)
    live: set[str] = set()
    emitted: dict[str, int] = {}
    want: dict[str, int] = {}
    now = 0.0
    for i in range(1500):
        op = rng.random()
        if op < 0.3:
            prompt = rng.randint(1, 1500)
            out = rng.randint(1, 300)
            tag = rng.randrange(4)  # four shared "documents"
            blocks = prompt // BLOCK_TOKENS
            hs = hashes(tag, min(blocks, 8)) + hashes(100 + i, max(0, blocks - 8))
            engine.add_request(EngineRequest(f"r{i}", prompt, out, hs), now)
            live.add(f"r{i}")
            want[f"r{i}"] = out
        elif op < 0.35 and live:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
            want.pop(victim)
        elif engine.has_work():
            res = engine.step(now)
            now += res.duration_s
            for rid, n in res.emitted.items():
                emitted[rid] = emitted.get(rid, 0) + n
            for rid in res.finished:
                live.discard(rid)
                assert emitted[rid] == want[rid]
        engine.check_invariants()
    while engine.has_work():
        for rid in engine.step(now).finished:
            live.discard(rid)
        engine.check_invariants()
    assert not live
    s = engine.stats()
    assert s["preemptions"] > 0 and s["prefix_hits"] > 0
    assert engine.kv_usage() == 0.0


# -- the default GQA preset and the MoE variants -------------------------------


def test_default_preset_is_llama3_8b_with_scaled_h100_times() -> None:
    cfg = preset()
    assert cfg.name == "llama3-8b" and cfg.tp == 1
    assert cfg.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    # 80 GB x 0.9 - 2.5 GB of activations - 16 GB of weights, over 128 KiB.
    assert cfg.kv_capacity_tokens == pytest.approx(408_000, rel=0.01)
    assert cfg.kv_capacity_tokens > 3.5 * preset("llama2-7b").kv_capacity_tokens
    # H100 Llama-2-7B times the A100 Llama-3-8B / Llama-2-7B ratio, which is
    # ~1.05 at 4,096 tokens (more MLP, less QKV projection with GQA).
    h100_7b = MODELS["llama2-7b"].profile(1)
    assert cfg.profile.time_s(4096) / h100_7b.time_s(4096) == pytest.approx(1.056, abs=0.02)
    assert cfg.profile.time_s(1) == pytest.approx(h100_7b.time_s(1) * 9.70 / 9.09, rel=0.03)


def test_moe_variants_take_weights_and_active_flops_from_their_experts() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        preset("llama3-8b+moe", tp=1)  # 47.5B weights: two GPUs, as Mixtral-8x7B
    moe = preset("llama3-8b+moe")
    assert moe.tp == 2 and moe.moe is not None and moe.moe_profile is not None
    _, mlp = MODELS["llama3-8b"].split_profile(2)
    # One token touches top_k = 2 experts; a big step runs 2 dense MLPs of FLOPs per token.
    assert active_experts(1, 8, 2) == pytest.approx(2.0)
    assert moe.moe_profile.time_s(1) == pytest.approx(2 * mlp.time_s(1), rel=0.05)
    slope = moe.moe_profile.slope_s_per_token(2048, 4096)
    assert slope == pytest.approx(2 * mlp.slope_s_per_token(512, 1024), rel=0.15)
    big = preset("llama3-8b+moe256")
    assert big.tp == 8 and big.moe is not None and big.moe.ep_ranks == 8
    # Counted in the step: a MoE step is the non-MLP profile plus the experts.
    engine = Engine(moe, random.Random(0))
    engine.add_request(EngineRequest("a", 500, 1), 0.0)  # one prefill chunk
    step = engine.step(0.0)
    assert step.duration_s > moe.profile.time_s(500) + moe.moe_profile.time_s(500) * 0.99
    assert sum(engine.stats()["expert_tokens"]) == 500 * 2
