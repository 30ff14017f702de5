"""Load-test results: per-request records, exact percentiles, JSON and markdown.

Everything here is pure (no clock, no I/O except the explicit writers), so the
numbers a report prints can be checked by hand from recorded timings.

Percentiles use linear interpolation between closest ranks, numpy's default
(``method="linear"``, Hyndman & Fan type 7): for sorted values ``v`` of length
``n`` and quantile ``q`` in [0, 1], the rank is ``h = (n - 1) * q`` and the
result ``v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)])``.
It was chosen over nearest-rank because it is what people get when they
re-check our JSON with numpy or pandas, so the two agree to the last digit.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# The quantiles every report shows; p99 is where routing mistakes show first.
QUANTILES = (0.5, 0.9, 0.99)

# Key in per-replica tables for responses that named no replica (a direct run
# against one replica, or an error before any replica was chosen).
UNKNOWN_REPLICA = "-"

# Results JSON schema version, bumped when a field changes meaning.
SCHEMA_VERSION = 1


class ErrorKind(StrEnum):
    """Why a request did not complete normally (``http`` carries the status)."""

    CONNECT = "connect"  # could not connect / connection refused
    HTTP = "http"  # an HTTP error status before any body
    TIMEOUT = "timeout"  # the client's request timeout fired
    IN_BAND = "in_band"  # an error object inside a 200 stream
    TRUNCATED = "truncated"  # the stream ended without [DONE] / the body broke off


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values``, numpy-linear.

    Empty input gives NaN (there is no latency of zero requests), so tables
    show "-" instead of a misleading 0.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    h = (n - 1) * q
    lo = math.floor(h)
    if lo >= n - 1:
        return float(sorted_values[-1])
    frac = h - lo
    a, b = sorted_values[lo], sorted_values[lo + 1]
    return float(a + frac * (b - a))


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency metric over a run, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        data = sorted(values)
        if not data:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = (percentile(data, q) for q in QUANTILES)
        return cls(len(data), math.fsum(data) / len(data), p50, p90, p99, data[-1])


@dataclass(slots=True)
class RequestRecord:
    """What the load generator saw of one request (one conversation turn).

    Times are seconds relative to the run's start (``start_s``) or durations.
    ``ttft_s`` is None for non-streaming requests and for failures before the
    first token.
    """

    conversation: str
    turn: int
    start_s: float
    e2e_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    status: int | None = None
    error: str | None = None  # an ErrorKind value, None when ok
    replica: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT definition)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def error_key(self) -> str | None:
        """The key this record counts under in ``RunResult.errors``."""
        if self.error == ErrorKind.HTTP and self.status is not None:
            return f"http_{self.status}"
        return self.error


@dataclass(slots=True)
class RunResult:
    """One load-test run: the aggregate numbers plus the raw records."""

    label: str
    target: str
    workload: str
    mode: str  # "rate=R" (open loop) or "concurrency=C" (closed loop)
    wall_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    rps: float  # completed OK requests per second of wall time
    output_tps: float  # output tokens of OK requests per second
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    replicas: dict[str, int]  # OK requests served per replica name
    # Prefix-cache hit rate in tokens at first admission (vllm:prefix_cache_*:
    # what routing can change); re-admissions after a preemption apart
    # (dp_sim:prefix_cache_preempted_*, docs/replica.md), when measured.
    prefix_hit_rate: float | None = None
    readmit_hit_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    records: list[RequestRecord] = field(default_factory=list)

    def replica_share(self) -> dict[str, float]:
        total = sum(self.replicas.values())
        if not total:
            return {}
        return {name: n / total for name, n in sorted(self.replicas.items())}

    def to_json(self, *, with_records: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = SCHEMA_VERSION
        out["replica_share"] = self.replica_share()
        if not with_records:
            del out["records"]
        # JSON has no NaN: missing values become null.
        return _nan_to_none(out)


def summarize(
    records: Sequence[RequestRecord],
    *,
    wall_s: float,
    label: str = "run",
    target: str = "",
    workload: str = "",
    mode: str = "",
    prefix_hit_rate: float | None = None,
    extra: dict[str, Any] | None = None,
    readmit_hit_rate: float | None = None,
) -> RunResult:
    """Aggregate ``records`` of a run that took ``wall_s`` seconds."""
    good = [r for r in records if r.ok]
    errors = Counter(key for r in records if (key := r.error_key()) is not None)
    served = Counter(r.replica or UNKNOWN_REPLICA for r in good)
    per_s = 1.0 / wall_s if wall_s > 0 else math.nan
    return RunResult(
        label=label,
        target=target,
        workload=workload,
        mode=mode,
        wall_s=wall_s,
        requests=len(records),
        ok=len(good),
        errors=dict(sorted(errors.items())),
        rps=len(good) * per_s,
        output_tps=sum(r.output_tokens for r in good) * per_s,
        ttft=Distribution.of(r.ttft_s for r in good if r.ttft_s is not None),
        tpot=Distribution.of(t for r in good if (t := r.tpot_s) is not None),
        e2e=Distribution.of(r.e2e_s for r in good),
        replicas=dict(sorted(served.items())),
        prefix_hit_rate=prefix_hit_rate,
        readmit_hit_rate=readmit_hit_rate,
        extra=dict(extra or {}),
        records=list(records),
    )


def result_from_json(data: dict[str, Any]) -> RunResult:
    """Inverse of :meth:`RunResult.to_json` (for comparing saved runs)."""

    def dist(d: dict[str, Any]) -> Distribution:
        def num(key: str) -> float:
            return math.nan if d[key] is None else float(d[key])

        return Distribution(
            int(d["count"]), num("mean"), num("p50"), num("p90"), num("p99"), num("max")
        )

    fields = {k: v for k, v in data.items() if k not in ("schema", "replica_share")}
    for name in ("ttft", "tpot", "e2e"):
        fields[name] = dist(fields[name])
    fields["records"] = [RequestRecord(**r) for r in fields.get("records", [])]
    for name in ("rps", "output_tps"):
        if fields[name] is None:
            fields[name] = math.nan
    return RunResult(**fields)


def inflight_timeline(
    records: Sequence[RequestRecord], step_s: float
) -> tuple[list[float], dict[str, list[int]]]:
    """Requests in flight per replica, sampled every ``step_s`` seconds.

    Derived from the records' start and end times, so it shows the load the
    gateway actually placed, replica by replica, without scraping anything.
    """
    if not records or step_s <= 0:
        return [], {}
    end = max(r.start_s + r.e2e_s for r in records)
    n = int(end / step_s) + 1
    times = [i * step_s for i in range(n)]
    series: dict[str, list[int]] = {}
    for r in records:
        counts = series.setdefault(r.replica or UNKNOWN_REPLICA, [0] * n)
        first = math.ceil(r.start_s / step_s)
        last = math.floor((r.start_s + r.e2e_s) / step_s)
        for i in range(first, min(last, n - 1) + 1):
            counts[i] += 1
    return times, dict(sorted(series.items()))


# ---- formatting -------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    ms = seconds * 1000.0
    return f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100.0 * x:.1f}%"


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in errors.items())


def _shares(result: RunResult) -> str:
    share = result.replica_share()
    return " / ".join(f"{name} {100 * s:.0f}%" for name, s in share.items()) or "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, columns padded so it also reads as plain text."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def markdown_summary(result: RunResult) -> str:
    """``summary.md`` for one run: headline numbers, latency table, replicas."""
    lines = [
        f"# Load test: {result.label}",
        "",
        f"- target: `{result.target}`",
        f"- workload: `{result.workload}`, {result.mode}",
        f"- wall time: {result.wall_s:.1f} s; requests: {result.requests}, ok: {result.ok}, "
        f"errors: {_errors(result.errors)}",
        f"- throughput: {_num(result.rps, 2)} req/s, {_num(result.output_tps, 0)} output tok/s",
    ]
    if result.prefix_hit_rate is not None:
        lines.append(
            "- prefix-cache hit rate at first admission (replica metrics): "
            f"{_pct(result.prefix_hit_rate)}"
        )
    if result.readmit_hit_rate is not None:
        lines.append(
            "- prefix-cache hit rate of re-admissions after a preemption: "
            f"{_pct(result.readmit_hit_rate)}"
        )
    lines += ["", "Latency (ms):", ""]
    rows = [
        [name, str(d.count), _ms(d.mean), _ms(d.p50), _ms(d.p90), _ms(d.p99), _ms(d.max)]
        for name, d in (("TTFT", result.ttft), ("TPOT", result.tpot), ("E2E", result.e2e))
    ]
    lines.append(_table(["metric", "n", "mean", "p50", "p90", "p99", "max"], rows))
    if result.replicas:
        lines += ["", "Requests per replica:", ""]
        share = result.replica_share()
        rows = [[name, str(n), _pct(share[name])] for name, n in result.replicas.items()]
        lines.append(_table(["replica", "ok requests", "share"], rows))
    return "\n".join(lines) + "\n"


def comparison_table(results: Sequence[RunResult]) -> str:
    """Runs side by side (policy A vs B vs C), one row per run."""
    header = [
        "run",
        "TTFT p50",
        "TTFT p99",
        "E2E p50",
        "E2E p99",
        "TPOT p50",
        "req/s",
        "tok/s",
        "errors",
        "prefix hit (1st adm.)",
        "replica share",
    ]
    rows = [
        [
            r.label,
            _ms(r.ttft.p50),
            _ms(r.ttft.p99),
            _ms(r.e2e.p50),
            _ms(r.e2e.p99),
            _ms(r.tpot.p50),
            _num(r.rps, 2),
            _num(r.output_tps, 0),
            _errors(r.errors),
            _pct(r.prefix_hit_rate),
            _shares(r),
        ]
        for r in results
    ]
    return _table(header, rows) + "\n\n(latencies in ms)\n"


# ---- writers ----------------------------------------------------------------


def write_results(results: Sequence[RunResult], out_dir: Path) -> list[Path]:
    """Write ``results.json`` and ``summary.md`` (all runs, compared if several)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "runs": [r.to_json() for r in results],
    }
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    parts = []
    if len(results) > 1:
        parts += ["# Comparison", "", comparison_table(results)]
    parts += [markdown_summary(r) for r in results]
    md_path = out_dir / "summary.md"
    md_path.write_text("\n".join(parts))
    return [json_path, md_path]


def load_results(path: Path) -> list[RunResult]:
    data = json.loads(path.read_text())
    return [result_from_json(run) for run in data["runs"]]


def write_plots(results: Sequence[RunResult], out_dir: Path) -> list[Path] | None:
    """PNG charts: latency CDFs per run and per-replica load over time.

    matplotlib is an optional extra (``pip install dp-router[plots]``): returns
    None when it is not installed so callers can say so and carry on.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "e2e"), strict=True):
        for r in results:
            values = sorted(
                v
                for rec in r.records
                if rec.ok and (v := (rec.ttft_s if metric == "ttft" else rec.e2e_s)) is not None
            )
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.plot([v * 1000 for v in values], ys, label=r.label)
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        times, series = inflight_timeline(r.records, step_s=max(r.wall_s / 300, 0.05))
        for name, counts in series.items():
            ax.plot(times, counts, label=name, linewidth=1)
        ax.set_title(f"{r.label}: requests in flight per replica")
        ax.set_xlabel("time (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    path = out_dir / "replica_load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
