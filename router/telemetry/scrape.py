"""Reading a replica's load from its Prometheus ``/metrics`` text.

Presets name each engine's gauges (checked against the engines' sources):

- vLLM v1 (``vllm/v1/metrics/loggers.py``): ``vllm:num_requests_waiting``,
  ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` (before v0.10
  ``vllm:gpu_cache_usage_perc``, read when the new name is absent); one
  series per DP rank, label ``engine``.
- SGLang (``python/sglang/srt/metrics/collector.py``): ``sglang:num_queue_reqs``,
  ``sglang:num_running_reqs``, ``sglang:token_usage``; DP ranks (if any)
  by ``dp_rank``.
- TensorRT-LLM ``trtllm-serve`` (``tensorrt_llm/metrics/collector.py``),
  at ``/prometheus/metrics``: ``trtllm_num_requests_waiting``,
  ``trtllm_num_requests_running``, ``trtllm_kv_cache_utilization``
  (used / max KV blocks).
- custom: ``[telemetry] metric_names``.

``auto`` picks the preset from the names in the text (``vllm:``, ``sglang:``,
``trtllm_``), every scrape, so a replica replaced by another engine is read
right. Series of several DP ranks are SUMMED (waiting, running) or averaged
(KV usage, a fraction): one replica is one queue to the gateway, and a
last-series-wins read would see one rank of eight. The ranks are kept
apart only as metrics.

Expert counters: the simulated replica's ``dp_sim:expert_tokens`` and
``dp_sim:expert_overflow`` (label ``expert``, optional ``layer``) become
:class:`~router.experts.ExpertSample` values, one per (DP rank, layer):
each rank's counter restarts on its own, so deltas are taken per rank and
summed after (router/experts.py). SGLang's ``sglang:eplb_gpu_physical_count``
(a per-layer histogram of GPU ranks, not experts) is not read: nothing in
the gateway consumes it.

Bounded per scrape: at most ``MAX_SERIES_LINES`` sample lines reach the
parser (else the scrape fails, ``too_many_series``), at most ``MAX_RANKS``
DP ranks are kept apart, and a rank label longer than ``MAX_LABEL_LENGTH``
is not kept apart (both still count in the sums, ``Reading.ranks_dropped``).

Only the lines of the wanted families reach prometheus_client's parser
(``text_string_to_metric_families``): a vLLM exposition is mostly
histograms, and parsing all of it every second per replica would cost the
event loop milliseconds for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from router.experts import ExpertSample
from router.telemetry.reading import RankReading, Reading


@dataclass(frozen=True, slots=True)
class Preset:
    """One engine's metric names; each figure's first name present wins."""

    engine: str
    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...] = ()
    waiting_prompt_tokens: tuple[str, ...] = ()
    metrics_path: str = "/metrics"

    def names(self) -> tuple[str, ...]:
        return self.waiting + self.running + self.kv_usage + self.waiting_prompt_tokens


PRESETS: dict[str, Preset] = {
    "vllm": Preset(
        "vllm",
        ("vllm:num_requests_waiting",),
        ("vllm:num_requests_running",),
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": Preset(
        "sglang", ("sglang:num_queue_reqs",), ("sglang:num_running_reqs",), ("sglang:token_usage",)
    ),
    "trtllm": Preset(
        "trtllm",
        ("trtllm_num_requests_waiting",),
        ("trtllm_num_requests_running",),
        ("trtllm_kv_cache_utilization",),
        metrics_path="/prometheus/metrics",
    ),
}
# Prefixes that identify the engine in an exposition, in detection order.
_DETECT = (("vllm", "vllm:"), ("sglang", "sglang:"), ("trtllm", "trtllm_"))

EXPERT_TOKENS = "dp_sim:expert_tokens"
EXPERT_OVERFLOW = "dp_sim:expert_overflow"
# Labels that name a DP rank: vLLM's engine, SGLang's dp_rank.
_RANK_LABELS = ("engine", "dp_rank")
# prometheus_client's parser costs ~16 us a line (10,000 short lines: 0.16 s
# on the 2-core test machine), the longest one replica's scrape may block
# the event loop; 4 MiB of matching lines blocked it for 1.3 s. A vLLM
# replica of 8 DP engines has a few dozen lines of the load gauges; the
# simulated replica's expert counters are 2 x 256 lines (DeepSeek-V3's
# routed experts, layers aggregated).
MAX_SERIES_LINES = 10_000
# DP ranks kept apart per replica (metrics label values): vLLM and SGLang
# run at most a few dozen DP ranks per server; more is a broken exporter.
MAX_RANKS = 64
# A rank label is a small integer; a longer value is not kept as a label.
MAX_LABEL_LENGTH = 32
# The key under which ranks beyond the caps are summed (never a label).
_OTHER_RANK = "\x00other"


class ScrapeError(ValueError):
    """The text holds no load figures we can use; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def custom_preset(names: Mapping[str, str]) -> Preset:
    """``[telemetry] metric_names`` as a preset (validated by config)."""

    def one(key: str) -> tuple[str, ...]:
        return (names[key],) if key in names else ()

    return Preset(
        "custom", one("waiting"), one("running"), one("kv_usage"), one("waiting_prompt_tokens")
    )


def detect(text: str) -> Preset | None:
    """The preset whose names the text uses, or None."""
    for engine, prefix in _DETECT:
        if text.startswith(prefix) or f"\n{prefix}" in text or f" {prefix}" in text:
            return PRESETS[engine]
    return None


def parse_metrics(
    text: str, preset: Preset | None, *, max_experts: int = 1024, max_layers: int = 256
) -> Reading:
    """The load in a Prometheus exposition; ``preset`` None detects the engine.

    Raises :class:`ScrapeError` when no preset matches or the text has
    neither a waiting nor a running figure of it. Samples that are not
    finite or are negative are ignored (a broken gauge, not a queue).
    Expert counters beyond ``max_experts`` experts or ``max_layers``
    layers are dropped, never stored.
    """
    if preset is None:
        preset = detect(text)
        if preset is None:
            raise ScrapeError("no_load_metrics", "no vLLM, SGLang or TensorRT-LLM metrics")
    wanted = (*preset.names(), EXPERT_TOKENS, EXPERT_OVERFLOW)
    samples = _samples(_filter(text, wanted))
    per_name: dict[str, dict[str, list[float]]] = {}
    experts: dict[str, dict[tuple[str, int | None], dict[int, float]]] = {
        EXPERT_TOKENS: {},
        EXPERT_OVERFLOW: {},
    }
    kept: set[str] = set()
    dropped: set[str] = set()
    for name, labels, value in samples:
        if not math.isfinite(value) or value < 0:
            continue
        rank = next((labels[k] for k in _RANK_LABELS if k in labels), "")
        if rank not in kept:
            if len(rank) <= MAX_LABEL_LENGTH and len(kept) < MAX_RANKS:
                kept.add(rank)
            else:
                dropped.add(rank)
                rank = _OTHER_RANK
        base = name.removesuffix("_total")
        if base in experts:
            _add_expert(experts[base], rank, labels, value, max_experts, max_layers)
        else:
            per_name.setdefault(name, {}).setdefault(rank, []).append(value)

    def pick(names: tuple[str, ...]) -> dict[str, list[float]] | None:
        return next((per_name[n] for n in names if n in per_name), None)

    waiting, running = pick(preset.waiting), pick(preset.running)
    if waiting is None and running is None:
        raise ScrapeError("no_load_metrics", f"no {preset.engine} waiting or running gauge")
    kv, prompt_tokens = pick(preset.kv_usage), pick(preset.waiting_prompt_tokens)
    ranks = sorted({*(waiting or {}), *(running or {}), *(kv or {})} - {_OTHER_RANK})
    return Reading(
        waiting=_total(waiting),
        running=_total(running),
        kv_usage=_mean(kv),
        waiting_prompt_tokens=_total(prompt_tokens),
        ranks=(
            tuple(
                RankReading(
                    rank,
                    _total_of(waiting, rank),
                    _total_of(running, rank),
                    _mean_of(kv, rank),
                )
                for rank in ranks
            )
            if len(ranks) > 1
            else ()
        ),
        experts=_expert_samples(experts[EXPERT_TOKENS], experts[EXPERT_OVERFLOW]),
        ranks_dropped=len(dropped),
    )


# --- internals --------------------------------------------------------------------


def _filter(text: str, names: Iterable[str]) -> str:
    """Only the sample lines of ``names`` (with or without ``_total`` /
    ``_bucket``); comments dropped, so every family reaches the parser
    untyped and keeps its sample names as written. More than
    ``MAX_SERIES_LINES`` fails the scrape: the parser's cost is per line."""
    prefixes = tuple(
        f"{name}{suffix}{sep}"
        for name in names
        for suffix in ("", "_total", "_bucket")
        for sep in ("{", " ")
    )
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(prefixes):
            if len(lines) == MAX_SERIES_LINES:
                raise ScrapeError(
                    "too_many_series", f"more than {MAX_SERIES_LINES} load or expert series"
                )
            lines.append(line)
    return "\n".join(lines) + "\n"


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    try:
        return [
            (s.name, s.labels, float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except (ValueError, TypeError, IndexError) as exc:
        raise ScrapeError("parse_error", f"malformed exposition: {exc}") from None


def _add_expert(
    acc: dict[tuple[str, int | None], dict[int, float]],
    rank: str,
    labels: Mapping[str, str],
    value: float,
    max_experts: int,
    max_layers: int,
) -> None:
    try:
        expert = int(labels["expert"])
        layer = int(labels["layer"]) if "layer" in labels else None
    except (KeyError, ValueError):
        return
    if not 0 <= expert < max_experts or (layer is not None and not 0 <= layer < max_layers):
        return
    per_expert = acc.setdefault((rank, layer), {})
    per_expert[expert] = per_expert.get(expert, 0.0) + value  # ranks beyond the caps summed


def _expert_samples(
    tokens: dict[tuple[str, int | None], dict[int, float]],
    overflow: dict[tuple[str, int | None], dict[int, float]],
) -> tuple[ExpertSample, ...]:
    """One sample per (rank, layer), all as wide as the widest (a rank
    that saw no token for the last expert has no series for it)."""
    if not tokens:
        return ()
    n = max(max(per_expert) for per_expert in tokens.values()) + 1
    out = []
    for rank, layer in sorted(tokens, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        per_expert = tokens[rank, layer]
        over = overflow.get((rank, layer))
        out.append(
            ExpertSample(
                layer=layer,
                tokens=tuple(per_expert.get(i, 0.0) for i in range(n)),
                overflow=None if over is None else tuple(over.get(i, 0.0) for i in range(n)),
                rank=rank,
            )
        )
    return tuple(out)


def _total(series: dict[str, list[float]] | None) -> float | None:
    return None if series is None else float(sum(sum(v) for v in series.values()))


def _mean(series: dict[str, list[float]] | None) -> float | None:
    if series is None:
        return None
    values = [x for v in series.values() for x in v]
    return min(1.0, sum(values) / len(values))


def _total_of(series: dict[str, list[float]] | None, rank: str) -> float | None:
    values = None if series is None else series.get(rank)
    return None if values is None else float(sum(values))


def _mean_of(series: dict[str, list[float]] | None, rank: str) -> float | None:
    values = None if series is None else series.get(rank)
    return None if not values else min(1.0, sum(values) / len(values))


__all__ = ["PRESETS", "Preset", "ScrapeError", "custom_preset", "detect", "parse_metrics"]
