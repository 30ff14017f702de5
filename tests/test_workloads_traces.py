"""Trace loaders against the published facts of the vendored traces."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from loadtest.workloads import load_workload, traces
from loadtest.workloads.synthetic import text_source
from loadtest.workloads.traces import mooncake_prompt


def test_azure_conv_exact() -> None:
    d = traces.describe(traces.read_azure(traces.AZURE_CONV))
    assert d["rows"] == 19_366
    assert round(d["input_mean"], 1) == 1154.7
    assert d["input_median"] == 1020
    assert round(d["output_mean"], 1) == 211.1
    assert d["output_median"] == 129
    assert d["interarrival_cv"] == pytest.approx(1.09, abs=0.01)  # close to Poisson


def test_azure_code_exact() -> None:
    d = traces.describe(traces.read_azure(traces.AZURE_CODE))
    assert d["rows"] == 8_819
    assert d["input_median"] == 1469
    assert d["output_median"] == 13
    assert d["interarrival_cv"] > 10  # very bursty


def test_azure_timestamps_keep_seven_fractional_digits() -> None:
    assert traces._parse_azure_ts("2023-11-16 18:17:03.9799600") - traces._parse_azure_ts(
        "2023-11-16 18:17:03.0000001"
    ) == pytest.approx(0.9799599, abs=1e-6)
    rows = traces.read_azure(traces.AZURE_CONV)
    assert rows[0].t_s == 0.0
    assert all(b.t_s >= a.t_s for a, b in itertools.pairwise(rows))


def test_mooncake_rows_and_hit_ratio() -> None:
    rows = traces.read_mooncake(traces.MOONCAKE)
    assert len(rows) == 3_993
    assert all(len(r.hash_ids) == math.ceil(r.prompt_tokens / 512) for r in rows)
    assert traces.infinite_cache_hit_ratio(rows) == pytest.approx(0.640, abs=0.005)


def test_mooncake_text_shares_prefix_blocks_exactly_when_ids_do() -> None:
    # The gateway's hashes (Turn.block_hashes) of the replayed prompts vs the ids.
    rows = traces.read_mooncake(traces.MOONCAKE)[:400]
    hashes = [c.turns[0].block_hashes() for c in load_workload("mooncake", seed=1, requests=400)]
    checked = 0
    for a, b in itertools.combinations(range(len(rows)), 2):
        ia, ib = rows[a].hash_ids, rows[b].hash_ids
        same_ids = next((k for k, (x, y) in enumerate(zip(ia, ib, strict=False)) if x != y), None)
        if same_ids is None:
            same_ids = min(len(ia), len(ib))
        ha, hb = hashes[a], hashes[b]
        same_blocks = next(
            (k for k, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y),
            min(len(ha), len(hb)),
        )
        # 512 tokens per id = 8 policies/prefix blocks of 64 tokens.
        assert same_blocks == min(8 * same_ids, len(ha), len(hb))
        checked += 1
    assert checked == 400 * 399 // 2


def test_mooncake_prompt_length_and_determinism() -> None:
    src = text_source(0)
    text = mooncake_prompt(src, (1, 2, 3), 1300)
    assert len(text) == 1300 * 4
    assert text == mooncake_prompt(text_source(0), (1, 2, 3), 1300)
    assert text[:2048] == mooncake_prompt(src, (1, 9), 1024)[:2048]
    assert text[2048:4096] != mooncake_prompt(src, (1, 9), 1024)[2048:4096]


def test_trace_file_by_path(tmp_path: Path) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    convs = list(load_workload(str(csv), seed=0))
    assert [c.turns[0].prompt_tokens for c in convs] == [374, 396]
    assert convs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'
        '{"timestamp": 500, "input_length": 700, "output_length": 6, "hash_ids": [0, 2]}\n'
    )
    a, b = load_workload(str(jsonl), seed=0)
    assert b.arrival_s == 0.5
    assert a.turns[0].block_hashes()[:8] == b.turns[0].block_hashes()[:8]
    assert a.turns[0].block_hashes()[8] != b.turns[0].block_hashes()[8]


def test_mooncake_hit_ratio_survives_our_block_hashing() -> None:
    """Replayed as text and hashed as the gateway and the engine hash it (64-token
    chained blocks of the chat-formatted prompt), the trace keeps its ~0.64
    infinite-cache hit ratio: the text carries the trace's prefix sharing."""
    seen: set[int] = set()
    hits = total = 0
    for conv in load_workload("mooncake", seed=0):
        hashes = conv.turns[0].block_hashes()
        total += len(hashes)
        hits += sum(h in seen for h in hashes)
        seen.update(hashes)
    assert total > 700_000  # the whole trace (3,993 prompts, ~15k tokens each)
    assert hits / total == pytest.approx(0.64, abs=0.015)
