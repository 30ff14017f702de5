"""A simulated vLLM/SGLang replica: the test double the gateway is tested against.

It speaks the OpenAI-compatible HTTP API the way vLLM does (SSE streaming,
``usage``, ``/v1/models``, ``/metrics`` with vLLM or SGLang metric names, the
ORCA ``endpoint-load-metrics`` response header, ``--api-key``), delegates token
timing to a pluggable :class:`~loadtest.backend.GenerationBackend`, and adds
what a real engine cannot give a test: faults on demand and counters to read
back. Several replicas can share one process and one event loop
(``--port A --port B``) so that, on a 2-core machine, they do not fight the
gateway for CPU.

Output is deterministic: token ``i`` of every response is the text
``"t{i} "``, so a test can byte-compare what a client received with what the
replica produced (each request's record also carries the SHA-256 of the
uncompressed response body it sent).

Per-request faults: header ``x-sim-fault``
-------------------------------------------
Grammar: ``x-sim-fault: key=value[;key=value]...`` (whitespace around keys
and values is ignored; an unknown key or a bad value is answered with 400, so
a typo in a test cannot silently disable the fault it meant to inject).

- ``status=N``: answer status N (400..599) with an OpenAI-shaped error body,
  before any body.
- ``hang_before_headers=1``: accept the request, never answer, until the client
  goes away (counted as ``aborted``).
- ``chunks=N``: stop after N output-token SSE events (non-streaming: after N
  tokens, before the headers), then ``after=``:

  - ``die``: ``os._exit(1)`` when running as a process (every replica in that
    process dies, so use one process per replica for crash tests); in-process
    (``run_replica``), the connection is closed abruptly instead.
  - ``hang``: stop sending but keep the socket open until the client leaves.
  - ``finish`` (the default): end normally, ``[DONE]`` included (a short output).
- ``chunk_interval=S``: at least S seconds between token events for this
  request (the backend's own pace still applies when it is slower).
- ``delay=S``: sleep S seconds before anything else (the non-streaming "long
  generation" case: no headers until the delay is over).
- ``drain_marker=1``: answer 503 with header ``x-dp-draining: 1`` and error
  code ``"draining"``.
- ``gzip=1``: gzip the response body (``Content-Encoding: gzip``); a stream is
  flushed after every event, so it still streams.
- ``hop_headers=1``: add hop-by-hop response headers (``Keep-Alive: timeout=5``,
  ``Proxy-Authenticate: x``, ``Upgrade: h2c``, ``X-Hop: 1`` with
  ``Connection: X-Hop``) so a gateway's hop-by-hop filter can be tested.
- ``echo=1``: nothing special (headers are always recorded).

A ``/v1`` request is checked in this order: API key (401), flapping or not
ready (503), ``delay``, ``hang_before_headers``, drain (knob or marker, 503),
status (the process knob, else the header's), body validation (400, or 404
for an unknown model), then generation. A backend that refuses the job
(e.g. a prompt larger than the modelled KV cache) gets 400 for a
``ValueError``, else 500, or, once the stream's headers are out, an in-band
``data: {"error": ...}`` event then ``[DONE]``, as vLLM does.

Other request headers: ``x-request-id`` becomes the response ``id``
(``chatcmpl-<id>``) and is echoed back; ``x-sim-domain`` is the MoE domain
passed to the backend (``Job.domain``); ``endpoint-load-metrics-format``
asks for the ORCA header.

Process knobs (CLI flags, or at runtime: ``POST /_sim/config`` with a JSON
object; ``GET /_sim/config`` reads them back):

- ``not_ready_for`` (s): for that long after start (or after the POST),
  ``/health`` answers 200 but ``/v1/*`` answers 503: a replica still loading.
- ``flap_period`` (s): alternate OK and 503-for-everything (``/health``
  included) every period, starting OK; 0 disables.
- ``speed``: backend slow-down factor (1 normal, 10 = ten times slower).
- ``status``: answer every ``/v1/*`` request with this status (null clears).
- ``drain``: answer every ``/v1/*`` request with the draining 503 until cleared.

Test support endpoints: ``GET /_sim/stats`` (``started``, ``completed``,
``aborted``, ``errors``, ``in_progress``, ``health_checks``; every request
to a ``/v1`` generation or embeddings route, 401s included, ends as exactly
one of completed, aborted or errors), ``GET /_sim/requests`` (the last 1000
of those requests, with the headers as received; ``/v1/models``, ``/health``
and ``/metrics`` are not recorded), ``POST /_sim/reset``. These are never
behind the API key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import math
import os
import signal
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from loadtest.backend import BackendLoad, GenerationBackend, Job, PacedBackend
from policies.prefix import (
    block_hashes,
    chat_prompt_text,
    completion_prompt_text,
    estimate_tokens,
)

FAULT_HEADER = "x-sim-fault"
# The MoE expert-popularity domain of a request (Conversation.domain), passed
# to the backend as Job.domain; only the engine model's MoE layer uses it.
DOMAIN_HEADER = "x-sim-domain"
DRAIN_HEADER = "x-dp-draining"
ORCA_REQUEST_HEADER = "endpoint-load-metrics-format"
ORCA_RESPONSE_HEADER = "endpoint-load-metrics"

# vLLM's OpenAI server reports this in /v1/models; some clients check it.
OWNED_BY = "vllm"
# Requests kept for GET /_sim/requests: enough for any single test, bounded so
# a long load test does not grow the replica's memory.
REQUEST_LOG_SIZE = 1000
# Embedding vectors are tiny: their content is irrelevant to routing tests.
EMBEDDING_DIM = 8
# A hanging request (hang_before_headers, after=hang) waits this long at most,
# so that a test that forgets to disconnect cannot pin a task forever.
MAX_HANG_S = 3600.0
# On shutdown, in-flight handlers get this long to finish (aiohttp then waits
# up to as long again before the connection is closed under them): replicas
# are test doubles, and hanging requests must not delay a test's exit.
SHUTDOWN_TIMEOUT_S = 0.5

MetricsFlavour = Literal["vllm", "sglang"]
AfterAction = Literal["die", "hang", "finish"]


# ---------------------------------------------------------------------------
# configuration


@dataclass
class ReplicaConfig:
    """Everything that defines one simulated replica.

    ``models`` are the names served (the first is the one in metric labels,
    like vLLM's ``--served-model-name`` list). ``exit_on_die`` is set by
    :func:`main` only: a ``die`` fault then really exits the process. With
    ``engine`` set, tokens are timed by the engine model (continuous batching,
    KV cache, prefix reuse, MoE experts) and ``token_interval_s``, ``ttft_s``
    and ``max_running`` are ignored.
    """

    name: str = "replica"
    models: tuple[str, ...] = ("sim-model",)
    token_interval_s: float = 0.01
    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0  # paced model: uncached prompt adds to TTFT
    default_max_tokens: int = 16
    # Prompt + output tokens beyond this are refused with vLLM's 400; 128k is
    # a common long-context setting (Llama 3.1).
    max_model_len: int = 131_072
    metrics: MetricsFlavour = "vllm"
    not_ready_for_s: float = 0.0
    flap_period_s: float = 0.0
    max_running: int | None = None
    api_key: str | None = None
    speed: float = 1.0
    status: int | None = None  # force every /v1 answer to this status
    drain: bool = False
    exit_on_die: bool = False
    # The engine model instead of PacedBackend (see make_backend): a preset name
    # of loadtest.engine.preset ("llama2-7b", "llama2-7b+moe", ...).
    engine: str | None = None
    engine_tp: int = 1
    engine_pp: int = 1
    engine_interconnect: str = "nvlink"
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a replica serves at least one model")
        if self.metrics not in ("vllm", "sglang"):
            raise ValueError(f"metrics flavour must be vllm or sglang, not {self.metrics!r}")
        if not 1 <= self.default_max_tokens <= self.max_model_len:
            raise ValueError("default_max_tokens must be in 1..max_model_len")
        if self.token_interval_s < 0 or self.ttft_s < 0:
            raise ValueError("token_interval_s and ttft_s must be >= 0")
        if self.not_ready_for_s < 0 or self.flap_period_s < 0:
            raise ValueError("not_ready_for_s and flap_period_s must be >= 0")
        if self.speed <= 0:
            raise ValueError("speed must be > 0")
        if self.status is not None:
            _check_status(self.status)


def _check_status(status: int) -> int:
    if not 400 <= status <= 599:
        raise ValueError(f"status must be in 400..599, not {status}")
    return status


# ---------------------------------------------------------------------------
# per-request faults


class FaultError(ValueError):
    """A malformed ``x-sim-fault`` header (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Fault:
    status: int | None = None
    hang_before_headers: bool = False
    chunks: int | None = None
    after: AfterAction = "finish"
    chunk_interval: float | None = None
    delay: float = 0.0
    drain_marker: bool = False
    gzip: bool = False
    hop_headers: bool = False
    echo: bool = False


NO_FAULT = Fault()


def _flag(value: str) -> bool:
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise FaultError(f"expected 1 or 0, got {value!r}")


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise FaultError(f"expected seconds, got {value!r}") from None
    if not 0 <= s <= MAX_HANG_S:
        raise FaultError(f"seconds out of range: {value!r}")
    return s


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FaultError(f"expected an integer, got {value!r}") from None


def parse_fault(header: str | None) -> Fault:
    """Parse an ``x-sim-fault`` header value (grammar in the module docstring)."""
    if not header or not header.strip():
        return NO_FAULT
    values: dict[str, Any] = {}
    for item in header.split(";"):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep:
            raise FaultError(f"expected key=value, got {item.strip()!r}")
        if key == "status":
            try:
                values["status"] = _check_status(_int(raw))
            except ValueError as e:
                raise FaultError(str(e)) from None
        elif key == "chunks":
            n = _int(raw)
            if n < 0:
                raise FaultError("chunks must be >= 0")
            values["chunks"] = n
        elif key == "after":
            if raw not in ("die", "hang", "finish"):
                raise FaultError(f"after must be die, hang or finish, not {raw!r}")
            values["after"] = raw
        elif key in ("chunk_interval", "delay"):
            values[key] = _seconds(raw)
        elif key in ("hang_before_headers", "drain_marker", "gzip", "hop_headers", "echo"):
            values[key] = _flag(raw)
        else:
            raise FaultError(f"unknown fault key {key!r}")
    return Fault(**values)


# ---------------------------------------------------------------------------
# state and counters


@dataclass(slots=True)
class RequestRecord:
    """One /v1 request as the replica saw it; served by GET /_sim/requests."""

    id: str
    path: str
    headers: dict[str, str]
    body_len: int = 0
    t_start: float = 0.0
    t_end: float | None = None
    outcome: str | None = None  # ok | aborted | error | died | None (in progress)
    status: int | None = None
    chunks: int = 0  # token events (streaming) or tokens (non-streaming) produced
    resp_bytes: int = 0  # uncompressed response body bytes sent
    resp_sha256: str | None = None
    peer: str | None = None  # client address:port, to tell connections apart
    hasher: Any = None  # the running SHA-256 of the body; not exported

    def as_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del d["hasher"]
        d["headers"] = dict(self.headers)
        return d


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    aborted: int = 0
    errors: int = 0
    health_checks: int = 0

    def as_json(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d["in_progress"] = self.started - self.completed - self.aborted - self.errors
        return d


class ReplicaState:
    """Runtime state of one replica: knobs, counters, request log, backend."""

    def __init__(
        self,
        cfg: ReplicaConfig,
        backend: GenerationBackend,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.clock = clock
        self.t0 = clock()
        self.not_ready_until = self.t0 + cfg.not_ready_for_s
        self.flap_period = cfg.flap_period_s
        self.flap_t0 = self.t0
        self.speed = cfg.speed
        self.status = cfg.status
        self.drain = cfg.drain
        self.stats = Stats()
        self.requests: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)
        self._ids = itertools.count(1)
        self.created = int(time.time())
        backend.set_speed(cfg.speed)

    def next_id(self) -> int:
        return next(self._ids)

    def flapping_down(self) -> bool:
        if self.flap_period <= 0:
            return False
        return int((self.clock() - self.flap_t0) / self.flap_period) % 2 == 1

    def not_ready(self) -> bool:
        return self.clock() < self.not_ready_until

    def begin(self, request: web.Request) -> RequestRecord:
        self.stats.started += 1
        rid = request.headers.get("x-request-id") or f"{self.cfg.name}-{self.next_id()}"
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            # A repeated header (two X-Forwarded-For lines) is kept as one
            # comma-joined value, its meaning under RFC 9110 section 5.3.
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec = RequestRecord(
            id=rid,
            path=request.path,
            headers=headers,
            t_start=time.time(),
            peer=f"{peer[0]}:{peer[1]}" if peer else None,
        )
        self.requests.append(rec)
        return rec

    def finish(self, rec: RequestRecord, outcome: str, status: int | None = None) -> None:
        if rec.outcome is not None:
            return  # settled once: a late cancel after a die must not count twice
        rec.outcome = outcome
        rec.t_end = time.time()
        if rec.hasher is not None:
            rec.resp_sha256 = rec.hasher.hexdigest()
            rec.hasher = None
        if status is not None:
            rec.status = status
        if outcome == "ok":
            self.stats.completed += 1
        elif outcome == "aborted":
            self.stats.aborted += 1
        else:
            self.stats.errors += 1

    def reset(self) -> None:
        """Zero the counters and the log; requests still in flight stay counted
        as started, so when they settle ``in_progress`` returns to 0, not -n."""
        in_flight = self.stats.as_json()["in_progress"]
        self.stats = Stats(started=in_flight)
        self.requests.clear()

    def config_json(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "models": list(self.cfg.models),
            "not_ready_for": max(0.0, self.not_ready_until - self.clock()),
            "flap_period": self.flap_period,
            "speed": self.speed,
            "status": self.status,
            "drain": self.drain,
        }

    def apply_config(self, body: dict[str, Any]) -> None:
        """Validate all of a POST /_sim/config body, then apply it."""
        unknown = set(body) - {"not_ready_for", "flap_period", "speed", "status", "drain"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        updates: dict[str, Any] = {}
        for key in ("not_ready_for", "flap_period", "speed"):
            if key in body:
                v = body[key]
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                    raise ValueError(f"{key} must be a finite number >= 0")
                updates[key] = float(v)
        if updates.get("speed") == 0.0:
            raise ValueError("speed must be > 0")
        if "status" in body:
            s = body["status"]
            if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
                raise ValueError("status must be an integer or null")
            updates["status"] = None if s is None else _check_status(s)
        if "drain" in body:
            if not isinstance(body["drain"], bool):
                raise ValueError("drain must be true or false")
            updates["drain"] = body["drain"]
        now = self.clock()
        if "not_ready_for" in updates:
            self.not_ready_until = now + updates["not_ready_for"]
        if "flap_period" in updates:
            self.flap_period = updates["flap_period"]
            self.flap_t0 = now
        if "speed" in updates:
            self.speed = updates["speed"]
            self.backend.set_speed(self.speed)
        if "status" in updates:
            self.status = updates["status"]
        if "drain" in updates:
            self.drain = updates["drain"]


STATE_KEY = web.AppKey("replica_state", ReplicaState)


# ---------------------------------------------------------------------------
# responses


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_response(
    status: int,
    message: str,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped error, as vLLM sends it (``code`` defaults to the status)."""
    err_type = _ERROR_TYPES.get(status, "ServerError" if status >= 500 else "BadRequestError")
    body = {"error": {"message": message, "type": err_type, "code": code or status}}
    return web.json_response(body, status=status, headers=headers)


def draining_response() -> web.Response:
    return error_response(503, "replica is draining", code="draining", headers={DRAIN_HEADER: "1"})


def orca_header(fmt: str, load: BackendLoad) -> str | None:
    """vLLM's ORCA load report (``vllm/entrypoints/openai/orca_metrics.py``).

    vLLM reports ``kv_cache_usage_perc`` and ``num_requests_waiting`` as
    ``named_metrics``; we add ``num_requests_running`` so a gateway can rebuild
    the whole queue from the header alone. Unknown formats get no header, as
    in vLLM.
    """
    named = {
        "kv_cache_usage_perc": float(load.kv_usage),
        "num_requests_waiting": float(load.waiting),
        "num_requests_running": float(load.running),
    }
    f = fmt.strip().lower()
    if f == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in named.items())
    if f == "json":
        return "JSON " + json.dumps({"named_metrics": named})
    return None


_HOP_HEADERS = {
    "Keep-Alive": "timeout=5",
    "Proxy-Authenticate": "x",
    "Upgrade": "h2c",
    "X-Hop": "1",
    "Connection": "X-Hop",
}


def _token_text(i: int) -> str:
    return f"t{i} "


class _Body:
    """Counts, hashes and optionally gzips the response body as it is written."""

    def __init__(self, rec: RequestRecord, use_gzip: bool) -> None:
        self.rec = rec
        self._sha = rec.hasher = hashlib.sha256()  # digested once, when the record settles
        # wbits 31 = gzip container; a stream is sync-flushed per event below.
        self._z = zlib.compressobj(wbits=31) if use_gzip else None

    def encode(self, data: bytes, final: bool = False) -> bytes:
        self.rec.resp_bytes += len(data)
        self._sha.update(data)
        if self._z is None:
            return data
        mode = zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH
        return self._z.compress(data) + self._z.flush(mode)


# ---------------------------------------------------------------------------
# request parsing


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Generation:
    kind: Literal["chat", "completion"]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    prompt_text: str
    prompt_tokens: int
    block_hashes: tuple[int, ...] = field(default_factory=tuple)


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "request body must be a JSON object")
    return body


def _resolve_model(cfg: ReplicaConfig, body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return cfg.models[0]
    if not isinstance(model, str):
        raise BadRequest(400, "model must be a string")
    if model not in cfg.models:
        raise BadRequest(404, f"The model `{model}` does not exist.")
    return model


def parse_generation(
    cfg: ReplicaConfig, body: dict[str, Any], kind: Literal["chat", "completion"]
) -> Generation:
    model = _resolve_model(cfg, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, "stream must be a boolean")
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(400, "max_tokens must be an integer >= 1")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest(400, "messages must be a list")
        text = chat_prompt_text(messages)
    else:
        if "prompt" not in body:
            raise BadRequest(400, "prompt is required")
        text = completion_prompt_text(body["prompt"])
    prompt_tokens = estimate_tokens(len(text))
    if prompt_tokens + max_tokens > cfg.max_model_len:
        # vLLM's context-length refusal: the classic client error (M4).
        raise BadRequest(
            400,
            f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
            f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
            f"messages, {max_tokens} in the completion). Please reduce the length of the "
            "messages or completion.",
        )
    return Generation(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        prompt_text=text,
        prompt_tokens=prompt_tokens,
        block_hashes=block_hashes(text),
    )


# ---------------------------------------------------------------------------
# handlers


async def _hang() -> None:
    """Wait until cancelled (client gone), at most MAX_HANG_S."""
    await asyncio.sleep(MAX_HANG_S)


async def _die(request: web.Request, state: ReplicaState, rec: RequestRecord) -> None:
    """Crash mid-response: process exit, or (in-process) an abrupt close."""
    state.finish(rec, "died")
    transport = request.transport
    if state.cfg.exit_on_die:
        # Let what was written reach the kernel first: the client must see the
        # N chunks, then the connection drop, as with a real engine crash.
        deadline = time.monotonic() + 1.0
        while (
            transport is not None
            and transport.get_write_buffer_size() > 0
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.001)
        sys.stdout.flush()
        os._exit(1)
    if transport is not None:
        transport.close()  # flushes what was written, then FIN: no chunk terminator
    await _hang()  # connection_lost cancels us


def _settle_pre_headers(
    state: ReplicaState, rec: RequestRecord, fault: Fault
) -> web.Response | None:
    """Process-wide knobs and header-time faults, in precedence order."""
    if state.drain or fault.drain_marker:
        state.finish(rec, "error", 503)
        return draining_response()
    if state.status is not None or fault.status is not None:
        status = state.status if state.status is not None else fault.status
        assert status is not None
        state.finish(rec, "error", status)
        return error_response(status, f"simulated error {status}")
    return None


def _check_gate(state: ReplicaState, rec: RequestRecord) -> web.Response | None:
    if state.flapping_down():
        state.finish(rec, "error", 503)
        return error_response(503, "replica is flapping (simulated)")
    if state.not_ready():
        state.finish(rec, "error", 503)
        return error_response(503, "replica is not ready yet (simulated loading)")
    return None


def _authorized(cfg: ReplicaConfig, request: web.Request) -> bool:
    if cfg.api_key is None:
        return True
    got = request.headers.get("Authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode())


def _unauthorized(state: ReplicaState, rec: RequestRecord) -> web.Response:
    # vLLM's exact answer, before reading the body. Recorded like any other
    # request, so a test can see what reached the replica without the key.
    state.finish(rec, "error", 401)
    return web.json_response({"error": "Unauthorized"}, status=401)


def _response_headers(state: ReplicaState, request: web.Request, fault: Fault) -> dict[str, str]:
    headers: dict[str, str] = {}
    fmt = request.headers.get(ORCA_REQUEST_HEADER)
    if fmt:
        value = orca_header(fmt, state.backend.load())
        if value is not None:
            headers[ORCA_RESPONSE_HEADER] = value
    rid = request.headers.get("x-request-id")
    if rid:
        headers["x-request-id"] = rid
    if fault.hop_headers:
        headers.update(_HOP_HEADERS)
    if fault.gzip:
        headers["Content-Encoding"] = "gzip"
    return headers


def _chunk(gen: Generation, rid: str, created: int, i: int | None, finish: str | None) -> bytes:
    choice: dict[str, Any]
    if gen.kind == "chat":
        delta: dict[str, Any] = {}
        if i == 0:
            delta["role"] = "assistant"
        delta["content"] = "" if i is None else _token_text(i)
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        text = "" if i is None else _token_text(i)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    payload = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": gen.model,
        "choices": [choice],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _Chunks:
    """SSE token events for one response, built from a per-request template.

    Serializing a whole chunk per token cost more than everything else the
    replica does per token; a middle token's event differs only in its text,
    so it is the template's head + text + tail. ``_chunk`` remains the one
    definition: the template is cut from its output, and the tests check the
    two agree byte for byte.
    """

    def __init__(self, gen: Generation, rid: str, created: int) -> None:
        self.gen, self.rid, self.created = gen, rid, created
        probe = _chunk(gen, rid, created, None, None).decode()
        # The text is the last string in the chunk (only null fields follow),
        # so the last '""' is it whatever an escaped request id contains.
        head, _, tail = probe.rpartition('""')
        self._head, self._tail = head.encode(), tail.encode()

    def event(self, i: int, finish: str | None) -> bytes:
        if i == 0 or finish is not None:
            return _chunk(self.gen, self.rid, self.created, i, finish)
        return self._head + f'"{_token_text(i)}"'.encode() + self._tail


def _usage(gen: Generation, n: int) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": gen.prompt_tokens + n,
    }


class BackendError(Exception):
    """The backend refused or failed a job (answered 400 for ValueError, else 500)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.status = 400 if isinstance(cause, ValueError) else 500


async def _backend_steps(steps: AsyncIterator[int]) -> AsyncGenerator[int, None]:
    """The backend's steps, with its failures (not ours, not cancellation) wrapped."""
    while True:
        try:
            new = await anext(steps)
        except StopAsyncIteration:
            return
        except Exception as e:
            raise BackendError(e) from e
        yield new


async def _tokens(
    state: ReplicaState, job: Job, limit: int, chunk_interval: float | None
) -> AsyncGenerator[int, None]:
    """Token indices as the backend produces them, paced by ``chunk_interval``.

    The backend's iterator is closed on every exit (limit reached, client
    gone, die/hang), so its slot and cache accounting are freed at once and
    not whenever the garbage collector finalizes it.
    """
    produced = 0
    last = 0.0
    steps = state.backend.generate(job)
    try:
        async for new in _backend_steps(steps):
            for _ in range(max(0, new)):
                if produced >= limit:
                    return
                if chunk_interval and produced:
                    wait = last + chunk_interval - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                last = time.monotonic()
                yield produced
                produced += 1
            if produced >= limit:
                return
    finally:
        aclose = getattr(steps, "aclose", None)
        if aclose is not None:
            await aclose()


async def _generate(
    request: web.Request, kind: Literal["chat", "completion"]
) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    rec = state.begin(request)
    if not _authorized(state.cfg, request):
        return _unauthorized(state, rec)
    try:
        return await _generate_inner(request, state, rec, kind)
    except asyncio.CancelledError:
        state.finish(rec, "aborted")
        raise
    except ConnectionResetError:
        # The client went away mid-write. Return instead of raising: aiohttp
        # drops a response to a closed connection quietly, while an exception
        # is logged as an error with a traceback (noise for an everyday abort).
        state.finish(rec, "aborted")
        return web.Response(status=499)
    finally:
        if rec.outcome is None:
            state.finish(rec, "error", 500)


async def _generate_inner(
    request: web.Request,
    state: ReplicaState,
    rec: RequestRecord,
    kind: Literal["chat", "completion"],
) -> web.StreamResponse:
    raw = await request.read()
    rec.body_len = len(raw)
    try:
        fault = parse_fault(request.headers.get(FAULT_HEADER))
    except FaultError as e:
        state.finish(rec, "error", 400)
        return error_response(400, f"bad {FAULT_HEADER} header: {e}")
    gate = _check_gate(state, rec)
    if gate is not None:
        return gate
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.hang_before_headers:
        await _hang()
    early = _settle_pre_headers(state, rec, fault)
    if early is not None:
        return early
    try:
        gen = parse_generation(state.cfg, _parse_json_object(raw), kind)
    except BadRequest as e:
        state.finish(rec, "error", e.status)
        return error_response(e.status, e.message)

    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    rid = prefix + rec.id
    job = Job(
        request_id=rec.id,
        prompt_text=gen.prompt_text,
        prompt_tokens=gen.prompt_tokens,
        block_hashes=gen.block_hashes,
        max_tokens=gen.max_tokens,
        domain=request.headers.get(DOMAIN_HEADER) or None,
    )
    limit = gen.max_tokens if fault.chunks is None else min(gen.max_tokens, fault.chunks)
    cut = fault.chunks is not None and fault.chunks < gen.max_tokens
    body = _Body(rec, fault.gzip)
    created = state.created

    if not gen.stream:
        n = 0
        try:
            async with contextlib.aclosing(
                _tokens(state, job, limit, fault.chunk_interval)
            ) as toks:
                async for _ in toks:
                    n += 1
                    rec.chunks = n
        except BackendError as e:
            state.finish(rec, "error", e.status)
            return error_response(e.status, str(e))
        if cut and fault.after == "die":
            await _die(request, state, rec)
        if cut and fault.after == "hang":
            await _hang()
        finish_reason = "length" if n >= gen.max_tokens else "stop"
        text = "".join(_token_text(i) for i in range(n))
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        payload = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": gen.model,
            "choices": [choice],
            "usage": _usage(gen, n),
        }
        data = body.encode(json.dumps(payload, separators=(",", ":")).encode(), final=True)
        headers = _response_headers(state, request, fault)
        state.finish(rec, "ok", 200)
        return web.Response(body=data, content_type="application/json", headers=headers)

    resp = web.StreamResponse(headers=_response_headers(state, request, fault))
    resp.content_type = "text/event-stream"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    rec.status = 200
    n = 0
    chunks = _Chunks(gen, rid, created)
    try:
        async with contextlib.aclosing(_tokens(state, job, limit, fault.chunk_interval)) as toks:
            async for i in toks:
                reason = "length" if i + 1 == gen.max_tokens else None
                await resp.write(body.encode(chunks.event(i, reason)))
                n += 1
                rec.chunks = n
    except BackendError as e:
        # Headers are gone: report in-band, then end the stream, as vLLM does.
        err = {"error": {"message": str(e), "type": _ERROR_TYPES[e.status], "code": e.status}}
        await resp.write(body.encode(b"data: " + json.dumps(err).encode() + b"\n\n"))
        await resp.write(body.encode(b"data: [DONE]\n\n", final=True))
        await resp.write_eof()
        state.finish(rec, "error")  # the HTTP status stays the 200 already sent
        return resp
    if cut and fault.after == "die":
        await _die(request, state, rec)
    if cut and fault.after == "hang":
        await _hang()
    if n < gen.max_tokens:
        # Cut short by after=finish (or a backend that stopped early): a
        # normal end still carries a finish_reason.
        await resp.write(body.encode(_chunk(gen, rid, created, None, "stop")))
    if gen.include_usage:
        usage_chunk: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": gen.model,
            "choices": [],
            "usage": _usage(gen, n),
        }
        await resp.write(
            body.encode(
                b"data: " + json.dumps(usage_chunk, separators=(",", ":")).encode() + b"\n\n"
            )
        )
    await resp.write(body.encode(b"data: [DONE]\n\n", final=True))
    await resp.write_eof()
    state.finish(rec, "ok", 200)
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


def _embedding(text: str) -> list[float]:
    """A small deterministic unit-ish vector derived from the text."""
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    raw = struct.unpack(f"<{EMBEDDING_DIM}h", seed[: 2 * EMBEDDING_DIM])
    return [round(v / 32768.0, 6) for v in raw]


async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    rec = state.begin(request)
    if not _authorized(state.cfg, request):
        return _unauthorized(state, rec)
    try:
        raw = await request.read()
        rec.body_len = len(raw)
        fault = parse_fault(request.headers.get(FAULT_HEADER))
        gate = _check_gate(state, rec) or _settle_pre_headers(state, rec, fault)
        if gate is not None:
            return gate
        body = _parse_json_object(raw)
        model = _resolve_model(state.cfg, body)
        inp = body.get("input")
        items = [inp] if isinstance(inp, str) else inp
        if not isinstance(items, list) or not items:
            raise BadRequest(400, "input must be a string or a non-empty list")
        texts = [x if isinstance(x, str) else json.dumps(x) for x in items]
        tokens = sum(estimate_tokens(len(t)) for t in texts)
        payload = {
            "object": "list",
            "model": model,
            "data": [
                {"object": "embedding", "index": i, "embedding": _embedding(t)}
                for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        state.finish(rec, "ok", 200)
        return web.json_response(payload, headers=_response_headers(state, request, fault))
    except FaultError as e:
        state.finish(rec, "error", 400)
        return error_response(400, f"bad {FAULT_HEADER} header: {e}")
    except BadRequest as e:
        state.finish(rec, "error", e.status)
        return error_response(e.status, e.message)
    except asyncio.CancelledError:
        state.finish(rec, "aborted")
        raise
    finally:
        if rec.outcome is None:
            state.finish(rec, "error", 500)


async def models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if not _authorized(state.cfg, request):
        return web.json_response({"error": "Unauthorized"}, status=401)
    data = [
        {
            "id": m,
            "object": "model",
            "created": state.created,
            "owned_by": OWNED_BY,
            "root": state.cfg.models[0],
            "parent": None,
            "max_model_len": state.cfg.max_model_len,
        }
        for m in state.cfg.models
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.stats.health_checks += 1
    if state.flapping_down():
        return web.Response(status=503, text="flapping")
    return web.Response(status=200)


# ---------------------------------------------------------------------------
# /metrics


def _fmt(v: float) -> str:
    return repr(float(v))


def render_metrics(cfg: ReplicaConfig, load: BackendLoad) -> str:
    """Prometheus text exposition with vLLM's or SGLang's metric names.

    Names checked against the sources: vLLM v1 ``vllm/v1/metrics/loggers.py``
    (gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
    ``vllm:kv_cache_usage_perc``; counters ``vllm:prefix_cache_queries`` and
    ``vllm:prefix_cache_hits``, exposed with ``_total``, in tokens;
    ``vllm:num_preemptions``; labels ``model_name`` and ``engine``, the DP
    rank) and SGLang ``python/sglang/srt/metrics/collector.py`` (gauges
    ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
    ``sglang:token_usage``, ``sglang:cache_hit_rate``; label ``model_name``).
    """
    model = cfg.models[0].replace("\\", "\\\\").replace('"', '\\"')
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, str, float]]) -> None:
        # prometheus_client (which vLLM and SGLang use) names a counter's
        # HELP/TYPE lines with the ``_total`` suffix too; parsers rely on it.
        declared = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {declared} {help_}")
        lines.append(f"# TYPE {declared} {kind}")
        for suffix, labels, value in samples:
            lines.append(f"{name}{suffix}{{{labels}}} {_fmt(value)}")

    if cfg.metrics == "vllm":
        lab = f'model_name="{model}",engine="0"'
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [("", lab, load.running)],
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [("", lab, load.waiting)],
        )
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [("", lab, load.kv_usage)],
        )
        metric(
            "vllm:prefix_cache_queries",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            [("_total", lab, load.prefix_queries)],
        )
        metric(
            "vllm:prefix_cache_hits",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            [("_total", lab, load.prefix_hits)],
        )
        metric(
            "vllm:num_preemptions",
            "counter",
            "Cumulative number of preemption from the engine.",
            [("_total", lab, load.preemptions)],
        )
    else:
        lab = f'model_name="{model}"'
        hit_rate = load.prefix_hits / load.prefix_queries if load.prefix_queries else 0.0
        metric(
            "sglang:num_running_reqs",
            "gauge",
            "The number of running requests.",
            [("", lab, load.running)],
        )
        metric(
            "sglang:num_queue_reqs",
            "gauge",
            "The number of requests in the waiting queue.",
            [("", lab, load.waiting)],
        )
        metric("sglang:token_usage", "gauge", "The token usage.", [("", lab, load.kv_usage)])
        metric(
            "sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.", [("", lab, hit_rate)]
        )
    if load.expert_tokens:
        metric(
            "dp_sim:expert_tokens",
            "counter",
            "Tokens routed to each expert (simulated).",
            [
                ("_total", f'model_name="{model}",expert="{i}"', v)
                for i, v in enumerate(load.expert_tokens)
            ],
        )
    if load.expert_overflow:
        metric(
            "dp_sim:expert_overflow",
            "counter",
            "Tokens dropped by each expert's capacity limit (simulated).",
            [
                ("_total", f'model_name="{model}",expert="{i}"', v)
                for i, v in enumerate(load.expert_overflow)
            ],
        )
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    text = render_metrics(state.cfg, state.backend.load())
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


# ---------------------------------------------------------------------------
# /_sim control


async def sim_stats(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE_KEY].stats.as_json())


async def sim_requests(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    return web.json_response([r.as_json() for r in state.requests])


async def sim_reset(request: web.Request) -> web.StreamResponse:
    request.app[STATE_KEY].reset()
    return web.json_response({"ok": True})


async def sim_config_get(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE_KEY].config_json())


async def sim_config_post(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        body = _parse_json_object(await request.read())
        state.apply_config(body)
    except BadRequest as e:
        return error_response(e.status, e.message)
    except ValueError as e:
        return error_response(400, str(e))
    return web.json_response(state.config_json())


# ---------------------------------------------------------------------------
# app, in-process runner, CLI


def make_backend(cfg: ReplicaConfig) -> GenerationBackend:
    """The backend a config asks for: the engine model, or PacedBackend.

    The engine modules are imported only when asked for, so fault tests and
    the benchmark do not pay for loading profiles.
    """
    if cfg.engine is None:
        return PacedBackend(
            cfg.token_interval_s, cfg.ttft_s, cfg.max_running, cfg.prefill_tokens_per_s
        )
    import random

    from loadtest.engine import Engine, preset
    from loadtest.engine_backend import EngineBackend

    engine_cfg = preset(
        cfg.engine,
        tp=cfg.engine_tp,
        pp=cfg.engine_pp,
        interconnect=cfg.engine_interconnect,
        **cfg.engine_overrides,
    )
    backend: GenerationBackend = EngineBackend(Engine(engine_cfg, random.Random(cfg.seed)))
    return backend


def create_replica_app(
    cfg: ReplicaConfig, backend: GenerationBackend | None = None
) -> web.Application:
    """The aiohttp app of one replica; ``backend`` defaults to :func:`make_backend`."""
    if backend is None:
        backend = make_backend(cfg)
    app = web.Application()
    app[STATE_KEY] = ReplicaState(cfg, backend)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/_sim/stats", sim_stats)
    app.router.add_get("/_sim/requests", sim_requests)
    app.router.add_post("/_sim/reset", sim_reset)
    app.router.add_get("/_sim/config", sim_config_get)
    app.router.add_post("/_sim/config", sim_config_post)
    return app


def _runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that goes away cancels its handler at
    # once, which is how "aborted" is detected promptly (and how a real
    # engine frees the request). access_log off: tests and demos read counters.
    return web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )


@contextlib.asynccontextmanager
async def run_replica(
    cfg: ReplicaConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    backend: GenerationBackend | None = None,
) -> AsyncIterator[tuple[str, ReplicaState]]:
    """Serve one replica in the current event loop; yields ``(url, state)``."""
    app = create_replica_app(cfg, backend)
    runner = _runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = _bound_port(runner)
        yield f"http://{host}:{bound}", app[STATE_KEY]
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    addrs = runner.addresses
    if not addrs:
        raise RuntimeError("replica did not bind")
    return int(addrs[0][1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router replica",
        description="Run simulated vLLM/SGLang replica(s); one --port per replica, one loop.",
    )
    p.add_argument(
        "--port",
        type=int,
        action="append",
        required=True,
        help="port to serve a replica on (repeat for more; 0 = any free port)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        help="served model name (repeatable; default sim-model)",
    )
    p.add_argument(
        "--name", help="replica name (default host:port; suffixed -i with several ports)"
    )
    p.add_argument("--token-interval", type=float, default=0.01, help="seconds per output token")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    p.add_argument(
        "--prefill-rate",
        type=float,
        default=0.0,
        help="tokens/s: uncached prompt tokens add to TTFT (paced model; 0 = fixed TTFT)",
    )
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens when not requested")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=131_072,
        help="prompt + output token limit (vLLM's context-length 400 beyond it)",
    )
    p.add_argument(
        "--metrics", choices=("vllm", "sglang"), default="vllm", help="metric names on /metrics"
    )
    p.add_argument(
        "--not-ready-for",
        type=float,
        default=0.0,
        metavar="S",
        help="for S seconds /health is 200 but /v1/* answers 503 (loading)",
    )
    p.add_argument(
        "--flap-period",
        type=float,
        default=0.0,
        metavar="S",
        help="alternate OK and 503-for-everything every S seconds",
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=None,
        metavar="N",
        help="at most N requests generate at once; the rest wait (FIFO)",
    )
    p.add_argument("--speed", type=float, default=1.0, help="slow-down factor (10 = 10x slower)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    e = p.add_argument_group("engine model (instead of the paced model)")
    e.add_argument(
        "--engine",
        metavar="PRESET",
        help="loadtest.engine preset, e.g. llama2-7b, llama2-70b, llama2-7b+moe",
    )
    e.add_argument("--engine-tp", type=int, default=1)
    e.add_argument("--engine-pp", type=int, default=1)
    e.add_argument("--engine-interconnect", default="nvlink", choices=("nvlink", "pcie5"))
    e.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an EngineConfig field (value parsed as JSON if it can be)",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=0,
        help="engine RNG seed; replica i of this process uses seed + i",
    )
    return p


def _engine_overrides(opts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in opts:
        key, sep, raw = opt.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-opt expects KEY=VALUE, got {opt!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def configs_from_args(args: argparse.Namespace) -> list[ReplicaConfig]:
    ports: list[int] = args.port
    overrides = _engine_overrides(args.engine_opt)
    cfgs = []
    for i, port in enumerate(ports):
        if args.name:
            name = args.name if len(ports) == 1 else f"{args.name}-{i}"
        else:
            name = f"{args.host}:{port}"  # port 0 is renamed once bound
        cfgs.append(
            ReplicaConfig(
                name=name,
                models=tuple(args.models or ("sim-model",)),
                token_interval_s=args.token_interval,
                ttft_s=args.ttft,
                prefill_tokens_per_s=args.prefill_rate,
                default_max_tokens=args.max_tokens,
                max_model_len=args.max_model_len,
                metrics=args.metrics,
                not_ready_for_s=args.not_ready_for,
                flap_period_s=args.flap_period,
                max_running=args.max_running,
                api_key=args.api_key,
                speed=args.speed,
                exit_on_die=True,
                engine=args.engine,
                engine_tp=args.engine_tp,
                engine_pp=args.engine_pp,
                engine_interconnect=args.engine_interconnect,
                engine_overrides=overrides,
                seed=args.seed + i,
            )
        )
    return cfgs


async def serve(host: str, ports: Sequence[int], cfgs: Sequence[ReplicaConfig]) -> None:
    """Serve every replica until SIGTERM/SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for port, cfg in zip(ports, cfgs, strict=True):
            app = create_replica_app(cfg)
            runner = _runner(app)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            bound = _bound_port(runner)
            state = app[STATE_KEY]
            if port == 0 and cfg.name == f"{host}:0":
                state.cfg = dataclasses.replace(cfg, name=f"{host}:{bound}")
            print(
                f"ready {bound} name={state.cfg.name} url=http://{host}:{bound} "
                f"metrics={cfg.metrics}",
                flush=True,
            )
        await stop.wait()
    finally:
        # Concurrently: each runner may wait SHUTDOWN_TIMEOUT_S for its
        # stragglers, and N replicas should not take N times as long to stop.
        await asyncio.gather(*(runner.cleanup() for runner in runners))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfgs = configs_from_args(args)
    except ValueError as e:
        print(f"dp-router replica: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        run: Callable[..., Any] = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(args.host, args.port, cfgs))
    except (ValueError, ImportError) as e:  # a bad --engine preset or option
        print(f"dp-router replica: {e}", file=sys.stderr)
        return 2
    return 0
