"""Named workloads for the load generator and the policy simulator: one entry point.

``load_workload(name_or_path, seed=, requests=, rate=, speed=)`` yields
:class:`loadtest.workloads.types.Conversation` objects in arrival order, so
``--workload NAME|PATH`` means the same thing in ``dp-router loadtest`` and
``dp-router simulate``. ``WORKLOADS`` lists the names with a description.

Conventions:

- ``requests`` counts REQUESTS (turns), not conversations: a multi-turn
  workload stops adding conversations once it has that many turns (the last
  one is cut short). ``None`` = the workload's natural size (a whole trace,
  1,024 for the SGLang benchmark, 1,000 for the synthetic ones).
- Arrivals: ``rate=None`` replays a trace's own timestamps divided by
  ``speed`` (``speed=10`` = ten times faster); synthetic workloads then all
  arrive at 0 (closed loop: the caller's concurrency paces them). ``rate > 0``
  = Poisson arrivals of conversations at that rate (for single-turn workloads,
  requests per second). ``rate == 0`` = closed loop for traces too.
- A later turn is sent after the previous answer completed plus
  ``Turn.think_time_s``.

``python -m loadtest.workloads [NAME|PATH ...]`` lists or summarizes them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

from loadtest.workloads import synthetic, traces
from loadtest.workloads.types import Conversation

WORKLOADS: dict[str, str] = {
    "sharegpt": "single-turn, ShareGPT-like lognormal lengths (mean 161 in / 338 out tokens)",
    "alpaca": "single-turn, Alpaca-like lognormal lengths (mean 19 in / 58 out tokens)",
    "chat": "multi-turn LMSYS-like sessions: geometric turns (mean 2.0), 5 s mean think "
    "time, 69.5-token messages, 214.5-token replies, context grows turn by turn",
    "shared-system": "single-turn; 80% share one 2,000-token system prompt, the rest one of "
    "16 others, then a unique ~150-token message: the trap for first-block affinity",
    "sglang-shared-prefix": "SGLang's generated-shared-prefix benchmark: 64 groups x 16 "
    "requests, 2,048-token group prefix + 128-token question, 256 out, random order",
    "llm-d": "llm-d's prefix benchmark: 150 customers x 6,000-token prefixes, 5 users each, "
    "1,200-token queries, 300 out (our choice), random order",
    "azure-conv": "Azure LLM inference trace 2023, conversation (19,366 requests, 1 h)",
    "azure-code": "Azure LLM inference trace 2023, code (8,819 requests, bursty)",
    "mooncake": "Mooncake synthetic trace (3,993 requests, hash_ids -> shared prefix text)",
}

DEFAULT_REQUESTS = 1000


def load_workload(
    name_or_path: str,
    *,
    seed: int,
    requests: int | None = None,
    rate: float | None = None,
    speed: float = 1.0,
) -> Iterator[Conversation]:
    """Conversations of a named workload (see ``WORKLOADS``) or a trace file, in arrival order.

    Raises ValueError at once (not on first iteration) for an unknown name, a
    missing file or bad parameters.
    """
    if requests is not None and requests < 0:
        raise ValueError("requests must be >= 0")
    if rate is not None and rate < 0:
        raise ValueError("rate must be >= 0")
    if speed <= 0:
        raise ValueError("speed must be > 0")
    n = DEFAULT_REQUESTS if requests is None else requests
    name = name_or_path
    if name == "sharegpt":
        return synthetic.single_turn(name, seed, n, rate, synthetic.SHAREGPT)
    if name == "alpaca":
        return synthetic.single_turn(name, seed, n, rate, synthetic.ALPACA)
    if name == "chat":
        return synthetic.chat(seed, n, rate)
    if name == "shared-system":
        return synthetic.shared_system(seed, n, rate)
    if name == "sglang-shared-prefix":
        return synthetic.grouped_prefix(
            name,
            seed,
            1024 if requests is None else requests,
            rate,
            groups=64 if requests is None else max(1, math.ceil(requests / 16)),
            prefix_tokens=2048,
            question_tokens=128,
            output_tokens=256,
        )
    if name == "llm-d":
        return synthetic.llm_d(seed, 3000 if requests is None else requests, rate)
    trace = trace_of(name_or_path)
    if trace is not None:
        label, rows, domain = trace
        return traces.replay(label, rows, seed, requests, rate, speed, domain)
    raise ValueError(
        f"unknown workload {name_or_path!r}: not a file, and not one of {', '.join(WORKLOADS)}"
    )


def trace_of(name_or_path: str) -> tuple[str, tuple[traces.TraceRow, ...], str | None] | None:
    """(label, rows, MoE domain) of a trace workload or trace file; None for the others.

    The workloads with timestamps of their own: what ``dp-router simulate``
    replays at those timestamps (rescaled) unless told to resample them.
    """
    if name_or_path == "azure-conv":
        return name_or_path, traces.read_azure(traces.AZURE_CONV), "conv"
    if name_or_path == "azure-code":
        return name_or_path, traces.read_azure(traces.AZURE_CODE), "code"
    if name_or_path == "mooncake":
        return name_or_path, traces.read_mooncake(traces.MOONCAKE), None
    if name_or_path in WORKLOADS:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return path.stem, traces.read_trace(path), None
    return None


def summarize(convs: Iterator[Conversation]) -> dict[str, float]:
    """Counts and length statistics of a workload, for ``main`` and for reports."""
    n_conv = n_turn = 0
    ins: list[int] = []
    outs: list[int] = []
    first_blocks: dict[int, int] = {}
    last_arrival = 0.0
    for conv in convs:
        n_conv += 1
        last_arrival = max(last_arrival, conv.arrival_s)
        for turn in conv.turns:
            n_turn += 1
            ins.append(turn.prompt_tokens)
            outs.append(turn.output_tokens)
        hashes = conv.turns[0].block_hashes()
        if hashes:
            first_blocks[hashes[0]] = first_blocks.get(hashes[0], 0) + 1
    ins.sort()
    outs.sort()
    return {
        "conversations": n_conv,
        "requests": n_turn,
        "turns_per_conversation": n_turn / n_conv if n_conv else 0.0,
        "input_mean": sum(ins) / len(ins) if ins else 0.0,
        "input_median": ins[len(ins) // 2] if ins else 0,
        "output_mean": sum(outs) / len(outs) if outs else 0.0,
        "output_median": outs[len(outs) // 2] if outs else 0,
        "last_arrival_s": last_arrival,
        "top_first_block_share": max(first_blocks.values()) / n_conv if first_blocks else 0.0,
    }


def main(argv: list[str]) -> int:
    """``python -m loadtest.workloads [NAME|PATH ...]``: list or summarize workloads."""
    p = argparse.ArgumentParser(prog="loadtest.workloads", description=main.__doc__)
    p.add_argument("workload", nargs="*", help="names (see the list) or trace files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--speed", type=float, default=1.0)
    args = p.parse_args(argv)
    if not args.workload:
        for name, desc in WORKLOADS.items():
            print(f"{name:22s} {desc}")
        return 0
    for w in args.workload:
        try:
            convs = load_workload(
                w, seed=args.seed, requests=args.requests, rate=args.rate, speed=args.speed
            )
        except ValueError as e:
            print(f"error: {e}")
            return 2
        print(json.dumps({"workload": w, **summarize(convs)}))
    return 0
