"""Iteration-time profiles for the engine model, from Vidur's measured H100 tables.

Why a measured table and not a formula: an LLM iteration costs almost the same
for 1 and 128 tokens (the GPU is bound on loading the weights), then grows
linearly once the matrix multiplies are compute-bound. Vidur (Agrawal et al.,
MLSys 2024) measured exactly that per operator, per token count and per
tensor-parallel degree; we interpolate it instead of inventing a curve.

The vendored CSVs (``loadtest/engine/data/vidur_h100_llama2_*_mlp.csv``) hold, per
``(num_tokens, num_tensor_parallel_workers)``, the time in ms of each operator
of ONE transformer layer. A layer's non-attention time is the sum of the
medians of the per-layer operators (layer norms, QKV projection, RoPE,
output projection, MLP up/act/down, residual add); ``emb`` (the embedding) is
counted once per iteration, not per layer. Attention itself is not in these
tables: the engine adds it as KV bytes read / HBM bandwidth.

The measured curve is not monotonic: GEMM tile quantisation makes, e.g.,
72-96 tokens slower than 104-128 on 7B TP1 (7.3 vs 6.4 ms). A scheduler
model must not get faster by adding tokens, so each TP row is made
non-decreasing by isotonic regression (pool-adjacent-violators, the
least-squares monotone fit); this moves the 7B TP1 points by at most ~0.6 ms
(the dips are pooled with their neighbours) and leaves the large-token slope
untouched.

What the profiles give, as a sanity check against the usual H100 figures
(a 7B decode step ~6-7 ms, a 70B TP4 step ~15 ms): Llama-2-7B TP1 takes
5.5-6.8 ms per iteration up to 128 tokens, slope 1024->4096 tokens 0.0205
ms/token; Llama-2-70B TP4 14.3-16.0 ms up to 128 tokens, slope 0.052 ms/token.
"""

from __future__ import annotations

import csv
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

# Operators that run once per transformer layer (Vidur's column names).
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
MODEL_OPS = ("emb",)  # once per iteration


@dataclass(frozen=True, slots=True)
class IterationProfile:
    """Non-attention time of one iteration as a function of its token count.

    Piecewise-linear through measured ``(tokens, seconds)`` points; below the
    first point the first value holds (an iteration is never cheaper than
    loading the weights once), above the last the slope over the upper half
    of the table continues (the compute-bound regime stays linear; the last
    measured segment alone is too noisy to extrapolate from).
    """

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.tokens) != len(self.seconds):
            raise ValueError("a profile needs at least two (tokens, seconds) points")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)):
            raise ValueError("profile token counts must be strictly increasing")

    def time_s(self, tokens: float) -> float:
        ts, ss = self.tokens, self.seconds
        if tokens <= ts[0]:
            return ss[0]
        i = bisect_right(ts, tokens)
        if i >= len(ts):
            j = bisect_right(ts, ts[-1] // 2)
            j = min(max(j, 1), len(ts) - 1) - 1
            return ss[-1] + (ss[-1] - ss[j]) * (tokens - ts[-1]) / (ts[-1] - ts[j])
        t0, t1 = ts[i - 1], ts[i]
        s0, s1 = ss[i - 1], ss[i]
        return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)

    def slope_s_per_token(self, lo: int, hi: int) -> float:
        return (self.time_s(hi) - self.time_s(lo)) / (hi - lo)

    @classmethod
    def linear(cls, base_s: float, slope_s: float, knee_tokens: int = 128) -> IterationProfile:
        """A synthetic two-segment profile: flat up to the knee, then linear."""
        far = knee_tokens + 1_000_000
        return cls((1, knee_tokens, far), (base_s, base_s, base_s + slope_s * (far - knee_tokens)))


@lru_cache(maxsize=8)
def load_vidur_mlp(path: str | Path, layers: int) -> dict[int, IterationProfile]:
    """Per TP degree, the iteration profile of a whole model from a Vidur mlp.csv.

    Rows measured twice for the same (tokens, TP) are averaged. Times are
    converted from ms to seconds and multiplied by ``layers``.
    """
    acc: dict[int, dict[int, list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            tp = int(row["num_tensor_parallel_workers"])
            n = int(row["num_tokens"])
            layer_ms = sum(float(row[f"time_stats.{op}.median"]) for op in LAYER_OPS)
            model_ms = sum(float(row[f"time_stats.{op}.median"]) for op in MODEL_OPS)
            acc.setdefault(tp, {}).setdefault(n, []).append(layer_ms * layers + model_ms)
    out: dict[int, IterationProfile] = {}
    for tp, by_n in acc.items():
        ns = sorted(by_n)
        raw = [sum(by_n[n]) / len(by_n[n]) / 1000.0 for n in ns]
        out[tp] = IterationProfile(tuple(ns), tuple(isotonic(raw)))
    return out


def isotonic(ys: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``ys`` in least squares (PAVA)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks[-1]
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]
    out: list[float] = []
    for m, w in blocks:
        out.extend([m] * int(w))
    return out


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the engine needs to know about a model: size, KV footprint, profile."""

    name: str
    params: float  # parameter count; weights take params * weight_bytes
    layers: int
    kv_bytes_per_token: int  # whole model, all layers (split across TP x PP GPUs)
    profile_file: str  # file name in loadtest/engine/data
    weight_bytes: int = 2  # fp16/bf16

    def profile(self, tp: int) -> IterationProfile:
        profiles = load_vidur_mlp(str(DATA_DIR / self.profile_file), self.layers)
        if tp not in profiles:
            raise ValueError(
                f"{self.name}: no measured profile for TP{tp} (measured: "
                f"{', '.join(f'TP{t}' for t in sorted(profiles))})"
            )
        return profiles[tp]


# KV bytes per token = 2 (K and V) * layers * kv_heads * head_dim * 2 bytes.
# Llama-2-7B: 2*32*32*128*2 = 512 KiB (no GQA). Llama-2-70B: 2*80*8*128*2
# = 320 KiB (GQA, 8 KV heads). Compute and KV come from the same model (these
# two, because the Vidur profiles measured them): a KV footprint from one model
# and step times from another would give a fleet no real deployment has.
MODELS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec(
        "llama2-7b", 6.74e9, 32, 2 * 32 * 32 * 128 * 2, "vidur_h100_llama2_7b_mlp.csv"
    ),
    "llama2-70b": ModelSpec(
        "llama2-70b", 68.98e9, 80, 2 * 80 * 8 * 128 * 2, "vidur_h100_llama2_70b_mlp.csv"
    ),
}
