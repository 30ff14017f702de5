"""All Prometheus metrics of the gateway: names, labels and help, in one place.

Each gateway instance owns a ``CollectorRegistry`` (tests run several gateways
in one process). Label values come only from configuration (replica names,
models the replicas serve, fixed reason sets), never from raw client input:
a model the fleet does not serve is counted as ``unknown`` (docs/reliability.md, M47).

The per-request metrics (requests, durations, attempts, decisions) are
plain dicts exported at scrape time (:class:`HotCounter`), so a request
pays a dict update, not prometheus-client's lock and child lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from router.experts import ExpertView

PREFIX = "dp_router"
UNKNOWN = "unknown"

# Seconds; LLM requests run from milliseconds (embeddings) to minutes.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# Seconds; a session store call on loopback takes ~0.1 ms, its budget is tens of ms.
SESSION_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """One replica's state as the scrape sees it."""

    name: str
    in_flight: int
    outstanding_tokens: int
    healthy: bool
    routable: bool
    ejected: bool
    weight: float
    # From the replica's own load reports (router/telemetry); None: no report
    # (or telemetry off for it), and the gauge has no series for it.
    reported_waiting: float | None = None
    reported_running: float | None = None
    reported_kv_usage: float | None = None
    report_age: float | None = None
    report_stale: bool | None = None
    reported_draining: bool = False


@dataclass(frozen=True, slots=True)
class RankSample:
    """One DP rank (vLLM's ``engine`` label) of a replica, as its last scrape
    gave it: routing sums the ranks, these keep them apart for dashboards."""

    replica: str
    rank: str
    waiting: float | None
    running: float | None
    kv_usage: float | None


# Per data-path worker, exported by the supervisor with --workers N > 1
# (router/workers.py): name, type, help.
WORKER_FAMILIES = (
    (f"{PREFIX}_worker_pid", "gauge", "Process id of each data-path worker (0 while it is down)."),
    (f"{PREFIX}_worker_restarts", "counter", "Restarts of each worker after it died."),
    (
        f"{PREFIX}_worker_requests",
        "counter",
        "Client requests each worker served (how evenly the kernel spreads connections).",
    ),
)

# name suffix, help, field: per-replica gauges read at scrape time.
_REPLICA_GAUGES = (
    (
        "replica_in_flight",
        "Requests this gateway has dispatched to the replica and not settled.",
        "in_flight",
    ),
    (
        "replica_outstanding_tokens",
        "Prompt + expected output tokens of the in-flight requests.",
        "outstanding_tokens",
    ),
    ("replica_healthy", "1 if the active health check passes, else 0.", "healthy"),
    (
        "replica_routable",
        "1 if the replica may receive new requests (healthy, not ejected, not draining).",
        "routable",
    ),
    ("replica_ejected", "1 while the replica is ejected by outlier detection.", "ejected"),
    ("replica_effective_weight", "Configured weight times the slow-start factor.", "weight"),
    (
        "replica_reported_waiting",
        "Waiting requests in the replica's last load report (DP ranks summed).",
        "reported_waiting",
    ),
    (
        "replica_reported_running",
        "Running requests in the replica's last load report (DP ranks summed).",
        "reported_running",
    ),
    (
        "replica_reported_kv_usage",
        "KV-cache usage in [0, 1] in the replica's last load report (mean of DP ranks).",
        "reported_kv_usage",
    ),
    (
        "replica_report_age_seconds",
        "Seconds since the replica's last load report arrived.",
        "report_age",
    ),
    (
        "replica_report_stale",
        "1 while the replica has telemetry but no fresh load report (routing falls back "
        "to this gateway's in-flight count).",
        "report_stale",
    ),
    (
        "replica_reported_draining",
        "1 while the replica's own report says it is draining (no new requests).",
        "reported_draining",
    ),
)
# Per DP rank, from scrapes: name suffix, help, RankSample field.
_RANK_GAUGES = (
    ("replica_rank_waiting", "Waiting requests of one DP rank of the replica.", "waiting"),
    ("replica_rank_running", "Running requests of one DP rank of the replica.", "running"),
    ("replica_rank_kv_usage", "KV-cache usage of one DP rank of the replica.", "kv_usage"),
)


class ReplicaCollector(Collector):
    """Per-replica gauges computed when /metrics is scraped.

    The data path changes in-flight counts twice per request; setting a
    gauge each time cost measurable CPU (label lookups) for a value nobody
    reads between scrapes. Reading the live state at scrape time is exact and
    free on the hot path.
    """

    def __init__(self, snapshot: Callable[[], Iterable[ReplicaSample]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        samples = list(self._snapshot())
        for suffix, help_, attr in _REPLICA_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}_{suffix}", help_, labels=["replica"])
            for sample in samples:
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric([sample.name], float(value))
            yield family


class RankCollector(Collector):
    """Per-DP-rank gauges of scraped replicas, read at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable[RankSample]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        samples = list(self._snapshot())
        for suffix, help_, attr in _RANK_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}_{suffix}", help_, labels=["replica", "rank"])
            for sample in samples:
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric([sample.replica, sample.rank], float(value))
            yield family


# Per-expert (MoE) telemetry, router/experts.py: name suffix, help, ExpertView field.
_EXPERT_GAUGES = (
    (
        "expert_imbalance",
        "Routed tokens of the replica's busiest expert over the mean per expert, "
        "over [experts] window_s (1 = balanced).",
        "imbalance",
    ),
    (
        "expert_overflow_ratio",
        "Tokens dropped by expert capacity limits over tokens routed, over the window "
        "(only engines that report drops).",
        "overflow_rate",
    ),
    (
        "expert_slowdown",
        "Step time over a balanced replica's, as routing uses it: (1 - moe_share) + "
        "moe_share x busiest expert, over (1 - overflow ratio). No series when stale.",
        "slowdown",
    ),
    ("expert_report_age_seconds", "Seconds since the replica's last expert counters.", "age_s"),
)


# Every family ExpertCollector exports: with --workers N the supervisor holds
# the expert telemetry, so router/workers.py must take these from it alone.
EXPERT_FAMILIES = (
    *(f"{PREFIX}_{suffix}" for suffix, _, _ in _EXPERT_GAUGES),
    f"{PREFIX}_expert_tokens_per_second",
    f"{PREFIX}_expert_layer_imbalance",
    f"{PREFIX}_expert_samples_rejected",
)


class ExpertCollector(Collector):
    """Per-expert gauges computed at scrape time from ``ExpertTelemetry``.

    Cardinality is bounded by configuration, never by what replicas send:
    fleet members only, at most ``[experts] max_experts`` expert label
    values per replica, and a layer label (per-layer imbalance) only with
    ``per_layer``, at most ``max_layers`` values. Per-expert rates are summed
    over layers: per layer they would be layers x experts series per replica
    (58 x 256 for DeepSeek-V3).
    """

    def __init__(
        self,
        views: Callable[[], Sequence[ExpertView]],
        rejected: Callable[[], Mapping[str, int]],
    ) -> None:
        self._views = views
        self._rejected = rejected

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        views = list(self._views())
        for suffix, help_, attr in _EXPERT_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}_{suffix}", help_, labels=["replica"])
            for v in views:
                value = getattr(v, attr)
                if value is not None:
                    family.add_metric([v.replica], float(value))
            yield family
        rate = GaugeMetricFamily(
            f"{PREFIX}_expert_tokens_per_second",
            "Tokens routed to each expert per second over the window (layers summed).",
            labels=["replica", "expert"],
        )
        for v in views:
            if v.window_s > 0:
                for i, x in enumerate(v.tokens_per_s):
                    rate.add_metric([v.replica, str(i)], x)
        yield rate
        layers = GaugeMetricFamily(
            f"{PREFIX}_expert_layer_imbalance",
            "Busiest expert over the mean, per MoE layer ([experts] per_layer only).",
            labels=["replica", "layer"],
        )
        for v in views:
            for layer, x in sorted(v.layers.items()):
                layers.add_metric([v.replica, str(layer)], x)
        yield layers
        rejected = CounterMetricFamily(
            f"{PREFIX}_expert_samples_rejected",
            "Per-expert samples refused, by reason (unknown_replica, empty, too_many_experts, "
            "bad_layer, length_mismatch, duplicate_layer, not_finite, negative, "
            "overflow_exceeds_tokens).",
            labels=["reason"],
        )
        for reason, n in self._rejected().items():
            rejected.add_metric([reason], float(n))
        yield rejected


class HotCounter:
    """A counter for the per-request path: a plain dict, no lock, no child objects.

    prometheus_client's counters take a lock and walk a child object on every
    ``inc``; at thousands of requests a second on one event loop (one thread)
    neither is needed. The values are exported at scrape time, under the
    same name, help and labels a prometheus_client Counter would have.
    """

    __slots__ = ("help", "labels", "name", "values")

    def __init__(self, name: str, help_: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help_
        self.labels = list(labels)
        self.values: dict[tuple[str | int, ...], float] = {}

    def inc(self, key: tuple[str | int, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(
            self.name.removesuffix("_total"), self.help, labels=self.labels
        )
        for key, value in list(self.values.items()):
            # str: the request counter keeps the status as the int it is given.
            family.add_metric([str(v) for v in key], value)
        return [family]


class HotHistogram:
    """A histogram for the per-request path (see :class:`HotCounter`).

    A label set's state is one list: the count of each bucket (the last one
    +Inf), then the sum of the observations; an observation updates two
    items of it, with no dict lookup for the sum.
    """

    __slots__ = ("bounds", "counts", "help", "labels", "name")

    def __init__(
        self, name: str, help_: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.help = help_
        self.labels = list(labels)
        self.bounds = tuple(buckets)
        self.counts: dict[tuple[str, ...], list[float]] = {}

    def child(self, key: tuple[str, ...]) -> list[float]:
        """The label set's list (created empty): the bucket of ``value`` is
        ``bisect_left(bounds, value)``, the sum the last item."""
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = [0] * (len(self.bounds) + 1) + [0.0]
        return counts

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.counts.get(key) or self.child(key)
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for key, counts in list(self.counts.items()):
            cumulative = list(accumulate(counts[:-1]))
            buckets = [
                (floatToGoString(bound), float(n))
                for bound, n in zip(self.bounds, cumulative, strict=False)
            ]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(key), buckets, counts[-1])
        return [family]


class _HotCollector(Collector):
    def __init__(self, metrics: Sequence[HotCounter | HotHistogram]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for metric in self._metrics:
            yield from metric.collect()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Per request: plain dicts exported at scrape time (HotCounter).
        self.requests = HotCounter(
            f"{PREFIX}_requests_total",
            "Client requests by model, serving replica and HTTP status returned to the client.",
            ["model", "replica", "status"],
        )
        self.request_duration = HotHistogram(
            f"{PREFIX}_request_duration_seconds",
            "End-to-end time from request received to last byte sent.",
            ["model"],
            LATENCY_BUCKETS,
        )
        self.ttfb = HotHistogram(
            f"{PREFIX}_time_to_first_byte_seconds",
            "Time from request received to the first upstream body byte "
            "(the first token for streams).",
            ["model"],
            TTFB_BUCKETS,
        )
        self.attempts = HotCounter(
            f"{PREFIX}_upstream_attempts_total",
            "Upstream attempts by replica and outcome (ok, http_4xx, http_5xx, connect_error, "
            "timeout, upstream_reset, bad_response, client_disconnect, draining, internal).",
            ["replica", "outcome"],
        )
        self.retries = Counter(
            f"{PREFIX}_retries_total",
            "Retries on another replica, by reason.",
            ["reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            f"{PREFIX}_retry_budget_exhausted_total",
            "Retries not made, by cause: the ratio budget (budget) or the cap on "
            "concurrent retries (concurrency).",
            ["cause"],
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors_total",
            "Errors returned to clients (or in-band on started streams), by reason.",
            ["reason"],
            registry=r,
        )
        self.decisions = HotCounter(
            f"{PREFIX}_routing_decisions_total",
            "Routing decisions by policy and reason.",
            ["policy", "reason"],
        )
        r.register(
            _HotCollector(
                [self.requests, self.request_duration, self.ttfb, self.attempts, self.decisions]
            )
        )
        # The dicts and histogram lists the per-request methods update.
        self._requests = self.requests.values
        self._attempts = self.attempts.values
        self._decisions = self.decisions.values
        self._durations: dict[str, list[float]] = {}
        self._ttfbs: dict[str, list[float]] = {}
        self.health_transitions = Counter(
            f"{PREFIX}_health_transitions_total",
            "Active health check state changes.",
            ["replica", "to"],
            registry=r,
        )
        self.ejections = Counter(
            f"{PREFIX}_outlier_ejections_total",
            "Passive outlier ejections by reason.",
            ["replica", "reason"],
            registry=r,
        )
        self.admission_waits = Counter(
            f"{PREFIX}_admission_waits_total",
            "Requests that waited for capacity at the gateway.",
            registry=r,
        )
        self.admission_wait_seconds = Histogram(
            f"{PREFIX}_admission_wait_seconds",
            "Time spent waiting for capacity.",
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.admission_rejections = Counter(
            f"{PREFIX}_admission_rejections_total",
            "Requests refused for lack of capacity, by reason (queue_full, queue_timeout, "
            "shutting_down).",
            ["reason"],
            registry=r,
        )
        self.admission_queue = Gauge(
            f"{PREFIX}_admission_queue_length",
            "Requests waiting for capacity.",
            registry=r,
        )
        self.retry_budget_balance = Gauge(
            f"{PREFIX}_retry_budget_balance",
            "Retries the budget would allow now.",
            registry=r,
        )
        self.access_log_dropped = Counter(
            f"{PREFIX}_access_log_dropped_total",
            "Access log lines dropped because the log sink fell behind.",
            registry=r,
        )
        self._session_metrics(r)
        self._telemetry_metrics(r)
        self.models_refresh_failures = Counter(
            f"{PREFIX}_models_refresh_failures_total",
            "Failed GET /v1/models against a replica.",
            ["replica"],
            registry=r,
        )

    def _session_metrics(self, r: CollectorRegistry) -> None:
        """Sticky sessions (router/sessions.py, docs/sessions.md)."""
        self.session_requests = HotCounter(
            f"{PREFIX}_session_requests_total",
            "Requests with a session key, by result: hit (its pin held), new (first "
            "placement), repinned (moved, see session_repins_total), fallback (the store "
            "was unavailable: local pin cache or rendezvous hashing placed it).",
            ["result"],
        )
        self.session_repins = HotCounter(
            f"{PREFIX}_session_repins_total",
            "Sessions moved off their pinned replica, by reason (drained, unhealthy, "
            "overloaded, failed, removed, pool_changed).",
            ["reason"],
        )
        self.session_store_seconds = HotHistogram(
            f"{PREFIX}_session_store_seconds",
            "Latency of session store calls that completed, by operation.",
            ["store", "op"],
            SESSION_STORE_BUCKETS,
        )
        r.register(
            _HotCollector([self.session_requests, self.session_repins, self.session_store_seconds])
        )
        self.session_store_errors = Counter(
            f"{PREFIX}_session_store_errors_total",
            "Session store calls that failed, by operation and error (timeout, "
            "connection, error); calls refused by the open breaker are not counted here.",
            ["op", "error"],
            registry=r,
        )
        self.session_breaker_state = Gauge(
            f"{PREFIX}_session_breaker_state",
            "The session store's circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.session_breaker_opens = Counter(
            f"{PREFIX}_session_breaker_opens_total",
            "Times the session store's circuit breaker opened.",
            registry=r,
        )
        self.session_local_pins = Gauge(
            f"{PREFIX}_session_local_pins",
            "Pins this gateway keeps locally for store outages (bounded).",
            registry=r,
        )

    def _telemetry_metrics(self, r: CollectorRegistry) -> None:
        """Load reports (router/telemetry, docs/load-report.md)."""
        self.load_reports = Counter(
            f"{PREFIX}_load_reports_total",
            "Load reports accepted, by replica and source (scrape, push).",
            ["replica", "source"],
            registry=r,
        )
        self.load_reports_rejected = Counter(
            f"{PREFIX}_load_reports_rejected_total",
            "Load reports refused or failed, by source and reason (scrape: timeout, "
            "connect_error, http_error, http_status, too_large, too_many_series, parse_error, "
            "no_load_metrics, no_waiting; push: "
            "unauthorized, wrong_replica, unknown_replica, push_disabled, too_large, bad_json, "
            "invalid, no_waiting, out_of_order, method_not_allowed, not_found, timeout, "
            "too_many_connections).",
            ["source", "reason"],
            registry=r,
        )
        # Every response may carry one: a dict update, not a Counter child.
        self.load_headers = HotCounter(
            f"{PREFIX}_load_headers_total",
            "ORCA endpoint-load-metrics response headers read, by replica and result "
            "(ok, malformed).",
            ["replica", "result"],
        )
        r.register(_HotCollector([self.load_headers]))
        self._rank_source: Callable[[], Iterable[RankSample]] = tuple
        r.register(RankCollector(lambda: self._rank_source()))

    def count_load_header(self, replica: str, ok: bool) -> None:
        self.load_headers.inc((replica, "ok" if ok else "malformed"))

    def watch_ranks(self, snapshot: Callable[[], Iterable[RankSample]] | None) -> None:
        """Per-rank gauges read from ``snapshot`` (None: no ranks)."""
        self._rank_source = snapshot if snapshot is not None else tuple

    # Called for every request: each is one dict update (no call into the
    # HotCounter, whose dict it updates). The status stays an int (no str()
    # per request): HotCounter.collect prints it.

    def count_attempt(self, replica: str, outcome: str) -> None:
        values = self._attempts
        key = (replica, outcome)
        values[key] = values.get(key, 0.0) + 1.0

    def count_decision(self, policy: str, reason: str) -> None:
        values = self._decisions
        key = (policy, reason)
        values[key] = values.get(key, 0.0) + 1.0

    def count_finished(
        self, model: str, replica: str, status: int, seconds: float, ttfb: float | None
    ) -> None:
        """A finished request: its count by model, replica and status, its
        duration and (unless None) its time to first byte, in one call at the
        end of every request."""
        values = self._requests
        key = (model, replica, status)
        values[key] = values.get(key, 0.0) + 1.0
        counts = self._durations.get(model)
        if counts is None:
            counts = self._durations[model] = self.request_duration.child((model,))
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds
        if ttfb is not None:
            counts = self._ttfbs.get(model)
            if counts is None:
                counts = self._ttfbs[model] = self.ttfb.child((model,))
            counts[bisect_left(TTFB_BUCKETS, ttfb)] += 1
            counts[-1] += ttfb

    def watch_replicas(self, snapshot: Callable[[], Iterable[ReplicaSample]]) -> None:
        self.registry.register(ReplicaCollector(snapshot))

    def watch_experts(
        self,
        views: Callable[[], Sequence[ExpertView]],
        rejected: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry.register(ExpertCollector(views, rejected))

    def render(self) -> bytes:
        return generate_latest(self.registry)
