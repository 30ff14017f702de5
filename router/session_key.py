"""The session key: where it comes from, how it is checked, how it is stored.

A client names its session (a header, or the OpenAI body fields
``prompt_cache_key`` and ``user``); the gateway stores a fixed-size hash of
the source and the value, so a client can neither craft store keys nor grow
memory with long ones, and the same value from two sources never collides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.errors import ErrorKind, GatewayError

BODY_FIELDS = ("prompt_cache_key", "user")


@dataclass(frozen=True, slots=True)
class KeySource:
    """One place a session key may come from: a header or a body field."""

    kind: str  # "header" | "body"
    name: str
    header: bytes = b""  # the header's lower-case name, encoded once


def parse_sources(specs: tuple[str, ...]) -> tuple[KeySource, ...]:
    """``header:<name>`` or ``body:prompt_cache_key`` / ``body:user``.
    Raises ValueError with the offending spec (config turns it into a
    ConfigError)."""
    sources = []
    for spec in specs:
        kind, _, name = spec.partition(":")
        kind = kind.strip().lower()
        name = name.strip()
        if kind == "header" and name and name.isascii() and " " not in name:
            sources.append(KeySource("header", name.lower(), name.lower().encode("latin-1")))
        elif kind == "body" and name in BODY_FIELDS:
            sources.append(KeySource("body", name))
        else:
            raise ValueError(
                f"{spec!r}: expected header:<name> or body:{' / body:'.join(BODY_FIELDS)}"
            )
    return tuple(sources)


def _invalid(source: KeySource, why: str) -> GatewayError:
    where = f"header {source.name}" if source.kind == "header" else f"field '{source.name}'"
    return GatewayError(ErrorKind.BAD_SESSION_KEY, f"session key in {where} {why}")


def session_key(
    sources: tuple[KeySource, ...],
    header: Callable[[bytes], bytes | None],
    body: Mapping[str, Any] | None,
    max_length: int,
    model: str,
) -> str | None:
    """The stored form of the request's session key, or None for no session.

    The first source present wins. A present but invalid key (too long, not
    a string, control characters) is the client's error (400), not a silent
    loss of stickiness. The stored form is a hash of source, value and model:
    a fixed 32 hex characters whatever the client sent, and one pin per model
    (a KV cache is per model: a session that alternates a chat model and a
    small title model must not drag one model's pin to the other's replica
    on every request).
    """
    for source in sources:
        if source.kind == "header":
            raw = header(source.header)
            if raw is None:
                continue
            raw = raw.strip()
            if not raw:
                continue
            if len(raw) > max_length:
                raise _invalid(source, f"is longer than {max_length} bytes")
            if any(c < 0x21 or c > 0x7E for c in raw):
                raise _invalid(source, "must be visible ASCII characters")
            value = raw
        else:
            if body is None or body.get(source.name) is None:
                continue
            field = body[source.name]
            if not isinstance(field, str):
                raise _invalid(source, "must be a string")
            if not field:
                continue
            value = field.encode("utf-8", "surrogatepass")
            if len(value) > max_length:
                raise _invalid(source, f"is longer than {max_length} bytes")
            if any(c < 0x20 or c == 0x7F for c in value):
                raise _invalid(source, "must not contain control characters")
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{source.kind}:{source.name}\0".encode())
        digest.update(value)
        digest.update(b"\0" + model.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()
    return None
