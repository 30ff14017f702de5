"""Every error a client sees, in one shape and one place.

OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``. Each kind
has its status, type and code here, so the data path names a kind and never
builds an error body by hand. The ``code`` doubles as the ``reason`` label of
the errors metric (a fixed set, never client input).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from aiohttp import web


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    type: str
    code: str


class ErrorKind(Enum):
    # The data listener's protocol-level refusals, before any handler runs.
    BAD_REQUEST = ErrorSpec(400, "invalid_request_error", "bad_request")
    REQUEST_TIMEOUT = ErrorSpec(408, "invalid_request_error", "request_timeout")
    URI_TOO_LONG = ErrorSpec(414, "invalid_request_error", "uri_too_long")
    EXPECTATION_FAILED = ErrorSpec(417, "invalid_request_error", "expectation_failed")
    HEADERS_TOO_LARGE = ErrorSpec(431, "invalid_request_error", "headers_too_large")
    NOT_IMPLEMENTED = ErrorSpec(501, "server_error", "not_implemented")
    VERSION_NOT_SUPPORTED = ErrorSpec(505, "server_error", "http_version_not_supported")
    BAD_JSON = ErrorSpec(400, "invalid_request_error", "invalid_json")
    BAD_FIELD = ErrorSpec(400, "invalid_request_error", "invalid_field")
    BAD_SESSION_KEY = ErrorSpec(400, "invalid_request_error", "invalid_session_key")
    UNAUTHORIZED = ErrorSpec(401, "authentication_error", "unauthorized")
    NOT_FOUND = ErrorSpec(404, "invalid_request_error", "not_found")
    MODEL_NOT_FOUND = ErrorSpec(404, "invalid_request_error", "model_not_found")
    METHOD_NOT_ALLOWED = ErrorSpec(405, "invalid_request_error", "method_not_allowed")
    TOO_LARGE = ErrorSpec(413, "invalid_request_error", "request_too_large")
    UNSUPPORTED_ENCODING = ErrorSpec(415, "invalid_request_error", "unsupported_encoding")
    OVERLOADED = ErrorSpec(429, "rate_limit_error", "overloaded")
    INTERNAL = ErrorSpec(500, "server_error", "internal_error")
    UPSTREAM_ERROR = ErrorSpec(502, "server_error", "upstream_error")
    NO_REPLICA = ErrorSpec(503, "server_error", "no_healthy_replica")
    QUEUE_TIMEOUT = ErrorSpec(503, "server_error", "queue_timeout")
    SHUTTING_DOWN = ErrorSpec(503, "server_error", "shutting_down")
    UPSTREAM_TIMEOUT = ErrorSpec(504, "server_error", "upstream_timeout")

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def code(self) -> str:
        return self.value.code


def error_body(kind: ErrorKind, message: str) -> bytes:
    spec = kind.value
    return json.dumps(
        {"error": {"message": message, "type": spec.type, "code": spec.code, "param": None}}
    ).encode()


def error_response(
    kind: ErrorKind,
    message: str,
    *,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
) -> web.Response:
    """``status`` overrides the kind's own where config chooses (429 or 503)."""
    out = dict(headers or {})
    if retry_after_s is not None:
        # Retry-After takes whole seconds; round up so clients never retry early.
        out["Retry-After"] = str(max(1, int(-(-retry_after_s // 1))))
    return web.Response(
        status=status or kind.status,
        body=error_body(kind, message),
        content_type="application/json",
        headers=out,
    )


def sse_error_event(kind: ErrorKind, message: str) -> bytes:
    """An in-band error for a stream that already started: never a fake [DONE]."""
    return b"data: " + error_body(kind, message) + b"\n\n"


class GatewayError(Exception):
    """Raised inside the data path; the handler turns it into ``error_response``."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s
        self.status = status or kind.status
