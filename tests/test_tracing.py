"""OpenTelemetry spans (router/tracing.py, docs/tracing.md): a real gateway in
front of simulated replicas, spans caught by the SDK's in-memory exporter."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from router import cli
from router import config as config_mod
from router.app import Gateway, Role
from router.config import Config, ConfigError
from tests.harness import base, chat_body, free_port, gateway_config, get_json, replicas

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACING = {"enabled": True, "exporter": "console"}


@contextlib.asynccontextmanager
async def traced_gateway(
    cfg: Config, role: Role = Role.SINGLE
) -> AsyncIterator[tuple[Gateway, InMemorySpanExporter]]:
    """A gateway whose spans go to memory. Read them after the block: the
    gateway's shutdown flushes the batch processor."""
    exporter = InMemorySpanExporter()
    gw = Gateway(cfg, role=role, span_exporter=exporter)
    await gw.start()
    try:
        yield gw, exporter
    finally:
        await gw.shutdown()


async def post(
    client: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str], stream: bool = False
) -> aiohttp.ClientResponse:
    async with client.post(
        base(gw) + "/v1/chat/completions", json=chat_body(stream=stream), headers=headers
    ) as resp:
        await resp.read()
        return resp


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


def traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


async def seen_headers(client: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    """Each request the replica received, by X-Request-Id: its headers, lower-cased."""
    seen = await get_json(client, url + "/_sim/requests")
    return {r["id"]: {k.lower(): v for k, v in r["headers"].items()} for r in seen}


async def test_client_traceparent_joins_server_and_attempt_spans(
    client: aiohttp.ClientSession,
) -> None:
    """The request's span continues the client's trace; its one attempt is a
    child whose traceparent (and the client's tracestate) reached the replica."""
    headers = {
        "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01",
        "tracestate": "vendor=opaque",
        "x-request-id": "traced-1",
        "x-session-id": "conversation-7",
    }
    async with replicas(1) as urls:
        async with traced_gateway(gateway_config(urls, tracing=TRACING)) as (gw, exporter):
            resp = await post(client, gw, headers, stream=True)
            assert resp.status == 200
            upstream = (await seen_headers(client, urls[0]))["traced-1"]
        spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    [attempt] = by_kind(spans, SpanKind.CLIENT)
    assert server.name == "POST /v1/chat/completions"
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CLIENT_SPAN_ID
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    assert attempt.context.trace_id == server.context.trace_id

    replica = urls[0].removeprefix("http://")
    s = server.attributes or {}
    assert s["http.response.status_code"] == 200
    assert s["gen_ai.request.model"] == "sim-model"
    assert s["dp.request_id"] == "traced-1"
    assert s["dp.replica"] == replica
    assert s["dp.decision_reason"]
    assert s["dp.attempts"] == 1
    assert s["dp.outcome"] == "ok"
    assert s["dp.session"] == "new"
    assert isinstance(s["dp.ttfb_s"], float) and s["dp.ttfb_s"] > 0
    assert server.status.status_code is StatusCode.UNSET

    a = attempt.attributes or {}
    assert a["dp.replica"] == replica
    assert a["dp.attempt"] == 1
    assert a["dp.decision_reason"] == s["dp.decision_reason"]
    assert a["http.response.status_code"] == 200
    assert a["dp.outcome"] == "ok"
    assert a["dp.ttfb_s"] == s["dp.ttfb_s"]
    assert "dp.retry_reason" not in a
    assert a["server.port"] == int(replica.rpartition(":")[2])

    assert upstream["traceparent"] == traceparent(attempt)
    assert upstream["tracestate"] == "vendor=opaque"


async def test_retry_gives_one_attempt_span_per_attempt(client: aiohttp.ClientSession) -> None:
    """A replica refusing connections: the failed attempt's span says why, the
    retry's says it is the second and why; the replica sees the second's id."""
    dead = f"http://127.0.0.1:{free_port()}"
    async with replicas(1) as urls:
        cfg = gateway_config([dead, *urls], tracing=TRACING, routing={"policy": "round_robin"})
        async with traced_gateway(cfg) as (gw, exporter):
            for i in range(4):  # round robin: some request tries the dead one first
                resp = await post(client, gw, {"x-request-id": f"retry-{i}"})
                assert resp.status == 200
            upstream = await seen_headers(client, urls[0])
        spans = exporter.get_finished_spans()
    servers = by_kind(spans, SpanKind.SERVER)
    assert len(servers) == 4
    retried = [s for s in servers if (s.attributes or {})["dp.attempts"] == 2]
    assert retried
    server = retried[0]
    attempts = sorted(
        (s for s in by_kind(spans, SpanKind.CLIENT) if s.parent == server.context),
        key=lambda s: (s.attributes or {})["dp.attempt"],
    )
    first, second = (s.attributes or {} for s in attempts)
    assert first["dp.replica"] == dead.removeprefix("http://")
    assert first["dp.outcome"] == "connect_error"
    assert first["dp.failure"] == first["error.type"] == "connect_error"
    assert "http.response.status_code" not in first
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert second["dp.replica"] == urls[0].removeprefix("http://")
    assert second["dp.attempt"] == 2
    assert second["dp.retry_reason"] == "connect_error"
    assert second["http.request.resend_count"] == 1
    assert second["dp.outcome"] == "ok"
    # No client traceparent: the gateway's span starts the trace, and the
    # replica sees the attempt that reached it.
    assert server.parent is None
    request_id = (server.attributes or {})["dp.request_id"]
    assert upstream[request_id]["traceparent"] == traceparent(attempts[1])


async def test_worker_role_traces_its_own_requests(client: aiohttp.ClientSession) -> None:
    """``--workers N``: each worker process's Gateway (Role.WORKER) has its
    own provider; a malformed traceparent starts a new trace."""
    async with replicas(1) as urls:
        cfg = gateway_config(urls, tracing=TRACING)
        async with traced_gateway(cfg, role=Role.WORKER) as (gw, exporter):
            resp = await post(client, gw, {"traceparent": "00-not-a-trace-context-01"})
            assert resp.status == 200
        spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    assert server.parent is None
    assert len(by_kind(spans, SpanKind.CLIENT)) == 1


async def test_tracing_off_makes_no_spans_and_passes_traceparent_through(
    client: aiohttp.ClientSession,
) -> None:
    """Off (the default): no tracer at all, the client's trace headers reach
    the replica unchanged, and none is added to a request without them."""
    client_parent = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
    async with replicas(1) as urls:
        async with traced_gateway(gateway_config(urls)) as (gw, exporter):
            assert gw.proxy.tracer is None
            headers = {"traceparent": client_parent, "tracestate": "a=b", "x-request-id": "with"}
            assert (await post(client, gw, headers)).status == 200
            assert (await post(client, gw, {"x-request-id": "without"})).status == 200
            upstream = await seen_headers(client, urls[0])
        assert exporter.get_finished_spans() == ()
    assert upstream["with"]["traceparent"] == client_parent
    assert upstream["with"]["tracestate"] == "a=b"
    assert "traceparent" not in upstream["without"]
    assert "tracestate" not in upstream["without"]


# -- config ---------------------------------------------------------------


def _config(**tracing: Any) -> Config:
    return config_mod.from_dict(
        {"replicas": [{"url": "http://127.0.0.1:9"}], "tracing": tracing}, env={}
    )


def test_tracing_is_off_by_default() -> None:
    assert _config().tracing.enabled is False


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ({"exporter": "jaeger"}, "tracing.exporter: one of otlp, console"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio: must be in [0, 1]"),
        ({"exporter": "console", "endpoint": "http://c:4318"}, "tracing.endpoint: only for"),
        ({"endpoint": "collector:4318"}, "tracing.endpoint: expected an http(s) URL"),
        ({"service_name": ""}, "tracing.service_name: must not be empty"),
        ({"enable": True}, "tracing.enable: unknown key"),
    ],
)
def test_bad_tracing_config_is_one_clear_line(tracing: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(**tracing)


def test_enabled_without_the_sdk_fails_the_config_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SDK not installed (a None in sys.modules makes it unimportable):
    check-config exits 2 naming what to install, with no traceback."""
    for name in (
        "opentelemetry.sdk",
        "opentelemetry.sdk.trace",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    path = tmp_path / "gw.toml"
    path.write_text('[tracing]\nenabled = true\n\n[[replicas]]\nurl = "http://127.0.0.1:9"\n')
    assert cli.check_config([str(path)]) == 2
    err = capsys.readouterr().err
    assert "config error: tracing.enabled: exporter 'otlp' needs opentelemetry.sdk.trace" in err
    assert "pip install 'dp-router[tracing]'" in err
    assert "Traceback" not in err
