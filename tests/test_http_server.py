"""router.http_server against raw sockets: framing, limits, deadlines and the
smuggling variants (docs/reliability.md M12, M13, M36, M38, M39, M43, M44)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools
import pytest

from router.http_server import Exchange, HttpServer, Request, ServerLimits, start_server

HOST = "127.0.0.1"
Handler = Callable[[Request, Exchange], Awaitable[None]]


async def echo(request: Request, exchange: Exchange) -> None:
    exchange.respond(
        200,
        [(b"content-type", b"text/plain"), (b"x-path", request.path.encode())],
        request.body,
    )


@contextlib.asynccontextmanager
async def serve(
    handler: Handler = echo, **limits: Any
) -> AsyncIterator[tuple[HttpServer, list[Request], list[tuple[int, str]]]]:
    """A server on a free port; yields it, the requests its handler saw and
    the refusals reported through on_reject."""
    seen: list[Request] = []
    refused: list[tuple[int, str]] = []

    async def recording(request: Request, exchange: Exchange) -> None:
        seen.append(request)
        await handler(request, exchange)

    server = await start_server(
        recording,
        HOST,
        0,
        limits=ServerLimits(**limits),
        on_reject=lambda status, code: refused.append((status, code)),
    )
    try:
        yield server, seen, refused
    finally:
        await server.shutdown(timeout_s=1.0)


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, timeout: float = 2.0) -> Response:
    """One response, framed strictly (llhttp): skips a 100 Continue."""
    async with asyncio.timeout(timeout):
        while True:
            response = Response()
            parser = httptools.HttpResponseParser(response)
            while not response.done:
                data = await reader.read(1)
                if not data:
                    raise EOFError("connection closed mid-response")
                parser.feed_data(data)
            response.status = parser.get_status_code()
            if response.status != 100:
                return response


async def closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True when the server closed the connection (EOF or reset) in time."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except ConnectionError:
        return True  # a reset is closed too
    except TimeoutError:
        return False
    return True


_CLIENTS: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _CLIENTS:
        writer = _CLIENTS.pop()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def connect(
    server: HttpServer, sock: socket.socket | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if sock is None:
        reader, writer = await asyncio.open_connection(HOST, server.port)
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    _CLIENTS.append(writer)
    return reader, writer


def get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: gw\r\n%b\r\n" % (path.encode(), extra)


def post(body: bytes, path: str = "/v1/chat/completions") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%b" % (
        path.encode(),
        len(body),
        body,
    )


# -- requests that are served -------------------------------------------------


async def test_content_length_body_and_keep_alive_reuse() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        for body in (b'{"a": 1}', b"second"):
            writer.write(post(body))
            response = await read_response(reader)
            assert response.status == 200
            assert response.body == body
            assert b"connection" not in response.headers
        assert [r.body for r in seen] == [b'{"a": 1}', b"second"]
        assert seen[0].method == "POST" and seen[0].path == "/v1/chat/completions"
        assert seen[0].get(b"content-length") == b"8"
        assert seen[0].peer == HOST and seen[0].keep_alive and seen[0].http_version == "1.1"
        assert len(server.connections) == 1
        writer.close()


async def test_chunked_request_body_is_reassembled_and_trailers_dropped() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        response = await read_response(reader)
        assert response.status == 200 and response.body == b"abcdefgh"
        assert seen[0].get(b"x-trailer") is None
        writer.close()


async def test_chunked_response_framing_and_one_write_head() -> None:
    async def stream(request: Request, exchange: Exchange) -> None:
        exchange.start(200, [(b"content-type", b"text/event-stream")], content_length=None)
        for i in range(3):
            exchange.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0)
        exchange.end()

    async with serve(stream) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        response = await read_response(reader)
        assert response.headers[b"transfer-encoding"] == b"chunked"
        assert response.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        # and the connection is still usable
        writer.write(get())
        assert (await read_response(reader)).status == 200
        writer.close()


async def test_http10_closes_after_response_unless_keep_alive() -> None:
    async with serve() as (server, _, _):
        reader, writer = await connect(server)
        writer.write(b"GET /a HTTP/1.0\r\n\r\n")
        response = await read_response(reader)
        assert response.status == 200 and response.headers[b"connection"] == b"close"
        assert await closed(reader)

        reader, writer = await connect(server)
        writer.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = await read_response(reader)
        assert response.headers[b"connection"] == b"keep-alive"
        writer.write(b"GET /b HTTP/1.0\r\n\r\n")
        assert (await read_response(reader)).headers[b"x-path"] == b"/b"
        assert await closed(reader)


async def test_http10_stream_is_close_delimited() -> None:
    """HTTP/1.0 has no chunked coding: the body ends with the connection."""

    async def stream(request: Request, exchange: Exchange) -> None:
        exchange.start(200, [], content_length=None)
        exchange.write(b"part1 ")
        exchange.write(b"part2")
        exchange.end()

    async with serve(stream) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 2)
        head, body = raw.split(b"\r\n\r\n", 1)
        assert b"transfer-encoding" not in head and b"connection: close" in head
        assert body == b"part1 part2"


async def test_connection_close_request_closes_after_response() -> None:
    async with serve() as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get(extra=b"Connection: close\r\n"))
        response = await read_response(reader)
        assert response.headers[b"connection"] == b"close"
        assert await closed(reader)


async def test_pipelined_requests_run_one_at_a_time_in_order() -> None:
    running = 0
    most = 0

    async def slow(request: Request, exchange: Exchange) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        exchange.respond(200, [], request.path.encode())

    async with serve(slow) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get("/1") + post(b"x", "/2") + get("/3"))
        bodies = [(await read_response(reader)).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]
        assert most == 1
        writer.close()


async def test_pipelining_beyond_the_queue_closes_after_the_queued() -> None:
    """Parsed requests wait at most 16 deep; the rest are dropped with the
    connection, which a pipelining client must retry (RFC 9112 §9.3.2)."""
    release = asyncio.Event()

    async def held(request: Request, exchange: Exchange) -> None:
        await release.wait()
        exchange.respond(200, [], request.path.encode())

    async with serve(held) as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(b"".join(get(f"/{i}") for i in range(40)))
        await asyncio.sleep(0.1)
        release.set()
        bodies = []
        with contextlib.suppress(EOFError):
            while True:
                bodies.append((await read_response(reader)).body)
        assert bodies == [b"/%d" % i for i in range(len(bodies))]
        assert 16 <= len(bodies) <= 17  # the one in progress, plus the queue
        assert len(seen) == len(bodies)


async def test_absolute_form_target_becomes_origin_form() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(b"GET http://gw/v1/models?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await read_response(reader)).status == 200
        assert seen[0].path == "/v1/models?x=1"
        writer.close()


async def test_head_response_has_no_body() -> None:
    async def paths(request: Request, exchange: Exchange) -> None:
        exchange.respond(200, [], request.path.encode())

    async with serve(paths) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(b"HEAD /head HTTP/1.1\r\nHost: gw\r\n\r\n" + get("/after"))
        raw = b""
        async with asyncio.timeout(2):
            while not raw.endswith(b"/after"):
                raw += await reader.read(65536)
        first, second = raw.split(b"HTTP/1.1 200", 2)[1:]
        # the length a GET would have, and no body: the next response follows
        assert first.endswith(b"content-length: 5\r\n\r\n")
        assert second.endswith(b"\r\n\r\n/after")


async def test_upgrade_is_ignored_and_the_connection_closes() -> None:
    """RFC 9110 §7.8 lets a server ignore Upgrade; what follows it is not HTTP."""
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(get(extra=b"Connection: Upgrade\r\nUpgrade: h2c\r\n") + b"PRI * HTTP/2.0")
        response = await read_response(reader)
        assert response.status == 200 and response.headers[b"connection"] == b"close"
        assert await closed(reader)
        assert len(seen) == 1


async def test_tcp_nodelay_on_accepted_sockets() -> None:
    flags: list[int] = []

    async def handler(request: Request, exchange: Exchange) -> None:
        sock = exchange.transport.get_extra_info("socket")
        flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        exchange.respond(204, [], b"")

    async with serve(handler) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        assert (await read_response(reader)).status == 204
        assert flags and flags[0] != 0
        writer.close()


# -- the handler's failures ---------------------------------------------------


async def test_handler_exception_is_an_openai_shaped_500() -> None:
    async def broken(request: Request, exchange: Exchange) -> None:
        raise RuntimeError("bug")

    async with serve(broken) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        response = await read_response(reader)
        assert response.status == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "bug" not in response.body.decode()
        writer.close()


async def test_handler_returning_without_response_gets_500() -> None:
    async def forgetful(request: Request, exchange: Exchange) -> None:
        return None

    async with serve(forgetful) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        assert (await read_response(reader)).status == 500
        writer.close()


async def test_response_header_with_crlf_is_refused() -> None:
    errors: list[Exception] = []

    async def splitter(request: Request, exchange: Exchange) -> None:
        try:
            exchange.start(200, [(b"x-a", b"1\r\nset-cookie: evil")], content_length=0)
        except ValueError as exc:
            errors.append(exc)
            exchange.respond(200, [], b"ok")

    async with serve(splitter) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        response = await read_response(reader)
        assert errors and b"set-cookie" not in response.headers
        writer.close()


async def test_framing_fields_from_the_handler_are_dropped() -> None:
    async def framing(request: Request, exchange: Exchange) -> None:
        exchange.respond(
            200,
            [(b"Content-Length", b"999"), (b"transfer-encoding", b"chunked"), (b"x-a", b"1")],
            b"ok",
        )

    async with serve(framing) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 2)
        assert raw.lower().count(b"content-length") == 1 and b"content-length: 2" in raw
        assert b"transfer-encoding" not in raw.lower() and b"x-a: 1" in raw


async def test_short_content_length_body_closes_the_connection() -> None:
    async def short(request: Request, exchange: Exchange) -> None:
        exchange.start(200, [], content_length=10)
        exchange.write(b"12345")
        exchange.end()

    async with serve(short) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        with pytest.raises(EOFError):
            await read_response(reader)


async def test_abort_cuts_the_response() -> None:
    async def broken_midway(request: Request, exchange: Exchange) -> None:
        exchange.start(200, [], content_length=None)
        exchange.write(b"partial")
        exchange.abort()
        exchange.write(b"ignored")  # a no-op, never an error

    async with serve(broken_midway) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        with pytest.raises((EOFError, ConnectionError)):
            await read_response(reader)


# -- the client going away ----------------------------------------------------


async def test_client_disconnect_cancels_the_handler() -> None:
    """M13: the proxy's upstream request is closed through this cancel."""
    cancelled = asyncio.Event()
    wrote_after: list[bool] = []

    async def waiting(request: Request, exchange: Exchange) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            exchange.write(b"late")  # after the disconnect: a no-op
            wrote_after.append(exchange.closed)
            raise

    async with serve(waiting) as (server, seen, _):
        _reader, writer = await connect(server)
        writer.write(post(b"{}"))
        async with asyncio.timeout(1):
            while not seen:
                await asyncio.sleep(0.01)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 1.0)
        assert wrote_after == [True]


async def test_client_disconnect_mid_stream_cancels_the_handler() -> None:
    cancelled = asyncio.Event()

    async def streaming(request: Request, exchange: Exchange) -> None:
        exchange.start(200, [], content_length=None)
        try:
            while True:
                exchange.write(b"data: x\n\n")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(streaming) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get())
        await reader.readuntil(b"data: x\n\n")
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 1.0)


async def test_slow_reader_pauses_writes_and_drain_waits() -> None:
    """M45: the handler sees ``paused`` and ``drain`` blocks while the
    client does not read; nothing is lost once it does."""
    total = 8 * 1024 * 1024
    chunk = b"x" * 65536
    paused_seen: list[int] = []

    async def producer(request: Request, exchange: Exchange) -> None:
        exchange.start(200, [], content_length=total)
        sent = 0
        while sent < total:
            exchange.write(chunk)
            sent += len(chunk)
            if exchange.paused:
                paused_seen.append(exchange.transport.get_write_buffer_size())
            await exchange.drain()
        exchange.end()

    async with serve(producer) as (server, _, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, server.port))
        reader, writer = await connect(server, sock)
        writer.write(get())
        await asyncio.sleep(0.3)  # not reading
        assert paused_seen
        # bounded: never more than the high-water mark plus one write
        assert max(paused_seen) <= 64 * 1024 + len(chunk) + 64
        received = 0
        async with asyncio.timeout(5):
            while received < total:
                data = await reader.read(1 << 20)
                assert data
                received += len(data)
        assert received >= total
        writer.close()


# -- M39: smuggling and malformed requests -----------------------------------

SMUGGLED = get("/smuggled")

BAD_REQUESTS = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n0\r\n\r\n",
    "duplicate_cl": b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n"
    b"Content-Length: 0\r\n\r\n",
    "cl_list": b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 0, 0\r\n\r\n",
    "cl_plus_sign": b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: +0\r\n\r\n",
    "te_chunked_chunked": b"POST / HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "te_twice": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_chunked_not_last": b"POST / HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_identity": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: identity\r\n\r\n",
    "te_space_before_colon": b"POST / HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_folded_line": b"POST / HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n"
    b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_vertical_tab": b"POST / HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    "te_in_http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bare_lf_request_line": b"GET / HTTP/1.1\nHost: gw\r\n\r\n",
    "bare_lf_header": b"GET / HTTP/1.1\r\nHost: gw\n\r\n",
    "bare_cr_header": b"GET / HTTP/1.1\r\nHost: gw\rX: y\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n\r\n",
    "nul_in_name": b"GET / HTTP/1.1\r\nHost: gw\r\nX\x00A: ab\r\n\r\n",
    "chunk_size_hex_prefix": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0x3\r\nabc\r\n0\r\n\r\n",
    "chunk_size_negative": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-3\r\nabc\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
    "chunk_without_crlf": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcX\r\n0\r\n\r\n",
    "chunk_bare_lf": b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\nabc\r\n0\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "unknown_method": b"FOO / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "lower_case_method": b"get / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\nHost: gw\r\n\r\n",
    "control_in_target": b"GET /a\x01b HTTP/1.1\r\nHost: gw\r\n\r\n",
    "version_1_2": b"GET / HTTP/1.2\r\nHost: gw\r\n\r\n",
    "garbage": b"HELLO THERE\r\n\r\n",
    "upgrade_with_body": b"POST / HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\n"
    b"Upgrade: h2c\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.mark.parametrize("raw", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_smuggling_and_malformed_requests_are_400_and_closed(raw: bytes) -> None:
    """M39: answered 400, the connection closed, and neither that request nor
    the one behind it reaches the handler."""
    async with serve() as (server, seen, refused):
        reader, writer = await connect(server)
        writer.write(raw + SMUGGLED)
        response = await read_response(reader)
        assert response.status == 400, response.body
        assert response.headers[b"connection"] == b"close"
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert await closed(reader)
        assert seen == []
        assert refused == [(400, "bad_request")]


NOT_IMPLEMENTED = {
    # llhttp takes "gzip, chunked" as chunked; we decode no other coding.
    "te_gzip_chunked": (
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "connect": (b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\n\r\n", 501),
    "webdav_method": (b"PROPFIND / HTTP/1.1\r\nHost: gw\r\n\r\n", 501),
    "http2_version": (b"GET / HTTP/2.0\r\nHost: gw\r\n\r\n", 505),
    "http09": (b"GET /\r\n\r\n", 505),
    "expect_other": (b"GET / HTTP/1.1\r\nHost: gw\r\nExpect: magic\r\n\r\n", 417),
}


@pytest.mark.parametrize("raw,status", NOT_IMPLEMENTED.values(), ids=NOT_IMPLEMENTED.keys())
async def test_unsupported_requests_are_refused_and_closed(raw: bytes, status: int) -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(raw + SMUGGLED)
        response = await read_response(reader)
        assert response.status == status
        assert response.json()["error"]["code"]
        assert await closed(reader)
        assert seen == []


async def test_bad_request_behind_a_good_one_is_answered_in_order() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(get("/ok") + BAD_REQUESTS["cl_and_te"] + SMUGGLED)
        assert (await read_response(reader)).status == 200
        assert (await read_response(reader)).status == 400
        assert await closed(reader)
        assert [r.path for r in seen] == ["/ok"]


# -- M38: header limits -------------------------------------------------------


async def test_oversized_header_field_is_431() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(get(extra=b"X-Big: " + b"a" * 9000 + b"\r\n") + SMUGGLED)
        response = await read_response(reader)
        assert response.status == 431
        assert response.json()["error"]["code"] == "headers_too_large"
        assert await closed(reader)
        assert seen == []


async def test_header_field_at_the_limit_is_served() -> None:
    async with serve() as (server, _seen, _):
        reader, writer = await connect(server)
        name = b"X-Big"
        writer.write(get(extra=name + b": " + b"a" * (8190 - len(name)) + b"\r\n"))
        assert (await read_response(reader)).status == 200
        writer.close()


async def test_too_many_headers_is_431() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        writer.write(get(extra=many) + SMUGGLED)
        assert (await read_response(reader)).status == 431
        assert await closed(reader)
        assert seen == []


async def test_head_too_large_is_431_while_reading() -> None:
    """Under the per-field limit, over the whole-head limit, and never
    terminated: refused once the head passes max_head_bytes."""
    async with serve(max_head_bytes=16 * 1024) as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n")
        for i in range(10):
            writer.write(b"X-H%d: %b\r\n" % (i, b"v" * 4000))
            await writer.drain()
        assert (await read_response(reader)).status == 431
        assert seen == []


async def test_long_request_target_is_414() -> None:
    async with serve() as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(get("/" + "a" * 9000))
        assert (await read_response(reader)).status == 414
        assert await closed(reader)
        assert seen == []


# -- M36: the body limit --------------------------------------------------------

LIMIT = 1000


@pytest.mark.parametrize("size,status", [(LIMIT - 1, 200), (LIMIT, 200), (LIMIT + 1, 413)])
async def test_body_limit_with_content_length(size: int, status: int) -> None:
    async with serve(max_body_bytes=LIMIT) as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(post(b"b" * size))
        response = await read_response(reader)
        assert response.status == status
        if status == 413:
            assert response.json()["error"]["code"] == "request_too_large"
            assert seen == []
            assert await closed(reader)
        else:
            assert len(seen[0].body) == size
        writer.close()


@pytest.mark.parametrize("size,status", [(LIMIT, 200), (LIMIT + 1, 413)])
async def test_body_limit_with_chunked_body(size: int, status: int) -> None:
    """No Content-Length: the limit is enforced while the chunks arrive."""
    async with serve(max_body_bytes=LIMIT) as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        left = size
        while left:
            n = min(300, left)
            writer.write(b"%x\r\n%b\r\n" % (n, b"c" * n))
            left -= n
        writer.write(b"0\r\n\r\n")
        response = await read_response(reader)
        assert response.status == status
        if status == 413:
            assert seen == []
        else:
            assert len(seen[0].body) == size
        writer.close()


async def test_huge_content_length_is_refused_before_the_body() -> None:
    async with serve(max_body_bytes=LIMIT) as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999\r\n\r\n")
        assert (await read_response(reader)).status == 413
        assert seen == []


async def test_expect_100_continue_under_the_limit() -> None:
    async with serve(max_body_bytes=LIMIT) as (server, _seen, _):
        reader, writer = await connect(server)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        response = await read_response(reader)
        assert response.status == 200 and response.body == b"hello"
        writer.close()


async def test_expect_100_continue_over_the_limit_is_413_without_100() -> None:
    async with serve(max_body_bytes=LIMIT) as (server, seen, _):
        reader, writer = await connect(server)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 413")
        assert seen == []


# -- M43, M44: deadlines --------------------------------------------------------


async def test_slowloris_head_gets_408_within_the_deadline() -> None:
    deadline = 0.4
    async with serve(header_timeout_s=deadline) as (server, seen, refused):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reader, writer = await connect(server)

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in b"GET / HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa":
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(dribble())
        response = await read_response(reader, timeout=deadline + 0.5)
        assert response.status == 408
        assert await closed(reader, timeout=deadline + 0.5 - (loop.time() - t0))
        assert loop.time() - t0 <= deadline + 0.5
        assert seen == [] and refused == [(408, "request_timeout")]
        task.cancel()


async def test_silent_connection_is_closed_at_the_header_deadline() -> None:
    deadline = 0.3
    async with serve(header_timeout_s=deadline) as (server, _, _):
        t0 = asyncio.get_running_loop().time()
        reader, _writer = await connect(server)
        assert await reader.read() == b""  # closed, with no answer
        assert asyncio.get_running_loop().time() - t0 <= deadline + 0.5


async def test_slow_body_gets_408_within_the_body_deadline() -> None:
    deadline = 0.4
    async with serve(body_timeout_s=deadline) as (server, seen, _):
        loop = asyncio.get_running_loop()
        reader, writer = await connect(server)
        writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 10000\r\n\r\n0123456789")
        t0 = loop.time()
        response = await read_response(reader, timeout=deadline + 0.5)
        assert response.status == 408
        assert loop.time() - t0 <= deadline + 0.5
        assert seen == []


async def test_idle_keep_alive_connection_is_closed() -> None:
    idle = 0.3
    async with serve(keepalive_timeout_s=idle) as (server, _, _):
        loop = asyncio.get_running_loop()
        reader, writer = await connect(server)
        writer.write(get())
        await read_response(reader)
        t0 = loop.time()
        assert await reader.read() == b""
        assert loop.time() - t0 <= idle + 0.5


async def test_header_deadline_restarts_for_each_request() -> None:
    """A keep-alive client that sends requests steadily is never cut, even
    when the connection lives longer than the header deadline."""
    async with serve(header_timeout_s=0.3, keepalive_timeout_s=1.0) as (server, _, _):
        reader, writer = await connect(server)
        for _ in range(4):
            writer.write(get())
            assert (await read_response(reader)).status == 200
            await asyncio.sleep(0.15)
        writer.close()


async def test_long_handler_is_not_cut_by_server_deadlines() -> None:
    async def slow(request: Request, exchange: Exchange) -> None:
        await asyncio.sleep(0.6)
        exchange.respond(200, [], b"late")

    async with serve(slow, header_timeout_s=0.2, body_timeout_s=0.2, keepalive_timeout_s=0.2) as (
        server,
        _,
        _,
    ):
        reader, writer = await connect(server)
        writer.write(get())
        assert (await read_response(reader)).body == b"late"
        writer.close()


# -- shutdown ---------------------------------------------------------------------


async def test_a_queued_request_counts_as_in_flight_while_it_runs() -> None:
    """A pipelined request, queued while the one before it was answered, is
    run by the connection's task after that handler returns: in flight (so
    shutdown waits for it) until its own handler ends."""
    second_running = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.respond(200, [], request.path.encode())
        if request.path == "/1":
            await asyncio.sleep(0.05)  # work after the answer: /2 waits its turn
        else:
            second_running.set()
            await release.wait()

    async with serve(handler) as (server, _, _):
        reader, writer = await connect(server)
        writer.write(get("/1") + get("/2"))
        await asyncio.wait_for(second_running.wait(), 2.0)
        assert server.in_flight == 1
        release.set()
        assert [(await read_response(reader)).body for _ in range(2)] == [b"/1", b"/2"]
        assert await eventually_zero(lambda: server.in_flight)
        writer.close()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_handler_cancelled_after_its_answer_leaves_the_connection_serving(
    pipelined: bool,
) -> None:
    """A handler whose own await is cancelled after it answered (not the
    connection's cancel) ends that request only: the next one on the
    connection, queued or sent later, is answered as with a task per request."""

    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.respond(200, [], request.path.encode())
        if request.path == "/1":
            other = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(other.cancel)
            await other  # raises CancelledError: someone else's cancel

    async with serve(handler) as (server, _, _):
        reader, writer = await connect(server)
        if pipelined:
            writer.write(get("/1") + get("/2"))
        else:
            writer.write(get("/1"))
            assert (await read_response(reader)).body == b"/1"
            await asyncio.sleep(0.05)
            writer.write(get("/2"))
        bodies = [(await asyncio.wait_for(read_response(reader), 2.0)).body]
        if pipelined:
            bodies.append((await asyncio.wait_for(read_response(reader), 2.0)).body)
        assert bodies[-1] == b"/2"
        writer.close()


async def eventually_zero(value: Callable[[], int], timeout: float = 1.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while value() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return value() == 0


async def test_shutdown_lets_in_flight_finish_and_closes_idle() -> None:
    release = asyncio.Event()

    async def held(request: Request, exchange: Exchange) -> None:
        if request.path == "/held":
            await release.wait()
        exchange.respond(200, [], b"done")

    server = await start_server(held, HOST, 0, limits=ServerLimits())
    idle_reader, idle_writer = await connect(server)
    idle_writer.write(get("/quick"))
    await read_response(idle_reader)
    busy_reader, busy_writer = await connect(server)
    busy_writer.write(get("/held"))
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(server.shutdown(timeout_s=2.0))
    assert await closed(idle_reader, timeout=1.0)
    release.set()
    response = await read_response(busy_reader)
    assert response.body == b"done" and response.headers[b"connection"] == b"close"
    await stopping
    with pytest.raises(OSError):
        await connect(server)


# -- the same paths on uvloop, the production loop --------------------------------

UVLOOP_CASES: list[Callable[[], Awaitable[None]]] = [
    test_content_length_body_and_keep_alive_reuse,
    test_pipelined_requests_run_one_at_a_time_in_order,
    test_bad_request_behind_a_good_one_is_answered_in_order,
    test_oversized_header_field_is_431,
    test_slowloris_head_gets_408_within_the_deadline,
    test_client_disconnect_mid_stream_cancels_the_handler,
    test_slow_reader_pauses_writes_and_drain_waits,
    test_shutdown_lets_in_flight_finish_and_closes_idle,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=lambda case: case.__name__[5:])
def test_on_uvloop(case: Callable[[], Awaitable[None]]) -> None:
    """uvloop's transports pause, resume, half-close and report closes
    their own way; the gateway runs on it."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        try:
            await case()
        finally:
            while _CLIENTS:
                writer = _CLIENTS.pop()
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
