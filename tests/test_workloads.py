"""Workload generators: length statistics, prefix structure, arrivals, the entry point."""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter

import pytest

from loadtest.workloads import WORKLOADS, Conversation, load_workload
from policies.prefix import CHARS_PER_TOKEN


def turns_of(convs: list[Conversation]) -> list:
    return [t for c in convs for t in c.turns]


# -- length statistics against the papers' means --------------------------------------


def test_lmsys_like_sessions_average_two_turns() -> None:
    convs = list(load_workload("chat", seed=11, requests=20_000))
    assert len(turns_of(convs)) == 20_000
    assert len(turns_of(convs)) / len(convs) == pytest.approx(2.0, abs=0.1)


def test_sharegpt_vs_alpaca_length_ratios() -> None:
    share = turns_of(list(load_workload("sharegpt", seed=11, requests=30_000)))
    alpaca = turns_of(list(load_workload("alpaca", seed=11, requests=30_000)))
    s_in = statistics.fmean(t.prompt_tokens for t in share)
    s_out = statistics.fmean(t.output_tokens for t in share)
    a_in = statistics.fmean(t.prompt_tokens for t in alpaca)
    a_out = statistics.fmean(t.output_tokens for t in alpaca)
    # vLLM Fig. 11 means: 161.31 / 337.99 vs 19.31 / 58.45 -> 8.4x and 5.8x.
    assert s_in == pytest.approx(161.31, rel=0.05)
    assert s_out == pytest.approx(337.99, rel=0.05)
    assert a_in == pytest.approx(19.31, rel=0.05)
    assert a_out == pytest.approx(58.45, rel=0.05)
    assert s_in / a_in == pytest.approx(8.4, rel=0.06)
    assert s_out / a_out == pytest.approx(5.8, rel=0.06)


# -- prefix structure ----------------------------------------------------------------


def test_a_later_turn_extends_the_previous_context() -> None:
    convs = [c for c in load_workload("chat", seed=3, requests=400) if len(c.turns) >= 3]
    assert convs
    for conv in convs:
        for prev, cur in itertools.pairwise(conv.turns):
            assert cur.prompt_text.startswith(prev.prompt_text)
            # previous prompt + the previous answer + a new message
            assert cur.prompt_tokens > prev.prompt_tokens + prev.output_tokens
            hp, hc = prev.block_hashes(), cur.block_hashes()
            assert hc[: len(hp)] == hp
            assert cur.think_time_s > 0
        assert conv.turns[0].think_time_s == 0.0


def test_shared_system_prompt_dominates_the_first_blocks() -> None:
    convs = list(load_workload("shared-system", seed=2, requests=2000))
    firsts = Counter(c.turns[0].block_hashes()[0] for c in convs)
    (_, count), (_, second) = firsts.most_common(2)
    assert 0.75 < count / len(convs) < 0.85
    assert second < 0.03 * len(convs)
    # ... and the requests still differ after it (a message shorter than a
    # block leaves no full block of its own, hence "most").
    assert len({c.turns[0].prompt_text for c in convs}) == len(convs)
    assert len({c.turns[0].block_hashes() for c in convs}) > 0.8 * len(convs)


def test_sglang_shared_prefix_shape() -> None:
    convs = list(load_workload("sglang-shared-prefix", seed=4))
    assert len(convs) == 1024
    groups = Counter(c.turns[0].block_hashes()[31] for c in convs)  # end of the 2,048-token prefix
    assert sorted(groups.values()) == [16] * 64
    assert {(c.turns[0].prompt_tokens, c.turns[0].output_tokens) for c in convs} == {(2176, 256)}
    # Random order, not group by group.
    first_16 = {c.turns[0].block_hashes()[31] for c in convs[:16]}
    assert len(first_16) > 4


def test_llm_d_shape() -> None:
    convs = list(load_workload("llm-d", seed=5, requests=3000))
    prefixes = Counter(c.turns[0].block_hashes()[6000 // 64 - 1] for c in convs)
    assert len(prefixes) == 150
    assert {c.turns[0].prompt_tokens for c in convs} == {7200}
    users = {c.id.split("-")[4] for c in convs}
    assert users == {f"u{u}" for u in range(5)}


# -- arrivals, sizes, determinism -------------------------------------------------------


def test_text_length_matches_prompt_tokens_everywhere() -> None:
    for name in WORKLOADS:
        for conv in load_workload(name, seed=1, requests=50):
            for turn in conv.turns:
                assert len(turn.prompt_text) == turn.prompt_tokens * CHARS_PER_TOKEN
                assert turn.output_tokens >= 1


def test_same_seed_same_workload_other_seed_other_text() -> None:
    for name in ("chat", "azure-conv", "mooncake"):
        a = list(load_workload(name, seed=7, requests=30))
        b = list(load_workload(name, seed=7, requests=30))
        c = list(load_workload(name, seed=8, requests=30))
        assert a == b
        assert [x.turns[0].prompt_text for x in a] != [x.turns[0].prompt_text for x in c]


def test_trace_timestamps_speed_and_poisson_rate() -> None:
    base = list(load_workload("azure-conv", seed=0, requests=500))
    fast = list(load_workload("azure-conv", seed=0, requests=500, speed=10))
    assert base[0].arrival_s == 0.0
    assert fast[-1].arrival_s == pytest.approx(base[-1].arrival_s / 10)
    poisson = list(load_workload("azure-conv", seed=0, requests=4000, rate=50.0))
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(poisson)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.06)
    closed = list(load_workload("azure-conv", seed=0, requests=10, rate=0))
    assert {c.arrival_s for c in closed} == {0.0}
    assert {c.arrival_s for c in load_workload("chat", seed=0, requests=10)} == {0.0}


def test_cycling_a_trace_beyond_its_length() -> None:
    rows = 3993
    convs = list(load_workload("mooncake", seed=0, requests=rows + 5))
    assert len(convs) == rows + 5
    assert convs[rows].arrival_s > convs[rows - 1].arrival_s
    # The second pass repeats the lengths but not the cached blocks.
    assert convs[rows].turns[0].prompt_tokens == convs[0].turns[0].prompt_tokens
    assert convs[rows].turns[0].block_hashes()[0] != convs[0].turns[0].block_hashes()[0]
    assert len({c.id for c in convs}) == len(convs)


def test_lazy_and_errors_are_raised_at_once() -> None:
    it = load_workload("sharegpt", seed=0, requests=10**9)
    assert next(iter(it)).turns  # a billion requests, generated one by one
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("no-such-workload", seed=0)
    with pytest.raises(ValueError):
        load_workload("chat", seed=0, speed=0)
    with pytest.raises(ValueError):
        load_workload("chat", seed=0, rate=-1)


def test_summary_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.workloads.catalog import main

    assert main([]) == 0
    assert "sglang-shared-prefix" in capsys.readouterr().out
    assert main(["shared-system", "--requests", "500", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 500
    assert 0.75 < summary["top_first_block_share"] < 0.85
    assert main(["no-such-thing"]) == 2
