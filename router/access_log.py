"""The access log: one JSON line per request, formatted and written off the loop.

Formatting a JSON line and pushing it through ``logging`` (a LogRecord, a
handler lock, a write syscall) cost more than a small request's whole
routing decision, on the event loop that also relays every stream. So the
data path only appends the request's fields to a queue (a tuple, no
formatting), and one writer thread turns them into lines for the
``dp_router.access`` logger, where the operator's handlers apply as
before. The thread blocks on the queue, so an idle gateway costs nothing.

Bounded: past ``MAX_PENDING`` lines not yet written (a log sink slower than
the request rate), lines are dropped and counted rather than growing memory.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from types import TracebackType

access_log = logging.getLogger("dp_router.access")

# About a minute of a busy gateway's lines; each pending entry is one tuple.
MAX_PENDING = 100_000

FIELDS = (
    "ts",
    "id",
    "method",
    "path",
    "peer",
    "model",
    "replica",
    "reason",
    "status",
    "outcome",
    "attempts",
    "ttfb_ms",
    "duration_ms",
    "bytes_in",
    "bytes_out",
)

_STOP = object()


class AccessLog:
    """``write(...)`` from the loop; a daemon thread formats and logs.

    Use as a context manager (the gateway enters it at start and leaves it at
    shutdown, after the last request): leaving writes what is pending and
    joins the thread.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and access_log.isEnabledFor(logging.INFO)
        self.dropped = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        peer: str,
        model: str,
        replica: str | None,
        reason: str,
        status: int,
        outcome: str,
        attempts: int,
        ttfb_s: float | None,
        duration_s: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        if not self.enabled:
            return
        if self._queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return
        self._queue.put(
            (
                time.time(),
                request_id,
                method,
                path[:128],
                peer,
                model[:128],
                replica,
                reason,
                status,
                outcome,
                attempts,
                ttfb_s,
                duration_s,
                bytes_in,
                bytes_out,
            )
        )

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            assert isinstance(item, tuple)
            fields = dict(zip(FIELDS, item, strict=True))
            fields["ts"] = round(fields["ts"], 3)
            ttfb = fields["ttfb_ms"]
            fields["ttfb_ms"] = None if ttfb is None else round(ttfb * 1e3, 2)
            fields["duration_ms"] = round(fields["duration_ms"] * 1e3, 2)
            try:
                access_log.info(json.dumps(fields))
            except Exception:  # a broken handler must not kill the writer
                logging.getLogger("dp_router").exception("access log write failed")

    def __enter__(self) -> AccessLog:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5.0)
            self._thread = None
