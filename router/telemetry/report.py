"""The pushed load report: one JSON schema (docs/load-report.md), checked whole.

A report is refused, never half-applied, when anything in it is off: an
unknown key, a wrong type (``true`` is not a count), a negative or
non-finite number, a KV usage outside [0, 1], more experts or layers than
``[telemetry] push_max_experts`` / ``push_max_layers``, a duplicated
layer. :class:`ReportError` carries the reason the rejection is counted
under and a message for the replica's operator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from router.experts import ExpertSample
from router.telemetry.reading import Reading

SCHEMA_VERSION = 1
STATES = ("ready", "draining")
# A count beyond this is a bug in the reporter, not a queue.
MAX_COUNT = 1e9
MAX_NAME_LENGTH = 256

_KEYS = frozenset(
    {
        "version",
        "replica",
        "timestamp",
        "state",
        "waiting",
        "running",
        "kv_usage",
        "waiting_prompt_tokens",
        "experts",
    }
)
_EXPERT_KEYS = frozenset({"layer", "tokens", "overflow"})


class ReportError(ValueError):
    """A report refused; ``reason`` is the metric label (bad_json, invalid)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A validated report. ``timestamp`` is the replica's clock: it orders
    one replica's reports, and is never compared with the gateway's."""

    replica: str
    timestamp: float
    reading: Reading


def parse_report(body: bytes, *, max_experts: int, max_layers: int) -> LoadReport:
    """Validate a report body; raises :class:`ReportError`."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReportError("bad_json", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise ReportError("invalid", "the report must be a JSON object")
    unknown = doc.keys() - _KEYS
    if unknown:
        raise ReportError("invalid", f"unknown keys: {', '.join(sorted(unknown))}")
    version = doc.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ReportError("invalid", f"version: only {SCHEMA_VERSION} is known")
    replica = doc.get("replica")
    if not isinstance(replica, str) or not 0 < len(replica) <= MAX_NAME_LENGTH:
        raise ReportError("invalid", "replica: required, a non-empty string")
    state = doc.get("state", "ready")
    if state not in STATES:
        raise ReportError("invalid", f"state: one of {', '.join(STATES)}")
    kv = _number(doc, "kv_usage", required=False)
    if kv is not None and kv > 1.0:
        raise ReportError("invalid", "kv_usage: a fraction in [0, 1]")
    reading = Reading(
        waiting=_count(doc, "waiting", required=True),
        running=_count(doc, "running", required=True),
        kv_usage=kv,
        waiting_prompt_tokens=_count(doc, "waiting_prompt_tokens", required=False),
        draining=state == "draining",
        experts=_experts(doc.get("experts"), max_experts, max_layers),
    )
    timestamp = _number(doc, "timestamp", required=True)
    assert timestamp is not None
    return LoadReport(replica, timestamp, reading)


def _number(doc: dict[str, Any], key: str, *, required: bool) -> float | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise ReportError("invalid", f"{key}: required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError("invalid", f"{key}: expected a number")
    number = _float(value, key)
    if not math.isfinite(number) or number < 0:
        raise ReportError("invalid", f"{key}: must be finite and >= 0")
    return number


def _float(value: float, where: str) -> float:
    """JSON's integers have no bound: one beyond a float's range is refused,
    not an OverflowError out of the handler."""
    try:
        return float(value)
    except OverflowError:
        raise ReportError("invalid", f"{where}: too large") from None


def _count(doc: dict[str, Any], key: str, *, required: bool) -> float | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, int):
        raise ReportError("invalid", f"{key}: expected an integer")
    number = _number(doc, key, required=required)
    if number is not None and number > MAX_COUNT:
        raise ReportError("invalid", f"{key}: larger than {MAX_COUNT:g}")
    return number


def _experts(raw: Any, max_experts: int, max_layers: int) -> tuple[ExpertSample, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ReportError("invalid", "experts: expected a list")
    if len(raw) > max_layers:
        raise ReportError("invalid", f"experts: more than {max_layers} layers")
    samples = []
    seen: set[int | None] = set()
    for i, entry in enumerate(raw):
        where = f"experts[{i}]"
        if not isinstance(entry, dict) or entry.keys() - _EXPERT_KEYS:
            raise ReportError("invalid", f"{where}: an object of layer, tokens, overflow")
        layer = entry.get("layer")
        if layer is not None and (
            isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < max_layers
        ):
            raise ReportError("invalid", f"{where}.layer: an integer in [0, {max_layers})")
        if layer in seen:
            raise ReportError("invalid", f"{where}.layer: layer {layer} given twice")
        seen.add(layer)
        tokens = _vector(entry.get("tokens"), f"{where}.tokens", max_experts)
        overflow = entry.get("overflow")
        over = None if overflow is None else _vector(overflow, f"{where}.overflow", max_experts)
        if over is not None and len(over) != len(tokens):
            raise ReportError("invalid", f"{where}.overflow: one value per expert")
        samples.append(ExpertSample(layer=layer, tokens=tokens, overflow=over))
    if None in seen and len(seen) > 1:
        raise ReportError("invalid", "experts: either every entry has a layer or one has none")
    return tuple(samples)


def _vector(raw: Any, where: str, max_experts: int) -> tuple[float, ...]:
    if not isinstance(raw, list) or not raw:
        raise ReportError("invalid", f"{where}: a non-empty list of counts")
    if len(raw) > max_experts:
        raise ReportError("invalid", f"{where}: more than {max_experts} experts")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
            raise ReportError("invalid", f"{where}: counts must be finite numbers >= 0")
    return tuple(_float(v, where) for v in raw)


__all__ = ["SCHEMA_VERSION", "STATES", "LoadReport", "ReportError", "parse_report"]
