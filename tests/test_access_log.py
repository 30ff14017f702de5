"""The access log: valid JSON lines, client fields escaped, batched off the loop."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from router import access_log
from router.access_log import AccessLog


def entry(log: AccessLog, **overrides: object) -> None:
    fields: dict[str, object] = {
        "request_id": "abc-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "peer": "127.0.0.1",
        "model": "m",
        "replica": "r1",
        "reason": "queue_depth",
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "ttfb_s": 0.0012345,
        "duration_s": 0.5,
        "bytes_in": 10,
        "bytes_out": 20,
    }
    fields.update(overrides)
    log.write(**fields)  # type: ignore[arg-type]


async def test_lines_are_json_and_client_fields_cannot_forge_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dp_router.access")
    with AccessLog(True) as log:
        entry(log)
        entry(
            log, model='evil"\nFAKE {"status": 200}', path="/x?\u2028y", replica=None, ttfb_s=None
        )
        await asyncio.sleep(access_log.FLUSH_S + 0.2)
    lines = [line for r in caplog.records for line in r.getMessage().split("\n")]
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["status"] == 200 and first["ttfb_ms"] == pytest.approx(1.2345, abs=1e-3)
    assert first["duration_ms"] == pytest.approx(500.0)
    assert second["model"].startswith('evil"\nFAKE') and second["replica"] is None
    assert second["ttfb_ms"] is None
    assert not any(line.startswith("FAKE") for line in lines)


async def test_leaving_flushes_what_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dp_router.access")
    with AccessLog(True) as log:
        for i in range(access_log.MAX_LINES + 3):
            entry(log, request_id=f"id-{i}")
    lines = [line for r in caplog.records for line in r.getMessage().split("\n")]
    assert len(lines) == access_log.MAX_LINES + 3
    assert json.loads(lines[-1])["id"] == f"id-{access_log.MAX_LINES + 2}"


async def test_a_slow_sink_drops_and_counts_instead_of_growing() -> None:
    dropped: list[int] = []
    log = AccessLog(True, dropped.append)
    log.enabled = True  # no writer thread: nothing drains the queue
    for _ in range(access_log.MAX_PENDING_BATCHES + 2):
        entry(log)
        log.flush()
    assert dropped == [1, 1]


def test_off_when_disabled_or_below_info() -> None:
    logging.getLogger("dp_router.access").setLevel(logging.WARNING)
    try:
        assert not AccessLog(True).enabled
    finally:
        logging.getLogger("dp_router.access").setLevel(logging.NOTSET)
    assert not AccessLog(False).enabled
