"""Header rules at the proxy boundary: hop-by-hop stripping, forwarding, ids.

RFC 9110 7.6.1: ``Connection`` and every header it names are meaningful only
for one hop, as are Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade and
the Proxy-* headers; a proxy must not forward them, in either direction.

Headers are lists of ``(name, value)`` byte pairs with lower-case names, as
the data path's HTTP/1.1 server and upstream pool parse them: no case-folding
dictionaries on the hot path.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Iterable

Header = tuple[bytes, bytes]
Headers = list[Header]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself (or by the upstream pool from the body).
_REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-request-id",
    # The gateway asks replicas for their load itself (router/telemetry/orca.py),
    # and their answer is not the client's to read.
    b"endpoint-load-metrics-format",
}
# With a per-replica API key, the client's Authorization is replaced.
_REQUEST_AUTH_DROP = _REQUEST_DROP | {b"authorization"}
# The server frames and dates the response it sends; never copy these.
_RESPONSE_DROP = HOP_BY_HOP | {
    b"content-length",
    b"date",
    b"server",
    b"x-request-id",
    b"x-dp-replica",
    b"x-dp-session",
    b"endpoint-load-metrics",
}

REQUEST_ID = b"x-request-id"
REPLICA_HEADER = b"x-dp-replica"
# hit | new | repinned:<reason> | fallback: what sticky routing did (router/sessions.py).
SESSION_PLACEMENT_HEADER = b"x-dp-session"
# A replica that is shutting down answers 503 with this header (or body code
# "draining"): retried elsewhere, never counted as a replica failure.
DRAINING_HEADER = b"x-dp-draining"
# Rendered field prefixes for the one-pass blocks below.
_REQUEST_ID_FIELD = REQUEST_ID + b": "
_REPLICA_FIELD = REPLICA_HEADER + b": "
_SESSION_FIELD = SESSION_PLACEMENT_HEADER + b": "

# Generated ids: a random per-process prefix and a counter. Unique across
# gateways like a uuid4, at a tenth of its cost on the hot path.
_ID_PREFIX = os.urandom(8).hex() + "-"
_ID_COUNTER = itertools.count(1)

_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def render_fields(headers: Headers, drop: frozenset[bytes], what: str) -> bytes:
    """``name: value`` lines for a message head, minus the ``drop`` fields
    (framing the caller's engine writes itself: a second Content-Length or a
    Transfer-Encoding would make the message ambiguous, i.e. smuggling).

    A CR or LF inside a name or value would start a field, or a body, of
    the sender's choosing: ValueError. One count per byte kind on the joined
    block is cheaper than a check per field.
    """
    # Two joins in C, no concatenation per field (a third cheaper).
    lines = [b": ".join(field) for field in headers if field[0].lower() not in drop]
    n = len(lines)
    if not n:
        return b""
    lines.append(b"")  # the last field's CRLF
    block = b"\r\n".join(lines)
    if block.count(b"\n") != n or block.count(b"\r") != n:
        raise ValueError(f"CR or LF inside a {what} header")
    return block


# (drop set, Connection values) -> drop set with the names they list. A fleet
# sends a handful of distinct values ("keep-alive", "close"); bounded anyway.
_HOP_DROPS: dict[tuple[frozenset[bytes], tuple[bytes, ...]], frozenset[bytes]] = {}
_HOP_DROPS_MAX = 256


def connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in ``Connection`` (lower case): hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    names.add(token)
    return names


def _filtered(headers: Headers, drop: frozenset[bytes]) -> Headers:
    for name, _ in headers:
        if name == b"connection":
            drop = drop | connection_tokens(headers)
            break
    return [(n, v) for n, v in headers if n not in drop]


def upstream_request_headers(
    client_headers: Headers,
    *,
    request_id: str,
    forwarded_for: str,
    forwarded_proto: bytes,
    api_key: str,
    extra: Header | None = None,
) -> Headers:
    """What the replica sees: client headers minus hop-by-hop, plus forwarding.

    With a per-replica ``api_key`` the client's Authorization is replaced, so a
    client never learns or needs the upstream key and its own token never
    reaches the replica.
    """
    out = _filtered(client_headers, _REQUEST_DROP)
    if api_key:
        out = [(n, v) for n, v in out if n != b"authorization"]
        out.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
    out.append((REQUEST_ID, request_id.encode("ascii")))
    out.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    out.append((b"x-forwarded-proto", forwarded_proto))
    if extra is not None:
        out.append(extra)
    return out


def upstream_request_block(
    client_headers: Headers,
    *,
    request_id: str,
    forwarded_for: str,
    forwarded_proto: bytes,
    api_key: str,
    extra: Header | None = None,
    connection: list[bytes] | None,
) -> bytes:
    """:func:`upstream_request_headers`, rendered (``render_fields``) in one
    pass: the data path's form, with no list of pairs built and filtered
    twice. ``client_headers`` names are lower case (as the server parses
    them).

    Unlike ``render_fields``, no field is scanned for CR or LF: the fields
    come from the parsers, and llhttp refuses CR, LF and NUL in names and
    values (router/http_server.py, M39); the values added are the gateway's
    own (request ids checked by :func:`request_id_from`, configured replica
    names and keys, which config validation refuses with control
    characters). A scan per request on top cost 2% of a request's CPU.

    ``connection``: the request's Connection field values as the parser
    collected them (``Request.connection``; None: no such field). Required:
    a caller that left it out would pass Connection-listed fields on."""
    base = _REQUEST_AUTH_DROP if api_key else _REQUEST_DROP
    drop = hop_drop(base, connection)
    lines = [b": ".join(field) for field in client_headers if field[0] not in drop]
    if api_key:
        lines.append(b"authorization: Bearer " + api_key.encode("latin-1"))
    lines.append(_REQUEST_ID_FIELD + request_id.encode("ascii"))
    lines.append(b"x-forwarded-for: " + forwarded_for.encode("latin-1"))
    lines.append(b"x-forwarded-proto: " + forwarded_proto)
    if extra is not None:
        lines.append(b": ".join(extra))
    lines.append(b"")
    return b"\r\n".join(lines)


def client_response_block(
    upstream_headers: Headers,
    *,
    request_id: str,
    replica: bytes | None,
    session: str | None = None,
    connection: list[bytes] | None,
) -> bytes:
    """:func:`client_response_headers`, rendered in one pass (see
    :func:`upstream_request_block`); names lower case, as the upstream pool
    parses them. ``connection`` as in :func:`upstream_request_block`."""
    drop = hop_drop(_RESPONSE_DROP, connection)
    lines = [b": ".join(field) for field in upstream_headers if field[0] not in drop]
    lines.append(_REQUEST_ID_FIELD + request_id.encode("ascii"))
    if replica is not None:
        lines.append(_REPLICA_FIELD + replica)
        if session is not None:
            lines.append(_SESSION_FIELD + session.encode("ascii"))
    lines.append(b"")
    return b"\r\n".join(lines)


def hop_drop(drop: frozenset[bytes], connection: list[bytes] | None) -> frozenset[bytes]:
    """``drop`` plus the names listed by these Connection field values: the
    parsers collect the values while reading, so rendering a block does not
    scan every field for them, and the union is made once per distinct value."""
    if not connection:
        return drop
    key = (drop, tuple(connection))
    hit = _HOP_DROPS.get(key)
    if hit is None:
        hit = drop | connection_tokens([(b"connection", value) for value in connection])
        if len(_HOP_DROPS) < _HOP_DROPS_MAX:
            _HOP_DROPS[key] = hit
    return hit


def client_response_headers(
    upstream_headers: Headers,
    *,
    request_id: str,
    replica: bytes | None,
    session: str | None = None,
) -> Headers:
    out = _filtered(upstream_headers, _RESPONSE_DROP)
    out.append((REQUEST_ID, request_id.encode("ascii")))
    if replica is not None:
        out.append((REPLICA_HEADER, replica))
        if session is not None:
            out.append((SESSION_PLACEMENT_HEADER, session.encode("ascii")))
    return out


def request_id_from(value: bytes | None) -> str:
    """The client's X-Request-Id if it is a plain token, else a fresh one.

    Only a restricted alphabet is propagated: the id is logged and echoed, and
    a newline in it would forge log lines (docs/reliability.md, M46).
    """
    if value is not None and _SAFE_ID.match(value):
        return value.decode("ascii")
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


class ForwardedFor:
    """X-Forwarded-For by one documented rule.

    The upstream sees ``<client chain>, <peer>`` only when the TCP peer is a
    configured trusted proxy; otherwise the client's value is dropped and the
    upstream sees just the peer address. Logs use the peer address.
    """

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = [ipaddress.ip_network(c, strict=False) for c in trusted]
        self._cache: dict[str, bool] = {}

    def is_trusted(self, peer: str) -> bool:
        hit = self._cache.get(peer)
        if hit is None:
            try:
                addr = ipaddress.ip_address(peer)
                hit = any(addr in net for net in self._trusted)
            except ValueError:
                hit = False
            if len(self._cache) < 10_000:
                self._cache[peer] = hit
        return hit

    def value(self, peer: str, client_value: bytes | None) -> str:
        if client_value and self._trusted and self.is_trusted(peer):
            return f"{client_value.decode('latin-1')}, {peer}"
        return peer
