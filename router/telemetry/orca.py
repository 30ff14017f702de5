"""The ORCA ``endpoint-load-metrics`` response header: load on every response.

ORCA (Open Request Cost Aggregation, the xDS ``OrcaLoadReport``) lets a
backend attach its load to each response. vLLM sends it when the request
carries ``endpoint-load-metrics-format: TEXT`` (or ``JSON``), from
``vllm/entrypoints/openai/orca_metrics.py``::

    endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.4,
                                named_metrics.num_requests_waiting=2.0   (one line)
    endpoint-load-metrics: JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, ...}}

vLLM reports ``kv_cache_usage_perc`` and ``num_requests_waiting``; the
simulated replica adds ``num_requests_running``. Without it the running
count comes from the last scrape or push (:func:`router.telemetry.reading.record`).
Other engines' names for the same figures are accepted (``kv_cache_utilization``
as in the ORCA design doc's example, vLLM's older ``gpu_cache_usage_perc``).

The proxy asks for the header with :data:`ORCA_REQUEST_HEADER` and hands any
answer to :func:`on_load_header`. The header is read on the data path, once
per response: the parser is a few string splits, bounded in length, and
never raises.
"""

from __future__ import annotations

import json
import math
from typing import Any

from router.load import ReplicaLoad
from router.telemetry.reading import Reading, Source, record

# TEXT: a few splits to parse, where JSON is a json.loads per response.
ORCA_REQUEST_HEADER: tuple[bytes, bytes] = (b"endpoint-load-metrics-format", b"TEXT")
ORCA_RESPONSE_HEADER = b"endpoint-load-metrics"
# A load report is a handful of numbers; a longer header is not one.
MAX_HEADER_BYTES = 4096

_KV = ("kv_cache_usage_perc", "kv_cache_utilization", "gpu_cache_usage_perc")
_WAITING = ("num_requests_waiting",)
_RUNNING = ("num_requests_running",)


def parse_orca(value: bytes | str) -> Reading | None:
    """The reading an ``endpoint-load-metrics`` value carries; None if malformed.

    Malformed: too long, an unknown format, a pair without ``=``, a value
    that is not a finite number, a negative count, bad JSON. A well-formed
    header without any figure we use is a reading of nothing (``waiting``
    and ``kv_usage`` None).
    """
    if len(value) > MAX_HEADER_BYTES:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    kind, _, rest = text.strip().partition(" ")
    kind = kind.upper()
    if kind == "TEXT":
        named = _text_metrics(rest)
    elif kind == "JSON":
        named = _json_metrics(rest)
    else:
        return None
    if named is None:
        return None
    kv = _first(named, _KV)
    if kv is not None:
        kv = min(kv, 1.0)
    return Reading(waiting=_first(named, _WAITING), running=_first(named, _RUNNING), kv_usage=kv)


def on_load_header(load: ReplicaLoad, value: bytes, now: float) -> bool:
    """Record an ``endpoint-load-metrics`` response header on ``load``.

    For the proxy, once per response that carries the header; ``now`` is the
    loop clock. False when the header is malformed (the caller counts it:
    ``Metrics.count_load_header``); nothing is recorded then.
    """
    reading = parse_orca(value)
    if reading is None:
        return False
    record(load, reading, now, Source.HEADER)
    return True


def _text_metrics(rest: str) -> dict[str, float] | None:
    named: dict[str, float] = {}
    for pair in rest.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, eq, raw = pair.partition("=")
        if not eq:
            return None
        value = _number(raw.strip())
        if value is None:
            return None
        key = key.strip()
        # Top-level ORCA fields (cpu_utilization, rps_fractional, ...) are
        # well-formed but not ours; only named metrics carry the queue.
        named[key.removeprefix("named_metrics.")] = value
    return named


def _json_metrics(rest: str) -> dict[str, float] | None:
    try:
        doc: Any = json.loads(rest)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    # vLLM writes named_metrics; the proto's JSON mapping is namedMetrics.
    metrics = doc.get("named_metrics", doc.get("namedMetrics", {}))
    if not isinstance(metrics, dict):
        return None
    named: dict[str, float] = {}
    for key, raw in metrics.items():
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return None
        value = _number(raw)
        if value is None:
            return None
        named[str(key)] = value
    return named


def _number(raw: str | float) -> float | None:
    try:
        value = float(raw)
    except (ValueError, OverflowError):  # JSON's integers have no bound
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def _first(named: dict[str, float], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = named.get(key)
        if value is not None:
            return value
    return None


__all__ = ["MAX_HEADER_BYTES", "ORCA_REQUEST_HEADER", "ORCA_RESPONSE_HEADER", "on_load_header"]
