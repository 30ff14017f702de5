"""The access log: valid JSON lines, client fields escaped, batched off the loop."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def reference_line(
    ts: float,
    path: str,
    peer: str,
    model: str,
    replica: str | None,
    ttfb_s: float | None,
    duration_s: float,
    session: str | None,
) -> str:
    """The line as json.dumps wrote it before the quote cache."""

    def ms(seconds: float | None) -> str:
        return "null" if seconds is None else f"{seconds * 1e3:.3f}"

    d = json.dumps
    return (
        f'{{"ts": {ts:.3f}, "id": "abc-1", "method": "POST", '
        f'"path": {d(path[:128])}, "peer": {d(peer)}, '
        f'"model": {d(model[:128])}, "replica": {d(replica)}, '
        f'"reason": "queue_depth", "status": 200, "outcome": "ok", '
        f'"attempts": 1, "ttfb_ms": {ms(ttfb_s)}, '
        f'"duration_ms": {ms(duration_s)}, "bytes_in": 10, '
        f'"bytes_out": 20, "session": {d(session)}}}'
    )


# Any text, and text that repeats (cache hits) or runs past the 128 kept.
texts = st.one_of(
    st.text(),
    st.sampled_from(["", "m", "/v1/chat/completions", 'a"b\\c\n\u2028\x00é😀', "x" * 200]),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(1, 40)),
)
seconds = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(
    path=texts,
    peer=texts,
    model=texts,
    replica=st.none() | texts,
    ttfb_s=st.none() | seconds,
    duration_s=seconds,
    session=st.none() | texts,
    now=st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
)
def test_lines_are_byte_identical_to_json_dumps(
    path: str,
    peer: str,
    model: str,
    replica: str | None,
    ttfb_s: float | None,
    duration_s: float,
    session: str | None,
    now: float,
) -> None:
    log = AccessLog(True)
    log.enabled = True
    log._timer = object()  # type: ignore[assignment]  # no loop here: no flush timer
    fields = {"path": path, "peer": peer, "model": model, "replica": replica}
    # Long strings whose first 128 characters are cached print as before.
    path_128, model_128 = (path + "p" * 128)[:128], (model + "m" * 128)[:128]
    long = {"path": path_128 + "tail", "model": model_128 + "y" * 200}
    with mock.patch.object(access_log, "time", SimpleNamespace(time=lambda: now)):
        for _ in range(2):  # a miss, then (for short strings) a cache hit
            entry(log, **fields, ttfb_s=ttfb_s, duration_s=duration_s, session=session)
        entry(log, path=path_128, model=model_128)
        entry(log, **long)
    expected = reference_line(now, path, peer, model, replica, ttfb_s, duration_s, session)
    assert log._lines[:2] == [expected, expected]
    expected_long = reference_line(
        now, long["path"], "127.0.0.1", long["model"], "r1", 0.0012345, 0.5, None
    )
    assert log._lines[3] == expected_long


def test_the_quote_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access_log, "_quoted", {None: "null"})
    for i in range(access_log.QUOTE_CACHE_MAX * 2):
        assert access_log._quote(f"client-{i}") == json.dumps(f"client-{i}")
    assert len(access_log._quoted) <= access_log.QUOTE_CACHE_MAX
    assert access_log._quoted[None] == "null"
    long = "z" * 129
    assert access_log._quote(long) == json.dumps(long) and long not in access_log._quoted
    escaped = "\n" * 64  # 64 characters, 130 quoted
    assert access_log._quote(escaped) == json.dumps(escaped) and escaped in access_log._quoted
    assert access_log._quote("\n" * 65) == json.dumps("\n" * 65)
    assert "\n" * 65 not in access_log._quoted
