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


MLP_OPS = ("mlp_up_proj", "mlp_act", "mlp_down_proj")  # what MoE experts replace
NON_MLP_OPS = tuple(op for op in LAYER_OPS if op not in MLP_OPS)


@lru_cache(maxsize=32)
def load_vidur_mlp(
    path: str | Path,
    layers: int,
    layer_ops: tuple[str, ...] = LAYER_OPS,
    model_ops: tuple[str, ...] = MODEL_OPS,
) -> dict[int, IterationProfile]:
    """Per TP degree, the iteration profile of a whole model from a Vidur mlp.csv.

    Rows measured twice for the same (tokens, TP) are averaged. Times are
    converted from ms to seconds and multiplied by ``layers``. ``layer_ops``
    and ``model_ops`` choose the operators summed (all of them by default;
    the MoE presets read the MLP and the rest apart).
    """
    acc: dict[int, dict[int, list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            tp = int(row["num_tensor_parallel_workers"])
            n = int(row["num_tokens"])
            layer_ms = sum(float(row[f"time_stats.{op}.median"]) for op in layer_ops)
            model_ms = sum(float(row[f"time_stats.{op}.median"]) for op in model_ops)
            acc.setdefault(tp, {}).setdefault(n, []).append(layer_ms * layers + model_ms)
    out: dict[int, IterationProfile] = {}
    for tp, by_n in acc.items():
        ns = sorted(by_n)
        raw = [sum(by_n[n]) / len(by_n[n]) / 1000.0 for n in ns]
        out[tp] = IterationProfile(tuple(ns), tuple(isotonic(raw)))
    return out


def scaled(
    base: IterationProfile, num: IterationProfile, den: IterationProfile
) -> IterationProfile:
    """``base`` times the ratio ``num / den`` at each of ``base``'s token counts.

    How a model without a profile on one GPU gets one: the H100 Llama-2-7B
    table times (A100 Llama-3-8B / A100 Llama-2-7B), both A100 tables measured
    by the same harness on the same GPU. Made monotone again, since a ratio
    of two monotone curves need not be.
    """
    ys = [s * num.time_s(n) / den.time_s(n) for n, s in zip(base.tokens, base.seconds, strict=True)]
    return IterationProfile(base.tokens, tuple(isotonic(ys)))


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
    """What the engine needs to know about a model: size, KV footprint, profile.

    ``scale_files`` = (numerator, denominator): the model has no profile of its
    own on the profiled GPU, so ``profile_file`` is scaled by the ratio of two
    tables measured together on another GPU (see :func:`scaled`).
    """

    name: str
    params: float  # parameter count; weights take params * weight_bytes
    layers: int
    kv_bytes_per_token: int  # whole model, all layers (split across TP x PP GPUs)
    profile_file: str  # file name in loadtest/engine/data
    mlp_params: float  # of ``params``, the MLP's (what MoE experts replace)
    scale_files: tuple[str, str] | None = None
    weight_bytes: int = 2  # fp16/bf16

    def profile(self, tp: int) -> IterationProfile:
        """The whole model's iteration time (non-attention) at TP ``tp``."""
        return self._profile(tp, LAYER_OPS, MODEL_OPS)

    def split_profile(self, tp: int) -> tuple[IterationProfile, IterationProfile]:
        """(everything but the MLP, the MLP alone) at TP ``tp``: what MoE presets build on."""
        return self._profile(tp, NON_MLP_OPS, MODEL_OPS), self._profile(tp, MLP_OPS, ())

    def _profile(
        self, tp: int, layer_ops: tuple[str, ...], model_ops: tuple[str, ...]
    ) -> IterationProfile:
        profiles = load_vidur_mlp(
            str(DATA_DIR / self.profile_file), self.layers, layer_ops, model_ops
        )
        if tp not in profiles:
            raise ValueError(
                f"{self.name}: no measured profile for TP{tp} (measured: "
                f"{', '.join(f'TP{t}' for t in sorted(profiles))})"
            )
        if self.scale_files is None:
            return profiles[tp]
        num, den = (
            load_vidur_mlp(str(DATA_DIR / f), self.layers, layer_ops, model_ops)[tp]
            for f in self.scale_files
        )
        return scaled(profiles[tp], num, den)


# KV bytes per token = 2 (K and V) * layers * kv_heads * head_dim * 2 bytes.
# Llama-2-7B: 2*32*32*128*2 = 512 KiB (no GQA). Llama-2-70B: 2*80*8*128*2
# = 320 KiB (GQA, 8 KV heads). Llama-3-8B: 2*32*8*128*2 = 128 KiB (GQA, 8 KV
# heads). MLP parameters: 3 (gate, up, down) * hidden * intermediate * layers.
# Compute and KV come from the same model: a KV footprint from one model and
# step times from another would give a fleet no real deployment has. Vidur
# has no H100 table for Llama-3-8B, so its step times are the H100 Llama-2-7B
# table times the A100 Llama-3-8B / Llama-2-7B ratio (docs/simulator.md).
MODELS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec(
        "llama3-8b",
        8.03e9,
        32,
        2 * 32 * 8 * 128 * 2,
        "vidur_h100_llama2_7b_mlp.csv",
        mlp_params=3 * 4096 * 14336 * 32,
        scale_files=("vidur_a100_llama3_8b_mlp.csv", "vidur_a100_llama2_7b_mlp.csv"),
    ),
    "llama2-7b": ModelSpec(
        "llama2-7b",
        6.74e9,
        32,
        2 * 32 * 32 * 128 * 2,
        "vidur_h100_llama2_7b_mlp.csv",
        mlp_params=3 * 4096 * 11008 * 32,
    ),
    "llama2-70b": ModelSpec(
        "llama2-70b",
        68.98e9,
        80,
        2 * 80 * 8 * 128 * 2,
        "vidur_h100_llama2_70b_mlp.csv",
        mlp_params=3 * 8192 * 28672 * 80,
    ),
}
# The preset `dp-router simulate` and `dp-router replica` use unless told: a
# GQA dense model, as today's fleets serve.
DEFAULT_MODEL = "llama3-8b"
