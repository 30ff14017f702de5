"""Active health checks: evidence here, the verdict in the registry.

A replica's health is status, and status has one owner, the
:class:`router.replicas.Registry`. This module keeps only the evidence the
verdict is drawn from (per replica: the checks in a row that disagree with
the current verdict, and the last check's reason) and writes each verdict
change with one ``registry.update(name, health=..., ramp=...)``.

- :class:`HealthState` turns one check into a verdict change, or none; pure,
  time passed in, so the thresholds are tested on a hand clock. Rise/fall
  thresholds as HAProxy's ``rise 2`` / ``fall 3`` (SGLang's router added the
  same after flapping), so one slow check does not pull a replica and one
  lucky check does not restore it. A non-expected HTTP status fails at once
  (Envoy's active health checking): a replica that answers 503 on /health is
  telling us, not timing out.
- :class:`HealthChecker` GETs every member's health path, one round every
  interval (jittered), and applies the results.
- :func:`health_checks`: the checker as an async context manager for the
  app's ordered start-up and shutdown.

**Before the first check** a replica is ``unknown`` and not routable:
"routable until proven otherwise" would flood a replica still loading a 70 GB
model. As in Envoy, a single check decides the first verdict (one success
makes it healthy, one failure unhealthy), so a starting gateway does not wait
``rise`` intervals, and :func:`health_checks` runs that first round before
it yields: once the gateway listens, every replica has a verdict.

**Slow start only after a failure** (HAProxy ``slowstart``: only for a server
"previously seen as failed", never at proxy start). A replica that was healthy
at start-up gets full weight at once; one that turns healthy after being
unhealthy gets a :class:`~router.replicas.Ramp` (Envoy's slow start), because
it is cold: empty KV cache, maybe CUDA graphs not captured yet
(``docs/reliability.md`` M7, M11). A replica *added at runtime* ramps from its
first healthy verdict too: it is not "proxy start" for that replica, and a
replica added to a running fleet has usually just been started. The ramp of a
replica that comes back while still ejected starts when the ejection ends,
when it can first take traffic. The outlier detector sets the ramp that
follows an ejection, from the same ``[health]`` slow-start values.

Membership is the registry's, re-read every round: a replica added at runtime
is checked from the next round on, one removed is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable

import aiohttp

from router.config import HealthConfig
from router.metrics import Metrics
from router.replicas import FleetSnapshot, Health, Ramp, Registry

log = logging.getLogger("dp_router.health")

# HAProxy's defaults: two good checks to come back, three bad to go.
DEFAULT_RISE = 2
DEFAULT_FALL = 3
# vLLM and SGLang answer 200 on /health once they can serve.
DEFAULT_EXPECTED_STATUSES: frozenset[int] = frozenset({200})
# +-10 % per interval: enough to stop N gateways from checking in lockstep.
DEFAULT_JITTER = 0.1
# Health responses are tiny; reading at most this much keeps the connection
# reusable without letting a confused replica stream megabytes at us.
_MAX_BODY = 64 * 1024


class HealthState:
    """One replica's health evidence: what the next verdict is drawn from.

    The verdict itself is not here (it is the registry's): :meth:`observe`
    is told the current one and answers with the new one, or None.
    """

    __slots__ = ("fall", "last_at", "last_reason", "rise", "streak")

    def __init__(self, rise: int = DEFAULT_RISE, fall: int = DEFAULT_FALL) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise = rise
        self.fall = fall
        # Checks in a row that disagree with the current verdict.
        self.streak = 0
        self.last_reason = "unknown"
        self.last_at: float | None = None  # when the last check was applied

    def observe(
        self,
        ok: bool,
        now: float,
        current: Health,
        *,
        immediate: bool = False,
        reason: str | None = None,
    ) -> Health | None:
        """Feed one check; the verdict it changes ``current`` to, or None.

        ``immediate`` marks a failure that fails the replica at once (a
        non-expected status) rather than after ``fall`` in a row. ``reason``
        is a short fixed string (default "passed" or "failed"), kept in
        ``last_reason`` for the admin API and the transition's log line.
        """
        self.last_reason = reason or ("passed" if ok else "failed")
        self.last_at = now
        verdict = Health.HEALTHY if ok else Health.UNHEALTHY
        if current is Health.UNKNOWN:
            self.streak = 0
            return verdict
        if verdict is current:
            self.streak = 0
            return None
        if not ok and immediate:
            self.streak = self.fall
        else:
            self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return None
        self.streak = 0
        return verdict

    def __repr__(self) -> str:
        return f"HealthState(streak={self.streak}, last={self.last_reason!r})"


def slow_start_ramp(config: HealthConfig) -> Callable[[float], Ramp] | None:
    """The ramp a recovered replica gets, by its start time.

    None when ``slow_start_s`` is 0: slow start is off, back at full weight.
    """
    if config.slow_start_s <= 0:
        return None
    return functools.partial(
        Ramp,
        duration=config.slow_start_s,
        aggression=config.slow_start_aggression,
        min_weight=config.slow_start_min_weight,
    )


class HealthChecker:
    """Active health checks of every member of ``registry``, in rounds.

    Every ``interval_s`` (+- ``jitter``), GET ``url + path`` of each member
    with a ``timeout_s`` deadline: a status in ``expected_statuses`` passes,
    any other fails at once, a timeout or connection error counts toward
    ``fall``. Every member is checked, draining ones included (HAProxy's
    ``drain`` keeps checking a server; only ``maint`` stops).

    ``session`` must NOT be the data path's: checks queued behind 100 streams
    in the upstream connector would time out and fail healthy replicas
    exactly when they are busy (:func:`health_checks` makes a small one).
    ``clock`` gives ``now`` for the registry, so it must be the clock the
    router compares ``ejected_until`` and ramps with (by default the event
    loop's, as the proxy uses).
    """

    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        config: HealthConfig,
        metrics: Metrics,
        rng: random.Random,
        *,
        clock: Callable[[], float] | None = None,
        expected_statuses: Iterable[int] = DEFAULT_EXPECTED_STATUSES,
        jitter: float = DEFAULT_JITTER,
    ) -> None:
        if config.interval_s <= 0 or config.timeout_s <= 0:
            raise ValueError("health interval_s and timeout_s must be > 0")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        HealthState(config.healthy_threshold, config.unhealthy_threshold)  # validate now
        self._registry = registry
        self._session = session
        self._config = config
        self._metrics = metrics
        self._rng = rng
        self._clock = clock if clock is not None else asyncio.get_running_loop().time
        self._expected = frozenset(expected_statuses)
        self._jitter = jitter
        self._ramp = slow_start_ramp(config)
        self._evidence: dict[str, HealthState] = {}
        # Members of the first round: their first healthy verdict is "proxy
        # start" and gets no ramp; a replica added later does ramp.
        self._at_start: set[str] | None = None

    def evidence(self, name: str) -> HealthState | None:
        """What the checks have seen of ``name`` (None before its first check)."""
        return self._evidence.get(name)

    async def check_round(self) -> None:
        """Check every current member once, concurrently, and apply the results."""
        snapshot = self._registry.snapshot
        self._forget_departed(snapshot)
        if self._at_start is None:
            self._at_start = set(snapshot.names)
        targets = [(status.name, status.url) for status in snapshot]
        results = await asyncio.gather(
            *(self._check(name, url) for name, url in targets), return_exceptions=True
        )
        for (name, _), result in zip(targets, results, strict=True):
            if isinstance(result, Exception):
                # A bug here must not stop the checks of the rest of the fleet.
                log.error("health check of %s crashed", name, exc_info=result)
            elif isinstance(result, BaseException):
                raise result

    async def run(self) -> None:
        """Check rounds until cancelled, each an interval after the last began."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(max(0.0, started + self._next_interval() - loop.time()))
            started = loop.time()
            try:
                await self.check_round()
            except Exception:
                log.exception("health check round failed; the next one runs as usual")

    # --- internals ----------------------------------------------------------------

    async def _check(self, name: str, url: str) -> None:
        ok, immediate, reason = await self._probe(url)
        self._apply(name, url, ok, immediate, reason)

    async def _probe(self, base_url: str) -> tuple[bool, bool, str]:
        """(ok, fail_at_once, reason) for one GET of the health path."""
        url = base_url.rstrip("/") + self._config.path
        try:
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
                allow_redirects=False,
            ) as resp:
                await resp.content.read(_MAX_BODY)
                if resp.status in self._expected:
                    return True, False, "passed"
                return False, True, "unexpected_status"
        except TimeoutError:
            return False, False, "timeout"
        except aiohttp.ClientConnectionError:
            return False, False, "connect_error"
        except aiohttp.ClientError:
            return False, False, "error"

    def _apply(self, name: str, url: str, ok: bool, immediate: bool, reason: str) -> None:
        current = self._registry.snapshot.get(name)
        if current is None or current.url != url:
            return  # removed (or replaced) while the check ran: not its evidence
        state = self._evidence.get(name)
        if state is None:
            state = self._evidence[name] = HealthState(
                self._config.healthy_threshold, self._config.unhealthy_threshold
            )
        now = self._clock()
        verdict = state.observe(ok, now, current.health, immediate=immediate, reason=reason)
        if verdict is None:
            return
        if verdict is Health.UNHEALTHY:
            # Any ramp is moot while down; the recovery starts a fresh one.
            self._registry.update(name, health=verdict, ramp=None)
        elif self._cold(name, current.health):
            # Routable from the end of any ejection on: ramp from there.
            start = max(now, current.ejected_until)
            ramp = None if self._ramp is None else self._ramp(start)
            self._registry.update(name, health=verdict, ramp=ramp)
        else:
            self._registry.update(name, health=verdict)
        self._metrics.health_transitions.labels(name, verdict.value).inc()
        level = logging.INFO if verdict is Health.HEALTHY else logging.WARNING
        log.log(level, "replica %s is %s (%s)", name, verdict.value, reason)

    def _cold(self, name: str, was: Health) -> bool:
        """Whether turning healthy from ``was`` deserves slow start."""
        if was is Health.UNHEALTHY:
            return True  # "previously seen as failed"
        return was is Health.UNKNOWN and name not in (self._at_start or ())

    def _forget_departed(self, snapshot: FleetSnapshot) -> None:
        names = snapshot.names
        for name in [n for n in self._evidence if n not in names]:
            del self._evidence[name]
        if self._at_start is not None:
            # Back under the same name later, it is a runtime add: it ramps.
            self._at_start &= names

    def _next_interval(self) -> float:
        spread = self._config.interval_s * self._jitter
        return self._config.interval_s + self._rng.uniform(-spread, spread)


@contextlib.asynccontextmanager
async def health_checks(
    registry: Registry,
    session: aiohttp.ClientSession | None,
    config: HealthConfig,
    metrics: Metrics,
    rng: random.Random,
    *,
    clock: Callable[[], float] | None = None,
    expected_statuses: Iterable[int] = DEFAULT_EXPECTED_STATUSES,
    jitter: float = DEFAULT_JITTER,
) -> AsyncIterator[HealthChecker]:
    """Run health checks for the body of the ``async with``.

    On enter, the first round runs to completion (at most ``timeout_s``), so
    every replica has a verdict before the gateway listens; then rounds run
    in one background task. On exit that task is cancelled and awaited, and a
    session made here is closed: nothing is left running. ``session=None``
    (recommended) makes a small session of the checker's own. The caller
    decides whether checks run at all (``config.enabled`` is not read here);
    with checks on, build the registry with ``initial_health=Health.UNKNOWN``.
    """
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    # Rounds do not overlap: one check in flight per replica.
                    connector=aiohttp.TCPConnector(limit=0, limit_per_host=1),
                    timeout=aiohttp.ClientTimeout(total=None),
                )
            )
        checker = HealthChecker(
            registry,
            session,
            config,
            metrics,
            rng,
            clock=clock,
            expected_statuses=expected_statuses,
            jitter=jitter,
        )
        await checker.check_round()
        task = asyncio.create_task(checker.run(), name="health-checks")
        try:
            yield checker
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our own cancellation, not the task's: pass it on


__all__ = [
    "DEFAULT_EXPECTED_STATUSES",
    "HealthChecker",
    "HealthState",
    "health_checks",
    "slow_start_ramp",
]
