"""The data path: one request's life, in one straight line.

1. parse: the server hands over a complete request (head and body, limits
   enforced while reading); parse only what routing needs;
2. wait for capacity: only when every candidate is full (``admission``);
3. decide, once per attempt: ``Router.decide`` (pure) picks a replica;
4. dispatch: ``load.dispatch`` returns the ticket, and the policy hears of
   it at once (``on_dispatch`` and ``on_complete`` always come in pairs);
5. forward the ORIGINAL bytes through the upstream pool; relay the answer,
   a stream chunk by chunk straight from the upstream socket to the client's;
6. settle the ticket once in ``finally`` (success, error, cancel alike): the
   policy, outlier detection and waiting requests learn of it there.

Failures before the first byte reached the client (connect refused, reset,
an answer that is not HTTP, 502/503/504, a stream's first-byte timeout) are
retried on a different replica while the retry policy allows. After the
first byte nothing is retried: a stream gets an in-band SSE error event and
never a fake [DONE]. A client that goes away cancels the handler (the
server does it on connection loss); the upstream connection is then
closed, so the engine sees the disconnect and aborts the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from policies.base import BasePolicy, RouteRequest
from policies.load import Outcome
from router import headers as hdr
from router.access_log import AccessLog
from router.admission import Admission, Rejected, Turn
from router.config import Config
from router.errors import ErrorKind, GatewayError, error_body, sse_error_event
from router.http_server import Exchange, Request
from router.load import Ticket, dispatch
from router.metrics import UNKNOWN, Metrics
from router.outlier import OutlierDetector
from router.outlier import report as report_ejection
from router.replicas import Registry, ReplicaStatus
from router.request_info import ENDPOINTS, parse_body, summarize, summarize_form
from router.retry_budget import RetryBudget, backoff_s
from router.routing import NoRoute, Repin, Routed, Router
from router.sessions import Lookup, Placement, Sessions
from router.telemetry.orca import ORCA_REQUEST_HEADER, ORCA_RESPONSE_HEADER, on_load_header
from router.telemetry.source import plan_for
from router.tracing import AttemptTrace, RequestTrace, Tracing
from router.upstream import (
    BadResponse,
    ConnectError,
    RelayResult,
    UpstreamPool,
    UpstreamReset,
    UpstreamResponse,
)

log = logging.getLogger("dp_router.proxy")

# Expected output of a request without max_tokens, before any is observed:
# a typical chat answer (Azure conv trace median ~130, mean ~210).
DEFAULT_EXPECTED_OUTPUT_TOKENS = 256
OUTPUT_EWMA_ALPHA = 0.05  # ~20 requests of memory: adapts within a minute
# A non-streaming answer is held whole before it is sent (so a failure can
# still be retried); this bounds what a confused replica can make us hold.
# Embeddings of a large batch run to tens of MB.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
_USAGE_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_SSE_EVENT = b"data:"
_JSON = [(b"content-type", b"application/json")]
_REJECTION_KINDS = {
    "queue_full": ErrorKind.OVERLOADED,
    "queue_timeout": ErrorKind.QUEUE_TIMEOUT,
    "shutting_down": ErrorKind.SHUTTING_DOWN,
}
_INFO_ROUTES = {"/v1/models", "/healthz", "/readyz"}
# Plain strings for the per-request hot path: an enum member's ``.value`` is a
# Python-level property call each time.
_OK = Outcome.OK.value
_CLIENT_DISCONNECT = Outcome.CLIENT_DISCONNECT.value


class Failure(StrEnum):
    """Why an upstream attempt failed: the one vocabulary of retry reasons
    (the retries metric's label, the budget's exemptions, the access log)."""

    CONNECT_ERROR = "connect_error"
    UPSTREAM_RESET = "upstream_reset"
    BAD_RESPONSE = "bad_response"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    RESPONSE_TIMEOUT = "response_timeout"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    DRAINING = "draining"


# Retries that cost no replica any work: a refused connection sent nothing,
# and a draining replica declined before doing any. Retrying them cannot
# amplify load, so they do not spend the ratio budget (max_retries still
# bounds them); charging them let one dead replica drain a quiet gateway's
# reserve before ejection removed it.
FREE_RETRIES = frozenset({Failure.CONNECT_ERROR, Failure.DRAINING})
_STATUS_FAILURES = {502: Failure.HTTP_502, 503: Failure.HTTP_503, 504: Failure.HTTP_504}


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole response held back (a 502/503/504 passed on if nothing better comes)."""

    status: int
    headers: bytes  # rendered: hdr.client_response_block
    body: bytes


class AttemptFailed(Exception):
    """One upstream attempt failed. ``retryable``: nothing reached the client
    and the failure says "try another replica" (connect error, reset, an
    answer that is not HTTP, a stream's first-byte timeout, 502/503/504); a
    non-streaming response timeout is never retried (the engine may be
    mid-generation)."""

    def __init__(
        self,
        outcome: Outcome,
        reason: Failure,
        kind: ErrorKind,
        message: str,
        *,
        retryable: bool = True,
        passthrough: Answer | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.reason = reason
        self.kind = kind
        self.message = message
        self.retryable = retryable
        # The upstream's own answer (a 502/503/504), returned if not retried.
        self.passthrough = passthrough
        self.status = status


@dataclass(slots=True)
class Attempted:
    outcome: Outcome
    status: int
    ttfb: float
    output_tokens: int | None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a replica's requests go, parsed once from its URL."""

    host: str
    port: int
    prefix: str
    tls: ssl.SSLContext | None
    # Ask for the replica's load on every response (ORCA header, docs/load-report.md).
    load_header: hdr.Header | None


class Record:
    """What the access log and the request metrics report for one request.

    ``status`` and ``outcome`` are set through :meth:`end` only, once: the
    first ending wins (a handler that is cancelled after answering keeps
    its answer).
    """

    __slots__ = (
        "attempts",
        "bytes_in",
        "bytes_out",
        "model",
        "model_label",
        "outcome",
        "reason",
        "replica",
        "request_id",
        "session",
        "status",
        "trace",
        "ttfb",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.model: str | None = None
        self.model_label = UNKNOWN
        self.replica: str | None = None
        self.reason = ""
        self.status = 0
        self.ttfb: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.attempts = 0
        self.outcome = ""
        self.session: str | None = None  # the X-Dp-Session value
        self.trace: RequestTrace | None = None  # only while tracing is on

    def end(self, status: int, outcome: str) -> None:
        if not self.status:
            self.status = status
            self.outcome = outcome


class Proxy:
    """The data path. Owns nothing but its per-request work: the fleet is the
    registry's, decisions the router's, capacity waits the admission's,
    connections the upstream pool's."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        router: Router,
        metrics: Metrics,
        admission: Admission,
        budget: RetryBudget,
        outlier: OutlierDetector | None,
        rng: random.Random,
    ) -> None:
        self.config = config
        self.registry = registry
        self.router = router
        self.policy = router.policy
        # The policy hooks most policies leave as BasePolicy's no-ops are
        # not called per request (each call cost ~0.5k instructions).
        kind = type(self.policy)
        self._hears_dispatch = getattr(kind, "on_dispatch", None) is not BasePolicy.on_dispatch
        self._hears_complete = getattr(kind, "on_complete", None) is not BasePolicy.on_complete
        self._hears_timing = getattr(kind, "observe", None) is not BasePolicy.observe
        self.metrics = metrics
        self.admission = admission
        self.budget = budget
        self.outlier = outlier
        self.rng = rng
        self.pool: UpstreamPool | None = None  # set when the gateway starts
        # Set with the pool. asyncio.get_running_loop() makes a getpid()
        # system call each time on Python 3.11 (a fork check): twice per
        # request was 2 of its 6 system calls.
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.sessions: Sessions | None = None  # set when the gateway starts
        # Set when the gateway starts, if [tracing] is on; None costs the data
        # path one check per request and per attempt (router/tracing.py).
        self.tracer: Tracing | None = None
        self.forwarded_for = hdr.ForwardedFor(config.server.trusted_proxies)
        self._expected_output: dict[str, float] = {}
        self._targets: dict[str, Target] = {}
        self._tls: ssl.SSLContext | None = None
        self.shutting_down = False
        self.panic = config.admission.when_none_routable == "panic"
        # What a 503 tells clients to wait: about one health-check round.
        self.retry_after_s = max(1.0, config.health.interval_s if config.health.enabled else 1.0)
        up = config.upstream
        self._connect_timeout = up.connect_timeout_s
        self._first_byte_timeout = up.first_byte_timeout_s
        self._idle_timeout = up.idle_timeout_s
        self._response_timeout = up.response_timeout_s
        self._max_retries = up.max_retries
        self._replica_header = config.server.replica_header
        # Entered (started and stopped) by the gateway.
        self.access = AccessLog(config.server.access_log, metrics.access_log_dropped.inc)
        r = config.retry
        self._backoff_base_s = r.backoff_base_s
        self._backoff_max_s = r.backoff_max_s

    def begin_shutdown(self) -> None:
        """Refuse new requests, and the ones waiting for capacity, at once."""
        self.shutting_down = True
        self.admission.close()

    def readiness(self) -> tuple[int, dict[str, str]]:
        """Ready: not shutting down, and some replica routable with known models."""
        if self.shutting_down:
            return 503, {"status": "shutting_down"}
        now = asyncio.get_running_loop().time()
        if not any(r.routable(now) and r.models for r in self.registry.snapshot):
            return 503, {"status": "no_routable_replica"}
        return 200, {"status": "ready"}

    # -- entry point ------------------------------------------------------

    def handle(self, request: Request, exchange: Exchange) -> Coroutine[Any, Any, None]:
        """The data listener's one handler: routes by path, then proxies.

        Not itself a coroutine: it returns the one that answers, so the
        connection's task awaits ``_proxy`` with no frame between them to walk
        through at every resumption (docs/performance.md)."""
        path = request.path.partition("?")[0]
        kind = ENDPOINTS.get(path)
        if kind is not None and request.method == "POST":
            return self._proxy(request, exchange, kind)
        return self._local(request, exchange, path, kind)

    async def _local(
        self, request: Request, exchange: Exchange, path: str, kind: str | None
    ) -> None:
        """What the gateway answers itself: model list, probes, 404 and 405."""
        if path in _INFO_ROUTES and request.method in ("GET", "HEAD"):
            if path == "/v1/models":
                payload: dict[str, Any] = {"object": "list", "data": self.registry.model_list()}
                status = 200
            elif path == "/healthz":
                status, payload = 200, {"status": "ok"}
            else:
                status, payload = self.readiness()
            exchange.respond(status, list(_JSON), json.dumps(payload).encode())
            return
        if kind is not None or path in _INFO_ROUTES:
            allowed = "POST" if kind is not None else "GET"
            self._reply_error(
                exchange,
                ErrorKind.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed on {path[:128]}; use {allowed}",
                extra=[(b"allow", allowed.encode())],
            )
            return
        self._reply_error(exchange, ErrorKind.NOT_FOUND, "no such endpoint")

    # -- the request --------------------------------------------------------

    async def _proxy(self, request: Request, exchange: Exchange, kind: str) -> None:
        # Latencies by perf_counter: uvloop's loop.time() has millisecond
        # resolution, too coarse for a TTFT histogram that starts at 1 ms.
        t0 = time.perf_counter()
        record = Record(hdr.request_id_from(request.get(hdr.REQUEST_ID)))
        record.bytes_in = len(request.body)
        if self.tracer is not None:
            record.trace = self.tracer.request(request, record.request_id)
        try:
            route_req = self._parse(request, kind, record)
            await self._forward(request, exchange, route_req, record, t0)
        except GatewayError as exc:
            self._fail(exchange, record, exc.kind, exc.message, exc.retry_after_s, exc.status)
        except asyncio.CancelledError:
            record.end(499, _CLIENT_DISCONNECT)  # nginx's "client closed request"
            raise
        except Exception:
            # A bug, not a client or replica problem: logged once with its
            # traceback, answered in OpenAI's shape without one.
            log.exception("unexpected error on %s %s", request.method, request.path[:128])
            self._fail(exchange, record, ErrorKind.INTERNAL, "internal gateway error")
        finally:
            if exchange.started:
                record.end(exchange.status, _OK)
            self._finish(record, t0, time.perf_counter(), request)
            if record.trace is not None:
                record.trace.end(record)

    def _parse(self, request: Request, kind: str, record: Record) -> RouteRequest:
        """What routing needs from the request; GatewayError if it cannot be routed."""
        if self.shutting_down:
            raise GatewayError(ErrorKind.SHUTTING_DOWN, "the gateway is shutting down")
        encoding = request.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            # Routing must read the body; we do not inflate untrusted input
            # (docs/reliability.md, M37).
            raise GatewayError(
                ErrorKind.UNSUPPORTED_ENCODING,
                f"Content-Encoding {encoding[:32].decode('latin-1')!r} is not supported; "
                "send an identity body",
            )
        body = request.body
        data: dict[str, Any] | None = None
        if kind == "audio":
            content_type = (request.get(b"content-type") or b"").decode("latin-1")
            summary = summarize_form(body, content_type)
        else:
            data = parse_body(body)
            summary = summarize(kind, data)
        sessions = self.sessions
        key = sessions.key(request.get, data, summary.model) if sessions is not None else None
        record.model = summary.model
        if self.registry.snapshot.knows_model(summary.model):
            record.model_label = summary.model
        expected = summary.max_tokens
        if expected is None:
            expected = int(self._expected_output.get(summary.model, DEFAULT_EXPECTED_OUTPUT_TOKENS))
        return RouteRequest(
            summary.model,
            stream=summary.stream,
            prompt_tokens=summary.prompt_tokens,
            max_tokens=summary.max_tokens,
            expected_output_tokens=expected,
            session_key=key,
            prompt_text=summary.prompt_text,
            request_id=record.request_id,
        )

    async def _forward(
        self,
        request: Request,
        exchange: Exchange,
        route_req: RouteRequest,
        record: Record,
        t0: float,
    ) -> None:
        """wait for capacity -> decide -> dispatch -> forward -> settle, per attempt."""
        loop = self.loop
        tried: list[str] = []
        turn: Turn | None = None  # made only when the request has to wait
        self.budget.deposit()  # each request funds a fraction of a retry
        last_failure: AttemptFailed | None = None
        budgeted_retry = False  # a granted retry holds a budget slot until it settles
        session: Lookup | None = None
        if route_req.session_key is not None and self.sessions is not None:
            session = await self.sessions.lookup(route_req.session_key)
        try:
            while True:
                pin = session.pin if session is not None else None
                hashed = False
                if session is not None and pin is None:
                    pin = self._hash_placement(route_req, session, loop.time())
                    hashed = pin is not None
                routed: Routed | NoRoute = NoRoute.AT_CAPACITY
                if turn is None and not self.admission.busy(route_req.model):
                    routed = self.router.decide(
                        route_req,
                        pin,
                        self.registry.snapshot,
                        loop.time(),
                        exclude=tried,
                        panic=self.panic,
                    )
                if routed is NoRoute.AT_CAPACITY:
                    if turn is None:
                        turn = self.admission.turn(route_req.model)
                    routed = await self._route(route_req, pin, tried, turn)
                if isinstance(routed, NoRoute):
                    if last_failure is not None:
                        self._give_up(exchange, record, last_failure)
                    else:
                        self._no_route(exchange, record, routed)
                    return
                replica = routed.replica
                # Counted at once, before any await: requests deciding while
                # this one stores its pin see the replica's load (no herd, no
                # concurrency limit overshot).
                ticket = dispatch(replica.load, route_req.cost_tokens)
                if turn is not None:
                    turn.close()  # dispatched: the next waiter may try
                if session is not None:
                    try:
                        pinned = await self._pin(route_req, session, routed, hashed, tried, record)
                    except BaseException:
                        ticket.close(Outcome.CLIENT_DISCONNECT)
                        self.admission.notify()
                        raise
                    if pinned.replica is not replica:
                        # Another gateway's pin won: the load moves with the request.
                        ticket.close(Outcome.OK)
                        routed, replica = pinned, pinned.replica
                        ticket = dispatch(replica.load, route_req.cost_tokens)
                        self.admission.notify()
                if self._hears_dispatch:
                    self.policy.on_dispatch(route_req, replica.name, loop.time())
                record.replica = replica.name
                record.reason = routed.decision.reason
                record.attempts += 1
                self.metrics.count_decision(self.policy.name, routed.decision.reason)
                outcome = Outcome.INTERNAL  # what an unexpected exception leaves
                status: int | None = None
                failure: AttemptFailed | None = None
                trace = None
                if record.trace is not None:
                    trace = self._trace_attempt(record.trace, record, replica, routed, last_failure)
                try:
                    result = await self._attempt(
                        request, exchange, route_req, replica, t0, record, trace
                    )
                    outcome, status = result.outcome, result.status
                    record.ttfb = result.ttfb
                    if outcome is not Outcome.OK:
                        midstream = route_req.stream and result.status == 200
                        record.end(result.status, f"stream_{outcome}" if midstream else outcome)
                    self._learn(
                        route_req,
                        replica,
                        result,
                        loop.time(),
                        time.perf_counter() - t0,
                        known=record.model_label is not UNKNOWN,
                    )
                    return
                except AttemptFailed as exc:
                    failure = exc
                    outcome, status = exc.outcome, exc.status
                except asyncio.CancelledError:
                    outcome = Outcome.CLIENT_DISCONNECT
                    raise
                finally:
                    self._settle(ticket, route_req, replica, outcome, status, loop.time())
                    if trace is not None:
                        reason = failure.reason.value if failure is not None else None
                        trace.end(outcome.value, status, reason, record.ttfb)
                    if budgeted_retry:
                        self.budget.release()
                        budgeted_retry = False
                last_failure = failure
                tried.append(replica.name)
                if not self._may_retry(failure, len(tried)):
                    self._give_up(exchange, record, failure)
                    return
                budgeted_retry = failure.reason not in FREE_RETRIES
                self.metrics.retries.labels(failure.reason.value).inc()
                await asyncio.sleep(
                    backoff_s(
                        len(tried), self.rng, base_s=self._backoff_base_s, max_s=self._backoff_max_s
                    )
                )
        finally:
            if turn is not None:
                turn.close()
            if budgeted_retry:
                self.budget.release()

    async def _route(
        self, route_req: RouteRequest, pin: str | None, tried: list[str], turn: Turn
    ) -> Routed | NoRoute:
        """Decide now, or wait (bounded, in line) until a replica has room."""
        loop = asyncio.get_running_loop()
        waited = turn.waited_s
        while True:
            if not turn.must_wait():
                routed = self._decide(route_req, pin, tried, loop.time())
                if routed is not NoRoute.AT_CAPACITY:
                    if turn.waited_s > waited:
                        self.metrics.admission_waits.inc()
                        self.metrics.admission_wait_seconds.observe(turn.waited_s - waited)
                    return routed
            try:
                await turn.wait()
            except Rejected as exc:
                self.metrics.admission_rejections.labels(exc.reason).inc()
                raise GatewayError(
                    _REJECTION_KINDS[exc.reason],
                    "the gateway is shutting down"
                    if exc.reason == "shutting_down"
                    else "no replica has capacity for this request now",
                    retry_after_s=exc.retry_after_s,
                    status=exc.status,
                ) from None

    def _decide(
        self, route_req: RouteRequest, pin: str | None, tried: list[str], now: float
    ) -> Routed | NoRoute:
        return self.router.decide(
            route_req, pin, self.registry.snapshot, now, exclude=tried, panic=self.panic
        )

    # -- sessions (router/sessions.py) ---------------------------------------

    def _hash_placement(self, route_req: RouteRequest, session: Lookup, now: float) -> str | None:
        """A pin from the rendezvous hash, for a session without one: while the
        store is unavailable (so gateways agree without it), or for every new
        session with ``first_placement = "rendezvous"``."""
        sessions = self.sessions
        assert sessions is not None and route_req.session_key is not None
        if not (session.fallback or sessions.rendezvous_first):
            return None
        return sessions.place_by_hash(
            route_req.session_key, route_req.model, self.registry.snapshot, now
        )

    async def _pin(
        self,
        route_req: RouteRequest,
        session: Lookup,
        routed: Routed,
        hashed: bool,
        tried: list[str],
        record: Record,
    ) -> Routed:
        """Store what ``decide`` did with the session's pin, and follow another
        gateway's pin if it won a race for this session."""
        sessions = self.sessions
        assert sessions is not None
        key = session.key
        chosen = routed.replica.name
        old = session.pin
        repin = routed.repin
        if repin is None and not hashed and (session.stored or session.fallback):
            self._placed(record, Placement.FALLBACK if session.fallback else Placement.HIT)
            return routed
        if repin is Repin.FAILED:
            # A retry moves this attempt only (Envoy's retries keep the hash):
            # one reset must not throw the session's cache away. The pin
            # moves once its replica is unhealthy, ejected or drained.
            self._placed(record, Placement.REPINNED, Repin.FAILED)
            return routed
        if session.fallback:
            # The store is unavailable, so gateways cannot agree on a move:
            # keep only what every gateway would choose alike. A held hash
            # choice is remembered; an overloaded pin stays (this request
            # spills, the session does not move); a pin that broke for
            # another reason is forgotten, so the next turn goes to the
            # rendezvous hash over the replicas left, on every gateway.
            if repin is None:
                sessions.local.put(key, chosen)
            elif not hashed and repin is not Repin.OVERLOADED:
                sessions.local.discard(key)
            if repin is not None and not hashed:
                self.metrics.session_repins.inc((repin.value,))
            session.pin = chosen
            self._placed(record, Placement.FALLBACK)
            return routed
        if session.stored:
            assert old is not None
            stored = await sessions.repin(key, old, chosen)
        else:
            # A first placement (the policy's, or the hash's), or a local pin
            # the store had lost: atomic, and the loser of a race between
            # gateways follows the winner.
            stored = await sessions.claim(key, chosen)
        if stored is None:
            # The store failed just now: this request, and its retries, go
            # on without it (one wait on the store per request, not one per
            # attempt).
            session.fallback = True
            session.pin = chosen
            if old is not None and repin is not None:
                self.metrics.session_repins.inc((repin.value,))
            self._placed(record, Placement.FALLBACK)
            return routed
        session.pin = stored
        session.stored = True
        if stored != chosen:
            loop = asyncio.get_running_loop()
            follow = self.router.follow(
                route_req, stored, self.registry.snapshot, loop.time(), exclude=tried
            )
            if follow is not None:
                routed = follow
            else:
                # The winner's replica cannot take this request from where we
                # stand; go with our choice and leave the stored pin alone.
                session.pin = chosen
        if old is None:  # the policy's or the hash's first placement
            self._placed(record, Placement.NEW)
        elif repin is None:
            self._placed(record, Placement.HIT)  # a local pin the store had lost
        else:
            self._placed(record, Placement.REPINNED, repin)
        return routed

    def _placed(self, record: Record, placement: Placement, repin: Repin | None = None) -> None:
        """What sticky routing did with this request: the X-Dp-Session value
        (``repinned:<reason>``), and its count."""
        self.metrics.session_requests.inc((placement.value,))
        if repin is None:
            record.session = placement.value
        else:
            record.session = f"{placement.value}:{repin.value}"
            self.metrics.session_repins.inc((repin.value,))

    def _may_retry(self, failure: AttemptFailed, attempts: int) -> bool:
        """Retry only what has not started, up to max_retries, within the budget."""
        if not failure.retryable or attempts > self._max_retries:
            return False
        if failure.reason in FREE_RETRIES:
            return True
        if self.budget.try_withdraw():
            return True
        self.metrics.retry_budget_exhausted.labels(self.budget.check() or "budget").inc()
        return False

    def _settle(
        self,
        ticket: Ticket,
        route_req: RouteRequest,
        replica: ReplicaStatus,
        outcome: Outcome,
        status: int | None,
        now: float,
    ) -> None:
        """The one place a dispatched request's load is released."""
        if not ticket.close(outcome):
            return
        self.metrics.count_attempt(replica.name, outcome.value)
        if self._hears_complete:
            self.policy.on_complete(route_req, replica.name, outcome, now)
        if self.outlier is not None:
            event = self.outlier.record(replica.name, outcome, now, status=status)
            if event is not None:
                report_ejection(event, self.metrics)
        self.admission.notify()  # capacity freed

    def _learn(
        self,
        route_req: RouteRequest,
        replica: ReplicaStatus,
        result: Attempted,
        now: float,
        elapsed: float,
        *,
        known: bool,
    ) -> None:
        """Feed per-token time and output length back into load signals (the
        time to first token was fed when it came: :meth:`_first_token`).
        ``known``: the fleet served the model when the request was parsed;
        only those models' output lengths are kept (clients name models)."""
        if result.outcome is not Outcome.OK or result.status != 200:
            return
        load = replica.load
        tokens = result.output_tokens
        if tokens is not None and tokens > 1:
            tpot = (elapsed - result.ttfb) / (tokens - 1)
            load.tpot.add(tpot, now)
            if self._hears_timing:
                self.policy.observe(replica.name, None, tpot, now)
        if tokens is None or tokens <= 0:
            return
        if known:
            avg = self._expected_output.get(route_req.model, float(DEFAULT_EXPECTED_OUTPUT_TOKENS))
            self._expected_output[route_req.model] = avg + OUTPUT_EWMA_ALPHA * (tokens - avg)

    def _trace_attempt(
        self,
        trace: RequestTrace,
        record: Record,
        replica: ReplicaStatus,
        routed: Routed,
        last_failure: AttemptFailed | None,
    ) -> AttemptTrace:
        target = self._target(replica)
        return trace.attempt(
            replica.name,
            (target.host, target.port),
            record.attempts,
            routed.decision.reason,
            last_failure.reason.value if last_failure is not None else None,
        )

    def _first_token(self, replica: ReplicaStatus, ttft: float, now: float) -> None:
        """The replica's time to first token (from this attempt's send), fed at
        once: a policy that counts prefill queued ahead (``predicted_ttft``)
        must learn a request has left the queue when its first token comes,
        not when its stream ends."""
        replica.load.ttft.add(ttft, now)
        if self._hears_timing:
            self.policy.observe(replica.name, ttft, None, now)

    # -- one upstream attempt ----------------------------------------------

    def _target(self, replica: ReplicaStatus) -> Target:
        target = self._targets.get(replica.url)
        if target is None:
            parts = urlsplit(replica.url)
            tls = None
            if parts.scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
            target = self._targets[replica.url] = Target(
                parts.hostname or "",
                parts.port or (443 if tls is not None else 80),
                parts.path.rstrip("/"),
                tls,
                ORCA_REQUEST_HEADER if plan_for(self.config, replica.name).reads_header else None,
            )
        return target

    async def _attempt(
        self,
        request: Request,
        exchange: Exchange,
        route_req: RouteRequest,
        replica: ReplicaStatus,
        t0: float,
        record: Record,
        trace: AttemptTrace | None = None,
    ) -> Attempted:
        """One upstream try. Everything up to the first byte we would send the
        client (headers, plus the first chunk of a stream or the whole body
        otherwise) runs under one deadline; failures there are AttemptFailed,
        retryable unless the replica may already have done the work."""
        pool = self.pool
        assert pool is not None, "upstream pool not started"
        loop = self.loop
        stream = route_req.stream
        target = self._target(replica)
        sent = time.perf_counter()
        forwarded_for = self.forwarded_for.value(request.peer, request.get(b"x-forwarded-for"))
        headers: hdr.Headers | bytes
        if trace is None:
            headers = hdr.upstream_request_block(
                request.headers,
                request_id=record.request_id,
                forwarded_for=forwarded_for,
                forwarded_proto=b"http",
                api_key=replica.api_key,
                extra=target.load_header,
                connection=request.connection,
            )
        else:
            headers = trace.headers(  # this attempt's traceparent
                hdr.upstream_request_headers(
                    request.headers,
                    request_id=record.request_id,
                    forwarded_for=forwarded_for,
                    forwarded_proto=b"http",
                    api_key=replica.api_key,
                    extra=target.load_header,
                )
            )
        deadline = loop.time() + (self._first_byte_timeout if stream else self._response_timeout)
        try:
            upstream = await pool.request(
                target.host,
                target.port,
                "POST",
                target.prefix + request.path,
                headers,
                request.body,
                connect_timeout_s=self._connect_timeout,
                tls=target.tls,
            )
        except ConnectError as exc:
            raise AttemptFailed(
                Outcome.CONNECT_ERROR,
                Failure.CONNECT_ERROR,
                ErrorKind.UPSTREAM_ERROR,
                f"could not connect to replica {replica.name}: {exc.reason}",
            ) from None
        try:
            try:
                await upstream.head(deadline)
            except TimeoutError:
                if upstream.status in _STATUS_FAILURES:
                    raise self._failed_status(upstream, b"", replica, record) from None
                if stream:
                    raise AttemptFailed(
                        Outcome.TIMEOUT,
                        Failure.FIRST_BYTE_TIMEOUT,
                        ErrorKind.UPSTREAM_TIMEOUT,
                        f"replica {replica.name} sent nothing within "
                        f"{self._first_byte_timeout:g} s",
                    ) from None
                raise self._response_timeout_failure(replica) from None
            except UpstreamReset as exc:
                # Nothing reached the client: another replica may try.
                raise _reset(replica, exc, retryable=True) from None
            except BadResponse as exc:
                raise _bad_response(replica, exc, retryable=True) from None
            ttfb = time.perf_counter() - t0
            if target.load_header is not None:
                report = upstream.get(ORCA_RESPONSE_HEADER)
                if report is not None:
                    ok = on_load_header(replica.load, report, loop.time())
                    self.metrics.count_load_header(replica.name, ok)
            status = upstream.status
            if status == 200:
                self._first_token(replica, time.perf_counter() - sent, loop.time())
            if status in _STATUS_FAILURES:
                try:
                    data = await upstream.read_all(64 * 1024, deadline)
                except (TimeoutError, UpstreamReset, BadResponse):
                    data = b""
                raise self._failed_status(upstream, data, replica, record)
            if stream and status == 200:
                return await self._relay_stream(exchange, upstream, replica, record, ttfb)
            try:
                data = await upstream.read_all(MAX_RESPONSE_BYTES, deadline)
            except TimeoutError:
                raise self._response_timeout_failure(replica) from None
            except UpstreamReset as exc:
                # The headers of a finished non-streaming answer came: the
                # work is done, a retry would do it twice.
                raise _reset(replica, exc, retryable=stream) from None
            except BadResponse as exc:
                raise _bad_response(replica, exc, retryable=stream) from None
            return self._relay_whole(exchange, upstream, data, replica, record, ttfb)
        finally:
            # Idempotent; a no-op once the body ended cleanly and the
            # connection went back to the pool. Otherwise the connection is
            # dropped so the engine sees the disconnect and aborts.
            upstream.close()

    def _response_timeout_failure(self, replica: ReplicaStatus) -> AttemptFailed:
        """Non-streaming: never retried (vLLM sends no headers until it is
        done, so a retry would double a long generation)."""
        return AttemptFailed(
            Outcome.TIMEOUT,
            Failure.RESPONSE_TIMEOUT,
            ErrorKind.UPSTREAM_TIMEOUT,
            f"replica {replica.name} did not complete the response within "
            f"{self._response_timeout:g} s",
            retryable=False,
        )

    def _failed_status(
        self, upstream: UpstreamResponse, data: bytes, replica: ReplicaStatus, record: Record
    ) -> AttemptFailed:
        """A 502/503/504 from the replica: retryable, and passed through as
        is if no retry happens. A 503 with the draining marker says "not me"
        rather than "broken"."""
        status = upstream.status
        draining = status == 503 and (
            upstream.get(hdr.DRAINING_HEADER) is not None or b'"draining"' in data
        )
        passthrough = Answer(status, self._response_headers(upstream, replica, record), data)
        if draining:
            return AttemptFailed(
                Outcome.DRAINING,
                Failure.DRAINING,
                ErrorKind.NO_REPLICA,
                f"replica {replica.name} is draining",
                passthrough=passthrough,
                status=status,
            )
        return AttemptFailed(
            Outcome.HTTP_5XX,
            _STATUS_FAILURES[status],
            ErrorKind.UPSTREAM_ERROR,
            f"replica {replica.name} answered {status}",
            passthrough=passthrough,
            status=status,
        )

    def _response_headers(
        self, upstream: UpstreamResponse, replica: ReplicaStatus, record: Record
    ) -> bytes:
        return hdr.client_response_block(
            upstream.headers,
            connection=upstream.connection,
            request_id=record.request_id,
            replica=replica.name.encode() if self._replica_header else None,
            session=record.session,
        )

    def _relay_whole(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        data: bytes,
        replica: ReplicaStatus,
        record: Record,
        ttfb: float,
    ) -> Attempted:
        """A complete (non-streaming, or non-200) answer, passed on as is."""
        status = upstream.status
        tokens = None
        if status == 200 and upstream.get(b"content-encoding") is None:
            match = _USAGE_RE.search(data)
            if match:
                tokens = int(match.group(1))
        exchange.respond(status, self._response_headers(upstream, replica, record), data)
        record.bytes_out = len(data)
        if status < 400:
            outcome = Outcome.OK
        else:
            outcome = Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX
        return Attempted(outcome, status, ttfb, tokens)

    async def _relay_stream(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        replica: ReplicaStatus,
        record: Record,
        ttfb: float,
    ) -> Attempted:
        """Pass chunks through as they arrive, straight from the upstream
        socket to the client's. The client's headers go out with the first
        chunk (already read under the first-byte deadline), so a failure
        before it was still retryable; after it, failures are in-band."""
        exchange.start(
            upstream.status,
            self._response_headers(upstream, replica, record),
            content_length=None,
        )
        sse = (upstream.get(b"content-type") or b"").startswith(b"text/event-stream")
        result = await upstream.relay(exchange, idle_timeout_s=self._idle_timeout, count=_SSE_EVENT)
        events = upstream.counted
        record.bytes_out = exchange.bytes_sent
        if result is RelayResult.COMPLETE:
            outcome = Outcome.OK
        elif result is RelayResult.IDLE_TIMEOUT:
            outcome = Outcome.TIMEOUT
            self._fail_stream(
                exchange,
                sse,
                ErrorKind.UPSTREAM_TIMEOUT,
                f"replica {replica.name} stalled for {self._idle_timeout:g} s mid-stream",
            )
        elif result in (RelayResult.UPSTREAM_RESET, RelayResult.BAD_RESPONSE):
            outcome = (
                Outcome.BAD_RESPONSE
                if result is RelayResult.BAD_RESPONSE
                else Outcome.UPSTREAM_RESET
            )
            self._fail_stream(
                exchange,
                sse,
                ErrorKind.UPSTREAM_ERROR,
                f"replica {replica.name} closed the stream mid-response",
            )
        else:  # the client left, or stopped reading (its connection was aborted)
            outcome = Outcome.CLIENT_DISCONNECT
        # vLLM/SGLang send about one token per SSE event, plus [DONE] and a
        # usage event: close enough for the output-length estimate.
        tokens = max(0, events - 1) if sse else None
        return Attempted(outcome, upstream.status, ttfb, tokens)

    @staticmethod
    def _fail_stream(exchange: Exchange, sse: bool, kind: ErrorKind, message: str) -> None:
        """After the first byte: tell the client in-band, never a fake [DONE]."""
        if sse:
            exchange.write(sse_error_event(kind, message))
            exchange.end()
        else:
            # A non-SSE body cannot carry an error: cut the connection so the
            # client sees a truncated response rather than a short success.
            exchange.abort()

    # -- outcomes without a served response ---------------------------------

    def _reply_error(
        self,
        exchange: Exchange,
        kind: ErrorKind,
        message: str,
        retry_after_s: float | None = None,
        status: int | None = None,
        extra: hdr.Headers | None = None,
    ) -> int:
        """Answer in OpenAI's error shape; returns the status sent."""
        status = status or kind.status
        if exchange.started:
            exchange.abort()  # too late for a status: cut it, never a fake success
            return status
        headers = list(_JSON)
        if retry_after_s is not None:
            # Retry-After takes whole seconds; round up so clients never retry early.
            headers.append((b"retry-after", b"%d" % max(1, int(-(-retry_after_s // 1)))))
        if extra:
            headers.extend(extra)
        exchange.respond(status, headers, error_body(kind, message))
        if kind in (ErrorKind.NOT_FOUND, ErrorKind.METHOD_NOT_ALLOWED):
            self.metrics.errors.labels(kind.code).inc()
        return status

    def _fail(
        self,
        exchange: Exchange,
        record: Record,
        kind: ErrorKind,
        message: str,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        sent = self._reply_error(exchange, kind, message, retry_after_s, status)
        record.end(sent, kind.code)

    def _no_route(self, exchange: Exchange, record: Record, why: NoRoute) -> None:
        model = (record.model or "")[:64]
        if why is NoRoute.UNKNOWN_MODEL:
            self._fail(
                exchange, record, ErrorKind.MODEL_NOT_FOUND, f"The model '{model}' does not exist"
            )
        elif why is NoRoute.MODELS_PENDING:
            self._fail(
                exchange,
                record,
                ErrorKind.NO_REPLICA,
                f"no replica is known to serve '{model}' yet (some replicas have not "
                "reported their models)",
                retry_after_s=self.retry_after_s,
            )
        else:
            self._fail(
                exchange,
                record,
                ErrorKind.NO_REPLICA,
                f"no healthy replica for model '{model}'",
                retry_after_s=self.retry_after_s,
            )

    def _give_up(self, exchange: Exchange, record: Record, failure: AttemptFailed) -> None:
        answer = failure.passthrough
        if answer is not None and failure.outcome is not Outcome.DRAINING:
            exchange.respond(answer.status, answer.headers, answer.body)
            record.end(answer.status, failure.reason.value)
            return
        self._fail(
            exchange,
            record,
            failure.kind,
            failure.message,
            retry_after_s=self.retry_after_s if failure.kind.status == 503 else None,
        )

    def _finish(self, record: Record, t0: float, t1: float, request: Request) -> None:
        """Count and log the request once, whatever ended it."""
        m = self.metrics
        model = record.model_label
        m.count_finished(model, record.replica or "none", record.status, t1 - t0, record.ttfb)
        if record.outcome != _OK:
            m.errors.labels(record.outcome).inc()
        self.access.write(
            record.request_id,
            request.method,
            request.path,
            request.peer,
            record.model or "",
            record.replica,
            record.reason,
            record.status,
            record.outcome,
            record.attempts,
            record.ttfb,
            t1 - t0,
            record.bytes_in,
            record.bytes_out,
            record.session,
        )


def _reset(replica: ReplicaStatus, exc: UpstreamReset, *, retryable: bool) -> AttemptFailed:
    return AttemptFailed(
        Outcome.UPSTREAM_RESET,
        Failure.UPSTREAM_RESET,
        ErrorKind.UPSTREAM_ERROR,
        f"replica {replica.name} closed the connection: {exc.reason}",
        retryable=retryable,
    )


def _bad_response(replica: ReplicaStatus, exc: BadResponse, *, retryable: bool) -> AttemptFailed:
    """Not HTTP (a garbage status line, a truncated or oversized header
    block): the replica is broken, not the client; outlier detection counts
    it, and before the first byte another replica may try."""
    log.warning("replica %s sent an invalid response: %s", replica.name, exc.reason)
    return AttemptFailed(
        Outcome.BAD_RESPONSE,
        Failure.BAD_RESPONSE,
        ErrorKind.UPSTREAM_ERROR,
        f"replica {replica.name} sent an invalid HTTP response",
        retryable=retryable,
    )
