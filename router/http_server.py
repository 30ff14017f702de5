"""The data listener's HTTP/1.1 server: an asyncio protocol around llhttp.

Why not aiohttp here: its layers cost more CPU per request than a whole
relay (docs/ARCHITECTURE.md, the request path). This server does what a
gateway's edge needs and nothing else: it reads one request (head and
body, limits enforced while reading), hands it to ``handler(request,
exchange)``, run by the connection's one task (its requests one after
another), and frames the answer the handler writes.

Decisions, each with its reason:

- The body is read whole, under ``max_body_bytes``, before the handler
  runs: the proxy must parse it to route (M36). Over the limit is a 413
  before the handler sees anything, whether the size came from
  Content-Length or from counting a chunked body.
- Pipelining is served strictly in order, one request at a time. llhttp
  (through httptools) cannot be paused mid-buffer, so a pipelined request is
  parsed (every limit applies) and queued, and reading stops until the
  response in progress has ended. At most ``_MAX_PIPELINED`` requests wait;
  beyond that the connection closes after the queued ones are answered,
  which a pipelining client must expect anyway (RFC 9112 §9.3.2).
- Timeouts: a fresh connection has ``header_timeout_s`` to deliver a
  complete request head, and any later request has it from its first
  byte (slowloris, M43: HAProxy's ``timeout http-request``); a partial head
  at the deadline gets 408. The body then has ``body_timeout_s`` in total
  (M44). Between requests a keep-alive connection may idle
  ``keepalive_timeout_s`` (75 s, nginx's default: longer than the 60 s idle
  timeout of the usual cloud load balancers, so the balancer in front, not
  the gateway, closes idle connections and never sends on one we just
  closed). While a handler runs no server timeout applies: the proxy owns
  upstream time.
- A client that disconnects cancels its handler task (as aiohttp's
  ``handler_cancellation``), so the proxy closes its upstream request and
  the engine stops generating (M12, M13); writes after that are no-ops.
  A half-close (EOF) counts as a disconnect, as in aiohttp and uvicorn.
- Protocol errors answer once in OpenAI's error shape, with
  ``Connection: close``, then close the connection after a short lingering
  read, so a client still sending its body is not reset before it reads
  the answer (nginx's lingering close).
- Smuggling (M39): llhttp 9 rejects CL + TE, duplicate Content-Length,
  invalid chunk sizes, bare LF and CR, NUL and other controls in headers,
  obs-fold and whitespace before a colon. Checked here as well, where
  llhttp is lenient: a coding before ``chunked`` such as ``gzip, chunked``
  (501: we decode none, RFC 9112 §6.1; an obfuscated name, or ``chunked``
  not last, is a 400 here and in llhttp), Transfer-Encoding in an HTTP/1.0
  request (400; RFC 9112 §6.1), a missing or repeated Host (400; RFC 9112 §3.2), HTTP
  versions other than 1.0 and 1.1 (505; llhttp accepts ``HTTP/2.0`` and
  HTTP/0.9), CONNECT and methods a gateway does not serve (501), an
  Upgrade request with a body (400; llhttp would skip the body and parse
  it as the next request).
- Header limits (M38) are aiohttp's, stated in ``ServerLimits``: a line of
  at most 8190 bytes (414 for the request target, 431 for a field), at most
  128 fields, and a whole head of at most 64 KiB, counted while reading so
  a head never grows without bound inside the parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from router.errors import ErrorKind, error_body
from router.headers import render_fields

__all__ = [
    "Exchange",
    "FlowListener",
    "Handler",
    "HttpServer",
    "Request",
    "ServerLimits",
    "start_server",
]

log = logging.getLogger("dp_router.http")

# One parsed request may queue behind the one being answered; a client
# pipelining more than this gets the connection closed after them. Bounds
# the objects one read buffer (256 KiB of tiny requests) can create.
_MAX_PIPELINED = 16
# How long a connection we are closing after an error keeps reading (and
# discarding), so the client gets our answer rather than a reset because
# its unread body was still in our receive buffer (nginx lingering_timeout).
_LINGER_S = 2.0
# Methods the data path serves. llhttp knows dozens (WebDAV, RTSP, ...);
# RFC 9110 §9.1 answers the ones a server does not implement with 501.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Request fields the server reads as well as passes on.
_NOTED_FIELDS = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"}
)
# Header fields the server writes itself, dropped from a handler's list.
_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
_LAST_CHUNK = b"0\r\n\r\n"

# Parse phases of a connection.
_IDLE = 0  # between requests (or before the first byte)
_HEAD = 1  # reading a request line and header fields
_BODY = 2  # reading a body
_LINGER = 3  # answered an error; discarding input until close


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Limits and deadlines of the data listener; each default has its reason."""

    # The proxy's ``server.max_body_bytes`` (10 MiB there); a large prompt is
    # a few MB of JSON.
    max_body_bytes: int = 10 * 1024 * 1024
    # aiohttp's max_line_size / max_field_size: the request line and each
    # header field (name + value).
    max_line_bytes: int = 8190
    # aiohttp's max_headers.
    max_headers: int = 128
    # The whole head, counted while reading: nginx's default buffers hold
    # 4 x 8 KiB; no API client sends more than a few KiB.
    max_head_bytes: int = 64 * 1024
    # Slowloris: from accept (or a later request's first byte) to the end of
    # the head. HAProxy's usual ``timeout http-request``.
    header_timeout_s: float = 10.0
    # From the end of the head to the end of the body, in total: 10 MiB at
    # a slow 2 Mbit/s still fits.
    body_timeout_s: float = 60.0
    # Idle time between requests on a keep-alive connection (nginx's 75 s).
    keepalive_timeout_s: float = 75.0
    # Client write buffer: above high the handler's source is paused (M45;
    # Envoy's per-connection buffers are 32 KiB).
    write_high_water: int = 64 * 1024
    write_low_water: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_line_bytes", "max_headers", "max_head_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.write_low_water <= self.write_high_water:
            raise ValueError("write_low_water must be between 0 and write_high_water")


class Request:
    """One request, complete: head and body.

    ``path`` is the raw request target in origin form (path and query, as
    sent; an absolute-form target is reduced to it, RFC 9112 §3.2.2).
    ``headers`` keep the client's order and repeats, names lower-cased.
    """

    __slots__ = (
        "body",
        "connection",
        "get",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "peer",
    )

    def __init__(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        peer: str,
        keep_alive: bool,
        http_version: str,
        connection: list[bytes] | None = None,
    ) -> None:
        """``connection``: the Connection field values, collected while parsing
        (router.headers.hop_drop); None when there is none."""
        self.method = method
        self.connection = connection
        self.path = path
        self.headers = headers
        self.body = body
        self.peer = peer
        self.keep_alive = keep_alive
        self.http_version = http_version
        # ``get(name)``: the first value of header ``name`` (lower case), or
        # None. A dict's own get, built in C (reversed, so the first of
        # repeated fields wins): the proxy looks up four fields per request,
        # and a Python loop over the list per lookup cost more than the build.
        self.get: Callable[[bytes], bytes | None] = dict(reversed(headers)).get

    def get_all(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path[:64]!r} from {self.peer}>"


class FlowListener(Protocol):
    """Who feeds an exchange (the upstream relay) and must follow the client:
    stop reading its source while the client's buffer is full, stop at
    once when the client is gone."""

    def client_paused(self) -> None: ...

    def client_resumed(self) -> None: ...

    def client_lost(self) -> None: ...


class _Reject(Exception):
    """A request refused before its handler ran: answered once, then closed."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = kind.status
        self.code = kind.code
        self.message = message

    def render(self) -> bytes:
        body = error_body(self.kind, self.message)
        return (
            b"%bcontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
            % (
                _STATUS_LINES.get(self.status) or _status_line(self.status),
                len(body),
                body,
            )
        )


class _StopParsing(Exception):
    """Raised from a parser callback to stop reading this connection's input."""


def _bad(message: str) -> _Reject:
    return _Reject(ErrorKind.BAD_REQUEST, message)


class Exchange:
    """The response side of one request.

    ``start`` keeps the head until the first ``write`` or ``end``, so a small
    answer (or a stream's head and first chunk) leaves in one
    ``transport.write``. ``write`` never blocks: callers that produce faster
    than the client reads either ``await drain()`` or register a
    :class:`FlowListener`. After the client is gone every call is a no-op.
    """

    __slots__ = (
        "_bodyless",
        "_chunked",
        "_close",
        "_conn",
        "_head",
        "_head_request",
        "_keep_alive",
        "_length",
        "_listener",
        "_version10",
        "bytes_sent",
        "ended",
        "status",
        "transport",
    )

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        transport = conn.transport
        assert transport is not None
        self.transport: asyncio.Transport = transport
        self._version10 = request.http_version == "1.0"
        self._keep_alive = request.keep_alive
        self._head_request = request.method == "HEAD"
        self._head: bytes | None = None
        self._chunked = False
        self._bodyless = False
        self._close = False
        self._length: int | None = None
        self._listener: FlowListener | None = None
        self.status = 0
        self.bytes_sent = 0
        self.ended = False

    @property
    def started(self) -> bool:
        return self.status != 0

    @property
    def closed(self) -> bool:
        """The client connection is gone (or closing): writes are dropped."""
        return self._conn.closed

    @property
    def writable(self) -> bool:
        return not self.ended and not self._conn.closed

    @property
    def paused(self) -> bool:
        """The client's write buffer is above the high-water mark."""
        return self._conn.write_paused

    def set_flow_listener(self, listener: FlowListener | None) -> None:
        """Follow the client's flow control; told at once if already paused."""
        self._listener = listener
        if listener is not None and self._conn.write_paused and not self._conn.closed:
            listener.client_paused()

    def start(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]] | bytes,
        *,
        content_length: int | None,
    ) -> None:
        """Prepare the response head; ``content_length=None`` frames the body
        as chunked (close-delimited for an HTTP/1.0 client, which has no
        chunked coding). Framing fields in ``headers`` (Content-Length,
        Transfer-Encoding, Connection, Keep-Alive) are dropped: the server
        writes those. Other hop-by-hop fields are the caller's to strip.
        As bytes, ``headers`` is a field block already rendered and checked
        by ``router.headers`` without framing fields
        (``client_response_block``), sent as is."""
        if self.status:
            raise RuntimeError("response already started")
        if not 200 <= status <= 599:
            raise ValueError(f"status {status} cannot start a response")
        # Framing is the server's alone (response smuggling); CR or LF in a
        # field is refused (response splitting).
        block = (
            headers
            if isinstance(headers, bytes)
            else render_fields(headers, _FRAMING_FIELDS, "response")
        )
        self.status = status
        self._head = b"".join(
            (
                _STATUS_LINES.get(status) or _status_line(status),
                block,
                self._framing(status, content_length),
                b"\r\n",
            )
        )

    def _framing(self, status: int, content_length: int | None) -> bytes:
        """The framing fields of the response starting now (the server's
        alone: response smuggling); notes how its body is framed and whether
        the connection closes after it."""
        conn = self._conn
        # The last response before a close says so; queued (pipelined)
        # requests are still answered first.
        close = not self._keep_alive or (conn.closing and not conn.has_pending)
        framing = b""
        if status == 204 or status == 304 or self._head_request:
            # No body (RFC 9110 §6.4.1); a HEAD or 304 may still state the length.
            self._bodyless = True
            if content_length is not None and status != 204:
                framing = b"content-length: %d\r\n" % content_length
        elif content_length is not None:
            self._length = content_length
            framing = b"content-length: %d\r\n" % content_length
        elif self._version10:
            close = True  # the body ends when the connection does
        else:
            self._chunked = True
            framing = b"transfer-encoding: chunked\r\n"
        if close:
            framing += b"connection: close\r\n"
        elif self._version10:
            framing += b"connection: keep-alive\r\n"
        self._close = close
        return framing

    def write(self, data: bytes) -> None:
        """Send body bytes now (chunk-framed when chunked). ``write(b"")``
        flushes a pending head without sending anything else."""
        if self.ended or self._conn.closed:
            return
        if not self.status:
            raise RuntimeError("write() before start()")
        head = self._head
        n = len(data)
        if n == 0 or self._bodyless:
            if head is not None:
                self._head = None
                self.transport.write(head)
            return
        self.bytes_sent += n
        if self._chunked:
            if head is not None:
                self._head = None
                self.transport.write(b"%b%x\r\n%b\r\n" % (head, n, data))
            else:
                self.transport.write(b"%x\r\n%b\r\n" % (n, data))
        elif head is not None:
            self._head = None
            self.transport.write(head + data)
        else:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the client's write buffer is above the high-water mark."""
        conn = self._conn
        if conn.write_paused and not conn.closed:
            await conn.wait_drained()

    def end(self) -> None:
        """Finish the response. A body shorter or longer than the declared
        Content-Length is a broken message: the connection is closed so the
        client sees the truncation instead of waiting for the rest."""
        if self.ended:
            return
        if not self.status:
            raise RuntimeError("end() before start()")
        self.ended = True
        conn = self._conn
        if not conn.closed:
            tail = _LAST_CHUNK if self._chunked else b""
            head = self._head
            if head is not None:
                self._head = None
                tail = head + tail
            if tail:
                self.transport.write(tail)
            if self._length is not None and self.bytes_sent != self._length:
                log.warning(
                    "response body of %d bytes where Content-Length said %d; closing",
                    self.bytes_sent,
                    self._length,
                )
                self._close = True
        conn.response_done(self, self._close)

    def abort(self) -> None:
        """Drop the connection now: for a body that broke mid-way and cannot
        say so in-band, or a client that stopped reading. The client sees a
        truncated message, never a short success."""
        if not self.ended:
            self.ended = True
            self._conn.response_done(self, True, abort=True)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]] | bytes, body: bytes) -> None:
        """A whole response in one ``transport.write``.

        With a rendered field block (every proxied non-streaming answer) it
        is :meth:`start`, :meth:`write` and :meth:`end` in one call."""
        if self.status or self.ended or headers.__class__ is not bytes or not 200 <= status <= 599:
            self.start(status, headers, content_length=len(body))
            self.write(body)
            self.end()
            return
        self.status = status
        framing = self._framing(status, len(body))
        self.ended = True
        conn = self._conn
        if not conn.closed:
            if self._bodyless:
                body = b""
            else:
                self.bytes_sent = len(body)
            self.transport.write(
                b"".join(
                    (
                        _STATUS_LINES.get(status) or _status_line(status),
                        headers,  # type: ignore[arg-type]
                        framing,
                        b"\r\n",
                        body,
                    )
                )
            )
        conn.response_done(self, self._close)


# The handler returns the coroutine that answers: the connection's task
# awaits it (an ``async def`` handler is one).
Handler = Callable[[Request, Exchange], Coroutine[Any, Any, None]]
RejectHook = Callable[[int, str], None]


class _Connection(asyncio.Protocol):
    """One client connection: parser callbacks, deadlines, the current exchange."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._limits = limits = server.limits
        self._max_headers = limits.max_headers
        self._max_line = limits.max_line_bytes
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.closing = False  # close after the response in progress
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._discard = False  # input is ignored from now on
        self._reading_paused = False
        self._peer = ""
        self._exchange: Exchange | None = None
        # One task per connection runs its requests one after another
        # (_work): a task per request cost about a tenth of the engine's
        # CPU per request (creation, registration, a done callback).
        self._worker: asyncio.Task[None] | None = None
        self._handling = False  # the worker is inside a handler
        self._next: tuple[Request, Exchange] | None = None  # dispatched while handling
        self._wake: asyncio.Future[tuple[Request, Exchange]] | None = None  # idle worker
        self._pending: deque[Request | _Reject] = deque()
        # Deadlines: one lazily re-armed timer per connection. It never
        # sleeps longer than the shortest timeout, so a new deadline is
        # never earlier than the armed timer and no handle is cancelled or
        # created per request.
        self._phase = _IDLE
        self._deadline = 0.0
        self._tick = min(
            limits.header_timeout_s, limits.body_timeout_s, limits.keepalive_timeout_s, _LINGER_S
        )
        self._timer: asyncio.TimerHandle | None = None
        # The request being parsed.
        self._chunk_len = 0
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._nfields = 0
        self._hosts = 0
        self._content_length: int | None = None
        self._chunked = False
        self._expect: bytes | None = None
        self._connection: list[bytes] | None = None
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._body_len = 0

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Streamed tokens are small writes; Nagle would hold them.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self._peer = str(peer[0])
        limits = self._limits
        transport.set_write_buffer_limits(high=limits.write_high_water, low=limits.write_low_water)
        self._server.connections.add(self)
        if self._server.closing:
            transport.close()
            return
        # A fresh connection gets the header deadline from accept: a socket
        # that never sends is slowloris too.
        self._deadline = self._loop.time() + limits.header_timeout_s
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        exchange = self._exchange
        worker = self._worker
        if exchange is not None:
            self._exchange = None
            listener = exchange._listener
            if listener is not None:
                listener.client_lost()
            nxt = self._next
            if nxt is not None and nxt[1] is exchange:
                # Never started: the handler running is the previous
                # request's, whose response has ended; it finishes.
                self._next = None
            elif worker is not None and not worker.done():
                worker.cancel()
        elif self._wake is not None and worker is not None and not worker.done():
            worker.cancel()  # idle between requests
        # A handler still finishing after its response ended is not
        # cancelled (its response is complete); the worker stops after it.
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # a half-close is a disconnect: close, and cancel the handler

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self._exchange
        if exchange is not None and exchange._listener is not None:
            exchange._listener.client_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        exchange = self._exchange
        if exchange is not None and exchange._listener is not None:
            exchange._listener.client_resumed()

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        n = len(data)
        if self._phase == _IDLE:
            self._phase = _HEAD
            self._head_bytes = 0
            if self._exchange is None:
                self._deadline = self._loop.time() + self._limits.header_timeout_s
        elif self._phase == _HEAD:
            self._head_bytes += n
        self._chunk_len = n
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The Upgrade request (no body: checked in on_headers_complete)
            # is answered as plain HTTP/1.1, which RFC 9110 §7.8 allows; what
            # follows it is another protocol, so nothing more is read.
            self._discard = True
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopParsing):
                self._discard = True
                self.closing = True
                return
            if isinstance(cause, _Reject):
                self._reject(cause)
            else:
                # llhttp's reason is a fixed string, safe to echo.
                self._reject(_bad(f"malformed HTTP request: {exc}"))
            return
        if self._phase == _HEAD and self._head_bytes > self._limits.max_head_bytes:
            self._reject(
                _Reject(
                    ErrorKind.HEADERS_TOO_LARGE,
                    f"request head exceeds {self._limits.max_head_bytes} bytes",
                )
            )

    # -- httptools callbacks -----------------------------------------------

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        # Bytes of this read may belong to the previous (pipelined) request:
        # counting them all errs on the strict side by less than one read.
        self._head_bytes = self._chunk_len
        self._url = b""
        self._headers = []
        self._nfields = 0
        self._hosts = 0
        self._content_length = None
        self._chunked = False
        self._expect = None
        self._connection = None
        self._request = None
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line_bytes:
            raise _Reject(
                ErrorKind.URI_TOO_LONG,
                f"request target exceeds {self._limits.max_line_bytes} bytes",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every field: the usual one costs a few lines; limits,
        # trailers and the fields the server reads go the long way.
        self._nfields += 1
        if (
            self._nfields > self._max_headers
            or len(name) + len(value) > self._max_line
            or self._phase == _BODY
        ):
            self._unusual_field(name, value)
            return
        name = name.lower()
        if name in _NOTED_FIELDS:
            if name == b"host":  # every request has one
                self._hosts += 1
            elif name == b"content-length":  # every request with a body
                self._content_length = int(value)  # llhttp checked: digits, once
            else:
                self._noted_field(name, value)
        self._headers.append((name, value))

    def _unusual_field(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        if self._nfields > limits.max_headers:
            raise _Reject(
                ErrorKind.HEADERS_TOO_LARGE, f"more than {limits.max_headers} header fields"
            )
        if len(name) + len(value) > limits.max_line_bytes:
            raise _Reject(
                ErrorKind.HEADERS_TOO_LARGE,
                f"a header field exceeds {limits.max_line_bytes} bytes",
            )
        # Otherwise a trailer field: counted, then discarded (RFC 9110 §6.5.1).

    def _noted_field(self, name: bytes, value: bytes) -> None:
        if name == b"connection":
            if self._connection is None:
                self._connection = [value]
            else:
                self._connection.append(value)
        elif name == b"transfer-encoding":
            coding = value.strip(b" \t").lower()
            if coding != b"chunked":
                if not coding.endswith(b"chunked") or coding[-8:-7] not in (b",", b" ", b"\t"):
                    # Chunked not last (or an obfuscated name): the length
                    # cannot be determined (RFC 9112 §6.3 item 4).
                    raise _bad("invalid Transfer-Encoding")
                # "gzip, chunked", which llhttp lets through: we decode no
                # coding but chunked (RFC 9112 §6.1 answers 501).
                raise _Reject(
                    ErrorKind.NOT_IMPLEMENTED, "only chunked transfer coding is supported"
                )
            self._chunked = True
        else:  # expect
            self._expect = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(ErrorKind.VERSION_NOT_SUPPORTED, "only HTTP/1.1 and 1.0 are served")
        method = parser.get_method().decode("ascii")
        if method not in _METHODS:
            raise _Reject(ErrorKind.NOT_IMPLEMENTED, f"method {method} is not implemented")
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in 1.0.
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            raise _bad("a request needs exactly one Host header")
        if self._chunked and version == "1.0":
            # RFC 9112 §6.1: HTTP/1.0 has no chunked coding; treat the
            # framing as faulty.
            raise _bad("Transfer-Encoding in an HTTP/1.0 request")
        length = self._content_length
        limits = self._limits
        if length is not None and length > limits.max_body_bytes:
            raise _Reject(
                ErrorKind.TOO_LARGE, f"request body exceeds {limits.max_body_bytes} bytes"
            )
        has_body = self._chunked or bool(length)
        upgrade = parser.should_upgrade()
        if upgrade and has_body:
            raise _bad("an Upgrade request with a body is not supported")
        target = self._url
        if target[:1] != b"/":
            target = self._origin_form(target, method)
        expect = self._expect
        if expect is not None and version == "1.1":
            # RFC 9110 §10.1.1; an HTTP/1.0 request's expectation is ignored.
            if expect.lower() != b"100-continue":
                raise _Reject(
                    ErrorKind.EXPECTATION_FAILED, "only Expect: 100-continue is supported"
                )
            if has_body and self._exchange is None and self.transport is not None:
                # Under the limit (checked above): ask for the body. While a
                # response is in progress a 100 would corrupt it; the client
                # sends the body after its own short wait instead.
                self.transport.write(_CONTINUE)
        self._request = Request(
            method,
            target.decode("latin-1"),  # llhttp admits only visible ASCII here
            self._headers,
            b"",
            self._peer,
            parser.should_keep_alive() and not upgrade,
            version,
            self._connection,
        )
        self._phase = _BODY
        if self._exchange is None:
            self._deadline = self._loop.time() + limits.body_timeout_s

    @staticmethod
    def _origin_form(target: bytes, method: str) -> bytes:
        if target == b"*" and method == "OPTIONS":
            return target
        # RFC 9112 §3.2.2: a server must accept the absolute form.
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise _bad("invalid request target") from None
        if url.schema not in (b"http", b"https") or not url.host:
            raise _bad("invalid request target")
        path = url.path or b"/"
        return path + b"?" + url.query if url.query else path

    def on_body(self, body: bytes) -> None:
        size = self._body_len + len(body)
        if size > self._limits.max_body_bytes:
            raise _Reject(
                ErrorKind.TOO_LARGE,
                f"request body exceeds {self._limits.max_body_bytes} bytes",
            )
        self._body_len = size
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        parts = self._body
        request.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body = []
        self._phase = _IDLE
        if self._exchange is None and not self._pending:
            self._dispatch(request)
            return
        self._pending.append(request)
        self._pause_reading()
        if len(self._pending) >= _MAX_PIPELINED:
            raise _StopParsing

    # -- requests and responses --------------------------------------------

    def _dispatch(self, request: Request) -> None:
        exchange = Exchange(self, request)
        self._exchange = exchange
        worker = self._worker
        if worker is None or worker.done():
            worker = self._worker = self._loop.create_task(self._work(request, exchange))
        elif self._handling or self._wake is None or self._wake.done():
            # The previous handler is still finishing (its response has
            # ended): the worker takes this one next.
            self._next = (request, exchange)
        else:
            self._wake.set_result((request, exchange))
        self._server._tasks.add(worker)

    async def _work(self, request: Request, exchange: Exchange) -> None:
        """The connection's requests, one after another. The handler's
        coroutine is awaited directly (no wrapper per request); how it ended
        is read here. Ends when the connection does."""
        server = self._server
        busy = server._tasks
        loop = self._loop
        worker: asyncio.Task[None] = self._worker  # type: ignore[assignment]
        while True:
            self._handling = True
            busy.add(worker)  # also for a request taken from _next
            try:
                await server.handler(request, exchange)
            except asyncio.CancelledError:
                self._handling = False
                busy.discard(worker)
                if not exchange.ended:
                    exchange.abort()
                if worker.cancelling() or self.closed:
                    # The client left (connection_lost) or the server stopped
                    # waiting: this connection is done.
                    self._worker = None
                    return
                # The handler's own cancellation (an awaited future it did
                # not own), not the connection's: as with a task per
                # request, the connection goes on (or closes, if the
                # response had not ended: abort() above).
                log.warning(
                    "request handler was cancelled on %s %s",
                    request.method,
                    request.path[:128],
                )
            except Exception as exc:
                log.error(
                    "request handler failed on %s %s",
                    request.method,
                    request.path[:128],
                    exc_info=exc,
                )
                self._answer_failure(exchange)
            else:
                if not exchange.ended:
                    log.error(
                        "request handler returned without ending the response: %s %s",
                        request.method,
                        request.path[:128],
                    )
                    self._answer_failure(exchange)
            self._handling = False
            busy.discard(worker)
            nxt = self._next
            if nxt is not None:
                self._next = None
            else:
                if self.closed:
                    return
                wake = self._wake = loop.create_future()
                try:
                    nxt = await wake
                except asyncio.CancelledError:
                    return  # the connection closed while idle
                finally:
                    self._wake = None
            request, exchange = nxt

    @staticmethod
    def _answer_failure(exchange: Exchange) -> None:
        if exchange.ended or exchange.closed:
            return
        if exchange.started:
            exchange.abort()  # the head is out: only a cut says "broken"
            return
        exchange.respond(
            500,
            [(b"content-type", b"application/json")],
            error_body(ErrorKind.INTERNAL, "internal gateway error"),
        )

    def response_done(self, exchange: Exchange, close: bool, *, abort: bool = False) -> None:
        """The response in progress has ended: close, or serve what is next."""
        if exchange is not self._exchange:
            return
        self._exchange = None
        transport = self.transport
        if self.closed or transport is None:
            return
        if abort:
            transport.abort()
            return
        if close or (self.closing and not self._pending):
            transport.close()
            return
        if self._pending:
            item = self._pending.popleft()
            if isinstance(item, _Reject):
                self._send_error(item)
                return
            self._dispatch(item)
            if not self._pending and not self._discard:
                self._resume_reading()
            return
        if self._reading_paused:
            self._resume_reading()
        limits = self._limits
        phase = self._phase
        now = self._loop.time()
        if phase == _HEAD:
            self._deadline = now + limits.header_timeout_s
        elif phase == _BODY:
            self._deadline = now + limits.body_timeout_s
        else:
            self._deadline = now + limits.keepalive_timeout_s
        if self._timer is None:  # else the armed timer re-checks the deadline
            self._arm()

    def _reject(self, reject: _Reject) -> None:
        self._discard = True
        hook = self._server.on_reject
        if hook is not None:
            hook(reject.status, reject.code)
        if self._exchange is not None or self._pending:
            # Earlier requests are answered first, in order.
            self._pending.append(reject)
            self._pause_reading()
            return
        self._send_error(reject)

    def _send_error(self, reject: _Reject) -> None:
        """Answer once, stop sending, and read (discarding) a little longer."""
        transport = self.transport
        if transport is None or self.closed:
            return
        log.debug("refused a request from %s: %d %s", self._peer, reject.status, reject.message)
        self._discard = True
        self.closing = True
        transport.write(reject.render())
        if transport.can_write_eof():
            transport.write_eof()
            self._resume_reading()
            self._phase = _LINGER
            self._deadline = self._loop.time() + _LINGER_S
            self._arm()
        else:
            transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    async def wait_drained(self) -> None:
        drain = self._drain
        if drain is None or drain.done():
            drain = self._drain = self._loop.create_future()
        await drain

    def shutdown(self) -> None:
        """Server stopping: close now if idle, else after the current response."""
        self.closing = True
        idle = self._exchange is None and not self._pending and self._phase == _IDLE
        if idle and self.transport is not None:
            self.transport.close()

    # -- deadlines ---------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is None and not self.closed:
            when = min(self._deadline, self._loop.time() + self._tick)
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self._exchange is not None:
            return  # a handler is running: the proxy owns time; re-armed when it ends
        now = self._loop.time()
        if now < self._deadline:
            self._timer = self._loop.call_at(min(self._deadline, now + self._tick), self._on_timer)
            return
        transport = self.transport
        assert transport is not None
        phase = self._phase
        if phase == _IDLE:
            transport.close()  # idle keep-alive, or a connection that never spoke
        elif phase == _LINGER:
            transport.abort()
        elif phase == _HEAD:
            self._reject(_Reject(ErrorKind.REQUEST_TIMEOUT, "request head not received in time"))
        else:
            self._reject(_Reject(ErrorKind.REQUEST_TIMEOUT, "request body not received in time"))


class HttpServer:
    """The data listener. Stop order (uvicorn's): stop accepting, close idle
    connections, let in-flight requests finish within a timeout, cancel the
    rest, close everything."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        on_reject: RejectHook | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        # Called with (status, code) for each request refused at the edge:
        # the place to count them; the handler never sees those.
        self.on_reject = on_reject
        self.connections: set[_Connection] = set()
        self.closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "server not started"
        return self._loop

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=backlog,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def port(self) -> int:
        """The bound port (the OS's pick when started with port 0)."""
        return self._port

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def close(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()

    async def shutdown(self, timeout_s: float) -> None:
        self.close()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(timeout_s=5.0)


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: ServerLimits | None = None,
    reuse_port: bool = False,
    backlog: int = 1024,
    on_reject: RejectHook | None = None,
) -> HttpServer:
    """Start the listener; ``await server.shutdown(timeout_s)`` stops it."""
    server = HttpServer(handler, limits, on_reject=on_reject)
    await server.start(host, port, reuse_port=reuse_port, backlog=backlog)
    return server
