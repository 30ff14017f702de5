"""Typed configuration: a TOML file (stdlib tomllib), validated once at load.

Every problem is reported as ``ConfigError("<key path>: <what is wrong>")`` so
``dp-router check-config`` and ``serve`` can exit with one clear line instead
of a traceback. Unknown keys are errors: a typo in a timeout must not silently
fall back to a default. A few keys deployments change per environment can be
overridden by environment variables (ENV_OVERRIDES); defaults live here only.
"""

from __future__ import annotations

import inspect
import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from policies import registry
from policies.load import DEFAULT_LOAD_BOUND_EPSILON, DEFAULT_SESSION_LOAD_FLOOR
from router import tracing
from router.session_key import parse_sources

ENV_OVERRIDES = {
    "DP_ROUTER_HOST": ("server", "host"),
    "DP_ROUTER_PORT": ("server", "port"),
    "DP_ROUTER_ADMIN_HOST": ("admin", "host"),
    "DP_ROUTER_ADMIN_PORT": ("admin", "port"),
    "DP_ROUTER_ADMIN_TOKEN": ("admin", "token"),
    "DP_ROUTER_REDIS_URL": ("redis", "url"),
}


class ConfigError(ValueError):
    """A config problem, phrased for the operator: key path, then the problem."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    # 10 MiB: long-context prompts reach a few MB of JSON; beyond that is abuse.
    max_body_bytes: int = 10 * 1024 * 1024
    # Peers whose X-Forwarded-For we extend instead of replacing (CIDRs).
    trusted_proxies: tuple[str, ...] = ()
    replica_header: bool = True
    access_log: bool = True
    # SIGTERM: readiness false at once, then in-flight requests get this long.
    shutdown_timeout_s: float = 30.0
    # Readiness goes false this long before the listener closes, so the load
    # balancer in front sees /readyz fail and stops sending first.
    shutdown_delay_s: float = 0.0
    # Slowloris: a request head must arrive within this (408 otherwise),
    # HAProxy's usual `timeout http-request`.
    header_timeout_s: float = 10.0
    # The whole body, once the head is in: 10 MiB at a slow 2 Mbit/s fits.
    body_timeout_s: float = 60.0
    # Idle time between requests on a client's keep-alive connection (nginx's 75 s).
    keepalive_timeout_s: float = 75.0
    # Data-path processes sharing the port (SO_REUSEPORT) behind one
    # supervisor (docs/workers.md); "auto" in the file is os.cpu_count().
    workers: int = 1


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # Loopback unless the operator says otherwise (docs/reliability.md, M23).
    host: str = "127.0.0.1"
    port: int = 8081
    token: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = 2.0
    # Streaming only: vLLM sends headers when the first token is ready.
    first_byte_timeout_s: float = 60.0
    # Longest silence between two chunks of a started stream.
    idle_timeout_s: float = 60.0
    # Non-streaming: vLLM sends nothing until the whole completion is done, so
    # this must exceed the longest generation; it is never retried.
    response_timeout_s: float = 600.0
    # Idle upstream connections are dropped after this: under the 5 s after
    # which vLLM's and SGLang's servers (uvicorn) close idle keep-alive
    # connections, so a reused connection is rarely one the replica closed.
    keepalive_timeout_s: float = 4.0
    # Re-read GET /v1/models of replicas whose models are not configured.
    models_refresh_s: float = 30.0
    max_retries: int = 1


@dataclass(frozen=True, slots=True)
class HealthConfig:
    enabled: bool = True
    path: str = "/health"
    interval_s: float = 5.0
    timeout_s: float = 2.0
    healthy_threshold: int = 2  # HAProxy rise 2
    unhealthy_threshold: int = 3  # HAProxy fall 3
    slow_start_s: float = 30.0
    slow_start_aggression: float = 1.0
    slow_start_min_weight: float = 0.1  # Envoy's minimum 10 %


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    enabled: bool = True
    consecutive_failures: int = 5  # Envoy consecutive_5xx default
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    budget_ratio: float = 0.2  # Finagle: each request deposits 0.2 ...
    budget_reserve: int = 3  # ... and a quiet gateway can still retry 3 times
    max_concurrent_retries: int = 10
    backoff_base_s: float = 0.025  # Envoy: full jitter, 25 ms base ...
    backoff_max_s: float = 0.25  # ... 250 ms cap


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    queue_timeout_s: float = 5.0
    max_queue: int = 1000
    reject_status: int = 429
    # When no replica is routable: "fail" answers 503 + Retry-After at once;
    # "panic" routes to every replica that serves the model (Envoy's panic).
    when_none_routable: str = "fail"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = registry.DEFAULT_POLICY
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    # The one epsilon of every bounded-load rule (session affinity, the
    # prefix policies): a replica holds at most ceil((1 + eps) x (total + 1) / n).
    load_bound_epsilon: float = DEFAULT_LOAD_BOUND_EPSILON
    # A pinned session is never "overloaded" off a replica holding fewer than
    # this many of this gateway's requests: an engine batches dozens of
    # sequences, so at low load its KV cache is worth more than balance
    # (and each gateway counts only its own requests).
    session_load_floor: int = DEFAULT_SESSION_LOAD_FLOOR


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """The shared store. Empty ``url`` and no ``sentinels``: no Redis at all.

    The hot path's calls get a tight budget (``op_timeout_s`` around each
    call, redis-py's own retries off, a bounded pool), because a session
    lookup must never cost a request more than that (docs/sessions.md).
    """

    url: str = ""  # redis://host:port/db, rediss://..., unix:///path
    # Sentinel: "host:port" of each sentinel, and the master's name.
    sentinels: tuple[str, ...] = ()
    master_name: str = ""
    key_prefix: str = "dp:"
    op_timeout_s: float = 0.05  # every hot-path call, connect included
    max_connections: int = 32  # the pool's cap; excess callers wait pool_timeout_s
    pool_timeout_s: float = 0.05
    # Circuit breaker: open after this many failures in a row, probe after open_s.
    breaker_failures: int = 3
    breaker_open_s: float = 2.0


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    """Sticky sessions (docs/sessions.md)."""

    enabled: bool = True
    # Where the session key comes from, first match wins: "header:<name>",
    # "body:prompt_cache_key", "body:user".
    sources: tuple[str, ...] = ("header:x-session-id",)
    ttl_s: float = 3600.0  # sliding: every request of the session extends it
    max_key_length: int = 256
    memory_max_sessions: int = 100_000  # the in-memory store's LRU bound
    local_cache_size: int = 10_000  # pins this gateway read or wrote, kept for Redis outages
    # A new session's first replica: "policy" (load- and cache-aware) or
    # "rendezvous" (the hash's choice, so that a Redis outage moves fewer sessions).
    first_placement: str = "policy"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """How the gateway reads each replica's load (docs/load-report.md).

    ``source`` is every replica's default (a replica's own ``telemetry`` key
    overrides it): "auto" asks for the ORCA response header and scrapes
    ``metrics_path``, the engine found from the metric names, so vLLM and
    SGLang replicas need no config; "scrape", "push", "header" use one
    source; "none" routes on this gateway's own counts.
    """

    source: str = "auto"
    # "auto" (from the metric names), "vllm", "sglang", "trtllm", "custom".
    engine: str = "auto"
    metrics_path: str = "/metrics"
    # A queue length a second old is still a good one; vLLM updates its
    # gauges every engine step, Prometheus scrapes every 15 s.
    scrape_interval_s: float = 1.0
    scrape_timeout_s: float = 0.5
    # vLLM's /metrics with per-engine histograms is ~100-300 KB; far beyond
    # that is a confused endpoint, not metrics.
    # 2.4x an 8-engine vLLM exposition (~441 KB): room to grow, while a
    # runaway /metrics is cut before it costs the loop a parse.
    scrape_max_bytes: int = 1024 * 1024
    # engine = "custom": the replica's names for waiting, running, kv_usage
    # (and waiting_prompt_tokens), e.g. { waiting = "my:queue", ... }.
    metric_names: Mapping[str, str] = field(default_factory=dict)
    # The push listener, "host:port"; "" (the default) runs none.
    push_listen: str = ""
    push_max_bytes: int = 256 * 1024
    push_max_experts: int = 1024  # DeepSeek-V3 has 256 routed experts per layer
    push_max_layers: int = 256  # DeepSeek-V3 has 58 MoE layers


@dataclass(frozen=True, slots=True)
class ExpertsConfig:
    """Per-expert (MoE) telemetry and its routing signal (router/experts.py)."""

    # Experts kept per replica: the bound of the expert label's cardinality
    # (DeepSeek-V3 has 256 routed experts); larger reports are refused.
    max_experts: int = 256
    max_layers: int = 128  # per-layer reports beyond are refused (DeepSeek-V3: 58)
    window_s: float = 30.0  # imbalance and overflow over this sliding window
    top_k: int = 3  # hot experts shown per replica
    per_layer: bool = False  # keep layers apart (memory x layers); else summed
    # Share of a step the MoE (expert MLP) layers take: step time = (1 - share)
    # + share x imbalance. 0.6: the MLP's share of a layer in the Vidur
    # profiles (loadtest/engine/moe.py uses the same).
    moe_share: float = 0.6
    # Older expert counters give no routing signal (three missed 5 s scrapes).
    stale_s: float = 15.0


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry spans (docs/tracing.md): off unless enabled, and then
    the ``tracing`` extra (the OpenTelemetry SDK) must be installed."""

    enabled: bool = False
    exporter: str = "otlp"  # OTLP over HTTP (protobuf), or "console" (stdout)
    # The collector's traces URL, e.g. http://otel-collector:4318/v1/traces;
    # "" leaves it to OTEL_EXPORTER_OTLP_ENDPOINT (else localhost:4318).
    endpoint: str = ""
    service_name: str = "dp-router"
    # Share of new traces kept; a client's traceparent decides for its own.
    sample_ratio: float = 1.0


TELEMETRY_SOURCES = ("auto", "scrape", "push", "header", "none")
TELEMETRY_ENGINES = ("auto", "vllm", "sglang", "trtllm", "custom")
TELEMETRY_METRIC_KEYS = ("waiting", "running", "kv_usage", "waiting_prompt_tokens")


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    url: str
    name: str
    models: tuple[str, ...] | None = None  # None: discover from GET /v1/models
    weight: float = 1.0
    api_key: str = ""
    max_concurrency: int | None = None
    # Load reports (docs/load-report.md); "" takes the [telemetry] default.
    telemetry: str = ""
    engine: str = ""
    metrics_path: str = ""
    push_token: str = ""  # from push_token_env: the only key that may report for it


@dataclass(frozen=True, slots=True)
class Config:
    replicas: tuple[ReplicaConfig, ...]
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    health: HealthConfig = HealthConfig()
    outlier: OutlierConfig = OutlierConfig()
    retry: RetryConfig = RetryConfig()
    admission: AdmissionConfig = AdmissionConfig()
    routing: RoutingConfig = RoutingConfig()
    redis: RedisConfig = RedisConfig()
    sessions: SessionsConfig = SessionsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    experts: ExpertsConfig = ExpertsConfig()
    tracing: TracingConfig = TracingConfig()


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "admin": AdminConfig,
    "upstream": UpstreamConfig,
    "health": HealthConfig,
    "outlier": OutlierConfig,
    "retry": RetryConfig,
    "admission": AdmissionConfig,
    "redis": RedisConfig,
    "sessions": SessionsConfig,
    "telemetry": TelemetryConfig,
    "experts": ExpertsConfig,
    "tracing": TracingConfig,
}


def _check_type(path: str, value: Any, default: Any) -> Any:
    """Coerce/validate ``value`` against the type of the field's default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
        return tuple(value)
    return value


def workers_value(value: Any) -> Any:
    """``workers = "auto"``: one worker per CPU the OS reports. Other values
    pass through to the type check (an integer >= 1)."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        raise ConfigError(f'server.workers: expected an integer or "auto", got {value!r}')
    return value


def _section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a table")
    if cls is ServerConfig and "workers" in data:
        data = {**data, "workers": workers_value(data["workers"])}
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
    defaults = cls()
    values = {
        key: _check_type(f"{name}.{key}", value, getattr(defaults, key))
        for key, value in data.items()
    }
    return cls(**values)


def _positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _port(path: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{path}: must be a port number 0-65535, got {value}")


def parse_replica_url(path: str, url: str) -> str:
    """Only http(s) URLs with a host: the upstream never comes from a request
    (docs/reliability.md, M42)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: expected an http(s) URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{path}: must not carry a query or fragment")
    return url.rstrip("/")


def default_replica_name(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _replica(i: int, data: Any) -> ReplicaConfig:
    path = f"replicas[{i}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table")
    allowed = {"url", "name", "models", "weight", "api_key", "api_key_env", "max_concurrency"}
    allowed |= {"telemetry", "engine", "metrics_path", "push_token_env"}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(sorted(allowed))})")
    if "url" not in data:
        raise ConfigError(f"{path}.url: required")
    url = parse_replica_url(f"{path}.url", _check_type(f"{path}.url", data["url"], ""))
    name = _check_type(f"{path}.name", data.get("name", default_replica_name(url)), "")
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        # It goes out in a response header (X-Dp-Replica), unchecked per request.
        raise ConfigError(f"{path}.name: must be non-empty without spaces, got {name!r}")
    models = None
    if "models" in data:
        models = _check_type(f"{path}.models", data["models"], ())
        if not models:
            raise ConfigError(f"{path}.models: must not be empty (omit it to discover models)")
    weight = _check_type(f"{path}.weight", data.get("weight", 1.0), 1.0)
    _positive(f"{path}.weight", weight, allow_zero=True)
    api_key = _check_type(f"{path}.api_key", data.get("api_key", ""), "")
    if "api_key_env" in data:
        env_name = _check_type(f"{path}.api_key_env", data["api_key_env"], "")
        if env_name not in os.environ:
            raise ConfigError(f"{path}.api_key_env: environment variable {env_name} is not set")
        api_key = os.environ[env_name]
    if api_key and not (api_key.isascii() and api_key.isprintable()):
        # It goes out in a request header, unchecked per request.
        raise ConfigError(f"{path}.api_key: must be printable ASCII")
    max_conc = data.get("max_concurrency")
    if max_conc is not None:
        max_conc = _check_type(f"{path}.max_concurrency", max_conc, 0)
        _positive(f"{path}.max_concurrency", max_conc)
    telemetry = {k: _check_type(f"{path}.{k}", data.get(k, ""), "") for k in _REPLICA_TELEMETRY}
    push_token = ""
    if "push_token_env" in data:
        env_name = _check_type(f"{path}.push_token_env", data["push_token_env"], "")
        push_token = os.environ.get(env_name, "")
        if not push_token:
            raise ConfigError(f"{path}.push_token_env: environment variable {env_name} is not set")
    return ReplicaConfig(
        url, name, models, weight, api_key, max_conc, **telemetry, push_token=push_token
    )


_REPLICA_TELEMETRY = ("telemetry", "engine", "metrics_path")


def _routing(data: Any) -> RoutingConfig:
    if not isinstance(data, dict):
        raise ConfigError("routing: expected a table")
    for key in data:
        if key not in ("policy", "params", "seed", "load_bound_epsilon", "session_load_floor"):
            raise ConfigError(
                f"routing.{key}: unknown key (known: load_bound_epsilon, params, policy, "
                "seed, session_load_floor)"
            )
    policy = _check_type("routing.policy", data.get("policy", registry.DEFAULT_POLICY), "")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError("routing.params: expected a table")
    if "epsilon" in params:
        raise ConfigError(
            "routing.params.epsilon: set [routing] load_bound_epsilon instead "
            "(one load bound for every bounded rule)"
        )
    seed = data.get("seed")
    if seed is not None:
        seed = _check_type("routing.seed", seed, 0)
    epsilon = _check_type(
        "routing.load_bound_epsilon",
        data.get("load_bound_epsilon", DEFAULT_LOAD_BOUND_EPSILON),
        0.0,
    )
    _positive("routing.load_bound_epsilon", epsilon, allow_zero=True)
    floor = _check_type(
        "routing.session_load_floor",
        data.get("session_load_floor", DEFAULT_SESSION_LOAD_FLOOR),
        0,
    )
    _positive("routing.session_load_floor", floor, allow_zero=True)
    try:
        registry.create(policy, policy_params(policy, dict(params), epsilon), seed)
    except ValueError as exc:
        raise ConfigError(f"routing.policy: {exc}") from None
    return RoutingConfig(policy, dict(params), seed, epsilon, floor)


def policy_params(policy: str, params: dict[str, Any], epsilon: float) -> dict[str, Any]:
    """The policy's parameters, with the gateway's one load-bound epsilon for
    policies that apply a load bound of their own."""
    cls = registry.POLICIES.get(policy)
    if cls is not None and "epsilon" in inspect.signature(cls).parameters:
        return {**params, "epsilon": epsilon}
    return params


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _validate(cfg: Config) -> None:
    _port("server.port", cfg.server.port)
    _port("admin.port", cfg.admin.port)
    if not is_loopback(cfg.admin.host) and not cfg.admin.token:
        # Drains and weights must not be one curl away for anyone who can
        # reach the port (docs/reliability.md, M22/M23).
        raise ConfigError("admin.token: required when admin.host is not loopback")
    _positive("server.max_body_bytes", cfg.server.max_body_bytes)
    _positive("server.shutdown_timeout_s", cfg.server.shutdown_timeout_s, allow_zero=True)
    _positive("server.shutdown_delay_s", cfg.server.shutdown_delay_s, allow_zero=True)
    for key in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
        _positive(f"server.{key}", getattr(cfg.server, key))
    if cfg.server.workers < 1:
        raise ConfigError(f'server.workers: must be >= 1 or "auto", got {cfg.server.workers}')
    for i, cidr in enumerate(cfg.server.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{i}]: not an IP network: {cidr!r}") from None
    for key in (
        "connect_timeout_s",
        "first_byte_timeout_s",
        "idle_timeout_s",
        "response_timeout_s",
        "keepalive_timeout_s",
        "models_refresh_s",
    ):
        _positive(f"upstream.{key}", getattr(cfg.upstream, key))
    _positive("upstream.max_retries", cfg.upstream.max_retries, allow_zero=True)
    h = cfg.health
    _positive("health.interval_s", h.interval_s)
    _positive("health.timeout_s", h.timeout_s)
    _positive("health.healthy_threshold", h.healthy_threshold)
    _positive("health.unhealthy_threshold", h.unhealthy_threshold)
    _positive("health.slow_start_s", h.slow_start_s, allow_zero=True)
    _positive("health.slow_start_aggression", h.slow_start_aggression)
    if not 0 < h.slow_start_min_weight <= 1:
        raise ConfigError("health.slow_start_min_weight: must be in (0, 1]")
    if not h.path.startswith("/"):
        raise ConfigError(f"health.path: must start with '/', got {h.path!r}")
    o = cfg.outlier
    _positive("outlier.consecutive_failures", o.consecutive_failures)
    _positive("outlier.base_ejection_s", o.base_ejection_s)
    if o.max_ejection_s < o.base_ejection_s:
        raise ConfigError("outlier.max_ejection_s: must be >= outlier.base_ejection_s")
    if not 0 <= o.max_ejection_percent <= 100:
        raise ConfigError("outlier.max_ejection_percent: must be in [0, 100]")
    r = cfg.retry
    _positive("retry.budget_ratio", r.budget_ratio, allow_zero=True)
    _positive("retry.budget_reserve", r.budget_reserve, allow_zero=True)
    _positive("retry.max_concurrent_retries", r.max_concurrent_retries, allow_zero=True)
    _positive("retry.backoff_base_s", r.backoff_base_s, allow_zero=True)
    _positive("retry.backoff_max_s", r.backoff_max_s, allow_zero=True)
    a = cfg.admission
    _positive("admission.queue_timeout_s", a.queue_timeout_s, allow_zero=True)
    _positive("admission.max_queue", a.max_queue, allow_zero=True)
    if a.reject_status not in (429, 503):
        raise ConfigError("admission.reject_status: must be 429 or 503")
    if a.when_none_routable not in ("fail", "panic"):
        raise ConfigError('admission.when_none_routable: must be "fail" or "panic"')
    _validate_sessions(cfg)
    _validate_telemetry(cfg)
    _validate_experts(cfg.experts)
    _validate_tracing(cfg.tracing)
    if not cfg.replicas:
        raise ConfigError("replicas: at least one replica is required")
    seen: set[str] = set()
    for i, rep in enumerate(cfg.replicas):
        if rep.name in seen:
            raise ConfigError(f"replicas[{i}].name: duplicate replica name {rep.name!r}")
        seen.add(rep.name)


def _validate_sessions(cfg: Config) -> None:
    rd = cfg.redis
    if rd.url and urlsplit(rd.url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis.url: expected redis://, rediss:// or unix://")
    if bool(rd.sentinels) != bool(rd.master_name):
        raise ConfigError("redis.sentinels and redis.master_name: give both, or neither")
    if rd.sentinels and rd.url:
        raise ConfigError("redis.url and redis.sentinels: give one (Sentinel finds the master)")
    for i, hostport in enumerate(rd.sentinels):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"redis.sentinels[{i}]: expected host:port, got {hostport!r}")
    for key in ("op_timeout_s", "pool_timeout_s", "breaker_open_s"):
        _positive(f"redis.{key}", getattr(rd, key))
    _positive("redis.max_connections", rd.max_connections)
    _positive("redis.breaker_failures", rd.breaker_failures)
    if not rd.key_prefix or len(rd.key_prefix) > 64:
        raise ConfigError("redis.key_prefix: 1 to 64 characters")
    se = cfg.sessions
    try:
        parse_sources(se.sources)
    except ValueError as exc:
        raise ConfigError(f"sessions.sources: {exc}") from None
    _positive("sessions.ttl_s", se.ttl_s)
    _positive("sessions.max_key_length", se.max_key_length)
    _positive("sessions.memory_max_sessions", se.memory_max_sessions)
    _positive("sessions.local_cache_size", se.local_cache_size, allow_zero=True)
    if se.first_placement not in ("policy", "rendezvous"):
        raise ConfigError(
            f'sessions.first_placement: "policy" or "rendezvous", got {se.first_placement!r}'
        )


def _validate_experts(e: ExpertsConfig) -> None:
    # 4096 experts x a few replicas is already thousands of series per scrape.
    if not 1 <= e.max_experts <= 4096:
        raise ConfigError(f"experts.max_experts: must be in [1, 4096], got {e.max_experts}")
    if not 1 <= e.max_layers <= 1024:
        raise ConfigError(f"experts.max_layers: must be in [1, 1024], got {e.max_layers}")
    _positive("experts.window_s", e.window_s)
    _positive("experts.stale_s", e.stale_s)
    if not 1 <= e.top_k <= e.max_experts:
        raise ConfigError("experts.top_k: must be in [1, experts.max_experts]")
    if not 0.0 <= e.moe_share <= 1.0:
        raise ConfigError(f"experts.moe_share: must be in [0, 1], got {e.moe_share}")


def _validate_tracing(t: TracingConfig) -> None:
    if t.exporter not in tracing.EXPORTERS:
        raise ConfigError(f"tracing.exporter: one of {', '.join(tracing.EXPORTERS)}")
    if t.endpoint:
        if t.exporter != "otlp":
            raise ConfigError('tracing.endpoint: only for exporter "otlp"')
        parts = urlsplit(t.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"tracing.endpoint: expected an http(s) URL, got {t.endpoint!r}")
    if not t.service_name:
        raise ConfigError("tracing.service_name: must not be empty")
    if not 0.0 <= t.sample_ratio <= 1.0:
        raise ConfigError(f"tracing.sample_ratio: must be in [0, 1], got {t.sample_ratio}")
    if t.enabled:
        missing = tracing.missing_modules(t.exporter)
        if missing:
            raise ConfigError(
                f"tracing.enabled: exporter {t.exporter!r} needs {', '.join(missing)}, "
                f"not installed ({tracing.INSTALL_HINT})"
            )


def _validate_telemetry(cfg: Config) -> None:
    t = cfg.telemetry
    if t.source not in TELEMETRY_SOURCES:
        raise ConfigError(f"telemetry.source: one of {', '.join(TELEMETRY_SOURCES)}")
    if t.engine not in TELEMETRY_ENGINES:
        raise ConfigError(f"telemetry.engine: one of {', '.join(TELEMETRY_ENGINES)}")
    if not t.metrics_path.startswith("/"):
        raise ConfigError("telemetry.metrics_path: must start with '/'")
    for key in ("scrape_interval_s", "scrape_timeout_s", "scrape_max_bytes", "push_max_bytes"):
        _positive(f"telemetry.{key}", getattr(t, key))
    _positive("telemetry.push_max_experts", t.push_max_experts)
    _positive("telemetry.push_max_layers", t.push_max_layers)
    if not isinstance(t.metric_names, Mapping):
        raise ConfigError("telemetry.metric_names: expected a table")
    custom_ok = {"waiting", "running"} <= t.metric_names.keys()
    for key, value in t.metric_names.items():
        if key not in TELEMETRY_METRIC_KEYS or not isinstance(value, str) or not value:
            raise ConfigError(
                f"telemetry.metric_names.{key}: keys {', '.join(TELEMETRY_METRIC_KEYS)}, "
                "each a metric name"
            )
    if t.push_listen:
        host, sep, port = t.push_listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"telemetry.push_listen: expected host:port, got {t.push_listen!r}")
        _port("telemetry.push_listen", int(port))
    for i, rep in enumerate(cfg.replicas):
        path = f"replicas[{i}]"
        if rep.telemetry and rep.telemetry not in TELEMETRY_SOURCES:
            raise ConfigError(f"{path}.telemetry: one of {', '.join(TELEMETRY_SOURCES)}")
        if rep.engine and rep.engine not in TELEMETRY_ENGINES:
            raise ConfigError(f"{path}.engine: one of {', '.join(TELEMETRY_ENGINES)}")
        if rep.metrics_path and not rep.metrics_path.startswith("/"):
            raise ConfigError(f"{path}.metrics_path: must start with '/'")
        if (rep.engine or t.engine) == "custom" and not custom_ok:
            raise ConfigError("telemetry.metric_names: engine custom needs waiting and running")
        if (rep.telemetry or t.source) == "push" and not rep.push_token:
            raise ConfigError(f"{path}.push_token_env: telemetry push needs a token")
    tokens = [r.push_token for r in cfg.replicas if r.push_token]
    if len(tokens) != len(set(tokens)):
        # The token names the replica: one shared by two could report for both.
        raise ConfigError("replicas: two replicas share a push token")


def from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build and validate a Config from parsed TOML plus environment overrides."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for var, (section, key) in ENV_OVERRIDES.items():
        value = (env if env is not None else os.environ).get(var)
        if value is None or value == "":
            continue
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        table[key] = int(value) if key == "port" and value.isdigit() else value
    known = {*_SECTIONS, "replicas", "routing"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(known))})")
    sections = {
        name: _section(name, cls, data[name]) for name, cls in _SECTIONS.items() if name in data
    }
    raw_replicas = data.get("replicas", [])
    if not isinstance(raw_replicas, list):
        raise ConfigError("replicas: expected an array of tables ([[replicas]])")
    replicas = tuple(_replica(i, r) for i, r in enumerate(raw_replicas))
    routing = _routing(data["routing"]) if "routing" in data else RoutingConfig()
    cfg = Config(replicas=replicas, routing=routing, **sections)
    _validate(cfg)
    return cfg


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(data, env)
