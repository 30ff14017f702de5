"""Active health checks and slow start.

Two pure pieces with the clock passed in, and one thin asyncio loop:

- :class:`HealthState`: one replica's verdict from its checks. Rise/fall
  thresholds (HAProxy ``rise 2`` / ``fall 3`` [H5]; SGLang added the same
  after flapping, I10) so one slow check does not pull a replica and one lucky
  check does not restore it. A non-expected HTTP status fails at once (Envoy
  [E7]): a replica that answers 503 on /health is telling us, not timing out.
- :class:`SlowStart`: a replica that comes back is cold (KV cache empty, CUDA
  graphs maybe not captured), so its share ramps up instead of jumping to 1/N
  (Envoy [E10], HAProxy ``slowstart`` [H3]).
- :class:`HealthChecker`: GETs every replica's health path on an interval and
  reports verdict changes through a callback.

**Before the first check** a replica is *unknown* and not routable: "routable
until proven otherwise" would flood a replica that is still loading a 70 GB
model. Envoy does the same when active checks are on, and, as in Envoy, a
single check decides the first verdict (one success makes it healthy, one
failure unhealthy), so a starting gateway does not wait ``rise`` intervals.
:meth:`HealthChecker.start` runs that first round before it returns, so once
the gateway listens every replica has a verdict.

**Slow start only after a failure** (HAProxy: "previously seen as failed",
never at proxy start): replicas healthy at gateway start get full weight at
once; a replica that turns healthy after being unhealthy ramps. A replica
added at runtime may ramp too (``slow_start_on_first=True``). The router
should also call ``state.slow_start.begin(now)`` when an outlier ejection of
the replica ends, since M7's "200 on /health but cannot serve" replica is
caught by ejection, not by the health check.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import aiohttp

log = logging.getLogger(__name__)

# HAProxy's defaults [H5]: two good checks to come back, three bad to go.
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_PATH = "/health"  # vLLM and SGLang both serve it
DEFAULT_INTERVAL_S = 5.0
DEFAULT_TIMEOUT_S = 2.0
# +-10 % per interval: enough to stop N gateways from checking in lockstep.
DEFAULT_JITTER = 0.1
# Envoy slow start: the minimum weight is 10 % so a ramping replica still gets
# some traffic (and so proves itself); linear ramp (aggression 1).
DEFAULT_SLOW_START_S = 30.0
DEFAULT_AGGRESSION = 1.0
DEFAULT_MIN_WEIGHT = 0.1
# Health responses are tiny; reading at most this much keeps the connection
# reusable without letting a confused replica stream megabytes at us.
_MAX_BODY = 64 * 1024

OnChange = Callable[[str, bool, str], None]
Targets = Callable[[], Iterable[tuple[str, str]]]


class SlowStart:
    """Envoy's slow-start factor: ``max(min_weight, (t / window) ** (1 / aggression))``.

    ``t`` is the time since :meth:`begin`. Aggression 1 is linear; above 1 the
    ramp is faster early; below 1, slower. Outside a ramp the factor is 1.
    A window of 0 disables slow start.
    """

    __slots__ = ("aggression", "min_weight", "started_at", "window_s")

    def __init__(
        self,
        window_s: float = DEFAULT_SLOW_START_S,
        aggression: float = DEFAULT_AGGRESSION,
        min_weight: float = DEFAULT_MIN_WEIGHT,
    ) -> None:
        if window_s < 0 or aggression <= 0 or not 0 < min_weight <= 1:
            raise ValueError("slow start: window_s >= 0, aggression > 0, 0 < min_weight <= 1")
        self.window_s = window_s
        self.aggression = aggression
        self.min_weight = min_weight
        self.started_at: float | None = None

    def begin(self, now: float) -> None:
        """Start (or restart) a ramp at ``now``."""
        if self.window_s > 0:
            self.started_at = now

    def cancel(self) -> None:
        self.started_at = None

    def active(self, now: float) -> bool:
        return self.started_at is not None and now - self.started_at < self.window_s

    def factor(self, now: float) -> float:
        """Weight multiplier in [min_weight, 1]; 1 outside a ramp."""
        if not self.active(now):
            return 1.0
        assert self.started_at is not None
        t = max(0.0, now - self.started_at)
        return max(self.min_weight, (t / self.window_s) ** (1.0 / self.aggression))


@dataclass(frozen=True, slots=True)
class HealthTransition:
    """A verdict change. ``first``: the first verdict (from unknown)."""

    healthy: bool
    reason: str
    at: float
    first: bool = False


class HealthState:
    """One replica's health verdict from active checks (pure; time passed in).

    ``observe(ok, now)`` feeds one check; ``immediate=True`` marks a failure
    that fails the replica at once (a non-expected status) rather than after
    ``fall`` in a row. ``healthy`` is False while the replica is unknown.
    """

    __slots__ = (
        "_healthy",
        "fall",
        "last_reason",
        "rise",
        "since",
        "slow_start",
        "slow_start_on_first",
        "streak",
    )

    def __init__(
        self,
        rise: int = DEFAULT_RISE,
        fall: int = DEFAULT_FALL,
        *,
        slow_start: SlowStart | None = None,
        slow_start_on_first: bool = False,
    ) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise = rise
        self.fall = fall
        self.slow_start = slow_start if slow_start is not None else SlowStart()
        self.slow_start_on_first = slow_start_on_first
        self._healthy: bool | None = None  # None: no check yet
        # Checks in a row that disagree with the current verdict.
        self.streak = 0
        # When the replica last became healthy (None: not healthy yet).
        self.since: float | None = None
        self.last_reason = "unknown"

    @property
    def healthy(self) -> bool:
        return self._healthy is True

    @property
    def known(self) -> bool:
        return self._healthy is not None

    def slow_start_factor(self, now: float) -> float:
        """Weight multiplier for routing: 1 unless ramping after a recovery."""
        return self.slow_start.factor(now)

    def observe(
        self, ok: bool, now: float, *, immediate: bool = False, reason: str | None = None
    ) -> HealthTransition | None:
        """Feed one check result; returns the transition it caused, if any.

        ``reason`` is a short fixed string for metrics (default "passed" or
        "failed"); it is kept in ``last_reason``.
        """
        reason = reason or ("passed" if ok else "failed")
        self.last_reason = reason
        if self._healthy is None:
            self._healthy = ok
            self.streak = 0
            if ok:
                self.since = now
                if self.slow_start_on_first:
                    self.slow_start.begin(now)
            return HealthTransition(ok, reason, now, first=True)
        if ok == self._healthy:
            self.streak = 0
            return None
        if not ok and immediate:
            self.streak = self.fall
        else:
            self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return None
        self._healthy = ok
        self.streak = 0
        if ok:
            self.since = now
            self.slow_start.begin(now)  # it was seen failed: ramp
        else:
            self.since = None
            self.slow_start.cancel()
        return HealthTransition(ok, reason, now)

    def __repr__(self) -> str:
        verdict = "unknown" if self._healthy is None else ("up" if self._healthy else "down")
        return f"HealthState({verdict}, streak={self.streak}, last={self.last_reason!r})"


class HealthChecker:
    """Background active health checks, one task per replica.

    Every ``interval_s`` (jittered by +-``jitter``), GET ``base_url + path``
    with a ``timeout_s`` deadline; a status in ``expected_statuses`` passes,
    any other status fails at once, a timeout or connection error counts
    toward ``fall``. Verdict changes call ``on_change(name, healthy, reason)``
    with reason one of ``passed``, ``unexpected_status``, ``timeout``,
    ``connect_error``, ``error``.

    ``targets()`` returns the current ``(name, base_url)`` pairs; membership
    is re-read every interval and on :meth:`refresh`. Leave drained or
    maintenance replicas in or out as the router prefers (HAProxy's ``drain``
    keeps checking, ``maint`` stops).

    ``session``: give a session that is NOT the data path's: health checks
    queued behind 100 streams in the upstream connector would time out and
    fail healthy replicas exactly when they are busy. With ``session=None``
    the checker owns a small session of its own (the recommended setup).

    Use as ``async with HealthChecker(...)`` or ``await start()`` /
    ``await stop()`` (an aiohttp ``cleanup_ctx`` generator can do either).
    """

    def __init__(
        self,
        targets: Targets,
        on_change: OnChange,
        *,
        session: aiohttp.ClientSession | None = None,
        path: str = DEFAULT_PATH,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        rise: int = DEFAULT_RISE,
        fall: int = DEFAULT_FALL,
        expected_statuses: Iterable[int] = (200,),
        jitter: float = DEFAULT_JITTER,
        slow_start_s: float = DEFAULT_SLOW_START_S,
        slow_start_aggression: float = DEFAULT_AGGRESSION,
        slow_start_min_weight: float = DEFAULT_MIN_WEIGHT,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if not path.startswith("/"):
            raise ValueError(f"health path must start with '/', got {path!r}")
        self._targets = targets
        self._on_change = on_change
        self._session = session
        self._own_session = session is None
        self.path = path
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.rise = rise
        self.fall = fall
        self.expected_statuses = frozenset(expected_statuses)
        self.jitter = jitter
        self._slow_start = (slow_start_s, slow_start_aggression, slow_start_min_weight)
        SlowStart(*self._slow_start)  # validate now, not at the first replica
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.states: dict[str, HealthState] = {}
        self._probes: dict[str, tuple[str, asyncio.Task[None]]] = {}
        # Probes cancelled by a membership change, awaited at stop().
        self._retired: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._started = False
        # Replicas present when the checker started get no slow start on their
        # first success (HAProxy: never at proxy start); later additions do.
        self._initial: set[str] = set()
        # Check results by reason ("passed", "timeout", ...) for the metrics
        # module.
        self.counters: Counter[str] = Counter()

    # --- queries ----------------------------------------------------------------

    def state(self, name: str) -> HealthState | None:
        return self.states.get(name)

    def is_healthy(self, name: str) -> bool:
        state = self.states.get(name)
        return state is not None and state.healthy

    def slow_start_factor(self, name: str, now: float | None = None) -> float:
        """Weight multiplier for ``name`` (1.0 when unknown or not ramping)."""
        state = self.states.get(name)
        if state is None:
            return 1.0
        return state.slow_start_factor(self._clock() if now is None else now)

    # --- lifecycle --------------------------------------------------------------

    async def start(self, *, wait_first_round: bool = True) -> None:
        """Start checking. By default returns after every replica's first check
        (at most ``timeout_s``), so the gateway starts with verdicts."""
        if self._started:
            return
        self._started = True
        if self._session is None:
            # Small and separate: a couple of connections per replica suffice.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=2),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        pairs = self._current_targets()
        self._initial = {name for name, _ in pairs}
        if wait_first_round:
            await asyncio.gather(*(self.check_once(name, url) for name, url in pairs))
        self._supervisor = asyncio.create_task(self._supervise(), name="health-supervisor")

    async def stop(self) -> None:
        """Cancel every check and wait for them; closes an owned session."""
        tasks = [t for _, t in self._probes.values()] + list(self._retired)
        if self._supervisor is not None:
            tasks.append(self._supervisor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        self._retired.clear()
        self._supervisor = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
        self._started = False

    async def __aenter__(self) -> HealthChecker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def refresh(self) -> None:
        """Re-read ``targets()`` now: start probes for new replicas, stop
        those of removed ones (call it on a membership change)."""
        if not self._started:
            return
        wanted = dict(self._current_targets())
        for name, (url, task) in list(self._probes.items()):
            if wanted.get(name) != url:
                task.cancel()
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
                del self._probes[name]
                if name not in wanted:
                    self.states.pop(name, None)
        for name, url in wanted.items():
            if name not in self._probes:
                # The first round already checked it: wait an interval first.
                delay = self._next_delay() if name in self.states else 0.0
                task = asyncio.create_task(self._probe(name, url, delay), name=f"health:{name}")
                self._probes[name] = (url, task)

    # --- checks -------------------------------------------------------------------

    async def check_once(self, name: str, base_url: str) -> HealthTransition | None:
        """One check of one replica, applied to its state; returns any transition."""
        ok, immediate, reason = await self._probe_once(base_url)
        self.counters[reason] += 1
        state = self.states.get(name)
        if state is None:
            state = self.states[name] = HealthState(
                self.rise,
                self.fall,
                slow_start=SlowStart(*self._slow_start),
                slow_start_on_first=name not in self._initial,
            )
        transition = state.observe(ok, self._clock(), immediate=immediate, reason=reason)
        if transition is not None:
            log.info(
                "replica %s is %s (%s)",
                name,
                "healthy" if transition.healthy else "unhealthy",
                reason,
            )
            try:
                self._on_change(name, transition.healthy, reason)
            except Exception:
                # A broken callback must not stop the checks of the fleet.
                log.exception("health on_change callback failed for %s", name)
        return transition

    async def _probe_once(self, base_url: str) -> tuple[bool, bool, str]:
        """(ok, fail_at_once, reason) for one GET of the health path."""
        assert self._session is not None, "start() the checker first"
        url = base_url.rstrip("/") + self.path
        try:
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                allow_redirects=False,
            ) as resp:
                await resp.content.read(_MAX_BODY)
                if resp.status in self.expected_statuses:
                    return True, False, "passed"
                return False, True, "unexpected_status"
        except TimeoutError:
            return False, False, "timeout"
        except aiohttp.ClientConnectionError:
            return False, False, "connect_error"
        except aiohttp.ClientError:
            return False, False, "error"

    async def _probe(self, name: str, url: str, delay: float) -> None:
        await asyncio.sleep(delay)
        while True:
            try:
                await self.check_once(name, url)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health check of %s crashed; retrying next interval", name)
            await asyncio.sleep(self._next_delay())

    async def _supervise(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:
                log.exception("health checker: reading targets failed")
            await asyncio.sleep(self.interval_s)

    def _current_targets(self) -> list[tuple[str, str]]:
        return list(dict(self._targets()).items())

    def _next_delay(self) -> float:
        spread = self.interval_s * self.jitter
        return self.interval_s + self._rng.uniform(-spread, spread)


__all__ = [
    "HealthChecker",
    "HealthState",
    "HealthTransition",
    "OnChange",
    "SlowStart",
    "Targets",
]
