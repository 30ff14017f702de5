"""Workloads for the load generator and the policy simulator: one entry point.

``load_workload(name_or_path, seed=, requests=, rate=, speed=)`` yields
:class:`loadtest.workload_types.Conversation` objects in arrival order, so
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
  ``Turn.think_time_s``; its prompt is the whole context so far (previous
  prompt + a synthetic assistant reply as long as the previous output + the
  new message), so a session's prefix reuse is real for policies/prefix.py.
- Prompt text is synthetic but deterministic in the seed: slices of one
  pseudo-word corpus per seed, each prompt opening with a unique tag, so two
  prompts share prefix blocks exactly when the workload says they do. Its
  length is ``prompt_tokens * policies.prefix.CHARS_PER_TOKEN`` characters.
  Text is built lazily, conversation by conversation (10^6 requests would be
  gigabytes of text at once), at a few microseconds per prompt.

Length distributions: ShareGPT-like and Alpaca-like samplers are lognormal
with the means vLLM's paper reports (Kwon et al., SOSP 2023, Fig. 11: input
/output 161.31/337.99 and 19.31/58.45 tokens); LMSYS-like sessions use
LMSYS-Chat-1M's published averages (Zheng et al. 2023: 2.0 turns per
conversation, 69.5-token prompts, 214.5-token responses) with geometric turn
counts. The spreads (sigma) are ours: they are not in those papers.
"""

from __future__ import annotations

import math
import random
import string
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from loadtest import traces
from loadtest.workload_types import Conversation, Turn
from policies.prefix import CHARS_PER_TOKEN

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
# Lognormal spreads of our synthetic samplers (the papers give means only).
SHAREGPT = ((161.31, 1.0), (337.99, 0.9))  # ((mean, sigma) input, (mean, sigma) output)
ALPACA = ((19.31, 0.6), (58.45, 0.8))
LMSYS_TURNS_MEAN = 2.0
LMSYS_PROMPT = (69.5, 1.0)
LMSYS_REPLY = (214.5, 0.9)
THINK_TIME_MEAN_S = 5.0
MAX_TOKENS = 16_384  # clamp for sampled lengths: keeps one sample from dominating a run
MAX_CONTEXT = 32_768  # a chat session stops growing here
MAX_TURNS = 32


# -- text -------------------------------------------------------------------

_CORPUS_CHARS = 1 << 20


class TextSource:
    """Deterministic filler text, cheap to slice: one pseudo-word corpus per seed."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"text:{seed}")
        letters = string.ascii_lowercase
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(4096)]
        words: list[str] = []
        size = 0
        while size < _CORPUS_CHARS:
            chunk = rng.choices(vocab, k=4096)
            words.extend(chunk)
            size += sum(len(w) + 1 for w in chunk)
        corpus = " ".join(words)[:_CORPUS_CHARS]
        self._doubled = corpus + corpus

    def text(self, key: str, tokens: int) -> str:
        """``tokens * CHARS_PER_TOKEN`` characters, opening with ``[key]``."""
        n = tokens * CHARS_PER_TOKEN
        head = f"[{key}] "
        if n <= len(head):
            return head[:n]
        body = n - len(head)
        off = zlib.crc32(key.encode()) % _CORPUS_CHARS
        if body <= _CORPUS_CHARS:
            return head + self._doubled[off : off + body]
        reps = body // _CORPUS_CHARS + 1
        return head + (self._doubled[off : off + _CORPUS_CHARS] * reps)[:body]


@lru_cache(maxsize=4)
def text_source(seed: int) -> TextSource:
    return TextSource(seed)


def mooncake_prompt(src: TextSource, hash_ids: tuple[int, ...], prompt_tokens: int) -> str:
    """Prompt text whose prefix blocks are equal exactly when the hash ids are.

    One Mooncake id = 512 tokens = 8 router/prefix blocks of 256 characters;
    the id's text opens with a tag naming it, and block hashes are chained, so
    two prompts' block hashes agree up to the first differing id.
    """
    parts = [src.text(f"mc{h}", traces.MOONCAKE_BLOCK_TOKENS) for h in hash_ids]
    text = "".join(parts)
    n = prompt_tokens * CHARS_PER_TOKEN
    if len(text) < n:  # a trace row with fewer ids than its length needs
        text += src.text(f"mc-tail-{len(hash_ids)}-{prompt_tokens}", prompt_tokens)
    return text[:n]


# -- length samplers --------------------------------------------------------


def lognormal_sampler(mean: float, sigma: float) -> Callable[[random.Random], int]:
    """Integer lengths >= 1 from a lognormal with the given MEAN (not median)."""
    mu = math.log(mean) - sigma * sigma / 2

    def sample(rng: random.Random) -> int:
        return min(MAX_TOKENS, max(1, round(rng.lognormvariate(mu, sigma))))

    return sample


def _geometric(rng: random.Random, mean: float, cap: int) -> int:
    """1, 2, ... with P(n) = p (1 - p)^(n - 1), p = 1/mean."""
    p = 1.0 / mean
    n = 1
    while n < cap and rng.random() >= p:
        n += 1
    return n


# -- arrivals ---------------------------------------------------------------


def _arrivals(rng: random.Random, rate: float | None) -> Iterator[float]:
    t = 0.0
    while True:
        if rate:
            t += rng.expovariate(rate)
        yield t


# -- synthetic workloads ----------------------------------------------------


def _single_turn(
    name: str, seed: int, requests: int, rate: float | None, spec: tuple[tuple[float, float], ...]
) -> Iterator[Conversation]:
    rng = random.Random(f"{name}:{seed}")
    src = text_source(seed)
    (im, isg), (om, osg) = spec
    sample_in, sample_out = lognormal_sampler(im, isg), lognormal_sampler(om, osg)
    arrivals = _arrivals(rng, rate)
    for i in range(requests):
        cid = f"{name}-s{seed}-{i}"
        p, o = sample_in(rng), sample_out(rng)
        yield Conversation(cid, next(arrivals), (Turn(src.text(cid, p), p, o),), domain=name)


def _chat(seed: int, requests: int, rate: float | None) -> Iterator[Conversation]:
    rng = random.Random(f"chat:{seed}")
    src = text_source(seed)
    sample_msg, sample_reply = lognormal_sampler(*LMSYS_PROMPT), lognormal_sampler(*LMSYS_REPLY)
    arrivals = _arrivals(rng, rate)
    left = requests
    i = 0
    while left > 0:
        cid = f"chat-s{seed}-{i}"
        n_turns = min(_geometric(rng, LMSYS_TURNS_MEAN, MAX_TURNS), left)
        turns: list[Turn] = []
        context = ""
        ctx_tokens = 0
        for k in range(n_turns):
            msg = sample_msg(rng)
            out = sample_reply(rng)
            if ctx_tokens + msg + out > MAX_CONTEXT:
                break
            context += src.text(f"{cid}-u{k}", msg)
            ctx_tokens += msg
            think = rng.expovariate(1.0 / THINK_TIME_MEAN_S) if k else 0.0
            turns.append(Turn(context, ctx_tokens, out, think))
            # The assistant's reply joins the context of the next turn.
            context += src.text(f"{cid}-a{k}", out)
            ctx_tokens += out
        i += 1
        if not turns:  # a first turn over MAX_CONTEXT: impossible with these samplers
            continue
        left -= len(turns)
        yield Conversation(cid, next(arrivals), tuple(turns), domain="chat")


def _shared_system(seed: int, requests: int, rate: float | None) -> Iterator[Conversation]:
    rng = random.Random(f"shared-system:{seed}")
    src = text_source(seed)
    system_tokens = 2000
    # Tenant 0 is the dominant system prompt (80%); 16 minor ones share the rest.
    systems = [src.text(f"system-{seed}-{t}", system_tokens) for t in range(17)]
    sample_msg, sample_out = lognormal_sampler(150.0, 0.8), lognormal_sampler(200.0, 0.8)
    arrivals = _arrivals(rng, rate)
    for i in range(requests):
        cid = f"shared-system-s{seed}-{i}"
        tenant = 0 if rng.random() < 0.8 else rng.randint(1, 16)
        msg, out = sample_msg(rng), sample_out(rng)
        text = systems[tenant] + src.text(cid, msg)
        yield Conversation(
            cid, next(arrivals), (Turn(text, system_tokens + msg, out),), domain="chat"
        )


def _grouped_prefix(
    name: str,
    seed: int,
    requests: int,
    rate: float | None,
    *,
    groups: int,
    prefix_tokens: int,
    question_tokens: int,
    output_tokens: int,
) -> Iterator[Conversation]:
    """Single-turn requests = one of ``groups`` long prefixes + a unique question."""
    rng = random.Random(f"{name}:{seed}")
    src = text_source(seed)
    prefixes = [src.text(f"{name}-prefix-{seed}-{g}", prefix_tokens) for g in range(groups)]
    order = [i % groups for i in range(requests)]
    rng.shuffle(order)
    arrivals = _arrivals(rng, rate)
    for i, g in enumerate(order):
        cid = f"{name}-s{seed}-g{g}-{i}"
        text = prefixes[g] + src.text(cid, question_tokens)
        turn = Turn(text, prefix_tokens + question_tokens, output_tokens)
        yield Conversation(cid, next(arrivals), (turn,), domain=name)


def _llm_d(seed: int, requests: int, rate: float | None) -> Iterator[Conversation]:
    # 150 customers x 5 users = 750 sessions; a request is a customer's
    # 6,000-token context + a fresh 1,200-token query from one of its users.
    rng = random.Random(f"llm-d:{seed}")
    src = text_source(seed)
    prefixes = [src.text(f"llm-d-prefix-{seed}-{c}", 6000) for c in range(150)]
    arrivals = _arrivals(rng, rate)
    for i in range(requests):
        c, u = rng.randrange(150), rng.randrange(5)
        cid = f"llm-d-s{seed}-c{c}-u{u}-{i}"
        text = prefixes[c] + src.text(cid, 1200)
        yield Conversation(cid, next(arrivals), (Turn(text, 7200, 300),), domain="llm-d")


# -- traces -----------------------------------------------------------------


def _replay(
    name: str,
    rows: tuple[traces.TraceRow, ...],
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
    arrivals = _arrivals(rng, rate) if rate is not None else None
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


def _trace_rows(path: Path) -> tuple[traces.TraceRow, ...]:
    if path.suffix == ".csv":
        return traces.read_azure(path)
    if path.suffix in (".jsonl", ".json"):
        return traces.read_mooncake(path)
    raise ValueError(
        f"unknown trace format {path.suffix!r}: expected Azure .csv or Mooncake .jsonl"
    )


# -- entry point ------------------------------------------------------------


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
        return _single_turn(name, seed, n, rate, SHAREGPT)
    if name == "alpaca":
        return _single_turn(name, seed, n, rate, ALPACA)
    if name == "chat":
        return _chat(seed, n, rate)
    if name == "shared-system":
        return _shared_system(seed, n, rate)
    if name == "sglang-shared-prefix":
        return _grouped_prefix(
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
        return _llm_d(seed, 3000 if requests is None else requests, rate)
    if name == "azure-conv":
        return _replay(
            name, traces.read_azure(traces.AZURE_CONV), seed, requests, rate, speed, "conv"
        )
    if name == "azure-code":
        return _replay(
            name, traces.read_azure(traces.AZURE_CODE), seed, requests, rate, speed, "code"
        )
    if name == "mooncake":
        return _replay(
            name, traces.read_mooncake(traces.MOONCAKE), seed, requests, rate, speed, None
        )
    path = Path(name_or_path)
    if path.is_file():
        rows = _trace_rows(path)
        return _replay(path.stem, rows, seed, requests, rate, speed, None)
    raise ValueError(
        f"unknown workload {name_or_path!r}: not a file, and not one of {', '.join(WORKLOADS)}"
    )


# -- inspection CLI -------------------------------------------------------------


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
    import argparse
    import json

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


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
