"""The push listener: replicas POST their own load reports.

Off unless ``[telemetry] push_listen = "host:port"``: its own listener, so
that it can sit on an internal network while the data port faces clients.
``POST /load-report`` with ``Authorization: Bearer <token>``; each replica
has its own token (``push_token_env`` in its ``[[replicas]]`` entry), the
token *is* the replica's identity, and a report naming another replica is
refused: a replica cannot drain, or pile load onto, any replica but itself.

Bounded: the body is read up to ``push_max_bytes`` (413 beyond) within
``BODY_TIMEOUT_S`` (408 beyond), the schema bounds everything inside
(router/telemetry/report.py). A connection that has not sent a whole
request head within ``KEEPALIVE_TIMEOUT_S`` of opening (or of its last
answer) is closed: aiohttp's keep-alive timer runs from the accept, and an
idle handler includes one waiting on a partial head. At most
``MAX_CONNECTIONS`` are open at once; one more is closed at accept and
counted (``too_many_connections``). A replica pushes once a second on
one keep-alive connection, so none of these touches a working pusher.
Every refusal is an
OpenAI-shaped JSON error (router/errors.py) and is counted by reason
(``dp_router_load_reports_rejected_total{source="push"}``); an accepted
report gets 204.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping

from aiohttp import web

from router.errors import ErrorKind, error_response
from router.telemetry.report import LoadReport, ReportError, parse_report

PATH = "/load-report"
# A report is a few KiB sent at once: 2 s is ample on any network that
# pushes load once a second, and bounds what a slow sender holds.
BODY_TIMEOUT_S = 2.0
# aiohttp's default is 3630 s: 500 half-sent heads stayed open for minutes.
# A pusher reports about every second, so its connection never idles 5 s.
KEEPALIVE_TIMEOUT_S = 5.0
# One connection per replica is the normal case; a fleet of thousands of
# replicas on one listener is not (each costs a handler and buffers).
MAX_CONNECTIONS = 1024

# (the replica the token belongs to, its validated report); raises Refusal.
Accept = Callable[[str, LoadReport], None]


class Refusal(Exception):
    """A report the receiver would not take: (reason label, HTTP status, message)."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


def token_key(token: str) -> bytes:
    """Tokens are looked up by their SHA-256: a dict lookup on the digest
    leaks nothing usable about a token through timing."""
    return hashlib.sha256(token.encode()).digest()


def create_push_app(
    tokens: Mapping[bytes, str],
    accept: Accept,
    count_rejected: Callable[[str], None],
    *,
    max_bytes: int,
    max_experts: int,
    max_layers: int,
    body_timeout: float = BODY_TIMEOUT_S,
) -> web.Application:
    """``tokens``: :func:`token_key` of each replica's token -> its name."""

    def refuse(
        kind: ErrorKind, reason: str, message: str, status: int | None = None
    ) -> web.Response:
        count_rejected(reason)
        return error_response(kind, message, status=status)

    async def load_report(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        owner = tokens.get(token_key(token.strip())) if scheme.lower() == "bearer" else None
        if owner is None:
            return refuse(ErrorKind.UNAUTHORIZED, "unauthorized", "missing or unknown token")
        if request.content_length is not None and request.content_length > max_bytes:
            return refuse(ErrorKind.TOO_LARGE, "too_large", f"report larger than {max_bytes} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(body_timeout):
                while chunk := await request.content.read(64 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        return refuse(
                            ErrorKind.TOO_LARGE,
                            "too_large",
                            f"report larger than {max_bytes} bytes",
                        )
        except TimeoutError:
            return refuse(
                ErrorKind.REQUEST_TIMEOUT, "timeout", f"body not sent within {body_timeout} s"
            )
        try:
            report = parse_report(bytes(body), max_experts=max_experts, max_layers=max_layers)
        except ReportError as exc:
            kind = ErrorKind.BAD_JSON if exc.reason == "bad_json" else ErrorKind.BAD_FIELD
            return refuse(kind, exc.reason, exc.message)
        if report.replica != owner:
            return refuse(
                ErrorKind.UNAUTHORIZED,
                "wrong_replica",
                f"this token reports for {owner!r} only",
                status=403,
            )
        try:
            accept(owner, report)
        except Refusal as refusal:
            return refuse(ErrorKind.BAD_FIELD, refusal.reason, refusal.message, refusal.status)
        return web.Response(status=204)

    async def not_found(request: web.Request) -> web.StreamResponse:
        return refuse(ErrorKind.NOT_FOUND, "not_found", f"only POST {PATH} is served here")

    async def wrong_method(request: web.Request) -> web.StreamResponse:
        return refuse(ErrorKind.METHOD_NOT_ALLOWED, "method_not_allowed", f"POST {PATH}")

    app = web.Application(client_max_size=max_bytes)
    app.router.add_post(PATH, load_report)
    app.router.add_route("*", PATH, wrong_method)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


class _Closed(asyncio.Protocol):
    """A connection beyond ``max_connections``: closed as soon as accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


@contextlib.asynccontextmanager
async def push_listener(
    app: web.Application,
    listen: str,
    *,
    count_rejected: Callable[[str], None] = lambda reason: None,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> AsyncIterator[int]:
    """Serve ``app`` on ``listen`` ("host:port"); yields the bound port.

    The socket is aiohttp's server behind a factory that counts open
    connections (a ``TCPSite`` cannot bound them: its ``backlog`` only
    bounds the kernel's accept queue).
    """
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=keepalive_timeout,
    )
    await runner.setup()
    server = runner.server
    assert server is not None

    def protocol() -> asyncio.BaseProtocol:
        if len(server.connections) >= max_connections:
            count_rejected("too_many_connections")
            return _Closed()
        return server()

    try:
        listener = await asyncio.get_running_loop().create_server(
            protocol, host.strip("[]"), int(port), reuse_address=True
        )
        try:
            yield int(listener.sockets[0].getsockname()[1])
        finally:
            listener.close()
    finally:
        await runner.cleanup()


__all__ = ["PATH", "Refusal", "create_push_app", "push_listener", "token_key"]
