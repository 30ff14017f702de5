"""The simulated replica's HTTP server: state, counters, handlers, the aiohttp app.

What it speaks, its fault grammar, knobs and test endpoints are documented
in docs/replica.md. Token timing is a :class:`~loadtest.replica.model.ReplicaModel`'s
job (paced, or the engine model); bodies are built by
loadtest/replica/openai.py, load reports by loadtest/replica/metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import math
import os
import random
import sys
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from loadtest.replica import openai, push
from loadtest.replica.config import SimReplicaConfig
from loadtest.replica.faults import (
    FAULT_HEADER,
    MAX_HANG_S,
    Fault,
    FaultError,
    check_status,
    parse_fault,
)
from loadtest.replica.metrics import (
    ORCA_REQUEST_HEADER,
    ORCA_RESPONSE_HEADER,
    orca_header,
    render_metrics,
)
from loadtest.replica.model import Job, ReplicaModel
from loadtest.replica.openai import BadRequest, error_response

# The MoE expert-popularity domain of a request (Conversation.domain), passed
# to the model as Job.domain; only the engine model's MoE layer uses it.
DOMAIN_HEADER = "x-sim-domain"
# Requests kept for GET /_sim/requests: enough for any single test, bounded so
# a long load test does not grow the replica's memory.
REQUEST_LOG_SIZE = 1000
# On shutdown, in-flight handlers get this long to finish (aiohttp then waits
# up to as long again before the connection is closed under them): replicas
# are test doubles, and hanging requests must not delay a test's exit.
SHUTDOWN_TIMEOUT_S = 0.5


# ---------------------------------------------------------------------------
# state and counters


@dataclass(slots=True)
class ReceivedRequest:
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


class SimReplicaState:
    """Runtime state of one replica: knobs, counters, request log, model."""

    def __init__(
        self,
        cfg: SimReplicaConfig,
        model: ReplicaModel,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.clock = clock
        self.t0 = clock()
        self.not_ready_until = self.t0 + cfg.not_ready_for_s
        self.flap_period = cfg.flap_period_s
        self.flap_t0 = self.t0
        self.speed = cfg.speed
        self.status = cfg.status
        self.drain = cfg.drain
        self.stats = Stats()
        self.requests: deque[ReceivedRequest] = deque(maxlen=REQUEST_LOG_SIZE)
        self._ids = itertools.count(1)
        self.created = int(time.time())
        model.set_speed(cfg.speed)

    def next_id(self) -> int:
        return next(self._ids)

    def flapping_down(self) -> bool:
        if self.flap_period <= 0:
            return False
        return int((self.clock() - self.flap_t0) / self.flap_period) % 2 == 1

    def not_ready(self) -> bool:
        return self.clock() < self.not_ready_until

    def begin(self, request: web.Request) -> ReceivedRequest:
        self.stats.started += 1
        rid = request.headers.get("x-request-id") or f"{self.cfg.name}-{self.next_id()}"
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            # A repeated header (two X-Forwarded-For lines) is kept as one
            # comma-joined value, its meaning under RFC 9110 section 5.3.
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec = ReceivedRequest(
            id=rid,
            path=request.path,
            headers=headers,
            t_start=time.time(),
            peer=f"{peer[0]}:{peer[1]}" if peer else None,
        )
        self.requests.append(rec)
        return rec

    def finish(self, rec: ReceivedRequest, outcome: str, status: int | None = None) -> None:
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
            updates["status"] = None if s is None else check_status(s)
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
            self.model.set_speed(self.speed)
        if "status" in updates:
            self.status = updates["status"]
        if "drain" in updates:
            self.drain = updates["drain"]


STATE_KEY = web.AppKey("replica_state", SimReplicaState)


# ---------------------------------------------------------------------------
# responses


_HOP_HEADERS = {
    "Keep-Alive": "timeout=5",
    "Proxy-Authenticate": "x",
    "Upgrade": "h2c",
    "X-Hop": "1",
    "Connection": "X-Hop",
}


class _Body:
    """Counts, hashes and optionally gzips the response body as it is written."""

    def __init__(self, rec: ReceivedRequest, use_gzip: bool) -> None:
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
# handlers


async def _hang() -> None:
    """Wait until cancelled (client gone), at most MAX_HANG_S."""
    await asyncio.sleep(MAX_HANG_S)


async def _die(request: web.Request, state: SimReplicaState, rec: ReceivedRequest) -> None:
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
    state: SimReplicaState, rec: ReceivedRequest, fault: Fault
) -> web.Response | None:
    """Process-wide knobs and header-time faults, in precedence order."""
    if state.drain or fault.drain_marker:
        state.finish(rec, "error", 503)
        return openai.draining_response()
    if state.status is not None or fault.status is not None:
        status = state.status if state.status is not None else fault.status
        assert status is not None
        state.finish(rec, "error", status)
        return error_response(status, f"simulated error {status}")
    return None


def _check_gate(state: SimReplicaState, rec: ReceivedRequest) -> web.Response | None:
    if state.flapping_down():
        state.finish(rec, "error", 503)
        return error_response(503, "replica is flapping (simulated)")
    if state.not_ready():
        state.finish(rec, "error", 503)
        return error_response(503, "replica is not ready yet (simulated loading)")
    return None


def _authorized(cfg: SimReplicaConfig, request: web.Request) -> bool:
    if cfg.api_key is None:
        return True
    got = request.headers.get("Authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode())


def _unauthorized(state: SimReplicaState, rec: ReceivedRequest) -> web.Response:
    # vLLM's exact answer, before reading the body. Recorded like any other
    # request, so a test can see what reached the replica without the key.
    state.finish(rec, "error", 401)
    return web.json_response({"error": "Unauthorized"}, status=401)


def _response_headers(state: SimReplicaState, request: web.Request, fault: Fault) -> dict[str, str]:
    headers: dict[str, str] = {}
    fmt = request.headers.get(ORCA_REQUEST_HEADER)
    if fmt:
        value = orca_header(fmt, state.model.load())
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


class ModelError(Exception):
    """The model refused or failed a job (answered 400 for ValueError, else 500)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.status = 400 if isinstance(cause, ValueError) else 500


async def _model_steps(steps: AsyncIterator[int]) -> AsyncGenerator[int, None]:
    """The model's steps, with its failures (not ours, not cancellation) wrapped."""
    while True:
        try:
            new = await anext(steps)
        except StopAsyncIteration:
            return
        except Exception as e:
            raise ModelError(e) from e
        yield new


async def _tokens(
    state: SimReplicaState, job: Job, limit: int, chunk_interval: float | None
) -> AsyncGenerator[int, None]:
    """Token indices as the model produces them, paced by ``chunk_interval``.

    The model's iterator is closed on every exit (limit reached, client
    gone, die/hang), so its slot and cache accounting are freed at once and
    not whenever the garbage collector finalizes it.
    """
    produced = 0
    last = 0.0
    steps = state.model.generate(job)
    try:
        async for new in _model_steps(steps):
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


async def _generate(request: web.Request, kind: openai.Kind) -> web.StreamResponse:
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
    state: SimReplicaState,
    rec: ReceivedRequest,
    kind: openai.Kind,
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
        gen = openai.parse_generation(state.cfg, openai.parse_json_object(raw), kind)
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
    refusal = getattr(state.model, "refusal", None)
    why = refusal(job) if refusal is not None else None
    if why is not None:
        # Before any header, as vLLM refuses what its KV cache can never hold.
        state.finish(rec, "error", 400)
        return error_response(400, why)
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
        except ModelError as e:
            state.finish(rec, "error", e.status)
            return error_response(e.status, str(e))
        if cut and fault.after == "die":
            await _die(request, state, rec)
        if cut and fault.after == "hang":
            await _hang()
        data = body.encode(openai.completion_body(gen, rid, created, n), final=True)
        headers = _response_headers(state, request, fault)
        state.finish(rec, "ok", 200)
        return web.Response(body=data, content_type="application/json", headers=headers)

    resp = web.StreamResponse(headers=_response_headers(state, request, fault))
    resp.content_type = "text/event-stream"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    rec.status = 200
    n = 0
    chunks = openai.Chunks(gen, rid, created)
    try:
        async with contextlib.aclosing(_tokens(state, job, limit, fault.chunk_interval)) as toks:
            async for i in toks:
                reason = "length" if i + 1 == gen.max_tokens else None
                await resp.write(body.encode(chunks.event(i, reason)))
                n += 1
                rec.chunks = n
    except ModelError as e:
        # Headers are gone: report in-band, then end the stream, as vLLM does.
        await resp.write(body.encode(openai.in_band_error(e.status, str(e))))
        await resp.write(body.encode(b"data: [DONE]\n\n", final=True))
        await resp.write_eof()
        state.finish(rec, "error")  # the HTTP status stays the 200 already sent
        return resp
    if cut and fault.after == "die":
        await _die(request, state, rec)
    if cut and fault.after == "hang":
        await _hang()
    if n < gen.max_tokens:
        # Cut short by after=finish (or a model that stopped early): a
        # normal end still carries a finish_reason.
        await resp.write(body.encode(openai.chunk(gen, rid, created, None, "stop")))
    if gen.include_usage:
        await resp.write(body.encode(openai.usage_chunk(gen, rid, created, n)))
    await resp.write(body.encode(b"data: [DONE]\n\n", final=True))
    await resp.write_eof()
    state.finish(rec, "ok", 200)
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


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
        payload = openai.embeddings_body(state.cfg, openai.parse_json_object(raw))
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
    return web.json_response(openai.models_body(state.cfg, state.created))


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.stats.health_checks += 1
    if state.flapping_down():
        return web.Response(status=503, text="flapping")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    text = render_metrics(state.cfg.metrics, state.cfg.models[0], state.model.load())
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
        body = openai.parse_json_object(await request.read())
        state.apply_config(body)
    except BadRequest as e:
        return error_response(e.status, e.message)
    except ValueError as e:
        return error_response(400, str(e))
    return web.json_response(state.config_json())


# ---------------------------------------------------------------------------
# the app, and an in-process runner


def make_model(cfg: SimReplicaConfig) -> ReplicaModel:
    """The replica model a config asks for: the engine model, or the paced one.

    The engine package is imported only when asked for, so fault tests and
    the benchmark do not pay for loading profiles.
    """
    if cfg.engine is None:
        from loadtest.replica.paced import PacedModel

        return PacedModel(
            cfg.token_interval_s, cfg.ttft_s, cfg.max_running, cfg.prefill_tokens_per_s
        )
    from loadtest.engine import Engine, preset
    from loadtest.replica.engine_model import EngineModel

    engine_cfg = preset(
        cfg.engine,
        tp=cfg.engine_tp,
        pp=cfg.engine_pp,
        interconnect=cfg.engine_interconnect,
        **cfg.engine_overrides,
    )
    return EngineModel(Engine(engine_cfg, random.Random(cfg.seed)))


def create_replica_app(cfg: SimReplicaConfig, model: ReplicaModel | None = None) -> web.Application:
    """The aiohttp app of one replica; ``model`` defaults to :func:`make_model`."""
    app = web.Application()
    app[STATE_KEY] = SimReplicaState(cfg, model if model is not None else make_model(cfg))
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
    push.install(app, app[STATE_KEY])  # load reports to a gateway if DP_SIM_PUSH_URL is set
    return app


def app_runner(app: web.Application) -> web.AppRunner:
    """The runner every replica is served with (in-process and by the CLI)."""
    # handler_cancellation: a client that goes away cancels its handler at
    # once, which is how "aborted" is detected promptly (and how a real
    # engine frees the request). access_log off: tests and demos read counters.
    return web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )


def bound_port(runner: web.AppRunner) -> int:
    addrs = runner.addresses
    if not addrs:
        raise RuntimeError("replica did not bind")
    return int(addrs[0][1])


@contextlib.asynccontextmanager
async def run_replica(
    cfg: SimReplicaConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    model: ReplicaModel | None = None,
) -> AsyncIterator[tuple[str, SimReplicaState]]:
    """Serve one replica in the current event loop; yields ``(url, state)``."""
    app = create_replica_app(cfg, model)
    runner = app_runner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield f"http://{host}:{bound_port(runner)}", app[STATE_KEY]
    finally:
        await runner.cleanup()
