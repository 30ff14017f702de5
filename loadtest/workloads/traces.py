"""The public request traces vendored in loadtest/workloads/data/: readers and replay.

- Azure LLM inference trace 2023 (Splitwise, ISCA 2024): CSV
  ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps carry 7 fractional
  digits, which ``datetime.strptime``'s ``%f`` (6 digits) refuses, so they are
  parsed by hand. No prompt contents: every request is independent text.
- Mooncake synthetic trace (FAST 2025): JSONL ``{"timestamp" (ms),
  "input_length", "output_length", "hash_ids"}`` with one hash id per
  512-token prompt block; equal ids = equal prefix block, which is real
  prefix sharing (multi-turn and shared documents).

Rows are plain tuples-with-names; :func:`replay` turns them into
:class:`~loadtest.workloads.types.Conversation` objects (synthetic text of
the row's length, the trace's arrivals or Poisson ones).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from loadtest.workloads.synthetic import TextSource, poisson_arrivals, text_source
from loadtest.workloads.types import Conversation, Turn
from policies.prefix import CHARS_PER_TOKEN

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

    The ceiling any cache (and any router) can reach on the trace: 0.640 for
    the Mooncake synthetic trace.
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


# -- replay -------------------------------------------------------------------


def mooncake_prompt(src: TextSource, hash_ids: tuple[int, ...], prompt_tokens: int) -> str:
    """Prompt text whose prefix blocks are equal exactly when the hash ids are.

    One Mooncake id = 512 tokens = 8 policies/prefix blocks of 256 characters;
    the id's text opens with a tag naming it, and block hashes are chained, so
    two prompts' block hashes agree up to the first differing id.
    """
    parts = [src.text(f"mc{h}", MOONCAKE_BLOCK_TOKENS) for h in hash_ids]
    text = "".join(parts)
    n = prompt_tokens * CHARS_PER_TOKEN
    if len(text) < n:  # a trace row with fewer ids than its length needs
        text += src.text(f"mc-tail-{len(hash_ids)}-{prompt_tokens}", prompt_tokens)
    return text[:n]


def replay(
    name: str,
    rows: tuple[TraceRow, ...],
    seed: int,
    requests: int | None,
    rate: float | None,
    speed: float,
    domain: str | None,
) -> Iterator[Conversation]:
    """Trace rows as single-turn conversations, cycling the trace if asked for more.

    Each further pass starts one mean gap after the previous one ends, and
    offsets Mooncake ids so a pass does not hit on the previous pass's blocks
    (the trace's own hit ratio is kept).
    """
    if not rows:
        return
    rng = random.Random(f"{name}:{seed}")
    src = text_source(seed)
    span = rows[-1].t_s - rows[0].t_s
    gap = span / max(len(rows) - 1, 1)
    id_stride = max((max(r.hash_ids) for r in rows if r.hash_ids), default=-1) + 1
    total = len(rows) if requests is None else requests
    arrivals = poisson_arrivals(rng, rate) if rate is not None else None
    for i in range(total):
        k, j = divmod(i, len(rows))
        row = rows[j]
        cid = f"{name}-s{seed}-{i}"
        if row.hash_ids:
            ids = tuple(h + k * id_stride for h in row.hash_ids)
            text = mooncake_prompt(src, ids, row.prompt_tokens)
        else:
            text = src.text(cid, row.prompt_tokens)
        t = next(arrivals) if arrivals is not None else (k * (span + gap) + row.t_s) / speed
        turn = Turn(text, row.prompt_tokens, max(1, row.output_tokens))
        yield Conversation(cid, t, (turn,), domain=domain)


def replay_times(rows: tuple[TraceRow, ...], requests: int) -> list[float]:
    """Arrival times of the first ``requests`` requests of :func:`replay` at speed 1."""
    if not rows:
        return []
    span = rows[-1].t_s - rows[0].t_s
    gap = span / max(len(rows) - 1, 1)
    n = len(rows)
    return [(i // n) * (span + gap) + rows[i % n].t_s for i in range(requests)]


def native_rate(rows: tuple[TraceRow, ...], requests: int) -> float:
    """Requests per second of the first ``requests`` requests at the trace's own pace.

    Measured on the run's own requests (a trace's head can run at another
    rate than its whole): (n - 1) / (last arrival - first arrival).
    """
    ts = replay_times(rows, max(2, requests))
    span = ts[-1] - ts[0]
    if span <= 0:
        raise ValueError("the trace's first requests all arrive at once: no rate to rescale")
    return (len(ts) - 1) / span


def read_trace(path: Path) -> tuple[TraceRow, ...]:
    """A trace file by its suffix: Azure ``.csv`` or Mooncake ``.jsonl``."""
    if path.suffix == ".csv":
        return read_azure(path)
    if path.suffix in (".jsonl", ".json"):
        return read_mooncake(path)
    raise ValueError(
        f"unknown trace format {path.suffix!r}: expected Azure .csv or Mooncake .jsonl"
    )
