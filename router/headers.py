"""Header rules at the proxy boundary: hop-by-hop stripping, forwarding, ids.

RFC 9110 7.6.1: ``Connection`` and every header it names are meaningful only
for one hop, as are Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade and
the Proxy-* headers; a proxy must not forward them, in either direction.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway itself (or by aiohttp from the body) on the upstream request.
_REQUEST_DROP = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-proto"})
# aiohttp frames and dates the response it sends; never copy these from upstream.
_RESPONSE_DROP = frozenset({"content-length", "date", "server"})

REQUEST_ID = "X-Request-Id"
REPLICA_HEADER = "X-Dp-Replica"
SESSION_HEADER = "x-session-id"
# A replica that is shutting down answers 503 with this header (or body code
# "draining"): retried elsewhere, never counted as a replica failure.
DRAINING_HEADER = "x-dp-draining"

# Generated ids: a random per-process prefix and a counter. Unique across
# gateways like a uuid4, at a tenth of its cost on the hot path.
_ID_PREFIX = os.urandom(8).hex() + "-"
_ID_COUNTER = itertools.count(1)

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in ``Connection`` (lower case): hop-by-hop too."""
    names: set[str] = set()
    for value in headers.getall("connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


def _filtered(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]
) -> CIMultiDict[str]:
    extra = connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in drop or lname in extra:
            continue
        out.add(name, value)
    return out


def upstream_request_headers(
    client_headers: CIMultiDictProxy[str],
    *,
    request_id: str,
    forwarded_for: str,
    forwarded_proto: str,
    api_key: str,
) -> CIMultiDict[str]:
    """What the replica sees: client headers minus hop-by-hop, plus forwarding.

    With a per-replica ``api_key`` the client's Authorization is replaced, so a
    client never learns or needs the upstream key and its own token never
    reaches the replica.
    """
    out = _filtered(client_headers, _REQUEST_DROP)
    out[REQUEST_ID] = request_id
    out["X-Forwarded-For"] = forwarded_for
    out["X-Forwarded-Proto"] = forwarded_proto
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def client_response_headers(
    upstream_headers: CIMultiDictProxy[str], *, request_id: str, replica: str | None
) -> CIMultiDict[str]:
    out = _filtered(upstream_headers, _RESPONSE_DROP)
    out[REQUEST_ID] = request_id
    if replica is not None:
        out[REPLICA_HEADER] = replica
    return out


def request_id_from(headers: CIMultiDictProxy[str]) -> str:
    """The client's X-Request-Id if it is a plain token, else a fresh one.

    Only a restricted alphabet is propagated: the id is logged and echoed, and
    a newline in it would forge log lines (docs/reliability.md, M46).
    """
    value = headers.get(REQUEST_ID)
    if value is not None and _SAFE_ID.match(value):
        return value
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

    def value(self, peer: str, client_value: str | None) -> str:
        if client_value and self._trusted and self.is_trusted(peer):
            return f"{client_value}, {peer}"
        return peer
