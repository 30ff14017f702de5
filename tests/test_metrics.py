"""Metrics: one registry per gateway, bounded labels, per-replica gauges at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import LATENCY_BUCKETS, TTFB_BUCKETS, Metrics, ReplicaSample


def families(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_each_gateway_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.count_finished("m", "r1", 200, 0.1, None)
    got = families(b)
    assert not any(v for _, v in got.get("dp_router_requests_total", []))


def test_per_replica_gauges_read_live_state_at_scrape_time() -> None:
    state = {"in_flight": 0}
    metrics = Metrics()
    metrics.watch_replicas(
        lambda: [ReplicaSample("r1", state["in_flight"], 7, True, True, False, 0.5)]
    )
    assert families(metrics)["dp_router_replica_in_flight"] == [({"replica": "r1"}, 0.0)]
    state["in_flight"] = 3
    got = families(metrics)
    assert got["dp_router_replica_in_flight"] == [({"replica": "r1"}, 3.0)]
    assert got["dp_router_replica_effective_weight"] == [({"replica": "r1"}, 0.5)]
    assert got["dp_router_replica_ejected"] == [({"replica": "r1"}, 0.0)]


def test_hot_path_counters_accumulate_per_label_set() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.count_attempt("r1", "ok")
    metrics.count_attempt("r1", "bad_response")
    metrics.count_decision("queue_depth", "queue_depth")
    got = dict(
        (labels["outcome"], v)
        for labels, v in families(metrics)["dp_router_upstream_attempts_total"]
    )
    assert got == {"ok": 3.0, "bad_response": 1.0}


def test_series_count_does_not_grow_with_request_volume() -> None:
    """Labels come from config and fixed reason sets, so 10k requests add no series."""
    metrics = Metrics()
    for status in (200, 503):
        metrics.count_finished("m", "r1", status, 0.01, None)
    before = sum(len(v) for v in families(metrics).values())
    for i in range(10_000):
        metrics.count_finished("m", "r1", 200 if i % 2 else 503, i / 1000, None)
    assert sum(len(v) for v in families(metrics).values()) == before


def test_hot_histograms_and_counters_export_what_prometheus_client_would() -> None:
    """The per-request methods write the HotCounter/HotHistogram state
    directly; /metrics must read as a prometheus_client Histogram and Counter
    fed the same calls (the per-key API, HotHistogram.observe, feeds the
    same series)."""
    reference = CollectorRegistry()
    duration = Histogram(
        "dp_router_request_duration_seconds",
        "",
        ["model"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    ttfb = Histogram(
        "dp_router_time_to_first_byte_seconds",
        "",
        ["model"],
        buckets=TTFB_BUCKETS,
        registry=reference,
    )
    requests = Counter("dp_router_requests", "", ["model", "replica", "status"], registry=reference)
    metrics, per_key = Metrics(), Metrics()
    values = [0.0, 0.005, 0.0050001, 0.3, 1e-9, 120.0, 299.99, 300.0, 301.0, 1e6]
    for i, seconds in enumerate(values):
        model = "m" if i % 3 else "other"
        status = 200 if i % 2 else 503
        duration.labels(model).observe(seconds)
        ttfb.labels(model).observe(seconds / 10)
        requests.labels(model, "r1", str(status)).inc()
        metrics.count_finished(model, "r1", status, seconds, seconds / 10)
        per_key.request_duration.observe((model,), seconds)
        per_key.ttfb.observe((model,), seconds / 10)
        per_key.requests.inc((model, "r1", status))
    duration.labels("m").observe(0.2)
    requests.labels("m", "r1", "200").inc()
    metrics.count_finished("m", "r1", 200, 0.2, None)  # no first byte: no TTFB
    per_key.request_duration.observe(("m",), 0.2)
    per_key.requests.inc(("m", "r1", 200))

    def samples(
        registry: CollectorRegistry,
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
            and family.name
            in {
                "dp_router_request_duration_seconds",
                "dp_router_time_to_first_byte_seconds",
                "dp_router_requests",
            }
        }

    got, want = samples(metrics.registry), samples(reference)
    assert got == want == samples(per_key.registry)
    assert len(got) == 2 * (len(LATENCY_BUCKETS) + 3) + 2 * (len(TTFB_BUCKETS) + 3) + 4
