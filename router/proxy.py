"""The data path: one request's life, in one straight line.

1. parse: read the body once (size-limited), parse only what routing needs;
2. wait for capacity: only when every candidate is full (``admission``);
3. decide, once per attempt: ``Router.decide`` (pure) picks a replica;
4. dispatch: ``load.dispatch`` returns the ticket, and the policy hears of
   it at once (``on_dispatch`` and ``on_complete`` always come in pairs);
5. forward the ORIGINAL bytes; stream the answer back chunk by chunk;
6. settle the ticket once in ``finally`` (success, error, cancel alike): the
   policy, outlier detection and waiting requests learn of it there.

Failures before the first byte reached the client (connect refused, reset,
502/503/504, a stream's first-byte timeout) are retried on a different
replica while the retry policy allows. After the first byte nothing is
retried: a stream gets an in-band SSE error event and never a fake [DONE].
A client that goes away cancels the handler (aiohttp ``handler_cancellation``)
or fails our write; either way the upstream response is closed, so the engine
sees the disconnect and aborts the generation.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from policies.base import RouteRequest
from policies.load import Outcome
from router import headers as hdr
from router.admission import Admission, Rejected, Turn
from router.config import Config
from router.errors import ErrorKind, GatewayError, error_response, sse_error_event
from router.load import Ticket, dispatch
from router.metrics import UNKNOWN, Metrics
from router.outlier import EventKind, OutlierDetector, OutlierEvent
from router.replicas import Registry, ReplicaStatus
from router.request_info import parse_body, summarize
from router.retry_budget import RetryBudget, backoff_s
from router.routing import NoRoute, Routed, Router

access_log = logging.getLogger("dp_router.access")
log = logging.getLogger("dp_router.proxy")

# Expected output of a request without max_tokens, before any is observed:
# a typical chat answer (Azure conv trace median ~130, mean ~210).
DEFAULT_EXPECTED_OUTPUT_TOKENS = 256
OUTPUT_EWMA_ALPHA = 0.05  # ~20 requests of memory: adapts within a minute
# aiohttp warns that bytes bodies above 1 MiB block the loop while written;
# BytesIO is written in chunks with yields in between.
LARGE_BODY_BYTES = 2**20
_USAGE_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_SSE_EVENT = b"data:"
_REJECTION_KINDS = {
    "queue_full": ErrorKind.OVERLOADED,
    "queue_timeout": ErrorKind.QUEUE_TIMEOUT,
    "shutting_down": ErrorKind.SHUTTING_DOWN,
}


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
        passthrough: web.Response | None = None,
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
    response: web.StreamResponse
    outcome: Outcome
    status: int
    ttfb: float | None
    output_tokens: int | None


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
        "status",
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

    def end(self, status: int, outcome: str) -> None:
        if not self.status:
            self.status = status
            self.outcome = outcome


class Proxy:
    """The data path. Owns nothing but its per-request work: the fleet is the
    registry's, decisions the router's, capacity waits the admission's."""

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
        self.metrics = metrics
        self.admission = admission
        self.budget = budget
        self.outlier = outlier
        self.rng = rng
        self.session: aiohttp.ClientSession | None = None
        self.forwarded_for = hdr.ForwardedFor(config.server.trusted_proxies)
        self._expected_output: dict[str, float] = {}
        self.shutting_down = False
        self.panic = config.admission.when_none_routable == "panic"
        # What a 503 tells clients to wait: about one health-check round.
        self.retry_after_s = max(1.0, config.health.interval_s if config.health.enabled else 1.0)
        up = config.upstream
        self._first_byte_timeout = up.first_byte_timeout_s
        self._idle_timeout = up.idle_timeout_s
        self._response_timeout = up.response_timeout_s
        self._max_retries = up.max_retries
        self._max_body = config.server.max_body_bytes
        self._replica_header = config.server.replica_header
        self._access_log = config.server.access_log
        r = config.retry
        self._backoff_base_s = r.backoff_base_s
        self._backoff_max_s = r.backoff_max_s

    # -- entry points -------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "embeddings")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.registry.model_list()})

    def begin_shutdown(self) -> None:
        """Refuse new requests, and the ones waiting for capacity, at once."""
        self.shutting_down = True
        self.admission.close()

    # -- the request --------------------------------------------------------

    async def _handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        record = Record(hdr.request_id_from(request.headers))
        response: web.StreamResponse | None = None
        try:
            response = await self._serve(request, endpoint, record, t0)
            return response
        except GatewayError as exc:
            response = self._error(record, exc.kind, exc.message, exc.retry_after_s, exc.status)
            return response
        except asyncio.CancelledError:
            record.end(499, Outcome.CLIENT_DISCONNECT.value)  # nginx's "client closed request"
            raise
        except ConnectionResetError:
            # The client left while we wrote to it. Answer with a placeholder
            # aiohttp's finish_response drops quietly; re-raising would log a
            # traceback for an everyday event.
            record.end(499, Outcome.CLIENT_DISCONNECT.value)
            response = web.Response(status=499)
            return response
        except Exception:
            # A bug, not a client or replica problem: logged once with its
            # traceback, answered in OpenAI's shape without one.
            log.exception("unexpected error on %s %s", request.method, request.path)
            response = self._error(record, ErrorKind.INTERNAL, "internal gateway error")
            return response
        finally:
            if response is not None:
                record.end(response.status, Outcome.OK.value)
            self._finish(record, t0, loop.time(), request)

    async def _serve(
        self, request: web.Request, endpoint: str, record: Record, t0: float
    ) -> web.StreamResponse:
        if self.shutting_down:
            raise GatewayError(ErrorKind.SHUTTING_DOWN, "the gateway is shutting down")
        body = await self._read_body(request)
        record.bytes_in = len(body)
        summary = summarize(endpoint, parse_body(body))
        record.model = summary.model
        if self.registry.snapshot.knows_model(summary.model):
            record.model_label = summary.model
        expected = summary.max_tokens
        if expected is None:
            expected = int(self._expected_output.get(summary.model, DEFAULT_EXPECTED_OUTPUT_TOKENS))
        route_req = RouteRequest(
            summary.model,
            stream=summary.stream,
            prompt_tokens=summary.prompt_tokens,
            max_tokens=summary.max_tokens,
            expected_output_tokens=expected,
            session_key=None,  # sessions (a pin store around decide) are not wired yet
            prompt_text=summary.prompt_text,
            request_id=record.request_id,
        )
        return await self._forward(request, body, route_req, record, t0)

    async def _read_body(self, request: web.Request) -> bytes:
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Routing must read the body; we do not inflate untrusted input
            # (docs/reliability.md, M37).
            raise GatewayError(
                ErrorKind.UNSUPPORTED_ENCODING,
                f"Content-Encoding {encoding[:32]!r} is not supported; send an identity body",
            )
        length = request.content_length
        if length is not None and length > self._max_body:
            raise GatewayError(ErrorKind.TOO_LARGE, f"request body exceeds {self._max_body} bytes")
        try:
            return await request.read()  # enforces client_max_size while streaming
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(
                ErrorKind.TOO_LARGE, f"request body exceeds {self._max_body} bytes"
            ) from None

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        route_req: RouteRequest,
        record: Record,
        t0: float,
    ) -> web.StreamResponse:
        """wait for capacity -> decide -> dispatch -> forward -> settle, per attempt."""
        loop = asyncio.get_running_loop()
        tried: list[str] = []
        turn = self.admission.turn(route_req.model)
        self.budget.deposit()  # each request funds a fraction of a retry
        last_failure: AttemptFailed | None = None
        budgeted_retry = False  # a granted retry holds a budget slot until it settles
        try:
            while True:
                routed = await self._route(route_req, tried, turn)
                if isinstance(routed, NoRoute):
                    if last_failure is not None:
                        return self._give_up(record, last_failure)
                    return self._no_route(record, routed)
                replica = routed.replica
                ticket = dispatch(replica.load, route_req.cost_tokens)
                self.policy.on_dispatch(route_req, replica.name, loop.time())
                turn.close()  # dispatched: the next waiter may try
                record.replica = replica.name
                record.reason = routed.decision.reason
                record.attempts += 1
                self.metrics.count_decision(self.policy.name, routed.decision.reason)
                outcome = Outcome.INTERNAL  # what an unexpected exception leaves
                status: int | None = None
                failure: AttemptFailed | None = None
                try:
                    result = await self._attempt(request, body, route_req, replica, t0, record)
                    outcome, status = result.outcome, result.status
                    record.ttfb = result.ttfb
                    if outcome is not Outcome.OK:
                        midstream = route_req.stream and result.status == 200
                        record.end(result.status, f"stream_{outcome}" if midstream else outcome)
                    self._learn(route_req, replica, result, loop.time(), t0)
                    return result.response
                except AttemptFailed as exc:
                    failure = exc
                    outcome, status = exc.outcome, exc.status
                except (asyncio.CancelledError, ConnectionResetError):
                    outcome = Outcome.CLIENT_DISCONNECT
                    raise
                finally:
                    self._settle(ticket, route_req, replica, outcome, status, loop.time())
                    if budgeted_retry:
                        self.budget.release()
                        budgeted_retry = False
                last_failure = failure
                tried.append(replica.name)
                if not self._may_retry(failure, len(tried)):
                    return self._give_up(record, failure)
                budgeted_retry = failure.reason not in FREE_RETRIES
                self.metrics.retries.labels(failure.reason.value).inc()
                await asyncio.sleep(
                    backoff_s(
                        len(tried), self.rng, base_s=self._backoff_base_s, max_s=self._backoff_max_s
                    )
                )
        finally:
            turn.close()
            if budgeted_retry:
                self.budget.release()

    async def _route(
        self, route_req: RouteRequest, tried: list[str], turn: Turn
    ) -> Routed | NoRoute:
        """Decide now, or wait (bounded, in line) until a replica has room."""
        loop = asyncio.get_running_loop()
        waited = turn.waited_s
        while True:
            if not turn.must_wait():
                routed = self.router.decide(
                    route_req,
                    None,
                    self.registry.snapshot,
                    loop.time(),
                    exclude=tried,
                    panic=self.panic,
                )
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
        self.policy.on_complete(route_req, replica.name, outcome, now)
        if self.outlier is not None:
            event = self.outlier.record(replica.name, outcome, now, status=status)
            if event is not None:
                self._ejection(event)
        self.admission.notify()  # capacity freed

    def _ejection(self, event: OutlierEvent) -> None:
        if event.kind is EventKind.EJECTED:
            self.metrics.ejections.labels(event.replica, event.reason).inc()
            log.warning(
                "ejected replica %s for %.1f s (%s, ejection #%d)",
                event.replica,
                event.duration_s,
                event.reason,
                event.ejections,
            )
        else:  # the max-percent cap refused it
            self.metrics.ejections.labels(event.replica, "overflow").inc()

    def _learn(
        self,
        route_req: RouteRequest,
        replica: ReplicaStatus,
        result: Attempted,
        now: float,
        t0: float,
    ) -> None:
        """Feed latency and output-length observations back into load signals."""
        if result.outcome is not Outcome.OK or result.status != 200:
            return
        load = replica.load
        ttft = result.ttfb
        if ttft is not None:
            load.ttft.add(ttft, now)
        tokens = result.output_tokens
        tpot = None
        if ttft is not None and tokens is not None and tokens > 1:
            tpot = (now - t0 - ttft) / (tokens - 1)
            load.tpot.add(tpot, now)
        self.policy.observe(replica.name, ttft, tpot, now)
        if tokens is None or tokens <= 0:
            return
        if self.registry.snapshot.knows_model(route_req.model):
            avg = self._expected_output.get(route_req.model, float(DEFAULT_EXPECTED_OUTPUT_TOKENS))
            self._expected_output[route_req.model] = avg + OUTPUT_EWMA_ALPHA * (tokens - avg)

    # -- one upstream attempt ----------------------------------------------

    async def _attempt(
        self,
        request: web.Request,
        body: bytes,
        route_req: RouteRequest,
        replica: ReplicaStatus,
        t0: float,
        record: Record,
    ) -> Attempted:
        """One upstream try. Everything up to the first byte we would send the
        client (headers, plus the first chunk of a stream or the whole body
        otherwise) runs under one deadline; failures there are AttemptFailed,
        retryable unless the replica may already have done the work."""
        session = self.session
        assert session is not None, "upstream session not started"
        loop = asyncio.get_running_loop()
        stream = route_req.stream
        headers = hdr.upstream_request_headers(
            request.headers,
            request_id=record.request_id,
            forwarded_for=self.forwarded_for.value(
                request.remote or "", request.headers.get("X-Forwarded-For")
            ),
            forwarded_proto=request.scheme,
            api_key=replica.api_key,
        )
        deadline = loop.time() + (self._first_byte_timeout if stream else self._response_timeout)
        upstream: aiohttp.ClientResponse | None = None
        head = b""
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    upstream = await session.post(
                        replica.url + request.rel_url.raw_path_qs,
                        data=io.BytesIO(body) if len(body) > LARGE_BODY_BYTES else body,
                        headers=headers,
                    )
                    if stream and upstream.status == 200:
                        head = await upstream.content.readany()
                    else:
                        head = await upstream.read()
            except aiohttp.ClientConnectorError as exc:
                raise AttemptFailed(
                    Outcome.CONNECT_ERROR,
                    Failure.CONNECT_ERROR,
                    ErrorKind.UPSTREAM_ERROR,
                    f"could not connect to replica {replica.name}: {exc.strerror or 'error'}",
                ) from None
            except TimeoutError:
                if upstream is not None and upstream.status in _STATUS_FAILURES:
                    raise self._failed_status(upstream, b"", replica, record) from None
                if stream:
                    raise AttemptFailed(
                        Outcome.TIMEOUT,
                        Failure.FIRST_BYTE_TIMEOUT,
                        ErrorKind.UPSTREAM_TIMEOUT,
                        f"replica {replica.name} sent nothing within "
                        f"{self._first_byte_timeout:g} s",
                    ) from None
                # Non-streaming: never retried (vLLM sends no headers until it
                # is done, so a retry would double a long generation).
                raise AttemptFailed(
                    Outcome.TIMEOUT,
                    Failure.RESPONSE_TIMEOUT,
                    ErrorKind.UPSTREAM_TIMEOUT,
                    f"replica {replica.name} did not complete the response within "
                    f"{self._response_timeout:g} s",
                    retryable=False,
                ) from None
            except (
                aiohttp.ClientOSError,
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientPayloadError,
            ) as exc:
                # Before headers (or a stream's first chunk) the request may be
                # replayed elsewhere; a body that broke off after the headers of
                # a finished non-streaming completion is not (the work is done).
                raise AttemptFailed(
                    Outcome.UPSTREAM_RESET,
                    Failure.UPSTREAM_RESET,
                    ErrorKind.UPSTREAM_ERROR,
                    f"replica {replica.name} closed the connection: {type(exc).__name__}",
                    retryable=upstream is None or stream or upstream.status in _STATUS_FAILURES,
                ) from None
            except aiohttp.ClientError as exc:
                # Not HTTP (a garbage status line, a truncated or oversized
                # header block): the replica is broken, not the client. Nothing
                # was relayed, so another replica may try; outlier detection
                # counts it.
                log.warning("replica %s sent an invalid response: %s", replica.name, exc)
                raise AttemptFailed(
                    Outcome.BAD_RESPONSE,
                    Failure.BAD_RESPONSE,
                    ErrorKind.UPSTREAM_ERROR,
                    f"replica {replica.name} sent an invalid HTTP response",
                    retryable=upstream is None or stream,
                ) from None
            ttfb = loop.time() - t0
            status = upstream.status
            if status in _STATUS_FAILURES:
                raise self._failed_status(upstream, head, replica, record)
            if stream and status == 200:
                return await self._relay_stream(request, upstream, head, replica, record, ttfb)
            return self._relay_whole(upstream, head, replica, record, ttfb)
        finally:
            if upstream is not None:
                # close(), not release(): an unfinished response must drop its
                # connection so the engine sees the disconnect and aborts.
                if upstream.content.is_eof():
                    upstream.release()
                else:
                    upstream.close()

    def _failed_status(
        self,
        upstream: aiohttp.ClientResponse,
        data: bytes,
        replica: ReplicaStatus,
        record: Record,
    ) -> AttemptFailed:
        """A 502/503/504 from the replica: retryable, and passed through as
        is if no retry happens. A 503 with the draining marker says "not me"
        rather than "broken"."""
        draining = upstream.status == 503 and (
            hdr.DRAINING_HEADER in upstream.headers or b'"draining"' in data
        )
        passthrough = web.Response(
            status=upstream.status,
            body=data,
            headers=self._response_headers(upstream, replica, record),
        )
        if draining:
            return AttemptFailed(
                Outcome.DRAINING,
                Failure.DRAINING,
                ErrorKind.NO_REPLICA,
                f"replica {replica.name} is draining",
                passthrough=passthrough,
                status=upstream.status,
            )
        return AttemptFailed(
            Outcome.HTTP_5XX,
            _STATUS_FAILURES[upstream.status],
            ErrorKind.UPSTREAM_ERROR,
            f"replica {replica.name} answered {upstream.status}",
            passthrough=passthrough,
            status=upstream.status,
        )

    def _response_headers(
        self, upstream: aiohttp.ClientResponse, replica: ReplicaStatus, record: Record
    ) -> CIMultiDict[str]:
        return hdr.client_response_headers(
            upstream.headers,
            request_id=record.request_id,
            replica=replica.name if self._replica_header else None,
        )

    def _relay_whole(
        self,
        upstream: aiohttp.ClientResponse,
        data: bytes,
        replica: ReplicaStatus,
        record: Record,
        ttfb: float,
    ) -> Attempted:
        """A complete (non-streaming, or non-200) answer, passed on as is."""
        status = upstream.status
        tokens = None
        if status == 200 and "Content-Encoding" not in upstream.headers:
            match = _USAGE_RE.search(data)
            if match:
                tokens = int(match.group(1))
        response = web.Response(
            status=status, body=data, headers=self._response_headers(upstream, replica, record)
        )
        record.bytes_out = len(data)
        if status < 400:
            outcome = Outcome.OK
        else:
            outcome = Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX
        return Attempted(response, outcome, status, ttfb, tokens)

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        replica: ReplicaStatus,
        record: Record,
        ttfb: float,
    ) -> Attempted:
        """Pass chunks through as they arrive. The client's headers go out
        with the first chunk (already read under the first-byte deadline), so
        a failure before it was still retryable; after it, failures are
        reported in-band."""
        content = upstream.content
        response = web.StreamResponse(
            status=upstream.status, headers=self._response_headers(upstream, replica, record)
        )
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        events = first.count(_SSE_EVENT)
        sent = len(first)
        outcome = Outcome.OK
        idle = self._idle_timeout
        try:
            await response.prepare(request)
            if first:
                await response.write(first)
            chunk = first
            while chunk:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                except TimeoutError:
                    outcome = Outcome.TIMEOUT
                    await self._fail_stream(
                        request,
                        response,
                        sse,
                        ErrorKind.UPSTREAM_TIMEOUT,
                        f"replica {replica.name} stalled for {idle:g} s mid-stream",
                    )
                    break
                except aiohttp.ClientError:
                    outcome = Outcome.UPSTREAM_RESET
                    await self._fail_stream(
                        request,
                        response,
                        sse,
                        ErrorKind.UPSTREAM_ERROR,
                        f"replica {replica.name} closed the stream mid-response",
                    )
                    break
                if chunk:
                    events += chunk.count(_SSE_EVENT)
                    sent += len(chunk)
                    await response.write(chunk)
            else:
                await response.write_eof()
        except ConnectionResetError:
            # The client went away: aiohttp's write raises; we close upstream
            # in _attempt's finally, so the engine aborts the generation.
            outcome = Outcome.CLIENT_DISCONNECT
        record.bytes_out = sent
        # vLLM/SGLang send about one token per SSE event, plus [DONE] and a
        # usage event: close enough for the output-length estimate.
        tokens = max(0, events - 1) if sse else None
        return Attempted(response, outcome, upstream.status, ttfb, tokens)

    async def _fail_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        sse: bool,
        kind: ErrorKind,
        message: str,
    ) -> None:
        """After the first byte: tell the client in-band, never a fake [DONE]."""
        if sse:
            await response.write(sse_error_event(kind, message))
            await response.write_eof()
        else:
            # A non-SSE body cannot carry an error: cut the connection so the
            # client sees a truncated response rather than a short success.
            if request.transport is not None:
                request.transport.close()

    # -- outcomes without a served response ---------------------------------

    def _error(
        self,
        record: Record,
        kind: ErrorKind,
        message: str,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> web.Response:
        response = error_response(kind, message, retry_after_s=retry_after_s, status=status)
        record.end(response.status, kind.code)
        return response

    def _no_route(self, record: Record, why: NoRoute) -> web.Response:
        model = (record.model or "")[:64]
        if why is NoRoute.UNKNOWN_MODEL:
            return self._error(
                record, ErrorKind.MODEL_NOT_FOUND, f"The model '{model}' does not exist"
            )
        if why is NoRoute.MODELS_PENDING:
            return self._error(
                record,
                ErrorKind.NO_REPLICA,
                f"no replica is known to serve '{model}' yet (some replicas have not "
                "reported their models)",
                retry_after_s=self.retry_after_s,
            )
        return self._error(
            record,
            ErrorKind.NO_REPLICA,
            f"no healthy replica for model '{model}'",
            retry_after_s=self.retry_after_s,
        )

    def _give_up(self, record: Record, failure: AttemptFailed) -> web.Response:
        if failure.passthrough is not None and failure.outcome is not Outcome.DRAINING:
            record.end(failure.passthrough.status, failure.reason.value)
            return failure.passthrough
        return self._error(
            record,
            failure.kind,
            failure.message,
            retry_after_s=self.retry_after_s if failure.kind.status == 503 else None,
        )

    def _finish(self, record: Record, t0: float, t1: float, request: web.Request) -> None:
        """Count and log the request once, whatever ended it."""
        m = self.metrics
        model = record.model_label
        m.count_request(model, record.replica or "none", record.status)
        m.observe_duration(model, t1 - t0)
        if record.ttfb is not None:
            m.observe_ttfb(model, record.ttfb)
        if record.outcome != Outcome.OK.value:
            m.errors.labels(record.outcome).inc()
        if self._access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "id": record.request_id,
                        "method": request.method,
                        "path": request.path[:128],
                        "peer": request.remote,
                        "model": (record.model or "")[:128],
                        "replica": record.replica,
                        "reason": record.reason,
                        "status": record.status,
                        "outcome": record.outcome,
                        "attempts": record.attempts,
                        "ttfb_ms": None if record.ttfb is None else round(record.ttfb * 1e3, 2),
                        "duration_ms": round((t1 - t0) * 1e3, 2),
                        "bytes_in": record.bytes_in,
                        "bytes_out": record.bytes_out,
                    }
                )
            )
