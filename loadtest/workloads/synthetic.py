"""Synthetic workloads: deterministic prompt text, length samplers, generators.

Prompt text is synthetic but deterministic in the seed: slices of one
pseudo-word corpus per seed, each prompt opening with a unique tag, so two
prompts share prefix blocks exactly when the workload says they do. Its
length is ``prompt_tokens * policies.prefix.CHARS_PER_TOKEN`` characters.
Text is built lazily, conversation by conversation (10^6 requests would be
gigabytes of text at once), at a few microseconds per prompt.

A later turn's prompt is the whole context so far (previous prompt + a
synthetic assistant reply as long as the previous output + the new message),
so a session's prefix reuse is real for policies/prefix.py.

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

from loadtest.workloads.types import Conversation, Turn
from policies.prefix import CHARS_PER_TOKEN

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


def poisson_arrivals(rng: random.Random, rate: float | None) -> Iterator[float]:
    t = 0.0
    while True:
        if rate:
            t += rng.expovariate(rate)
        yield t


# -- synthetic workloads ----------------------------------------------------


def single_turn(
    name: str, seed: int, requests: int, rate: float | None, spec: tuple[tuple[float, float], ...]
) -> Iterator[Conversation]:
    rng = random.Random(f"{name}:{seed}")
    src = text_source(seed)
    (im, isg), (om, osg) = spec
    sample_in, sample_out = lognormal_sampler(im, isg), lognormal_sampler(om, osg)
    arrivals = poisson_arrivals(rng, rate)
    for i in range(requests):
        cid = f"{name}-s{seed}-{i}"
        p, o = sample_in(rng), sample_out(rng)
        yield Conversation(cid, next(arrivals), (Turn(src.text(cid, p), p, o),), domain=name)


def chat(seed: int, requests: int, rate: float | None) -> Iterator[Conversation]:
    rng = random.Random(f"chat:{seed}")
    src = text_source(seed)
    sample_msg, sample_reply = lognormal_sampler(*LMSYS_PROMPT), lognormal_sampler(*LMSYS_REPLY)
    arrivals = poisson_arrivals(rng, rate)
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


def shared_system(seed: int, requests: int, rate: float | None) -> Iterator[Conversation]:
    rng = random.Random(f"shared-system:{seed}")
    src = text_source(seed)
    system_tokens = 2000
    # Tenant 0 is the dominant system prompt (80%); 16 minor ones share the rest.
    systems = [src.text(f"system-{seed}-{t}", system_tokens) for t in range(17)]
    sample_msg, sample_out = lognormal_sampler(150.0, 0.8), lognormal_sampler(200.0, 0.8)
    arrivals = poisson_arrivals(rng, rate)
    for i in range(requests):
        cid = f"shared-system-s{seed}-{i}"
        tenant = 0 if rng.random() < 0.8 else rng.randint(1, 16)
        msg, out = sample_msg(rng), sample_out(rng)
        text = systems[tenant] + src.text(cid, msg)
        yield Conversation(
            cid, next(arrivals), (Turn(text, system_tokens + msg, out),), domain="chat"
        )


def grouped_prefix(
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
    arrivals = poisson_arrivals(rng, rate)
    for i, g in enumerate(order):
        cid = f"{name}-s{seed}-g{g}-{i}"
        text = prefixes[g] + src.text(cid, question_tokens)
        turn = Turn(text, prefix_tokens + question_tokens, output_tokens)
        yield Conversation(cid, next(arrivals), (turn,), domain=name)


def llm_d(seed: int, requests: int, rate: float | None) -> Iterator[Conversation]:
    # 150 customers x 5 users = 750 sessions; a request is a customer's
    # 6,000-token context + a fresh 1,200-token query from one of its users.
    rng = random.Random(f"llm-d:{seed}")
    src = text_source(seed)
    prefixes = [src.text(f"llm-d-prefix-{seed}-{c}", 6000) for c in range(150)]
    arrivals = poisson_arrivals(rng, rate)
    for i in range(requests):
        c, u = rng.randrange(150), rng.randrange(5)
        cid = f"llm-d-s{seed}-c{c}-u{u}-{i}"
        text = prefixes[c] + src.text(cid, 1200)
        yield Conversation(cid, next(arrivals), (Turn(text, 7200, 300),), domain="llm-d")
