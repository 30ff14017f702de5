"""The replica's load, as vLLM and SGLang report it: ``/metrics`` and the ORCA header.

One table, :data:`SIGNALS`, says for every load signal of a
:class:`~loadtest.replica.model.ModelLoad` what it is called in each place
it is reported: vLLM's and SGLang's Prometheus exposition and the
``named_metrics`` of the ORCA ``endpoint-load-metrics`` response header. A
signal a flavour does not export has no name there, so the two writers below
cannot disagree about what a replica reports.

Names checked against the sources: vLLM v1 ``vllm/v1/metrics/loggers.py``
(gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``; counters ``vllm:prefix_cache_queries`` and
``vllm:prefix_cache_hits``, exposed with ``_total``, in tokens, counting
new requests only: a preempted request's lookup is kept apart;
``vllm:num_preemptions``; labels ``model_name`` and ``engine``, the DP rank),
SGLang ``python/sglang/srt/metrics/collector.py`` (gauges
``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
``sglang:token_usage``, ``sglang:cache_hit_rate``; label ``model_name``) and
vLLM's ``vllm/entrypoints/openai/orca_metrics.py`` (``kv_cache_usage_perc``
and ``num_requests_waiting`` as ``named_metrics``; we add
``num_requests_running`` so a gateway can rebuild the whole queue from the
header alone). The per-expert counters are ours (``dp_sim:``): no engine
exports them under a standard name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from loadtest.replica.config import MetricsFlavour
from loadtest.replica.model import ModelLoad

ORCA_REQUEST_HEADER = "endpoint-load-metrics-format"
ORCA_RESPONSE_HEADER = "endpoint-load-metrics"

Kind = Literal["gauge", "counter"]
# A signal's samples: (extra labels, value); one unlabelled sample for a scalar.
Samples = Callable[[ModelLoad], Sequence[tuple[str, float]]]


@dataclass(frozen=True, slots=True)
class Name:
    """A signal's name in one exposition, with its HELP text."""

    name: str
    help: str


@dataclass(frozen=True, slots=True)
class Signal:
    kind: Kind
    samples: Samples
    vllm: Name | None = None
    sglang: Name | None = None
    orca: str | None = None  # key in the ORCA header's named_metrics


def _one(value: Callable[[ModelLoad], float]) -> Samples:
    return lambda load: [("", float(value(load)))]


def _per_expert(counts: Callable[[ModelLoad], list[int]]) -> Samples:
    return lambda load: [(f'expert="{i}"', float(v)) for i, v in enumerate(counts(load))]


def _hit_rate(load: ModelLoad) -> float:
    # First admissions only, like the vLLM counters (docs/replica.md).
    return load.prefix_hits / load.prefix_queries if load.prefix_queries else 0.0


EXPERT_TOKENS = Name("dp_sim:expert_tokens", "Tokens routed to each expert (simulated).")
EXPERT_OVERFLOW = Name(
    "dp_sim:expert_overflow", "Tokens dropped by each expert's capacity limit (simulated)."
)

# vLLM counts a preempted request's new lookup apart (PrefixCacheStats'
# preempted_queries / preempted_hits) and does not export it; we do, under our prefix.
READMIT_QUERIES = Name(
    "dp_sim:prefix_cache_preempted_queries",
    "Prefix cache queries of requests admitted again after a preemption, in tokens (simulated).",
)
READMIT_HITS = Name(
    "dp_sim:prefix_cache_preempted_hits",
    "Prefix cache hits of requests admitted again after a preemption, in tokens (simulated).",
)

# Order: the ORCA header lists its named metrics in this order (vLLM's two first).
SIGNALS: tuple[Signal, ...] = (
    Signal(
        "gauge",
        _one(lambda load: load.kv_usage),
        vllm=Name("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
        sglang=Name("sglang:token_usage", "The token usage."),
        orca="kv_cache_usage_perc",
    ),
    Signal(
        "gauge",
        _one(lambda load: load.waiting),
        vllm=Name("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        sglang=Name("sglang:num_queue_reqs", "The number of requests in the waiting queue."),
        orca="num_requests_waiting",
    ),
    Signal(
        "gauge",
        _one(lambda load: load.running),
        vllm=Name("vllm:num_requests_running", "Number of requests in model execution batches."),
        sglang=Name("sglang:num_running_reqs", "The number of running requests."),
        orca="num_requests_running",
    ),
    Signal(
        "counter",
        _one(lambda load: load.prefix_queries),
        vllm=Name(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ),
    ),
    Signal(
        "counter",
        _one(lambda load: load.prefix_hits),
        vllm=Name(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ),
    ),
    Signal(
        "gauge", _one(_hit_rate), sglang=Name("sglang:cache_hit_rate", "The prefix cache hit rate.")
    ),
    Signal(
        "counter",
        _one(lambda load: load.readmit_queries),
        vllm=READMIT_QUERIES,
        sglang=READMIT_QUERIES,
    ),
    Signal(
        "counter",
        _one(lambda load: load.readmit_hits),
        vllm=READMIT_HITS,
        sglang=READMIT_HITS,
    ),
    Signal(
        "counter",
        _one(lambda load: load.preemptions),
        vllm=Name("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    ),
    Signal(
        "counter",
        _per_expert(lambda load: load.expert_tokens),
        vllm=EXPERT_TOKENS,
        sglang=EXPERT_TOKENS,
    ),
    Signal(
        "counter",
        _per_expert(lambda load: load.expert_overflow),
        vllm=EXPERT_OVERFLOW,
        sglang=EXPERT_OVERFLOW,
    ),
)


def _fmt(v: float) -> str:
    return repr(float(v))


def render_metrics(flavour: MetricsFlavour, model: str, load: ModelLoad) -> str:
    """Prometheus text exposition of ``load`` with ``flavour``'s metric names.

    ``model`` is the ``model_name`` label (the first served model, as vLLM
    labels it). A signal without samples (no MoE experts) is left out.
    """
    escaped = model.replace("\\", "\\\\").replace('"', '\\"')
    base = f'model_name="{escaped}",engine="0"' if flavour == "vllm" else f'model_name="{escaped}"'
    lines: list[str] = []
    for signal in SIGNALS:
        name = signal.vllm if flavour == "vllm" else signal.sglang
        samples = signal.samples(load)
        if name is None or not samples:
            continue
        counter = signal.kind == "counter"
        # prometheus_client (which vLLM and SGLang use) names a counter's
        # HELP/TYPE lines with the ``_total`` suffix too; parsers rely on it.
        declared = f"{name.name}_total" if counter else name.name
        lines.append(f"# HELP {declared} {name.help}")
        lines.append(f"# TYPE {declared} {signal.kind}")
        for extra, value in samples:
            labels = f"{base},{extra}" if extra else base
            lines.append(f"{declared}{{{labels}}} {_fmt(value)}")
    return "\n".join(lines) + "\n"


def orca_header(fmt: str, load: ModelLoad) -> str | None:
    """The ``endpoint-load-metrics`` value in ``fmt`` (TEXT or JSON); None for
    any other format, as in vLLM (which then sends no header)."""
    named = {s.orca: s.samples(load)[0][1] for s in SIGNALS if s.orca is not None}
    f = fmt.strip().lower()
    if f == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in named.items())
    if f == "json":
        return "JSON " + json.dumps({"named_metrics": named})
    return None
