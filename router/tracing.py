"""OpenTelemetry spans for the data path, off unless ``[tracing] enabled``.

One SERVER span per client request, joined to the client's W3C
``traceparent``/``tracestate``, and one CLIENT span per upstream attempt,
whose own ``traceparent`` replaces the client's on the upstream request, so
that the engine's spans (vLLM ``--otlp-traces-endpoint``, SGLang
``--enable-trace``: both read ``traceparent``) hang under the attempt that
reached them. Span names and attributes: docs/tracing.md.

Nothing here imports OpenTelemetry until :func:`provider` is entered with
tracing enabled: the API and SDK are the optional ``tracing`` extra, and a
gateway without them runs as before. When tracing is off the proxy holds
``None`` instead of a :class:`Tracing` and pays one ``is None`` check per
request and per attempt, no OpenTelemetry call at all.

Each process that serves the data path (the single process, or each
``--workers`` worker) has its own TracerProvider, owned by its Gateway and
never installed as the global one: two gateways in one process (tests) keep
their spans apart, and shutting one down flushes only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from router.headers import Headers

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from router.config import TracingConfig
    from router.http_server import Request
    from router.proxy import Record

EXPORTERS = ("otlp", "console")
# What each exporter needs importable; the config check names what is missing.
_MODULES = {
    "otlp": ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
    "console": ("opentelemetry.sdk.trace",),
}
INSTALL_HINT = "pip install 'dp-router[tracing]'"
TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
# Spans still queued at shutdown get this long to reach the collector: longer
# holds up a restart (and a worker the supervisor is waiting for) when the
# collector is down; shorter loses the last seconds of a drain.
FLUSH_ON_EXIT_S = 5.0
# A model name is the client's string, cut as in the access log: one request
# must not make a span of megabytes.
MAX_ATTRIBUTE_CHARS = 128


def missing_modules(exporter: str) -> list[str]:
    """The modules ``exporter`` needs that cannot be imported (the config check)."""
    missing = []
    for name in _MODULES.get(exporter, ()):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


class Tracing:
    """The data path's handle on OpenTelemetry; exists only while tracing is on."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._empty = Context()
        self._in_context = trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR

    def request(self, request: Request, request_id: str) -> RequestTrace:
        """Start the request's span, a child of the client's ``traceparent`` if
        it sent a valid one, else the root of a new trace."""
        carrier: dict[str, str] = {}
        parent = request.get(b"traceparent")
        if parent is not None:
            carrier["traceparent"] = parent.decode("latin-1")
            state = request.get_all(b"tracestate")
            if state:
                # Repeated tracestate lines are one list (W3C Trace Context 3.3.1.1).
                carrier["tracestate"] = b",".join(state).decode("latin-1")
        context = self._propagator.extract(carrier, self._empty) if carrier else self._empty
        route = request.path.partition("?")[0]
        span = self._tracer.start_span(
            f"{request.method} {route}",
            context=context,
            kind=self._server,
            attributes={
                "http.request.method": request.method,
                "url.path": route,
                "http.route": route,
                "client.address": request.peer,
                "dp.request_id": request_id,
            },
        )
        return RequestTrace(self, span, route)


class RequestTrace:
    """One client request's span; its attempts are its children."""

    __slots__ = ("_route", "_tracing", "span")

    def __init__(self, tracing: Tracing, span: Span, route: str) -> None:
        self._tracing = tracing
        self._route = route
        self.span = span

    def attempt(
        self,
        replica: str,
        address: tuple[str, int],
        number: int,
        decision_reason: str,
        retry_reason: str | None,
    ) -> AttemptTrace:
        """Start attempt ``number`` (1 for the first) on ``replica`` at
        ``address`` (host, port); ``retry_reason``: why the previous attempt
        failed."""
        tracing = self._tracing
        attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "url.path": self._route,
            "server.address": address[0],
            "server.port": address[1],
            "dp.replica": replica,
            "dp.attempt": number,
            "dp.decision_reason": decision_reason,
        }
        if retry_reason is not None:
            attributes["dp.retry_reason"] = retry_reason
            attributes["http.request.resend_count"] = number - 1
        span = tracing._tracer.start_span(
            f"upstream POST {self._route}",
            context=tracing._in_context(self.span, tracing._empty),
            kind=tracing._client,
            attributes=attributes,
        )
        return AttemptTrace(tracing, span)

    def end(self, record: Record) -> None:
        """What the access log says of the request, on its span; a 5xx is an
        error of the gateway's, a 4xx (499 included) the client's."""
        attributes: dict[str, str | int | float] = {
            "dp.outcome": record.outcome,
            "dp.attempts": record.attempts,
        }
        if record.status:
            attributes["http.response.status_code"] = record.status
        if record.model is not None:
            attributes["gen_ai.request.model"] = record.model[:MAX_ATTRIBUTE_CHARS]
        if record.replica is not None:
            attributes["dp.replica"] = record.replica
            attributes["dp.decision_reason"] = record.reason
        if record.session is not None:
            attributes["dp.session"] = record.session
        if record.ttfb is not None:
            attributes["dp.ttfb_s"] = record.ttfb
        span = self.span
        span.set_attributes(attributes)
        if record.status >= 500:
            span.set_status(self._tracing._error, record.outcome)
        span.end()


class AttemptTrace:
    """One upstream attempt's span, and the ``traceparent`` that names it."""

    __slots__ = ("_tracing", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span

    def headers(self, headers: Headers) -> Headers:
        """``headers`` with this span's traceparent (and the trace's tracestate)
        in place of the client's."""
        tracing = self._tracing
        carrier: dict[str, str] = {}
        tracing._propagator.inject(carrier, tracing._in_context(self.span, tracing._empty))
        out = [(name, value) for name, value in headers if name not in TRACE_HEADERS]
        out.extend((name.encode(), value.encode("latin-1")) for name, value in carrier.items())
        return out

    def end(
        self, outcome: str, status: int | None, failure: str | None, ttfb: float | None
    ) -> None:
        """``failure``: why the attempt failed (the retry reasons' vocabulary)."""
        attributes: dict[str, str | int | float] = {"dp.outcome": outcome}
        if status is not None:
            attributes["http.response.status_code"] = status
        if ttfb is not None:
            attributes["dp.ttfb_s"] = ttfb
        if failure is not None:
            attributes["dp.failure"] = attributes["error.type"] = failure
        span = self.span
        span.set_attributes(attributes)
        if outcome != "ok":
            span.set_status(self._tracing._error, failure or outcome)
        span.end()


@contextlib.asynccontextmanager
async def provider(
    config: TracingConfig, exporter: SpanExporter | None = None
) -> AsyncIterator[Tracing | None]:
    """This process's TracerProvider while the gateway runs, or None when
    tracing is off. ``exporter``: where spans go instead of the configured
    exporter (tests hand in an in-memory one). On exit, spans still queued
    get FLUSH_ON_EXIT_S to leave."""
    if not config.enabled:
        yield None
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if exporter is None:
        exporter = _exporter(config)
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name, "process.pid": os.getpid()}),
        # A client's sampled flag is followed (its trace is whole or absent);
        # new traces are kept at sample_ratio.
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        shutdown_on_exit=False,  # flushed below, with a bound
    )
    # Export in the SDK's own thread, batched: the event loop only queues.
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        yield Tracing(provider.get_tracer("dp-router"))
    finally:
        await _flush(processor.shutdown, FLUSH_ON_EXIT_S)


async def _flush(shutdown: Callable[[], object], timeout_s: float) -> None:
    """Run the processor's shutdown (a last export, then its thread stops) in
    a daemon thread, and wait for it at most ``timeout_s``: the SDK's own
    bound is 30 s plus a whole export timeout per queued batch, and neither
    the process's exit nor the event loop's default executor must wait on a
    collector that is down."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            shutdown()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(resolve)

    threading.Thread(target=run, name="dp-router-trace-flush", daemon=True).start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, timeout_s)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=config.service_name)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # "" leaves the endpoint to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else
    # the SDK's default, http://localhost:4318/v1/traces.
    return OTLPSpanExporter(endpoint=config.endpoint or None)
