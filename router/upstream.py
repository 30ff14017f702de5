"""Pooled HTTP/1.1 connections to the replicas: asyncio protocols around llhttp.

What the data path needs from an upstream client, and nothing more: write a
request in one ``transport.write``, read the answer with a C parser, and hand
body bytes to the client's :class:`~router.http_server.Exchange` from
``data_received`` as they arrive, so a streamed chunk costs about one read
and one write (docs/ARCHITECTURE.md, the request path).

Rules, each with its reason:

- Keep-alive reuse only after a clean, complete response that allows it
  (RFC 9112 §9.3). After an error, a timeout, a cancel or an unfinished body
  the connection is closed, never pooled: closing is how the engine learns
  the client is gone and stops generating (M12, M13).
- Idle connections are kept per (host, port), last in first out (the
  freshest socket is the least likely to have been closed by the server),
  at most ``max_idle_per_host``, for ``keepalive_timeout_s``.
- A reused connection that dies before a single response byte arrived is
  retried once on a fresh connection. That is the race every HTTP/1.1
  client meets: the server closed an idle connection (its keep-alive
  timeout) while our request was on the way, so the server never read it.
  It is the only automatic retry; anything else is the caller's decision
  (docs/reliability.md M1, retries on another replica within a budget).
- Framing follows RFC 9112 §6.3: Content-Length, chunked, or until close;
  1xx interim responses (100, 103) are skipped; 204, 304 and answers to HEAD
  have no body. A response that ends before its framing says (a close
  mid-body) is a reset, not a short success (M2).
- No decompression: bytes and Content-Encoding pass through unchanged (M37).
- Errors are named: :class:`ConnectError` (nothing was sent),
  :class:`UpstreamReset` (closed before or during the response),
  :class:`BadResponse` (not valid HTTP: a garbage status line, a truncated or
  oversized head, a transfer coding we cannot frame), and ``TimeoutError``
  from a deadline. Each carries a short ``reason`` safe to log.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, cast

import httptools

from router.headers import render_fields

if TYPE_CHECKING:
    from router.http_server import Exchange

__all__ = [
    "BadResponse",
    "ConnectError",
    "RelayResult",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamReset",
    "UpstreamResponse",
]

# Up to this size the request head and body are joined and written at once;
# beyond it the body goes out in slices that wait for the socket to drain,
# so a large prompt is never copied whole into the transport's buffer.
SINGLE_WRITE_MAX = 1024 * 1024
_SLICE = 256 * 1024
# Up to this size head and body are joined into one buffer for the write;
# above it they go out as two buffers of one writelines (no copy of the body).
_JOIN_MAX = 16 * 1024
# Bytes received before the caller takes them (between head() and relay()):
# above this, reading pauses. read_all() lifts it up to its own max_bytes.
_BUFFER_HIGH = 64 * 1024
# Request fields the pool writes itself, dropped from a caller's list.
_OWN_FIELDS = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}
)
_NO_FIELDS: dict[bytes, bytes] = {}
# Response fields read as well as relayed: the framing, and Connection (the
# hop-by-hop names it lists are not relayed).
_NOTED_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection"})
# Methods whose requests carry no body unless one is given.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """Base of the upstream failures; ``reason`` is short and safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectError(UpstreamError):
    """Could not connect (refused, unreachable, timed out): nothing was sent."""


class UpstreamReset(UpstreamError):
    """The connection closed before the response was complete."""


class BadResponse(UpstreamError):
    """The answer is not valid HTTP/1.1, or exceeds a limit."""


class RelayResult(StrEnum):
    """How a relayed body ended."""

    COMPLETE = "complete"
    UPSTREAM_RESET = "upstream_reset"  # the replica closed mid-body
    IDLE_TIMEOUT = "idle_timeout"  # the replica sent nothing for idle_timeout_s
    CLIENT_GONE = "client_gone"  # the client disconnected
    # The client stopped reading: its buffer stayed full for the stall
    # timeout. The client connection has been aborted.
    CLIENT_STALLED = "client_stalled"
    BAD_RESPONSE = "bad_response"  # invalid framing mid-body


class _Limits:
    __slots__ = ("max_head_bytes", "max_headers", "max_line_bytes")

    def __init__(self, max_head_bytes: int, max_headers: int, max_line_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_line_bytes = max_line_bytes


# (host, port, TLS context or None): connections are pooled per key.
_Key = tuple[str, int, ssl.SSLContext | None]


class _Connection(asyncio.Protocol):
    """One socket to a replica; carries one response at a time.

    The parser and the timer belong to the socket, not to a response: llhttp
    starts the next message by itself after a complete one, and building a
    parser per response cost about 5% of a small request's CPU
    (docs/performance.md). The parser's callbacks are here, working on
    ``self.response``; the response feeds the bytes and owns the state.
    """

    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.idle_since = 0.0
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._max_headers = pool.limits.max_headers
        self._max_line = pool.limits.max_line_bytes
        # One timer per socket for every deadline of its responses (the wait
        # for a head or body, the relay's silence and stall), re-armed only
        # when it fires or a deadline comes earlier than it: a timer made
        # and cancelled per wait cost more than the wait (uvloop, ~3 us).
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        # The response's feed, in line: a stream pays this once per chunk.
        r = self.response
        if r is None:
            # Bytes on an idle connection: the server broke framing (or is
            # not HTTP). Nothing sane can follow on this socket.
            self.close()
            return
        r._got_bytes = True
        head_done = r._head_done
        if not head_done:
            r._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            r._fail(BadResponse("upgrade response to a request that asked for none"))
            return
        except httptools.HttpParserError as exc:
            r._parse_error(exc)
            return
        if not head_done and not r._head_done and r._head_bytes > r._limits.max_head_bytes:
            r._fail(BadResponse(f"response head exceeds {r._limits.max_head_bytes} bytes"))

    def eof_received(self) -> bool | None:
        return None  # HTTP/1.1 has no half-close: close, and connection_lost decides

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost and exc is None:
            # We closed it (close()): never mistake that for the replica's
            # clean close that ends a close-delimited body.
            exc = ConnectionAbortedError("closed by the gateway")
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        response = self.response
        if response is not None:
            response._lost(exc)
        else:
            self.pool._forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.lost:
            drain = self._drain
            if drain is None or drain.done():
                drain = self._drain = asyncio.get_running_loop().create_future()
            await drain

    def close(self) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            # abort, not close: nothing queued for this socket matters any
            # more, and the engine must see the disconnect now.
            self.transport.abort()

    def arm(self, due: float) -> None:
        """Make sure the timer fires at ``due`` or earlier."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timer = self.pool.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        response = self.response
        if response is not None:
            due = response._on_timer()
            if due is not None and not self.lost:
                self._timer = self.pool.loop.call_at(due, self._on_timer)

    # -- httptools callbacks: the parse state is the response's ---------------

    def on_message_begin(self) -> None:
        r = self.response
        assert r is not None
        if r._complete:
            raise _Trailing
        r.headers = []
        r.connection = None
        r._nfields = 0
        r.content_length = None
        r._chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every field of every response: the usual field costs a
        # few lines; limits, trailers and framing fields go the long way.
        r: UpstreamResponse = self.response  # type: ignore[assignment]
        r._nfields += 1
        if (
            r._nfields > self._max_headers
            or len(name) + len(value) > self._max_line
            or r._head_done
        ):
            self._unusual_field(r, name, value)
            return
        name = name.lower()
        if name in _NOTED_FIELDS:
            if name == b"content-length":
                r.content_length = int(value)  # llhttp checked: digits, once
            elif name == b"connection":  # most replicas send "keep-alive"
                if r.connection is None:
                    r.connection = [value]
                else:
                    r.connection.append(value)
            else:
                self._transfer_coding(r, value)
        r.headers.append((name, value))

    @staticmethod
    def _unusual_field(r: UpstreamResponse, name: bytes, value: bytes) -> None:
        limits = r._limits
        if r._nfields > limits.max_headers:
            raise BadResponse(f"more than {limits.max_headers} response header fields")
        if len(name) + len(value) > limits.max_line_bytes:
            raise BadResponse(f"a response header field exceeds {limits.max_line_bytes} bytes")
        # Otherwise a trailer field: dropped (RFC 9110 §6.5.1).

    @staticmethod
    def _transfer_coding(r: UpstreamResponse, value: bytes) -> None:
        # llhttp would read "gzip" as close-delimited and hand us coded
        # bytes; we decode no transfer coding, so we cannot relay them.
        if value.strip(b" \t").lower() != b"chunked":
            raise BadResponse("unsupported transfer coding in the response")
        r._chunked = True

    def on_headers_complete(self) -> None:
        r = self.response
        assert r is not None
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BadResponse("101 Switching Protocols to a request that asked for none")
            r._interim = True  # 100 Continue, 103 Early Hints: skip it
            return
        r.status = status
        r.http_version = parser.get_http_version()
        r._head_done = True
        r.get = dict(reversed(r.headers)).get
        if r._head_request:
            # llhttp cannot be told this answers a HEAD, and would wait for
            # the body its Content-Length announces: the message ends here,
            # and the connection is not reused.
            r._trailing = True
            r._done()

    def on_body(self, body: bytes) -> None:
        r = self.response
        assert r is not None
        sink = r._sink
        if sink is not None:
            sink.write(body)
            r._last = r._loop.time()
            if r._count is not None:
                r.counted += body.count(r._count)
            if r._on_chunk is not None:
                r._on_chunk(body)
            return
        r._buffer.append(body)
        r._buffered += len(body)
        if r._accumulate:
            if r._buffered > r._limit_bytes:
                r._wake()  # read_all gives up; otherwise it waits for the end
            return
        if r._buffered > _BUFFER_HIGH:
            r._pause_reading()  # nobody is taking the bytes yet
        waiter = r._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        r = self.response
        assert r is not None
        if r._interim:
            r._interim = False
            return
        if r._complete:
            return
        r.keep_alive = self.parser.should_keep_alive()
        r._done()


class UpstreamResponse:
    """One request's answer from a replica.

    ``await head(deadline)`` first: status and headers, plus the first body
    bytes or the end. Then either ``read_all`` (the whole body) or ``relay``
    (the body to a client exchange as it arrives). Both settle the
    connection (pooled after a clean end, closed otherwise); ``release()``
    and ``close()`` are idempotent and safe in a ``finally``.
    """

    __slots__ = (
        "_accumulate",
        "_buffer",
        "_buffered",
        "_chunked",
        "_client_paused",
        "_complete",
        "_conn",
        "_connect_timeout_s",
        "_count",
        "_error",
        "_got_bytes",
        "_head_bytes",
        "_head_done",
        "_head_request",
        "_idle_s",
        "_interim",
        "_last",
        "_limit_bytes",
        "_limits",
        "_loop",
        "_nfields",
        "_on_chunk",
        "_paused_since",
        "_pool",
        "_reading_paused",
        "_relay",
        "_request_body",
        "_request_head",
        "_retried",
        "_reused",
        "_settled",
        "_sink",
        "_stall_s",
        "_trailing",
        "_wait_until",
        "_waiter",
        "connection",
        "content_length",
        "counted",
        "get",
        "headers",
        "http_version",
        "keep_alive",
        "status",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Connection,
        reused: bool,
        head_request: bool,
        request_head: bytes,
        request_body: bytes,
        connect_timeout_s: float,
    ) -> None:
        self._pool = pool
        self._loop: asyncio.AbstractEventLoop = pool._loop  # type: ignore[assignment]
        self._limits = pool.limits
        self._conn = conn
        self._reused = reused
        self._head_request = head_request
        self._request_head = request_head
        self._request_body = request_body
        self._connect_timeout_s = connect_timeout_s
        self._retried = False
        self._settled = False
        self._waiter: asyncio.Future[None] | None = None
        self._relay: asyncio.Future[RelayResult] | None = None
        # The relay's state (_on_chunk, _count, counted, _idle_s, _stall_s,
        # _last, _paused_since, _client_paused) is set by relay(), the only
        # state read while _relay or _sink is set: a non-streaming answer
        # (most requests) never builds it.
        self._sink: Exchange | None = None
        self._wait_until = 0.0  # the deadline of the wait in progress
        self._reading_paused = False
        self._accumulate = False
        self._limit_bytes = 0
        self._reset_parse()

    def _reset_parse(self) -> None:
        """Fresh parse state, for the first attempt and for the one retry."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        # The Connection field values, for hop-by-hop stripping
        # (router.headers.hop_drop); None when there is none.
        self.connection: list[bytes] | None = None
        # ``get(name)``: the first value of header ``name`` (lower case), or
        # None; a dict's own get once the head is in (as Request.get).
        self.get: Callable[[bytes], bytes | None] = _NO_FIELDS.get
        self.content_length: int | None = None
        self.http_version = ""
        self.keep_alive = False
        self._chunked = False
        self._interim = False
        self._head_done = False
        self._complete = False
        self._trailing = False
        self._error: UpstreamError | None = None
        self._got_bytes = False
        self._head_bytes = 0
        self._nfields = 0
        self._buffer: list[bytes] = []
        self._buffered = 0

    # -- what the caller reads ----------------------------------------------

    @property
    def chunked(self) -> bool:
        return self._chunked

    @property
    def complete(self) -> bool:
        return self._complete

    async def head(self, deadline: float | None = None) -> None:
        """Wait for status and headers, and the first body bytes or the end.

        ``deadline`` is a ``loop.time()``; past it, ``TimeoutError`` (the
        response stays open: the caller closes it, and may still read
        ``status`` if the head had arrived). Other failures close the
        connection and raise :class:`UpstreamError`.
        """
        while True:
            if self._error is not None:
                if self._reused and not self._got_bytes and not self._retried:
                    try:
                        await self._retry(deadline)
                    except ConnectError as exc:
                        # The request did leave on the stale connection:
                        # report that, not "nothing was sent".
                        self.close()
                        raise UpstreamReset(
                            f"connection closed before the response; reconnect failed: {exc.reason}"
                        ) from None
                    continue
                self.close()
                raise self._error
            if self._head_done and (self._buffer or self._complete):
                return
            await self._wait(deadline)

    async def read_all(self, max_bytes: int, deadline: float | None = None) -> bytes:
        """The whole body (after ``head``); more than ``max_bytes`` is a
        :class:`BadResponse`. The connection is pooled or closed on return."""
        self._accumulate = True
        self._limit_bytes = max_bytes
        if self._reading_paused:
            self._resume_reading()
        while not self._complete:
            if self._error is not None:
                self.close()
                raise self._error
            if self._buffered > max_bytes:
                self.close()
                raise BadResponse(f"response body exceeds {max_bytes} bytes")
            await self._wait(deadline)
        if self._buffered > max_bytes:
            self.close()
            raise BadResponse(f"response body exceeds {max_bytes} bytes")
        parts = self._buffer
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffer = []
        self._buffered = 0
        self.release()
        return body

    async def relay(
        self,
        exchange: Exchange,
        *,
        idle_timeout_s: float,
        on_chunk: Callable[[bytes], None] | None = None,
        stall_timeout_s: float | None = None,
        count: bytes | None = None,
    ) -> RelayResult:
        """Pass the body to ``exchange`` as it arrives, after ``head`` and
        after ``exchange.start``.

        Every chunk is written from ``data_received``: no task switch, no
        per-chunk timer. Flow control both ways: while the client's buffer is
        full the upstream socket is not read (TCP then slows the replica);
        it resumes when the client drains. ``idle_timeout_s`` bounds the
        replica's silence (M6), ``stall_timeout_s`` (default: the same)
        the client's (M45). ``on_chunk`` sees each chunk after it is written;
        ``count`` (a byte string) is counted in every chunk into ``counted``,
        without a Python call per chunk (the proxy counts SSE events so).

        On COMPLETE the exchange is ended and the connection pooled. On
        anything else the connection is closed and the exchange left for
        the caller to finish (an in-band SSE error, or ``abort``), except
        CLIENT_STALLED, where it has been aborted. A cancel closes the
        connection and propagates.
        """
        if not self._head_done:
            raise RuntimeError("relay() before head()")
        loop = self._loop
        self.counted = 0  # occurrences of ``count`` in the relayed body
        self._on_chunk = on_chunk
        self._count = count
        self._client_paused = False
        try:
            if exchange.closed:
                return self._finish_relay(RelayResult.CLIENT_GONE)
            for chunk in self._buffer:
                exchange.write(chunk)
                if count is not None:
                    self.counted += chunk.count(count)
                if on_chunk is not None:
                    on_chunk(chunk)
            self._buffer = []
            self._buffered = 0
            if self._complete:
                exchange.end()
                return self._finish_relay(RelayResult.COMPLETE)
            if self._error is not None:
                kind = (
                    RelayResult.BAD_RESPONSE
                    if isinstance(self._error, BadResponse)
                    else RelayResult.UPSTREAM_RESET
                )
                return self._finish_relay(kind)
            self._sink = exchange
            self._idle_s = idle_timeout_s
            self._stall_s = idle_timeout_s if stall_timeout_s is None else stall_timeout_s
            self._last = loop.time()
            relay = self._relay = loop.create_future()
            # The connection's one timer, re-armed only when it fires: chunks
            # just stamp ``_last``, which costs nothing like a timeout per chunk.
            self._conn.arm(self._last + min(self._idle_s, self._stall_s))
            exchange.set_flow_listener(self)
            if not exchange.paused:
                self._resume_reading()
            result = await relay
            if result is RelayResult.CLIENT_STALLED:
                exchange.abort()
            return self._finish_relay(result)
        except BaseException:
            self.close()
            raise
        finally:
            self._sink = None
            self._on_chunk = None
            self._count = None
            self._relay = None
            exchange.set_flow_listener(None)

    def release(self) -> None:
        """Give the connection back to the pool if the response ended cleanly
        and allows keep-alive; otherwise close it."""
        if self._settled:
            return
        if self._complete and self.keep_alive and self._error is None and not self._trailing:
            self._settled = True
            if self._reading_paused:
                self._resume_reading()  # an idle socket must still see the server's close
            conn = self._conn
            conn.response = None
            self._pool._release(conn)
        else:
            self.close()

    def close(self) -> None:
        """Discard the connection (an error, a cancel, an unfinished body):
        the replica sees the disconnect and can stop the work."""
        if self._settled:
            return
        self._settled = True
        conn = self._conn
        conn.response = None
        conn.close()
        self._pool._forget(conn)

    # -- internals ----------------------------------------------------------

    def _finish_relay(self, result: RelayResult) -> RelayResult:
        if result is RelayResult.COMPLETE:
            self.release()
        else:
            self.close()
        return result

    def _wait(self, deadline: float | None) -> asyncio.Future[None]:
        """The future to await for the next bytes, the end, or an error
        (TimeoutError past ``deadline``). A plain future, not a coroutine: one
        frame less to walk at every resumption. ``_wake`` and the timer
        leave an already finished waiter alone, so it is never cleared."""
        waiter = self._waiter = self._loop.create_future()
        if deadline is None:
            self._wait_until = math.inf
        else:
            self._wait_until = deadline
            conn = self._conn
            timer = conn._timer
            if timer is None or timer.when() > deadline:  # else armed early enough
                conn.arm(deadline)
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _retry(self, deadline: float | None) -> None:
        """The stale keep-alive case: one more try on a fresh connection."""
        self._retried = True
        old = self._conn
        old.response = None
        old.close()
        self._pool._forget(old)
        timeout = self._connect_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - self._loop.time())
            if timeout <= 0:
                raise TimeoutError
        conn = await self._pool._connect(self._conn.key, timeout)
        self._conn = conn
        self._reused = False
        self._reset_parse()
        conn.response = self
        await self._pool._send(conn, self._request_head, self._request_body)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is not None or self._complete:
            return
        self._error = error
        self._conn.close()
        relay = self._relay
        if relay is not None and not relay.done():
            relay.set_result(
                RelayResult.BAD_RESPONSE
                if isinstance(error, BadResponse)
                else RelayResult.UPSTREAM_RESET
            )
        self._wake()

    def _done(self) -> None:
        """The body ended by its framing (or by the close that frames it)."""
        self._complete = True
        sink = self._sink
        if sink is not None:
            sink.end()  # the terminator leaves now, not after a task switch
            relay = self._relay
            if relay is not None and not relay.done():
                relay.set_result(RelayResult.COMPLETE)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _pause_reading(self) -> None:
        transport = self._conn.transport
        if not self._reading_paused and transport is not None and not self._conn.lost:
            self._reading_paused = True
            transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self._conn.transport
        if self._reading_paused and transport is not None and not self._conn.lost:
            self._reading_paused = False
            transport.resume_reading()

    def _on_timer(self) -> float | None:
        """The connection's timer fired: a wait's deadline, or the relay's
        replica silence or client stall. Returns when to look again (None:
        nothing to watch until the next wait or relay arms it)."""
        now = self._loop.time()
        relay = self._relay
        if relay is not None:
            if relay.done():
                return None
            if self._client_paused:
                due = self._paused_since + self._stall_s
                if now >= due:
                    relay.set_result(RelayResult.CLIENT_STALLED)
                    return None
            else:
                due = self._last + self._idle_s
                if now >= due:
                    relay.set_result(RelayResult.IDLE_TIMEOUT)
                    return None
            return due
        waiter = self._waiter
        if waiter is None or waiter.done():
            return None
        if now >= self._wait_until:
            waiter.set_exception(TimeoutError())
            return None
        return self._wait_until

    # -- FlowListener (the client side of a relay) ---------------------------

    def client_paused(self) -> None:
        if not self._client_paused:
            self._client_paused = True
            self._paused_since = now = self._loop.time()
            self._pause_reading()
            self._rearm(now + self._stall_s)

    def client_resumed(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._last = now = self._loop.time()  # replica silence counts from now
            self._resume_reading()
            self._rearm(now + self._idle_s)

    def _rearm(self, due: float) -> None:
        """Bring the relay timer forward if the new deadline is earlier (only
        on a pause or resume, never per chunk)."""
        if self._relay is not None:
            self._conn.arm(due)

    def client_lost(self) -> None:
        relay = self._relay
        if relay is not None and not relay.done():
            relay.set_result(RelayResult.CLIENT_GONE)

    # -- from the connection --------------------------------------------------

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        if self._complete:
            # Bytes after a complete response: harmless to this one,
            # but the connection cannot be reused.
            self._trailing = True
            return
        cause = exc.__context__
        if isinstance(cause, UpstreamError):
            self._fail(cause)
        else:
            self._fail(BadResponse(f"invalid HTTP response: {exc}"))

    def _lost(self, exc: Exception | None) -> None:
        if self._complete or self._error is not None:
            return
        if self._head_done and exc is None and self._close_delimited():
            self._done()  # RFC 9112 §6.3 item 8: the body ends at close
            return
        if not self._got_bytes:
            self._fail(UpstreamReset("connection closed before the response"))
        elif not self._head_done:
            self._fail(BadResponse("connection closed inside the response head"))
        else:
            self._fail(UpstreamReset("connection closed mid-body"))

    def _close_delimited(self) -> bool:
        return (
            self.content_length is None
            and not self._chunked
            and not self._head_request
            and self.status not in (204, 304)
        )


class _Trailing(Exception):
    """A second message began on a connection whose response is complete."""


class UpstreamPool:
    """Keep-alive connections to the replicas, per (host, port).

    The pool bounds idle sockets, not concurrency: the number of requests
    in flight is admission control's job, where it is visible and has a
    deadline (M16).
    """

    def __init__(
        self,
        *,
        keepalive_timeout_s: float = 30.0,
        max_idle_per_host: int = 64,
        max_head_bytes: int = 64 * 1024,
        max_headers: int = 128,
        max_line_bytes: int = 8190,
    ) -> None:
        if keepalive_timeout_s <= 0 or max_idle_per_host < 0:
            raise ValueError("keepalive_timeout_s must be positive, max_idle_per_host >= 0")
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_idle_per_host = max_idle_per_host
        # aiohttp's client limits (8190 per field); the head bound keeps a
        # broken replica from growing a head without end.
        self.limits = _Limits(max_head_bytes, max_headers, max_line_bytes)
        self._idle: dict[_Key, deque[_Connection]] = {}
        self._conns: set[_Connection] = set()
        self._host_headers: dict[_Key, bytes] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def idle_count(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        return len(self._idle.get((host, port, tls), ()))

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def request(
        self,
        url_host: str,
        port: int,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]] | bytes,
        body: bytes,
        *,
        connect_timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> UpstreamResponse:
        """Send one request; ``await response.head(deadline)`` next.

        ``headers`` go out as given (names as they should be written),
        except Host, Content-Length, Transfer-Encoding, Connection and
        Keep-Alive, which the pool writes itself; the caller strips the
        other hop-by-hop fields. As bytes, ``headers`` is a field block
        already rendered and checked by ``router.headers`` without those
        fields (``upstream_request_block``), sent as is. ``tls``: an https replica's context
        (connections are pooled per context). Raises
        :class:`ConnectError` if no connection could be made.
        """
        if self._closed:
            raise ConnectError("upstream pool is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # the hot paths read the attribute
        key = (url_host, port, tls)
        # Host and framing are the pool's: a client's Content-Length or
        # Transfer-Encoding next to ours would be request smuggling.
        block = (
            headers
            if isinstance(headers, bytes)
            else render_fields(headers, _OWN_FIELDS, "request")
        )
        host = self._host_headers.get(key)
        if host is None:
            host = self._host_headers[key] = _host_header(url_host, port, tls is not None)
        length = (
            b"content-length: %d\r\n" % len(body) if body or method not in _NO_BODY_METHODS else b""
        )
        head = b"%b %b HTTP/1.1\r\nhost: %b\r\n%b%b\r\n" % (
            method.encode("ascii"),
            target.encode("latin-1"),
            host,
            block,
            length,
        )
        conn = self._acquire(key)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(key, connect_timeout_s)
        response = UpstreamResponse(
            self, conn, reused, method == "HEAD", head, body, connect_timeout_s
        )
        conn.response = response
        if len(body) <= SINGLE_WRITE_MAX:
            # The usual request: one write, no coroutine for it (_send's
            # first branch, in line).
            if not conn.lost:
                transport: asyncio.Transport = conn.transport  # type: ignore[assignment]
                if len(body) <= _JOIN_MAX:
                    transport.write(head + body if body else head)
                else:  # one vectored write; joining would copy the prompt once more
                    transport.writelines((head, body))
            return response
        try:
            await self._send(conn, head, body)
        except BaseException:
            response.close()
            raise
        return response

    async def _connect(self, key: _Key, timeout_s: float) -> _Connection:
        loop = self.loop
        host, port, tls = key
        try:
            async with asyncio.timeout(timeout_s):
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(self, key),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except TimeoutError:
            raise ConnectError(
                f"connect to {host}:{port} timed out after {timeout_s:g} s"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {host}:{port} failed: {exc.reason}") from None
        except OSError as exc:
            raise ConnectError(
                f"connect to {host}:{port} failed: {exc.strerror or type(exc).__name__}"
            ) from None
        self._conns.add(conn)
        return conn

    async def _send(self, conn: _Connection, head: bytes, body: bytes) -> None:
        """Head and body in one write; a large body in slices, with drain."""
        transport = conn.transport
        assert transport is not None
        if conn.lost:
            return  # head() reports it (and may retry)
        if len(body) <= SINGLE_WRITE_MAX:
            transport.write(head + body if body else head)
            return
        transport.write(head)
        view = memoryview(body)
        for start in range(0, len(body), _SLICE):
            await conn.drain()
            if conn.lost or conn.response is None or conn.response._complete:
                return  # the replica answered (or closed) early: stop sending
            transport.write(view[start : start + _SLICE])

    def _acquire(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        horizon = self._loop.time() - self.keepalive_timeout_s  # type: ignore[union-attr]
        while idle:
            conn = idle.pop()
            if conn.lost:
                self._conns.discard(conn)
                continue
            if conn.idle_since <= horizon:
                # The freshest is too old: so is everything under it.
                conn.close()
                self._conns.discard(conn)
                while idle:
                    old = idle.pop()
                    old.close()
                    self._conns.discard(old)
                return None
            return conn
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed or conn.lost or self.max_idle_per_host == 0:
            conn.close()
            self._conns.discard(conn)
            return
        conn.idle_since = self._loop.time()  # type: ignore[union-attr]
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        idle.append(conn)
        if len(idle) > self.max_idle_per_host:
            old = idle.popleft()
            old.close()
            self._conns.discard(old)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_timeout_s, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """A connection closed: it is in no idle list any more."""
        self._conns.discard(conn)
        idle = self._idle.get(conn.key)
        if idle:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def _sweep(self) -> None:
        """Close sockets idle past the keep-alive timeout (oldest first)."""
        self._sweeper = None
        horizon = self.loop.time() - self.keepalive_timeout_s
        any_left = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= horizon:
                old = idle.popleft()
                old.close()
                self._conns.discard(old)
            any_left = any_left or bool(idle)
        if any_left and not self._closed:
            self._sweeper = self.loop.call_later(self.keepalive_timeout_s / 2, self._sweep)

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let connection_lost callbacks run


def _host_header(host: str, port: int, tls: bool) -> bytes:
    if ":" in host:
        name = f"[{host}]".encode("ascii")  # an IPv6 literal
    else:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
    return name if port == (443 if tls else 80) else b"%b:%d" % (name, port)
