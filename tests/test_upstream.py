"""router.upstream against scripted raw replicas, and the relay through
router.http_server to raw clients (docs/reliability.md M2, M6, M12, M13, M45)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from router.http_server import Exchange, HttpServer, Request, ServerLimits, start_server
from router.upstream import (
    BadResponse,
    ConnectError,
    RelayResult,
    UpstreamPool,
    UpstreamReset,
    UpstreamResponse,
)

HOST = "127.0.0.1"
HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


@dataclass
class Call:
    """One request as the fake replica read it."""

    conn: int  # which connection (0, 1, ...)
    index: int  # which request on that connection
    head: bytes
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


Script = Callable[["FakeReplica", Call], Awaitable[bool]]


@dataclass
class FakeReplica:
    """A raw HTTP/1.1 'replica': reads requests, lets a script answer each.
    The script returns True to read another request on the connection."""

    script: Script
    port: int = 0
    connections: int = 0
    calls: list[Call] = field(default_factory=list)
    # loop.time() of each connection the gateway side closed
    peer_closed: list[float] = field(default_factory=list)
    sent: int = 0  # body bytes the scripts wrote (flow-control tests)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        index = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                call = Call(conn, index, head, body, reader, writer)
                self.calls.append(call)
                index += 1
                if not await self.script(self, call):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.append(asyncio.get_running_loop().time())
        finally:
            writer.close()

    def watch_eof(self, reader: asyncio.StreamReader) -> asyncio.Task[None]:
        """Record when the gateway closes this connection, while the script
        does something else (streams, or stays silent)."""

        async def watch() -> None:
            try:
                while await reader.read(65536):
                    pass
            except ConnectionError:
                pass
            self.peer_closed.append(asyncio.get_running_loop().time())

        task = asyncio.ensure_future(watch())
        self.tasks.add(task)
        return task


@contextlib.asynccontextmanager
async def replica(script: Script, *, sndbuf: int | None = None) -> AsyncIterator[FakeReplica]:
    fake = FakeReplica(script)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if sndbuf is not None:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        task = asyncio.current_task()
        assert task is not None
        fake.tasks.add(task)
        await fake.handle(reader, writer)

    server = await asyncio.start_server(handle, HOST, 0)
    fake.port = server.sockets[0].getsockname()[1]
    fake.server = server
    try:
        yield fake
    finally:
        server.close()
        for task in list(fake.tasks):
            task.cancel()
        await asyncio.gather(*fake.tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(keepalive_timeout_s=5.0, max_idle_per_host=4)
    yield p
    await p.close()


def answer(raw: bytes, *, keep: bool = True) -> Script:
    async def script(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(raw)
        await call.writer.drain()
        return keep

    return script


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%bcontent-length: %d\r\n\r\n%b"
        % (
            extra,
            len(body),
            body,
        )
    )


def deadline(seconds: float = 2.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def send(
    pool: UpstreamPool, fake: FakeReplica, body: bytes = b"{}", method: str = "POST"
) -> UpstreamResponse:
    return await pool.request(
        HOST,
        fake.port,
        method,
        "/v1/chat/completions",
        [(b"content-type", b"application/json")],
        body,
        connect_timeout_s=1.0,
    )


async def fetch(pool: UpstreamPool, fake: FakeReplica, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await send(pool, fake, body)
    try:
        await response.head(deadline())
        return response.status, await response.read_all(1 << 20, deadline())
    finally:
        response.release()


async def eventually(check: Callable[[], bool], timeout: float = 1.0) -> bool:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    return True


# -- framing and reuse ------------------------------------------------------------


async def test_content_length_response_and_keep_alive_reuse(pool: UpstreamPool) -> None:
    async with replica(answer(ok(b'{"ok": true}'))) as fake:
        for _ in range(3):
            assert await fetch(pool, fake) == (200, b'{"ok": true}')
        assert fake.connections == 1
        assert pool.idle_count(HOST, fake.port) == 1


async def test_request_is_one_write_with_host_and_length(pool: UpstreamPool) -> None:
    first_reads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_reads.append(await reader.read(65536))
        writer.write(ok(b"x"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        body = b'{"model": "m"}'
        response = await pool.request(
            HOST, port, "POST", "/v1/x?y=1", [(b"x-request-id", b"r1")], body, connect_timeout_s=1
        )
        await response.head(deadline())
        response.release()
        assert first_reads[0] == (
            b"POST /v1/x?y=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-request-id: r1\r\n"
            b"content-length: %d\r\n\r\n%b" % (port, len(body), body)
        )
    finally:
        server.close()
        await server.wait_closed()


async def test_callers_host_and_framing_fields_are_replaced(pool: UpstreamPool) -> None:
    async with replica(answer(ok(b"x"))) as fake:
        response = await pool.request(
            HOST,
            fake.port,
            "POST",
            "/",
            [
                (b"Host", b"client.example"),
                (b"Content-Length", b"999"),
                (b"Transfer-Encoding", b"chunked"),
                (b"x-a", b"1"),
            ],
            b"{}",
            connect_timeout_s=1.0,
        )
        await response.head(deadline())
        response.release()
        head = fake.calls[0].head.lower()
        assert head.count(b"host:") == 1 and b"client.example" not in head
        assert head.count(b"content-length") == 1 and b"content-length: 2" in head
        assert b"transfer-encoding" not in head and b"x-a: 1" in head


async def test_large_body_arrives_whole(pool: UpstreamPool) -> None:
    async def count(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(ok(b"%d" % len(call.body)))
        return True

    async with replica(count) as fake:
        # Sliced with drain, one vectored write, one joined write.
        for i, size in enumerate((3 * 1024 * 1024 + 7, 100 * 1024 + 3, 1000)):
            body = bytes([97 + i]) * size
            assert await fetch(pool, fake, body) == (200, b"%d" % len(body))
            assert fake.calls[i].body == body


async def test_chunked_response(pool: UpstreamPool) -> None:
    raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with replica(answer(raw)) as fake:
        assert await fetch(pool, fake) == (200, b"abcde")
        assert await fetch(pool, fake) == (200, b"abcde")
        assert fake.connections == 1


async def test_close_delimited_body_completes_at_close_and_is_not_reused(
    pool: UpstreamPool,
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end"
    async with replica(answer(raw, keep=False)) as fake:
        assert await fetch(pool, fake) == (200, b"until the end")
        assert pool.idle_count(HOST, fake.port) == 0
        assert await fetch(pool, fake) == (200, b"until the end")
        assert fake.connections == 2


async def test_connection_close_response_is_not_pooled(pool: UpstreamPool) -> None:
    async with replica(answer(ok(b"x", b"connection: close\r\n"), keep=False)) as fake:
        assert await fetch(pool, fake) == (200, b"x")
        assert pool.idle_count(HOST, fake.port) == 0


async def test_interim_responses_are_skipped(pool: UpstreamPool) -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n" + ok(b"final")
    )
    async with replica(answer(raw)) as fake:
        response = await send(pool, fake)
        await response.head(deadline())
        assert response.status == 200
        assert response.get(b"link") is None
        assert await response.read_all(1000) == b"final"
        assert pool.idle_count(HOST, fake.port) == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_keep_the_connection(pool: UpstreamPool, status: int) -> None:
    raw = b"HTTP/1.1 %d X\r\ncontent-length: 10\r\n\r\n" % status if status == 304 else b""
    raw = raw or b"HTTP/1.1 204 No Content\r\n\r\n"
    async with replica(answer(raw)) as fake:
        assert await fetch(pool, fake) == (status, b"")
        assert await fetch(pool, fake) == (status, b"")
        assert fake.connections == 1


async def test_head_request_has_no_body(pool: UpstreamPool) -> None:
    async with replica(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")) as fake:
        response = await send(pool, fake, b"", method="HEAD")
        await response.head(deadline())
        assert response.status == 200 and response.content_length == 100
        assert await response.read_all(1000) == b""
        assert b"content-length" not in fake.calls[0].head.lower()


async def test_bytes_after_the_response_prevent_reuse(pool: UpstreamPool) -> None:
    async with replica(answer(ok(b"x") + b"HTTP/1.1 200 OK\r\n")) as fake:
        assert await fetch(pool, fake) == (200, b"x")
        assert pool.idle_count(HOST, fake.port) == 0


async def test_response_bytes_pass_through_undecoded(pool: UpstreamPool) -> None:
    """M37: no decompression; Content-Encoding stays with its bytes."""
    gz = b"\x1f\x8b\x08\x00not-really-gzip"
    async with replica(answer(ok(gz, b"content-encoding: gzip\r\n"))) as fake:
        response = await send(pool, fake)
        await response.head(deadline())
        assert response.get(b"content-encoding") == b"gzip"
        assert await response.read_all(1000) == gz


# -- failures -----------------------------------------------------------------


async def test_close_mid_body_is_a_reset_and_not_reused(pool: UpstreamPool) -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345"
    async with replica(answer(raw, keep=False)) as fake:
        response = await send(pool, fake)
        await response.head(deadline())
        with pytest.raises(UpstreamReset, match="mid-body"):
            await response.read_all(1000, deadline())
        response.release()
        assert pool.idle_count(HOST, fake.port) == 0


INVALID_ANSWERS = {
    "garbage_status_line": b"HELLO THERE\r\n\r\n",
    "truncated_head": b"HTTP/1.1 200 OK\r\nContent-Type: application/js",
    "oversized_header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70000 + b"\r\n\r\n",
    "too_many_headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-%d: v\r\n" % i for i in range(200))
    + b"\r\n",
    "bad_status_code": b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
    "bare_lf": b"HTTP/1.1 200 OK\ncontent-length: 0\n\n",
    # What the client response block relies on: no CR, LF or NUL in a field
    # reaches it (router.headers.client_response_block does not scan).
    "bare_cr_in_field": b"HTTP/1.1 200 OK\r\nx-a: 1\rx-b: 2\r\ncontent-length: 0\r\n\r\n",
    "nul_in_field": b"HTTP/1.1 200 OK\r\nx-a: 1\x00x\r\ncontent-length: 0\r\n\r\n",
    "cl_and_te": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
    "gzip_transfer_coding": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc",
    "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n"
    b"connection: upgrade\r\n\r\n",
    "bad_chunk_size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.mark.parametrize("raw", INVALID_ANSWERS.values(), ids=INVALID_ANSWERS.keys())
async def test_invalid_answers_are_bad_response(pool: UpstreamPool, raw: bytes) -> None:
    async with replica(answer(raw, keep=False)) as fake:
        response = await send(pool, fake)
        with pytest.raises(BadResponse) as info:
            await response.head(deadline())
            await response.read_all(1000, deadline())
        assert info.value.reason
        assert pool.open_connections == 0


async def test_close_before_any_byte_on_a_fresh_connection_is_not_retried(
    pool: UpstreamPool,
) -> None:
    async with replica(answer(b"", keep=False)) as fake:
        response = await send(pool, fake)
        with pytest.raises(UpstreamReset, match="before the response"):
            await response.head(deadline())
        assert fake.connections == 1


async def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(
    pool: UpstreamPool,
) -> None:
    """The keep-alive race: the server closed the idle connection without
    reading our request; the pool resends it once on a new connection."""

    async def first_answers_then_closes(fake: FakeReplica, call: Call) -> bool:
        if call.conn == 0 and call.index == 1:
            return False  # close without answering
        call.writer.write(ok(b"conn%d" % call.conn))
        return True

    async with replica(first_answers_then_closes) as fake:
        assert await fetch(pool, fake) == (200, b"conn0")
        assert await fetch(pool, fake) == (200, b"conn1")
        assert fake.connections == 2


async def test_reused_connection_failing_twice_is_a_reset(pool: UpstreamPool) -> None:
    async def close_all_but_first(fake: FakeReplica, call: Call) -> bool:
        if call.conn == 0 and call.index == 0:
            call.writer.write(ok(b"x"))
            return True
        return False

    async with replica(close_all_but_first) as fake:
        assert await fetch(pool, fake) == (200, b"x")
        with pytest.raises(UpstreamReset):
            await fetch(pool, fake)
        assert fake.connections == 2  # one retry, not more


async def test_replica_gone_after_a_reused_connection_is_a_reset(pool: UpstreamPool) -> None:
    """The retry's reconnect is refused: still a reset (the request had left
    on the old connection), never a free connect error."""

    async def answer_then_die(fake: FakeReplica, call: Call) -> bool:
        if call.index == 0:
            call.writer.write(ok(b"x"))
            return True
        assert fake.server is not None
        fake.server.close()  # stop listening, then drop this connection
        return False

    async with replica(answer_then_die) as fake:
        assert await fetch(pool, fake) == (200, b"x")
        response = await send(pool, fake)
        with pytest.raises(UpstreamReset, match="reconnect failed"):
            await response.head(deadline())
        assert fake.connections == 1


async def test_refused_connection_is_connect_error(pool: UpstreamPool) -> None:
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(ConnectError, match="failed"):
        await pool.request(HOST, port, "POST", "/", [], b"{}", connect_timeout_s=1.0)


async def test_head_deadline_then_close_disconnects_the_replica(pool: UpstreamPool) -> None:
    async def silent(fake: FakeReplica, call: Call) -> bool:
        await fake.watch_eof(call.reader)
        return False

    async with replica(silent) as fake:
        response = await send(pool, fake)
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await response.head(deadline(0.2))
        t0 = loop.time()
        response.release()  # not complete: closes, never pools
        assert await eventually(lambda: bool(fake.peer_closed))
        assert fake.peer_closed[0] - t0 < 1.0
        assert pool.open_connections == 0


async def test_cancelled_request_closes_the_connection(pool: UpstreamPool) -> None:
    async def silent(fake: FakeReplica, call: Call) -> bool:
        await fake.watch_eof(call.reader)
        return False

    async with replica(silent) as fake:
        response = await send(pool, fake)
        task = asyncio.ensure_future(response.head(deadline()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        response.close()
        assert await eventually(lambda: bool(fake.peer_closed))
        assert pool.idle_count(HOST, fake.port) == 0


async def test_read_all_over_the_limit_is_bad_response(pool: UpstreamPool) -> None:
    async with replica(answer(ok(b"z" * 5000))) as fake:
        response = await send(pool, fake)
        await response.head(deadline())
        with pytest.raises(BadResponse, match="exceeds"):
            await response.read_all(4999, deadline())
        assert pool.open_connections == 0


async def test_header_injection_towards_the_replica_is_refused(pool: UpstreamPool) -> None:
    with pytest.raises(ValueError):
        await pool.request(
            HOST,
            1,
            "POST",
            "/",
            [(b"x-a", b"1\r\ntransfer-encoding: chunked")],
            b"",
            connect_timeout_s=1,
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_https_replica(pool: UpstreamPool, tmp_path: Path) -> None:
    """https replicas (the config accepts them) are pooled per TLS context."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost"
    args += " -addext subjectAltName=DNS:localhost"
    subprocess.run(
        ["openssl", *args.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(ok(head.split(b"\r\n")[1]))

    server = await asyncio.start_server(handle, "localhost", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(2):
            response = await pool.request(
                "localhost", port, "GET", "/", [], b"", connect_timeout_s=2.0, tls=client_ctx
            )
            await response.head(deadline())
            assert await response.read_all(100) == b"host: localhost:%d" % port
        assert pool.idle_count("localhost", port, client_ctx) == 1
        with pytest.raises(ConnectError, match="TLS"):
            await pool.request(
                "localhost",
                port,
                "GET",
                "/",
                [],
                b"",
                connect_timeout_s=2.0,
                tls=ssl.create_default_context(),  # does not trust the certificate
            )
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_idle_connections_expire() -> None:
    pool = UpstreamPool(keepalive_timeout_s=0.2, max_idle_per_host=4)
    try:
        async with replica(answer(ok(b"x"))) as fake:
            assert await fetch(pool, fake) == (200, b"x")
            assert await eventually(lambda: bool(fake.peer_closed), timeout=1.5)
            assert await fetch(pool, fake) == (200, b"x")
            assert fake.connections == 2
    finally:
        await pool.close()


async def test_idle_connections_per_host_are_bounded() -> None:
    pool = UpstreamPool(keepalive_timeout_s=5.0, max_idle_per_host=2)
    try:
        async with replica(answer(ok(b"x"))) as fake:
            responses = [await send(pool, fake) for _ in range(4)]
            for response in responses:
                await response.head(deadline())
                await response.read_all(100)
            assert pool.idle_count(HOST, fake.port) == 2
            assert await eventually(lambda: len(fake.peer_closed) == 2)
    finally:
        await pool.close()


# -- the relay: upstream -> server -> raw client ---------------------------------


@dataclass
class Relayed:
    server: HttpServer
    results: list[RelayResult | str] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)


@contextlib.asynccontextmanager
async def gateway(
    pool: UpstreamPool,
    fake: FakeReplica,
    *,
    idle_timeout_s: float = 2.0,
    stall_timeout_s: float | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> AsyncIterator[Relayed]:
    """The lead's proxy in miniature: forward, relay, end or abort."""
    relayed: Relayed

    async def handler(request: Request, exchange: Exchange) -> None:
        relayed.exchanges.append(exchange)
        response = await pool.request(
            HOST, fake.port, request.method, request.path, [], request.body, connect_timeout_s=1.0
        )
        try:
            await response.head(deadline())
            headers = [(k, v) for k, v in response.headers if k not in HOP]
            exchange.start(response.status, headers, content_length=response.content_length)
            result = await response.relay(
                exchange,
                idle_timeout_s=idle_timeout_s,
                stall_timeout_s=stall_timeout_s,
                on_chunk=on_chunk,
            )
            relayed.results.append(result)
            if not exchange.ended:
                exchange.abort()  # not SSE here: a cut says "broken"
        except asyncio.CancelledError:
            relayed.results.append("cancelled")
            raise
        finally:
            response.release()

    server = await start_server(handler, HOST, 0, limits=ServerLimits())
    relayed = Relayed(server)
    try:
        yield relayed
    finally:
        await server.shutdown(timeout_s=1.0)


@contextlib.asynccontextmanager
async def client(
    server: HttpServer, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_relay_passes_chunks_as_they_arrive(pool: UpstreamPool) -> None:
    go_on = asyncio.Event()

    async def stream(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await go_on.wait()
        call.writer.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return True

    async with replica(stream) as fake, gateway(pool, fake) as gw, client(gw.server) as (r, w):
        w.write(REQUEST)
        # the first event reaches the client while the replica still holds the rest
        assert b"data: 1\n\n" in await asyncio.wait_for(r.readuntil(b"data: 1\n\n"), 2)
        go_on.set()
        rest = await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 2)
        assert b"data: 2" in rest and b"[DONE]" in rest
        assert await eventually(lambda: gw.results == [RelayResult.COMPLETE])
        assert pool.idle_count(HOST, fake.port) == 1
        # keep-alive on both sides: a second request reuses everything
        w.write(REQUEST)
        go_on.set()
        await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 2)
        assert fake.connections == 1


async def test_relay_on_chunk_sees_every_byte_once(pool: UpstreamPool) -> None:
    """The proxy counts SSE events and bytes here, the first (buffered)
    chunk included."""
    events = [b"data: %d\n\n" % i for i in range(5)]

    async def stream(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(SSE_HEAD + chunk(events[0]))
        for event in events[1:]:
            await asyncio.sleep(0.01)
            call.writer.write(chunk(event))
        call.writer.write(b"0\r\n\r\n")
        return True

    seen: list[bytes] = []
    async with (
        replica(stream) as fake,
        gateway(pool, fake, on_chunk=seen.append) as gw,
        client(gw.server) as (r, w),
    ):
        w.write(REQUEST)
        await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 2)
        assert b"".join(seen) == b"".join(events)
        assert gw.results == [RelayResult.COMPLETE]


async def test_relay_small_response_keeps_its_length(pool: UpstreamPool) -> None:
    async with replica(answer(ok(b'{"id": 1}'))) as fake, gateway(pool, fake) as gw:
        async with client(gw.server) as (r, w):
            w.write(REQUEST)
            raw = await asyncio.wait_for(r.readuntil(b'{"id": 1}'), 2)
            assert b"content-length: 9\r\n" in raw and b"chunked" not in raw
            assert await eventually(lambda: gw.results == [RelayResult.COMPLETE])


async def test_relay_replica_dies_mid_stream(pool: UpstreamPool) -> None:
    """M2: the chunks that came are passed on once, then the client sees a cut."""

    async def die(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(SSE_HEAD + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"))
        await call.writer.drain()
        await asyncio.sleep(0.05)
        return False

    async with replica(die) as fake, gateway(pool, fake) as gw, client(gw.server) as (r, w):
        w.write(REQUEST)
        raw = await asyncio.wait_for(r.read(), 2)  # to EOF: the gateway cut it
        assert raw.count(b"data: 1") == 1 and raw.count(b"data: 2") == 1
        assert not raw.endswith(b"0\r\n\r\n")
        assert gw.results == [RelayResult.UPSTREAM_RESET]
        assert pool.open_connections == 0


async def test_relay_bad_chunk_mid_stream_is_bad_response(pool: UpstreamPool) -> None:
    async def corrupt(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await asyncio.sleep(0.05)
        call.writer.write(b"zz\r\n")
        await fake.watch_eof(call.reader)
        return False

    async with replica(corrupt) as fake, gateway(pool, fake) as gw, client(gw.server) as (r, w):
        w.write(REQUEST)
        await asyncio.wait_for(r.read(), 2)
        assert gw.results == [RelayResult.BAD_RESPONSE]
        assert await eventually(lambda: bool(fake.peer_closed))


async def test_relay_idle_timeout_closes_the_replica(pool: UpstreamPool) -> None:
    """M6: a stalled replica ends the relay within idle timeout + 0.5 s."""
    idle = 0.3

    async def stall(fake: FakeReplica, call: Call) -> bool:
        call.writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await fake.watch_eof(call.reader)
        return False

    async with replica(stall) as fake, gateway(pool, fake, idle_timeout_s=idle) as gw:
        async with client(gw.server) as (r, w):
            loop = asyncio.get_running_loop()
            w.write(REQUEST)
            await asyncio.wait_for(r.readuntil(b"data: 1\n\n"), 2)
            t0 = loop.time()
            await asyncio.wait_for(r.read(), idle + 1.0)
            assert loop.time() - t0 <= idle + 0.5
            assert gw.results == [RelayResult.IDLE_TIMEOUT]
            assert await eventually(lambda: bool(fake.peer_closed))


def streamer(total: int, piece: int = 64 * 1024) -> Script:
    """A replica that pushes ``total`` body bytes as fast as TCP lets it."""

    async def push(fake: FakeReplica, call: Call) -> bool:
        eof = fake.watch_eof(call.reader)
        call.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        data = b"s" * piece
        with contextlib.suppress(ConnectionError):
            while fake.sent < total and not eof.done():
                call.writer.write(data)
                fake.sent += len(data)
                await call.writer.drain()
        await eof
        return False

    return push


async def test_slow_reader_pauses_the_replica_instead_of_buffering(pool: UpstreamPool) -> None:
    """M45: while the client does not read, the gateway stops reading the
    replica (TCP backpressure reaches it); the gateway's own buffer stays at
    its high-water mark; everything arrives once the client reads."""
    total = 64 * 1024 * 1024
    async with replica(streamer(total), sndbuf=64 * 1024) as fake, gateway(pool, fake) as gw:
        async with client(gw.server, rcvbuf=16 * 1024) as (r, w):
            w.write(REQUEST)
            await asyncio.wait_for(r.readexactly(100), 2)
            await asyncio.sleep(0.5)
            stuck = fake.sent
            await asyncio.sleep(0.5)
            # The replica is blocked: a window update may let a piece
            # through, never the stream (unpaused, 64 MB pass in ~0.1 s).
            assert fake.sent - stuck <= 1024 * 1024
            assert fake.sent < total // 4
            exchange = gw.exchanges[0]
            assert exchange.paused
            # bounded: the high-water mark plus at most one upstream read
            assert exchange.transport.get_write_buffer_size() <= 64 * 1024 + 256 * 1024
            received = 100
            async with asyncio.timeout(20):
                while received < total:
                    data = await r.read(1 << 20)
                    assert data
                    received += len(data)
            assert received >= total
            assert await eventually(lambda: gw.results == [RelayResult.COMPLETE], 2)


async def test_client_that_stops_reading_is_cut_after_the_stall_timeout(
    pool: UpstreamPool,
) -> None:
    stall = 0.3
    async with (
        replica(streamer(256 * 1024 * 1024), sndbuf=64 * 1024) as fake,
        gateway(pool, fake, idle_timeout_s=5.0, stall_timeout_s=stall) as gw,
        client(gw.server, rcvbuf=16 * 1024) as (r, w),
    ):
        w.write(REQUEST)
        await asyncio.wait_for(r.readexactly(100), 2)
        assert await eventually(lambda: gw.results == [RelayResult.CLIENT_STALLED], stall + 1.5)
        assert await eventually(lambda: bool(fake.peer_closed))
        assert gw.exchanges[0].closed


async def test_client_disconnect_mid_stream_closes_the_replica(pool: UpstreamPool) -> None:
    """M12: the replica sees the disconnect within 1 s and stops."""

    async def endless(fake: FakeReplica, call: Call) -> bool:
        eof = fake.watch_eof(call.reader)
        call.writer.write(SSE_HEAD)
        with contextlib.suppress(ConnectionError):
            while not eof.done():
                call.writer.write(chunk(b"data: token\n\n"))
                await call.writer.drain()
                await asyncio.sleep(0.02)
        return False

    async with replica(endless) as fake, gateway(pool, fake) as gw:
        async with client(gw.server) as (r, w):
            w.write(REQUEST)
            for _ in range(3):
                await asyncio.wait_for(r.readuntil(b"data: token\n\n"), 2)
        t0 = asyncio.get_running_loop().time()
        assert await eventually(lambda: bool(fake.peer_closed), 1.0)
        assert fake.peer_closed[0] - t0 < 1.0
        assert await eventually(lambda: bool(gw.results))
        assert gw.results[0] in ("cancelled", RelayResult.CLIENT_GONE)
        assert pool.open_connections == 0


async def test_client_disconnect_before_headers_closes_the_replica(pool: UpstreamPool) -> None:
    """M13: a non-streaming request the client gave up on is closed upstream."""

    async def slow(fake: FakeReplica, call: Call) -> bool:
        await fake.watch_eof(call.reader)
        return False

    async with replica(slow) as fake, gateway(pool, fake) as gw:
        async with client(gw.server) as (_r, w):
            w.write(REQUEST)
            assert await eventually(lambda: bool(fake.calls))
            await asyncio.sleep(0.1)
        t0 = asyncio.get_running_loop().time()
        assert await eventually(lambda: bool(fake.peer_closed), 1.0)
        assert fake.peer_closed[0] - t0 < 1.0
        assert await eventually(lambda: gw.results == ["cancelled"])


# -- the same paths on uvloop, the production loop --------------------------------

UVLOOP_CASES = [
    test_content_length_response_and_keep_alive_reuse,
    test_close_delimited_body_completes_at_close_and_is_not_reused,
    test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one,
    test_relay_passes_chunks_as_they_arrive,
    test_relay_replica_dies_mid_stream,
    test_slow_reader_pauses_the_replica_instead_of_buffering,
    test_client_disconnect_mid_stream_closes_the_replica,
    test_client_disconnect_before_headers_closes_the_replica,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=lambda case: case.__name__[5:])
def test_on_uvloop(case: Callable[[UpstreamPool], Awaitable[None]]) -> None:
    """uvloop's transports pause, resume and report closes their own way."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        pool = UpstreamPool(keepalive_timeout_s=5.0, max_idle_per_host=4)
        try:
            await case(pool)
        finally:
            await pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
