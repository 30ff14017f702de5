"""The data path against real simulated replicas on loopback (issue 2 rows)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.harness import (
    MODEL,
    admin,
    base,
    chat_body,
    eventually,
    free_port,
    gateway,
    gateway_config,
    get_json,
    in_flight_total,
    replicas,
    serve_app,
    stats,
    tokens_total,
)


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


async def test_non_streaming_round_trip_names_replica(client: aiohttp.ClientSession) -> None:
    async with replicas(2) as urls, gateway(gateway_config(urls)) as gw:
        seen = set()
        for _ in range(6):
            async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["usage"]["completion_tokens"] == 8
                assert resp.headers["X-Request-Id"]
                seen.add(resp.headers["X-Dp-Replica"])
        assert seen <= {u.removeprefix("http://") for u in urls}
        assert in_flight_total(gw) == 0


async def test_stream_is_unbuffered(client: aiohttp.ClientSession) -> None:
    """The first chunk reaches the client while the replica is still generating."""
    async with replicas(1, token_interval_s=0.2) as urls, gateway(gateway_config(urls)) as gw:
        async with client.post(
            base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=6)
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await resp.content.readany()
            assert first.startswith(b"data: ")
            mid = await stats(client, urls[0])
            assert mid["completed"] == 0 and mid["in_progress"] == 1
            rest = await resp.content.read()
        events = _events(first + rest)
        assert events[-1] == b"data: [DONE]"
        assert (await stats(client, urls[0]))["completed"] == 1


async def test_stream_bytes_equal_replica_output(client: aiohttp.ClientSession) -> None:
    """What the client gets through the gateway is byte-identical to a direct call."""
    async with replicas(1, token_interval_s=0.0) as urls, gateway(gateway_config(urls)) as gw:
        body = chat_body(stream=True, max_tokens=20)
        async with client.post(base(gw) + "/v1/chat/completions", json=body) as resp:
            via = await resp.read()
        async with client.post(urls[0] + "/v1/chat/completions", json=body) as resp:
            direct = await resp.read()

        def strip(raw: bytes) -> list[dict]:
            # ids and timestamps differ per request; the token content must not
            out = []
            for e in _events(raw):
                if e == b"data: [DONE]":
                    continue
                d = json.loads(e[len(b"data: ") :])
                out.append([c.get("delta", c.get("text")) for c in d["choices"]])
            return out

        assert strip(via) == strip(direct)


async def test_client_disconnect_mid_stream_aborts_upstream(
    client: aiohttp.ClientSession,
) -> None:
    """M12: reading 3 chunks then closing frees the replica within 1 s."""
    async with replicas(1, token_interval_s=0.05) as urls, gateway(gateway_config(urls)) as gw:
        resp = await client.post(
            base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=500)
        )
        got = b""
        while got.count(b"data: ") < 3:
            got += await resp.content.readany()
        resp.close()  # drops the connection
        assert await eventually(lambda: _aborted(client, urls[0]), timeout=1.0 + 0.5), (
            "replica did not see the disconnect"
        )
        assert await eventually(lambda: in_flight_total(gw) == 0, timeout=1.5)
        assert tokens_total(gw) == 0
        s = await stats(client, urls[0])
        assert s["completed"] == 0


async def _aborted(client: aiohttp.ClientSession, url: str) -> bool:
    return (await stats(client, url))["aborted"] == 1


async def test_client_disconnect_before_headers_aborts_upstream(
    client: aiohttp.ClientSession, caplog
) -> None:
    """M13: a non-streaming request whose client leaves at 0.3 s of a 5 s generation."""
    caplog.set_level("INFO", logger="dp_router.access")
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        with __import__("contextlib").suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.post(
                    base(gw) + "/v1/chat/completions",
                    json=chat_body(),
                    headers={"x-sim-fault": "delay=5"},
                )
        assert await eventually(lambda: _aborted(client, urls[0]), timeout=1.0 + 0.5)
        assert await eventually(lambda: in_flight_total(gw) == 0, timeout=1.0)
        assert await eventually(
            lambda: any('"status": 499' in r.getMessage() for r in caplog.records), 1.0
        )
        line = next(r.getMessage() for r in caplog.records if '"status": 499' in r.getMessage())
        assert json.loads(line)["outcome"] == "client_disconnect"


async def test_refused_replica_costs_no_request(client: aiohttp.ClientSession) -> None:
    """M1 (basic): a replica refusing connections is retried on another one."""
    dead = f"http://127.0.0.1:{free_port()}"
    async with replicas(1) as urls, gateway(gateway_config([dead, *urls])) as gw:
        statuses = []
        for i in range(20):
            async with client.post(
                base(gw) + "/v1/chat/completions", json=chat_body(stream=bool(i % 2))
            ) as resp:
                await resp.read()
                statuses.append(resp.status)
        assert statuses == [200] * 20
        assert (await stats(client, urls[0]))["completed"] == 20
        metrics = await (await client.get(admin(gw) + "/metrics")).text()
        assert 'outcome="connect_error"' in metrics
        assert in_flight_total(gw) == 0


async def test_replica_dies_mid_stream_in_band_error_no_retry(
    client: aiohttp.ClientSession,
) -> None:
    """M2/M14: 5 chunks, then the replica drops the connection: the client gets
    those chunks once, an in-band error, no [DONE], and no second attempt."""
    async with replicas(2, token_interval_s=0.01) as urls, gateway(gateway_config(urls)) as gw:
        async with client.post(
            base(gw) + "/v1/chat/completions",
            json=chat_body(stream=True, max_tokens=50),
            headers={"x-sim-fault": "chunks=5;after=die"},
        ) as resp:
            assert resp.status == 200
            raw = await resp.read()
        events = _events(raw)
        assert b"data: [DONE]" not in events
        error = json.loads(events[-1][len(b"data: ") :])
        assert error["error"]["code"] == "upstream_error"
        token_events = [e for e in events[:-1] if b'"content"' in e or b'"text"' in e]
        assert len(token_events) == 5
        started = [(await stats(client, u))["started"] for u in urls]
        assert sorted(started) == [0, 1]  # exactly one attempt
        assert await eventually(lambda: in_flight_total(gw) == 0, timeout=1.0)
        metrics = await (await client.get(admin(gw) + "/metrics")).text()
        assert 'dp_router_errors_total{reason="stream_upstream_reset"} 1.0' in metrics


async def test_4xx_passes_through_untouched(client: aiohttp.ClientSession) -> None:
    """M4: a replica's 400 reaches the client as is, with no retry."""
    async with replicas(2) as urls, gateway(gateway_config(urls)) as gw:
        for _ in range(10):
            async with client.post(
                base(gw) + "/v1/chat/completions",
                json=chat_body(),
                headers={"x-sim-fault": "status=400"},
            ) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert "error" in body
        started = sum([(await stats(client, u))["started"] for u in urls])
        assert started == 10
        metrics = await (await client.get(admin(gw) + "/metrics")).text()
        assert "dp_router_retries_total{" not in metrics


async def test_unknown_model_is_404_and_list_models_is_union(
    client: aiohttp.ClientSession,
) -> None:
    async with replicas(1) as urls:
        cfg = gateway_config(
            urls,
            replicas=[
                {"url": urls[0], "models": [MODEL, "other"]},
                {"url": f"http://127.0.0.1:{free_port()}", "models": ["third"]},
            ],
        )
        async with gateway(cfg) as gw:
            body = chat_body()
            body["model"] = "nope\nFAKE log line"
            async with client.post(base(gw) + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 404
                err = (await resp.json())["error"]
                assert err["code"] == "model_not_found"
            listed = await get_json(client, base(gw) + "/v1/models")
            assert [m["id"] for m in listed["data"]] == ["other", "sim-model", "third"]
            # a model whose only replica is down is 503, not 404
            body["model"] = "third"
            async with client.post(base(gw) + "/v1/chat/completions", json=body) as resp:
                assert resp.status in (502, 503)
                assert (await resp.json())["error"]["type"] == "server_error"


async def test_models_discovered_from_replica(client: aiohttp.ClientSession) -> None:
    async with replicas(1) as urls:
        cfg = gateway_config(urls, replicas=[{"url": urls[0]}])
        async with gateway(cfg) as gw:

            async def known() -> bool:
                data = await get_json(client, base(gw) + "/v1/models")
                return [m["id"] for m in data["data"]] == [MODEL]

            assert await eventually(known, timeout=3)
            async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200


async def test_hop_by_hop_headers_do_not_cross(client: aiohttp.ClientSession) -> None:
    """M40, both directions; plus X-Forwarded-For, X-Request-Id and traceparent."""
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with client.post(
            base(gw) + "/v1/chat/completions",
            json=chat_body(),
            headers={
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Upgrade": "h2c",
                "Proxy-Authorization": "Basic abc",
                "X-Forwarded-For": "1.2.3.4",
                "X-Request-Id": "req-42",
                "traceparent": trace,
                "x-sim-fault": "hop_headers=1",
            },
        ) as resp:
            assert resp.status == 200
            for name in ("Keep-Alive", "Proxy-Authenticate", "Upgrade", "X-Hop"):
                assert name not in resp.headers, name
            assert resp.headers["X-Request-Id"] == "req-42"
            await resp.read()
        seen = await get_json(client, urls[0] + "/_sim/requests")
        received = {k.lower(): v for k, v in seen[-1]["headers"].items()}
        for name in ("x-secret-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
            assert name not in received, name
        assert received["x-forwarded-for"] == "127.0.0.1"
        assert received["x-request-id"] == "req-42"
        assert received["traceparent"] == trace


async def test_trusted_proxy_keeps_forwarded_chain(client: aiohttp.ClientSession) -> None:
    async with replicas(1) as urls:
        cfg = gateway_config(urls, server={"trusted_proxies": ["127.0.0.0/8"]})
        async with gateway(cfg) as gw:
            async with client.post(
                base(gw) + "/v1/chat/completions",
                json=chat_body(),
                headers={"X-Forwarded-For": "1.2.3.4", "X-Request-Id": "bad id;FAKE"},
            ) as resp:
                assert resp.headers["X-Request-Id"] != "bad id;FAKE"
                await resp.read()
            seen = (await get_json(client, urls[0] + "/_sim/requests"))[-1]["headers"]
            received = {k.lower(): v for k, v in seen.items()}
            assert received["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"


async def test_replica_header_can_be_turned_off(client: aiohttp.ClientSession) -> None:
    async with replicas(1) as urls:
        async with gateway(gateway_config(urls, server={"replica_header": False})) as gw:
            async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                assert "X-Dp-Replica" not in resp.headers


async def test_upstream_api_key_replaces_client_authorization(
    client: aiohttp.ClientSession,
) -> None:
    async with replicas(1, api_key="upstream-key") as urls:
        cfg = gateway_config(
            urls, replicas=[{"url": urls[0], "models": [MODEL], "api_key": "upstream-key"}]
        )
        async with gateway(cfg) as gw:
            async with client.post(
                base(gw) + "/v1/chat/completions",
                json=chat_body(),
                headers={"Authorization": "Bearer client-secret"},
            ) as resp:
                assert resp.status == 200
            seen = (await get_json(client, urls[0] + "/_sim/requests"))[-1]["headers"]
            assert {k.lower(): v for k, v in seen.items()}["authorization"] == (
                "Bearer upstream-key"
            )


async def test_gzip_response_passes_through_with_its_encoding(
    client: aiohttp.ClientSession,
) -> None:
    """M37: bytes and Content-Encoding stay consistent end to end."""
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        for stream in (False, True):
            async with client.post(
                base(gw) + "/v1/chat/completions",
                json=chat_body(stream=stream),
                headers={"x-sim-fault": "gzip=1", "Accept-Encoding": "gzip"},
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Encoding"] == "gzip"
                text = await resp.text()  # the client inflates: it must be valid gzip
                assert "t0 " in text


async def test_gzip_request_body_is_rejected_before_any_replica(
    client: aiohttp.ClientSession,
) -> None:
    import gzip

    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        async with client.post(
            base(gw) + "/v1/chat/completions",
            data=gzip.compress(json.dumps(chat_body()).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 415
            assert (await resp.json())["error"]["code"] == "unsupported_encoding"
        assert (await stats(client, urls[0]))["started"] == 0


async def test_body_limit(client: aiohttp.ClientSession) -> None:
    """M36: limit - 1 is forwarded; limit + 1 gets 413 with no upstream contact,
    with or without Content-Length."""
    limit = 1024 * 1024
    async with replicas(1) as urls:
        async with gateway(gateway_config(urls, server={"max_body_bytes": limit})) as gw:

            def body_of(size: int) -> bytes:
                head = json.dumps(chat_body())[:-1].encode() + b', "pad": "'
                return head + b"x" * (size - len(head) - 2) + b'"}'

            ok = body_of(limit - 1)
            assert len(ok) == limit - 1
            async with client.post(
                base(gw) + "/v1/chat/completions",
                data=ok,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 200
            big = body_of(limit + 1)
            async with client.post(
                base(gw) + "/v1/chat/completions",
                data=__import__("io").BytesIO(big),
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 413
                assert (await resp.json())["error"]["code"] == "request_too_large"

            async def chunked():  # no Content-Length
                for i in range(0, len(big), 65536):
                    yield big[i : i + 65536]

            async with client.post(
                base(gw) + "/v1/chat/completions",
                data=chunked(),
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 413
            assert (await stats(client, urls[0]))["started"] == 1


async def test_client_sockets_have_tcp_nodelay(client: aiohttp.ClientSession) -> None:
    """A missing TCP_NODELAY costs 40 ms of TTFT on keep-alive connections."""
    async with replicas(1, token_interval_s=0.05) as urls, gateway(gateway_config(urls)) as gw:
        async with client.post(
            base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=3)
        ) as resp:
            await resp.content.readany()
            connections = gw.data_server.connections
            assert connections
            for conn in connections:
                assert conn.transport is not None
                sock = conn.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await resp.read()


async def test_a_stream_that_keeps_flowing_is_never_cut(client: aiohttp.ClientSession) -> None:
    """M6: no total timeout on a stream (aiohttp's client default was 300 s):
    a stream may outlive every configured timeout while its chunks keep
    coming within the idle timeout."""
    async with replicas(1, token_interval_s=0.05) as urls:
        cfg = gateway_config(
            urls,
            upstream={
                "first_byte_timeout_s": 0.5,
                "idle_timeout_s": 0.5,
                "response_timeout_s": 0.5,
            },
        )
        async with gateway(cfg) as gw:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with client.post(
                base(gw) + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=30)
            ) as resp:
                body = await resp.read()
            assert loop.time() - t0 > 1.0  # longer than every timeout configured
            events = _events(body)
            assert events[-1] == b"data: [DONE]" and len(events) >= 30


async def test_in_flight_back_to_zero_after_random_cancels(
    client: aiohttp.ClientSession,
) -> None:
    """M48: 1,000 requests, random client cancels and replica faults; nothing leaks."""
    import random

    rng = random.Random(7)
    async with replicas(3, token_interval_s=0.002) as urls, gateway(gateway_config(urls)) as gw:
        tasks_before = _request_tasks()
        sem = asyncio.Semaphore(40)

        async def one(i: int) -> None:
            stream = rng.random() < 0.5
            fault = rng.choice(["", "", "", "status=503", "chunks=2;after=die", "status=400"])
            cancel_after = rng.choice([None, None, 0.001, 0.01, 0.03])
            headers = {"x-sim-fault": fault} if fault else {}
            async with sem:
                try:
                    async with asyncio.timeout(cancel_after):
                        async with client.post(
                            base(gw) + "/v1/chat/completions",
                            json=chat_body(stream=stream, max_tokens=rng.randint(1, 20)),
                            headers=headers,
                        ) as resp:
                            await resp.read()
                except (TimeoutError, aiohttp.ClientError):
                    pass

        await asyncio.gather(*(one(i) for i in range(1000)))
        assert await eventually(lambda: in_flight_total(gw) == 0, timeout=3)
        assert tokens_total(gw) == 0
        assert all(r.load.in_flight == 0 for r in gw.registry)
        ok = await eventually(lambda: _request_tasks() <= tasks_before + 5, 3)
        assert ok, [t.get_coro() for t in asyncio.all_tasks()][:10]


def _request_tasks() -> int:
    """Tasks other than idle keep-alive connections (one per pooled socket:
    aiohttp's handler on the replicas, the data listener's connection worker
    waiting for its next request)."""
    count = 0
    for t in asyncio.all_tasks():
        coro = t.get_coro()
        name = getattr(coro, "__qualname__", "")
        if name == "RequestHandler.start":
            continue
        frame = getattr(coro, "cr_frame", None)
        if name == "_Connection._work" and frame is not None and frame.f_locals["self"]._wake:
            continue
        count += 1
    return count


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[tuple[str, list[int]]]:
    """A 'replica' that reads a request, writes ``answer`` and closes: what a
    broken or confused backend looks like on the wire. Yields its URL and a
    one-element list counting the requests it received."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            seen[0] += 1
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"HELLO THERE\r\n\r\n",  # a garbage status line
        b"HTTP/1.1 200 OK\r\nContent-Type: application/js",  # a header block cut short
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"x" * 70000 + b"\r\n\r\n",  # an oversized header
    ],
    ids=["garbage_status_line", "truncated_headers", "oversized_header"],
)
async def test_invalid_upstream_answer_is_a_replica_failure(
    client: aiohttp.ClientSession, answer: bytes
) -> None:
    """Not valid HTTP from a replica: retried on another replica before the
    first byte, counted against the broken one (outlier ejection), never a
    client disconnect or a 500."""
    async with raw_upstream(answer) as (bad_url, seen), replicas(1) as good:
        cfg = gateway_config(
            [bad_url, *good],
            routing={"policy": "round_robin"},
            outlier={"consecutive_failures": 2, "base_ejection_s": 30.0},
            telemetry={"source": "none"},  # no /metrics scrapes: `seen` counts requests
        )
        bad_name = bad_url.removeprefix("http://")
        async with gateway(cfg) as gw:
            for _ in range(6):
                async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
                    assert resp.status == 200
                    assert resp.headers["X-Dp-Replica"] != bad_name
                    await resp.read()
            assert seen[0] == 2  # ejected after its second failure
            status = gw.registry.get(bad_name)
            assert status is not None and status.ejected(asyncio.get_running_loop().time())
            metrics = await (await client.get(admin(gw) + "/metrics")).text()
            failed = [
                line
                for line in metrics.splitlines()
                if line.startswith("dp_router_upstream_attempts_total")
                and f'replica="{bad_name}"' in line
            ]
            assert failed and all("client_disconnect" not in line for line in failed)
            assert any(
                line.startswith("dp_router_outlier_ejections_total")
                and f'replica="{bad_name}"' in line
                and line.endswith(" 1.0")
                for line in metrics.splitlines()
            )


@contextlib.asynccontextmanager
async def echo_replica(model: str) -> AsyncIterator[str]:
    """An OpenAI-ish replica that answers any POST with what it received."""
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "served_by": model,
                "path": request.path_qs,
                "content_type": request.headers.get("Content-Type", ""),
                "body_bytes": len(body),
                "body_sha": hash(body),
            }
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    app = web.Application(client_max_size=10 * 2**20)
    app.router.add_get("/v1/models", models)
    app.router.add_route("POST", "/{tail:.*}", echo)
    async with serve_app(app) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": "hello", "instructions": "be brief"}),
        ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
        ("/v1/score", {"text_1": "a", "text_2": "b"}),
        ("/tokenize", {"prompt": "count me"}),
        ("/detokenize", {"tokens": [1, 2, 3]}),
        ("/v1/completions?trace=1", {"prompt": "x"}),
    ],
)
async def test_openai_routes_pass_through_routed_by_model(
    client: aiohttp.ClientSession, path: str, body: dict
) -> None:
    async with echo_replica("alpha") as a, echo_replica("beta") as b:
        cfg = gateway_config(
            [a, b], replicas=[{"url": a, "models": ["alpha"]}, {"url": b, "models": ["beta"]}]
        )
        async with gateway(cfg) as gw:
            for model in ("alpha", "beta"):
                raw = json.dumps({"model": model, **body}).encode()
                async with client.post(
                    base(gw) + path, data=raw, headers={"Content-Type": "application/json"}
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    seen = await resp.json()
                assert seen["served_by"] == model
                assert seen["path"] == path
                assert seen["body_bytes"] == len(raw) and seen["body_sha"] == hash(raw)


async def test_audio_transcription_multipart_passes_through(client: aiohttp.ClientSession) -> None:
    async with echo_replica("whisper") as a, echo_replica("other") as b:
        cfg = gateway_config(
            [a, b], replicas=[{"url": a, "models": ["whisper"]}, {"url": b, "models": ["other"]}]
        )
        async with gateway(cfg) as gw:
            form = aiohttp.FormData()
            form.add_field("file", b"RIFF" + bytes(200_000), filename="a.wav")
            form.add_field("model", "whisper")
            async with client.post(base(gw) + "/v1/audio/transcriptions", data=form) as resp:
                assert resp.status == 200, await resp.text()
                seen = await resp.json()
            assert seen["served_by"] == "whisper"
            assert seen["content_type"].startswith("multipart/form-data; boundary=")
            assert seen["body_bytes"] > 200_000
            bad = aiohttp.FormData()
            bad.add_field("file", b"RIFF", filename="a.wav")
            async with client.post(base(gw) + "/v1/audio/transcriptions", data=bad) as resp:
                assert resp.status == 400
                assert "model" in (await resp.json())["error"]["message"]
