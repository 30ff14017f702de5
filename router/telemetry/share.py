"""Reported load from the ``--workers`` supervisor to its workers.

The supervisor scrapes and takes pushes (router/telemetry/source.py); the
workers route. Reported numbers are live counters, not status, so they do
not travel in the ``fleet`` messages (which go out on a version change):
each accepted report marks its replica, and every ``SHIP_BATCH_S`` one
``load`` message carries the marked replicas' readings to every worker
(:func:`ship_reports`), where :func:`apply_load_message` records them,
unless the worker already holds a newer one (an ORCA header it read
itself). A self-drain is status and travels with the fleet.

``reported_at`` is sent as it is: the supervisor's and the workers'
``loop.time()`` read one ``CLOCK_MONOTONIC`` (router/workers.py), so a
worker measures the report's age on the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from router.replicas import Registry
from router.telemetry.source import Telemetry

# Reports arrive about once a second per replica; 20 ms later is nothing
# to a queue length, and one message per batch beats one per report.
SHIP_BATCH_S = 0.02

# name, reported_at, queue, kv_usage, waiting, running, running_at,
# waiting_prompt_tokens, source
Entry = tuple[
    str,
    float,
    float,
    float | None,
    float | None,
    float | None,
    float | None,
    float | None,
    str | None,
]


def load_message(registry: Registry, names: set[str]) -> tuple[str, list[Entry]]:
    """The ``load`` message for ``names``' current readings."""
    entries: list[Entry] = []
    for name in sorted(names):
        status = registry.get(name)
        if status is None:
            continue
        load = status.load
        if load.reported_queue is None or load.reported_at is None:
            continue
        entries.append(
            (
                name,
                load.reported_at,
                load.reported_queue,
                load.kv_usage,
                load.reported_waiting,
                load.reported_running,
                load.running_at,
                load.waiting_prompt_tokens,
                load.reported_by,
            )
        )
    return ("load", entries)


def apply_load_message(registry: Registry, message: tuple[Any, ...]) -> int:
    """A worker: record the supervisor's readings; returns how many applied."""
    applied = 0
    for name, at, queue, kv, waiting, running, running_at, prompt_tokens, source in message[1]:
        status = registry.get(name)
        if status is None:
            continue
        load = status.load
        if load.reported_at is not None and load.reported_at >= at:
            continue  # this worker holds a newer reading (its own ORCA header)
        load.record_report(
            queue,
            kv,
            at,
            waiting=waiting,
            running=running,
            waiting_prompt_tokens=prompt_tokens,
            source=source,
        )
        load.running_at = running_at
        applied += 1
    return applied


@contextlib.contextmanager
def ship_reports(
    telemetry: Telemetry, registry: Registry, send: Callable[[tuple[Any, ...]], None]
) -> Iterator[None]:
    """While entered, send every accepted report's reading with ``send``,
    batched per ``SHIP_BATCH_S``."""
    loop = asyncio.get_running_loop()
    dirty: set[str] = set()
    timer: asyncio.TimerHandle | None = None

    def flush() -> None:
        nonlocal timer
        timer = None
        names = set(dirty)
        dirty.clear()
        message = load_message(registry, names)
        if message[1]:
            send(message)

    def on_report(name: str) -> None:
        nonlocal timer
        dirty.add(name)
        if timer is None:
            timer = loop.call_later(SHIP_BATCH_S, flush)

    telemetry.subscribe(on_report)
    try:
        yield
    finally:
        telemetry.unsubscribe(on_report)
        if timer is not None:
            timer.cancel()


__all__ = ["SHIP_BATCH_S", "apply_load_message", "load_message", "ship_reports"]
