"""The ``x-sim-fault`` request header: per-request faults, parsed strictly.

Grammar: ``x-sim-fault: key=value[;key=value]...`` (whitespace around keys
and values is ignored). An unknown key or a bad value is a
:class:`FaultError` (the replica answers 400), so a typo in a test cannot
silently disable the fault it meant to inject. The keys and what they do
are in docs/replica.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FAULT_HEADER = "x-sim-fault"
# A hanging request (hang_before_headers, after=hang) waits this long at most,
# so that a test that forgets to disconnect cannot pin a task forever.
MAX_HANG_S = 3600.0

AfterAction = Literal["die", "hang", "finish"]


class FaultError(ValueError):
    """A malformed ``x-sim-fault`` header (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Fault:
    status: int | None = None
    hang_before_headers: bool = False
    chunks: int | None = None
    after: AfterAction = "finish"
    chunk_interval: float | None = None
    delay: float = 0.0
    drain_marker: bool = False
    gzip: bool = False
    hop_headers: bool = False
    echo: bool = False


NO_FAULT = Fault()


def check_status(status: int) -> int:
    """An error status a replica may be told to answer: 400..599."""
    if not 400 <= status <= 599:
        raise ValueError(f"status must be in 400..599, not {status}")
    return status


def _flag(value: str) -> bool:
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise FaultError(f"expected 1 or 0, got {value!r}")


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise FaultError(f"expected seconds, got {value!r}") from None
    if not 0 <= s <= MAX_HANG_S:
        raise FaultError(f"seconds out of range: {value!r}")
    return s


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FaultError(f"expected an integer, got {value!r}") from None


def parse_fault(header: str | None) -> Fault:
    """Parse an ``x-sim-fault`` header value (grammar in docs/replica.md)."""
    if not header or not header.strip():
        return NO_FAULT
    values: dict[str, Any] = {}
    for item in header.split(";"):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep:
            raise FaultError(f"expected key=value, got {item.strip()!r}")
        if key == "status":
            try:
                values["status"] = check_status(_int(raw))
            except ValueError as e:
                raise FaultError(str(e)) from None
        elif key == "chunks":
            n = _int(raw)
            if n < 0:
                raise FaultError("chunks must be >= 0")
            values["chunks"] = n
        elif key == "after":
            if raw not in ("die", "hang", "finish"):
                raise FaultError(f"after must be die, hang or finish, not {raw!r}")
            values["after"] = raw
        elif key in ("chunk_interval", "delay"):
            values[key] = _seconds(raw)
        elif key in ("hang_before_headers", "drain_marker", "gzip", "hop_headers", "echo"):
            values[key] = _flag(raw)
        else:
            raise FaultError(f"unknown fault key {key!r}")
    return Fault(**values)
