"""All Prometheus metrics of the gateway: names, labels and help, in one place.

Each gateway instance owns a ``CollectorRegistry`` (tests run several gateways
in one process). Label values come only from configuration (replica names,
models the replicas serve, fixed reason sets), never from raw client input:
a model the fleet does not serve is counted as ``unknown`` (docs/reliability.md, M47).

Hot-path children are cached in dicts so a request does not pay for
prometheus-client's label lookup more than once per combination.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
                family.add_metric([sample.name], float(getattr(sample, attr)))
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "Client requests by model, serving replica and HTTP status returned to the client.",
            ["model", "replica", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "End-to-end time from request received to last byte sent.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            f"{PREFIX}_time_to_first_byte_seconds",
            "Time from request received to the first upstream body byte "
            "(the first token for streams).",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            f"{PREFIX}_upstream_attempts_total",
            "Upstream attempts by replica and outcome (ok, http_4xx, http_5xx, connect_error, "
            "timeout, upstream_reset, bad_response, client_disconnect, draining, internal).",
            ["replica", "outcome"],
            registry=r,
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
        self.decisions = Counter(
            f"{PREFIX}_routing_decisions_total",
            "Routing decisions by policy and reason.",
            ["policy", "reason"],
            registry=r,
        )
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
        self.models_refresh_failures = Counter(
            f"{PREFIX}_models_refresh_failures_total",
            "Failed GET /v1/models against a replica.",
            ["replica"],
            registry=r,
        )
        # Hot-path children, cached: prometheus-client's labels() lookup cost
        # shows in the gateway's per-request CPU profile.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_request(self, model: str, replica: str, status: int) -> None:
        self._child(self.requests, model, replica, str(status)).inc()

    def count_attempt(self, replica: str, outcome: str) -> None:
        self._child(self.attempts, replica, outcome).inc()

    def count_decision(self, policy: str, reason: str) -> None:
        self._child(self.decisions, policy, reason).inc()

    def observe_duration(self, model: str, seconds: float) -> None:
        self._child(self.request_duration, model).observe(seconds)

    def observe_ttfb(self, model: str, seconds: float) -> None:
        self._child(self.ttfb, model).observe(seconds)

    def watch_replicas(self, snapshot: Callable[[], Iterable[ReplicaSample]]) -> None:
        self.registry.register(ReplicaCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
