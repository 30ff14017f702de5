"""Readers for the public request traces vendored in loadtest/data/.

- Azure LLM inference trace 2023 (Splitwise, ISCA 2024): CSV
  ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps carry 7 fractional
  digits, which ``datetime.strptime``'s ``%f`` (6 digits) refuses, so they are
  parsed by hand. No prompt contents: every request is independent text.
- Mooncake synthetic trace (FAST 2025): JSONL ``{"timestamp" (ms),
  "input_length", "output_length", "hash_ids"}`` with one hash id per
  512-token prompt block; equal ids = equal prefix block, which is real
  prefix sharing (multi-turn and shared documents).

Rows are plain tuples-with-names; turning them into
:class:`loadtest.workload_types.Conversation` (text, arrivals) is
loadtest/workloads.py's job.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
AZURE_CONV = DATA_DIR / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = DATA_DIR / "AzureLLMInferenceTrace_code.csv"
MOONCAKE = DATA_DIR / "mooncake_synthetic_trace.jsonl"

MOONCAKE_BLOCK_TOKENS = 512  # one hash id per this many prompt tokens (Mooncake README)


@dataclass(frozen=True, slots=True)
class TraceRow:
    t_s: float  # arrival, seconds since the trace's first request
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # Mooncake only: one per 512-token prompt block


def _parse_azure_ts(s: str) -> float:
    """Seconds of '2023-11-16 18:17:03.9799600' (read as UTC, any fraction length)."""
    whole, _, frac = s.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


@lru_cache(maxsize=4)
def read_azure(path: str | Path = AZURE_CONV) -> tuple[TraceRow, ...]:
    """All rows of an Azure-format CSV, times relative to the first row."""
    rows: list[TraceRow] = []
    t0: float | None = None
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            t = _parse_azure_ts(rec["TIMESTAMP"])
            if t0 is None:
                t0 = t
            rows.append(TraceRow(t - t0, int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    return tuple(rows)


@lru_cache(maxsize=4)
def read_mooncake(path: str | Path = MOONCAKE) -> tuple[TraceRow, ...]:
    """All rows of a Mooncake-format JSONL, times relative to the first row."""
    rows: list[TraceRow] = []
    t0: float | None = None
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            t = float(rec["timestamp"]) / 1000.0
            if t0 is None:
                t0 = t
            rows.append(
                TraceRow(
                    t - t0,
                    int(rec["input_length"]),
                    int(rec["output_length"]),
                    tuple(int(h) for h in rec["hash_ids"]),
                )
            )
    return tuple(rows)


def infinite_cache_hit_ratio(rows: Iterable[TraceRow]) -> float:
    """Share of prompt blocks whose hash id was seen earlier in the trace.

    The ceiling any cache (and any router) can reach on the trace:
    SIMULATOR-CHECKS item 10 gives 0.640 for the Mooncake synthetic trace.
    """
    seen: set[int] = set()
    hits = total = 0
    for row in rows:
        for h in row.hash_ids:
            total += 1
            if h in seen:
                hits += 1
            else:
                seen.add(h)
    return hits / total if total else 0.0


def describe(rows: Iterable[TraceRow]) -> dict[str, float]:
    """Count, means and medians of prompt and output lengths, and arrival CV."""
    rs = list(rows)
    if not rs:
        return {"rows": 0}
    ins = sorted(r.prompt_tokens for r in rs)
    outs = sorted(r.output_tokens for r in rs)
    gaps = [b.t_s - a.t_s for a, b in pairwise(rs)]
    mean_gap = sum(gaps) / len(gaps) if gaps else 0.0
    cv = 0.0
    if gaps and mean_gap > 0:
        var = sum((g - mean_gap) ** 2 for g in gaps) / len(gaps)
        cv = var**0.5 / mean_gap
    return {
        "rows": len(rs),
        "input_mean": sum(ins) / len(ins),
        "input_median": _median(ins),
        "output_mean": sum(outs) / len(outs),
        "output_median": _median(outs),
        "duration_s": rs[-1].t_s - rs[0].t_s,
        "interarrival_cv": cv,
    }


def _median(sorted_xs: list[int]) -> float:
    n = len(sorted_xs)
    mid = n // 2
    return float(sorted_xs[mid]) if n % 2 else (sorted_xs[mid - 1] + sorted_xs[mid]) / 2
