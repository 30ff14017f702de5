"""The access log: one JSON line per request, batched off the event loop.

Formatting a line with ``json.dumps`` and pushing it through ``logging`` (a
LogRecord, a handler lock, a write syscall) cost more than a small request's
whole routing decision, on the event loop that also relays every stream; a
thread woken per line cost more still (a GIL hand-off per request). So:

- the data path formats a line with an f-string and appends it to a list:
  about 2 us. The fields that may carry a quote or a newline (path, peer,
  model, replica, session) are quoted as ``json.dumps`` quotes them, through
  a bounded cache: they repeat from line to line (see ``_quoted``);
- every ``FLUSH_S`` (or ``MAX_LINES`` lines) the batch goes, as one string of
  newline-separated JSON lines, to a writer thread, which logs it as one
  record on the ``dp_router.access`` logger. ``dp-router serve`` gives that
  logger a handler that writes the lines as they are (JSON lines on stderr);
  a handler of your own receives batches of lines.

Bounded: past ``MAX_PENDING_BATCHES`` batches not yet written (a log sink
slower than the request rate), batches are dropped and their lines counted
(``dp_router_access_log_dropped_total``) rather than growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from types import TracebackType
from typing import TextIO

access_log = logging.getLogger("dp_router.access")

FLUSH_S = 0.05  # a line reaches the log within 50 ms
MAX_LINES = 512  # or sooner, in batches of this many lines
MAX_PENDING_BATCHES = 200  # about 100k lines waiting for a slow sink, at most

_STOP = object()

# The quoted JSON form of each string lines carry (and None: null), exactly
# as json.dumps writes it: json.dumps(s) of a str is encode_basestring_ascii(s).
# Path, model, replica and peer repeat from line to line, and a dict hit costs
# a sixth of json.dumps (two Python frames per call, and a whole encoder built
# for None). Bounded, since the keys come from clients: only forms of at most
# 130 characters go in (128 plain ASCII characters and their quotes, so at
# most about 1.5 MB), and a full cache starts over.
QUOTE_CACHE_MAX = 4096
QUOTED_MAX_LEN = 130
_quoted: dict[str | None, str] = {None: "null"}
_encode = encode_basestring_ascii


def _quote(s: str | None) -> str:
    """The miss path of ``_quoted.get(s)``."""
    if s is None:
        return "null"
    q = _encode(s)
    if len(q) <= QUOTED_MAX_LEN:
        if len(_quoted) >= QUOTE_CACHE_MAX:
            _quoted.clear()
            _quoted[None] = "null"
        _quoted[s] = q
    return q


class AccessLog:
    """``write(...)`` from the event loop; a thread writes the batches.

    A context manager: the gateway enters it at start and leaves it after
    the data listener has drained, which flushes what is left and joins the
    writer thread.
    """

    def __init__(self, enabled: bool, on_drop: Callable[[int], None] | None = None) -> None:
        self.enabled = enabled and access_log.isEnabledFor(logging.INFO)
        self._on_drop = on_drop
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
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
        session: str | None = None,
    ) -> None:
        if not self.enabled:
            return
        # request_id is a checked token (headers.request_id_from); method,
        # reason, outcome and the numbers come from the gateway; the rest
        # may carry a quote or a newline and is escaped. A cached string is
        # at most 128 long (its quoted form is at most 130), so a hit on path
        # or model is a hit on its [:128].
        quoted = _quoted.get
        self._lines.append(
            f'{{"ts": {time.time():.3f}, "id": "{request_id}", "method": "{method}", '
            f'"path": {quoted(path) or _quote(path[:128])}, '
            f'"peer": {quoted(peer) or _quote(peer)}, '
            f'"model": {quoted(model) or _quote(model[:128])}, '
            f'"replica": {quoted(replica) or _quote(replica)}, '
            f'"reason": "{reason}", "status": {status}, "outcome": "{outcome}", '
            f'"attempts": {attempts}, '
            f'"ttfb_ms": {"null" if ttfb_s is None else f"{ttfb_s * 1e3:.3f}"}, '
            f'"duration_ms": {duration_s * 1e3:.3f}, "bytes_in": {bytes_in}, '
            f'"bytes_out": {bytes_out}, "session": {quoted(session) or _quote(session)}}}'
        )
        if len(self._lines) >= MAX_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines = self._lines
        if not lines:
            return
        self._lines = []
        if self._queue.qsize() >= MAX_PENDING_BATCHES:
            if self._on_drop is not None:
                self._on_drop(len(lines))
            return
        self._queue.put("\n".join(lines))

    def _run(self) -> None:
        get = self._queue.get
        while True:
            batch = get()
            if batch is _STOP:
                return
            try:
                access_log.info(batch)
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
            self.flush()
            self._queue.put(_STOP)
            self._thread.join(timeout=5.0)
            self._thread = None


def setup(stream: TextIO) -> None:
    """Access lines go out as they are (JSON lines), not behind the log
    format's time and level prefix; they carry their own ``ts``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.propagate = False
