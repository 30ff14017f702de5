"""Health verdicts on a hand clock; the checker against real servers on loopback.

Row numbers (M7, M11) are the test matrix in ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import ClientSession, web

from router.config import HealthConfig, ReplicaConfig
from router.health import HealthChecker, HealthState, health_checks, slow_start_ramp
from router.metrics import Metrics
from router.replicas import FleetSnapshot, Health, Ramp, Registry

UNKNOWN, HEALTHY, UNHEALTHY = Health.UNKNOWN, Health.HEALTHY, Health.UNHEALTHY

# --- HealthState: the verdict from evidence -------------------------------------


def test_one_success_decides_the_first_verdict() -> None:
    state = HealthState(rise=2, fall=3)
    assert state.observe(True, 1.0, UNKNOWN) is HEALTHY
    assert (state.streak, state.last_reason, state.last_at) == (0, "passed", 1.0)


def test_one_failure_decides_the_first_verdict() -> None:
    state = HealthState(rise=2, fall=3)
    assert state.observe(False, 0.0, UNKNOWN, reason="connect_error") is UNHEALTHY
    assert state.last_reason == "connect_error"


def test_fall_threshold() -> None:
    state = HealthState(rise=2, fall=3)
    assert state.observe(False, 1.0, HEALTHY) is None
    assert state.observe(False, 2.0, HEALTHY) is None
    assert state.observe(False, 3.0, HEALTHY, reason="timeout") is UNHEALTHY
    assert state.streak == 0 and state.last_reason == "timeout"


def test_rise_threshold_and_interleaved_results_reset_the_streak() -> None:
    state = HealthState(rise=2, fall=1)
    assert state.observe(True, 1.0, UNHEALTHY) is None
    assert state.observe(False, 2.0, UNHEALTHY) is None  # still down; the up-streak is gone
    assert state.observe(True, 3.0, UNHEALTHY) is None
    assert state.observe(True, 4.0, UNHEALTHY) is HEALTHY


def test_a_success_resets_the_failure_streak() -> None:
    state = HealthState(rise=2, fall=3)
    for ok in (False, False, True, False, False):
        assert state.observe(ok, 0.0, HEALTHY) is None


def test_non_expected_status_fails_at_once() -> None:
    state = HealthState(rise=2, fall=3)
    verdict = state.observe(False, 1.0, HEALTHY, immediate=True, reason="unexpected_status")
    assert verdict is UNHEALTHY


def test_immediate_does_not_speed_up_a_recovery() -> None:
    state = HealthState(rise=2, fall=3)
    assert state.observe(True, 1.0, UNHEALTHY, immediate=True) is None


def test_invalid_thresholds() -> None:
    with pytest.raises(ValueError):
        HealthState(rise=0)
    with pytest.raises(ValueError):
        HealthState(fall=0)


# --- slow start -------------------------------------------------------------------


def test_slow_start_ramp_uses_the_configured_curve() -> None:
    make = slow_start_ramp(
        HealthConfig(slow_start_s=20.0, slow_start_aggression=2.0, slow_start_min_weight=0.1)
    )
    assert make is not None
    ramp = make(100.0)
    assert ramp == Ramp(100.0, 20.0, 2.0, 0.1)
    # Envoy's (t / window) ** (1 / aggression): 5 s into 20 s at aggression 2 -> 0.5
    assert ramp.factor(105.0) == pytest.approx(0.5)
    assert ramp.factor(100.1) == pytest.approx(0.1)  # the floor: sqrt(0.005) = 0.07


def test_zero_window_disables_slow_start() -> None:
    assert slow_start_ramp(HealthConfig(slow_start_s=0.0)) is None


@pytest.mark.parametrize("aggression", [0.5, 1.0, 1.5, 3.0])
def test_slow_start_curve_is_monotonic_bounded_and_ends_at_one(aggression: float) -> None:
    make = slow_start_ramp(HealthConfig(slow_start_s=30.0, slow_start_aggression=aggression))
    assert make is not None
    ramp = make(100.0)
    samples = [ramp.factor(100.0 + t / 10) for t in range(400)]
    assert samples == sorted(samples)
    assert min(samples) == pytest.approx(0.1)
    assert all(0.1 <= f <= 1.0 for f in samples)
    assert ramp.factor(130.0) == 1.0 and not ramp.active(130.0)


# --- helpers for the checker ------------------------------------------------------

INTERVAL = 0.2
TIMEOUT = 0.3
# Slack on every time bound: shared CI machines are noisy.
SLACK = 0.5


class FakeReplica:
    """A /health endpoint whose answer the test flips."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.hits = 0
        self.release = asyncio.Event()

    async def health(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.status, text="ok")


class Server:
    """A real aiohttp server for one FakeReplica that a test can stop and restart."""

    def __init__(self, fake: FakeReplica) -> None:
        self.fake = fake
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen (again, on the same port after the first start)."""
        app = web.Application()
        app.router.add_get("/health", self.fake.health)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            self.fake.release.set()
            await self._runner.cleanup()
            self._runner = None


@asynccontextmanager
async def serve(fake: FakeReplica) -> AsyncIterator[str]:
    server = Server(fake)
    try:
        yield await server.start()
    finally:
        await server.stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def replica(name: str, url: str) -> ReplicaConfig:
    return ReplicaConfig(url=url, name=name, models=("m",))


def fleet(**urls: str) -> Registry:
    """Replicas start unknown, as they do when active checks are on."""
    return Registry(tuple(replica(n, u) for n, u in urls.items()), initial_health=Health.UNKNOWN)


def config(**kw: Any) -> HealthConfig:
    params: dict[str, Any] = {
        "interval_s": INTERVAL,
        "timeout_s": TIMEOUT,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
        "slow_start_s": 10.0,
    }
    params.update(kw)
    return HealthConfig(**params)


def health(reg: Registry, name: str) -> Health:
    status = reg.snapshot.get(name)
    assert status is not None
    return status.health


def transitions(metrics: Metrics, name: str, to: str) -> float:
    value = metrics.registry.get_sample_value(
        "dp_router_health_transitions_total", {"replica": name, "to": to}
    )
    return value or 0.0


async def wait_for(reg: Registry, cond: Callable[[FleetSnapshot], bool], timeout: float) -> None:
    """Wait until ``cond`` holds for the registry's snapshot (polled, bounded)."""
    async with asyncio.timeout(timeout):
        while not cond(reg.snapshot):
            await asyncio.sleep(0.01)


def is_(name: str, verdict: Health) -> Callable[[FleetSnapshot], bool]:
    def cond(snapshot: FleetSnapshot) -> bool:
        status = snapshot.get(name)
        return status is not None and status.health is verdict

    return cond


class Clock:
    """A hand clock for the checker's ``now``; the sockets keep real time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def hand_checker(
    reg: Registry, clock: Clock, **kw: Any
) -> AsyncIterator[tuple[HealthChecker, Metrics]]:
    """A checker driven round by round (no background task)."""
    metrics = Metrics()
    async with ClientSession() as session:
        yield (
            HealthChecker(reg, session, config(**kw), metrics, random.Random(12345), clock=clock),
            metrics,
        )


# --- the checker, round by round on a hand clock ----------------------------------


async def test_first_round_decides_and_gives_no_ramp_at_start() -> None:
    up, down = FakeReplica(), FakeReplica()
    down.status = 503
    async with serve(up) as up_url, serve(down) as down_url:
        reg = fleet(up=up_url, down=down_url)
        async with hand_checker(reg, Clock()) as (hc, metrics):
            await hc.check_round()
        assert (health(reg, "up"), health(reg, "down")) == (HEALTHY, UNHEALTHY)
        status = reg.snapshot.get("up")
        assert status is not None and status.ramp is None  # HAProxy: never at start
        assert transitions(metrics, "up", "healthy") == 1
        assert transitions(metrics, "down", "unhealthy") == 1
        evidence = hc.evidence("down")
        assert evidence is not None and evidence.last_reason == "unexpected_status"


async def test_recovery_after_failure_ramps_and_going_down_clears_the_ramp() -> None:
    fake = FakeReplica()
    clock = Clock(1000.0)
    async with serve(fake) as url:
        reg = fleet(a=url)
        async with hand_checker(reg, clock) as (hc, metrics):
            await hc.check_round()
            fake.status = 500
            clock.now = 1005.0
            await hc.check_round()  # a non-expected status: down at once
            assert health(reg, "a") is UNHEALTHY
            fake.status = 200
            clock.now = 1010.0
            await hc.check_round()
            assert health(reg, "a") is UNHEALTHY  # rise is 2
            clock.now = 1015.0
            await hc.check_round()
            status = reg.snapshot.get("a")
            assert status is not None and status.health is HEALTHY
            assert status.ramp == Ramp(1015.0, 10.0, 1.0, 0.1)
            assert status.ramp_factor(1020.0) == pytest.approx(0.5)
            fake.status = 503
            clock.now = 1016.0
            await hc.check_round()
            status = reg.snapshot.get("a")
            assert status is not None and status.health is UNHEALTHY and status.ramp is None
        assert transitions(metrics, "a", "healthy") == 2
        assert transitions(metrics, "a", "unhealthy") == 2


async def test_a_checked_replica_that_stays_healthy_changes_no_status() -> None:
    fake = FakeReplica()
    async with serve(fake) as url:
        reg = fleet(a=url)
        async with hand_checker(reg, Clock()) as (hc, _):
            await hc.check_round()
            version = reg.snapshot.version
            for _ in range(3):
                await hc.check_round()
            assert reg.snapshot.version == version


async def test_recovery_while_ejected_ramps_from_the_end_of_the_ejection() -> None:
    fake = FakeReplica()
    fake.status = 503
    clock = Clock(1000.0)
    async with serve(fake) as url:
        reg = fleet(a=url)
        async with hand_checker(reg, clock, healthy_threshold=1) as (hc, _):
            await hc.check_round()
            reg.update("a", ejected_until=1050.0)
            fake.status = 200
            clock.now = 1010.0
            await hc.check_round()
        status = reg.snapshot.get("a")
        assert status is not None and status.ramp is not None
        assert status.ramp.start == 1050.0


async def test_zero_slow_start_window_means_full_weight_on_recovery() -> None:
    fake = FakeReplica()
    fake.status = 503
    async with serve(fake) as url:
        reg = fleet(a=url)
        async with hand_checker(reg, Clock(), healthy_threshold=1, slow_start_s=0.0) as (hc, _):
            await hc.check_round()
            fake.status = 200
            await hc.check_round()
        status = reg.snapshot.get("a")
        assert status is not None and status.health is HEALTHY and status.ramp is None


async def test_membership_is_read_from_the_registry_every_round() -> None:
    a, b = FakeReplica(), FakeReplica()
    clock = Clock(1000.0)
    async with serve(a) as a_url, serve(b) as b_url:
        reg = fleet(a=a_url)
        async with hand_checker(reg, clock) as (hc, _):
            await hc.check_round()
            # Added at runtime: unknown until checked, then healthy AND ramping,
            # since for this replica it is not "proxy start".
            reg.add(replica("b", b_url))
            assert health(reg, "b") is UNKNOWN
            clock.now = 1001.0
            await hc.check_round()
            status = reg.snapshot.get("b")
            assert status is not None and status.health is HEALTHY
            assert status.ramp is not None and status.ramp.start == 1001.0
            # Removed: no more checks, its evidence forgotten.
            reg.remove("a")
            hits = a.hits
            await hc.check_round()
            assert a.hits == hits and hc.evidence("a") is None
            # Back under the same name: a runtime add, so it ramps.
            reg.add(replica("a", a_url))
            clock.now = 1002.0
            await hc.check_round()
            status = reg.snapshot.get("a")
            assert status is not None and status.ramp is not None
            assert status.ramp.start == 1002.0


async def test_unreachable_replica_is_a_connect_error_and_counts_toward_fall() -> None:
    reg = Registry((replica("gone", closed_port_url()),), initial_health=Health.HEALTHY)
    async with hand_checker(reg, Clock()) as (hc, _):
        await hc.check_round()
        assert health(reg, "gone") is HEALTHY  # one of fall (2)
        evidence = hc.evidence("gone")
        assert evidence is not None and evidence.last_reason == "connect_error"
        await hc.check_round()
        assert health(reg, "gone") is UNHEALTHY


async def test_a_crash_while_applying_one_result_spares_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = FakeReplica(), FakeReplica()
    async with serve(a) as a_url, serve(b) as b_url:
        reg = fleet(a=a_url, b=b_url)

        def explode(new: FleetSnapshot, old: FleetSnapshot) -> None:
            before, after = old.get("a"), new.get("a")
            if before is not None and after is not None and before.health != after.health:
                raise RuntimeError("boom")

        reg.subscribe(explode)
        async with hand_checker(reg, Clock()) as (hc, metrics):
            await hc.check_round()  # logs a's crash, does not raise
        assert transitions(metrics, "b", "healthy") == 1  # b's result fully applied
        assert "health check of a crashed" in caplog.text


async def test_invalid_config_is_refused() -> None:
    async with ClientSession() as session:
        for bad in ({"interval_s": 0.0}, {"timeout_s": 0.0}, {"healthy_threshold": 0}):
            with pytest.raises(ValueError):
                HealthChecker(fleet(), session, config(**bad), Metrics(), random.Random(0))


# --- health_checks: the live loop ---------------------------------------------------

# One round every INTERVAL (+10 % jitter); a round lasts at most TIMEOUT.
ROUND = INTERVAL * 1.1 + TIMEOUT


@asynccontextmanager
async def live(reg: Registry, **kw: Any) -> AsyncIterator[tuple[HealthChecker, Metrics]]:
    metrics = Metrics()
    async with health_checks(reg, None, config(**kw), metrics, random.Random(12345)) as hc:
        yield hc, metrics


def health_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "health-checks"]


async def test_every_replica_has_a_verdict_when_enter_returns() -> None:
    up, down = FakeReplica(), FakeReplica()
    down.status = 503
    async with serve(up) as up_url, serve(down) as down_url:
        reg = fleet(up=up_url, down=down_url, gone=closed_port_url())
        async with live(reg):
            assert {s.name: s.health for s in reg.snapshot} == {
                "up": HEALTHY,
                "down": UNHEALTHY,
                "gone": UNHEALTHY,
            }
            assert len(health_tasks()) == 1


async def test_flipping_status_marks_down_at_once_and_up_after_rise() -> None:
    fake = FakeReplica()
    async with serve(fake) as url:
        reg = fleet(a=url)
        async with live(reg) as (_, metrics):
            assert health(reg, "a") is HEALTHY
            fake.status = 503
            # A non-expected status fails at once: within one round.
            await wait_for(reg, is_("a", UNHEALTHY), ROUND + SLACK)
            fake.status = 200
            await wait_for(reg, is_("a", HEALTHY), 2 * ROUND + SLACK)
            status = reg.snapshot.get("a")
            assert status is not None and status.ramp is not None  # seen failed: ramps
        assert transitions(metrics, "a", "unhealthy") == 1
        assert transitions(metrics, "a", "healthy") == 2


async def test_dead_replica_fails_after_fall_and_is_readmitted_after_rise() -> None:
    """M11: killed, then brought back on the same port; it ramps once back (M7)."""
    server = Server(FakeReplica())
    try:
        reg = fleet(a=await server.start())
        async with live(reg) as (hc, _):
            assert health(reg, "a") is HEALTHY
            await server.stop()
            # Connection refused, counted toward fall (2): two rounds.
            await wait_for(reg, is_("a", UNHEALTHY), 2 * ROUND + SLACK)
            evidence = hc.evidence("a")
            assert evidence is not None and evidence.last_reason == "connect_error"
            await server.start()
            # Re-admitted after rise (2) passing checks.
            await wait_for(reg, is_("a", HEALTHY), 2 * ROUND + SLACK)
            status = reg.snapshot.get("a")
            assert status is not None and status.ramp is not None
    finally:
        await server.stop()


async def test_hanging_replica_times_out() -> None:
    fake = FakeReplica()
    async with serve(fake) as url:
        reg = fleet(a=url)
        async with live(reg, unhealthy_threshold=1) as (hc, _):
            fake.hang = True
            await wait_for(reg, is_("a", UNHEALTHY), ROUND + SLACK)
            evidence = hc.evidence("a")
            assert evidence is not None and evidence.last_reason == "timeout"


async def test_a_replica_added_at_runtime_is_checked_by_the_loop() -> None:
    a, b = FakeReplica(), FakeReplica()
    async with serve(a) as a_url, serve(b) as b_url:
        reg = fleet(a=a_url)
        async with live(reg):
            reg.add(replica("b", b_url))
            await wait_for(reg, is_("b", HEALTHY), ROUND + SLACK)


async def test_exit_stops_the_loop_even_mid_check() -> None:
    fake = FakeReplica()
    async with serve(fake) as url:
        reg = fleet(a=url)
        loop = asyncio.get_running_loop()
        async with live(reg):
            fake.hang = True
            hits = fake.hits
            async with asyncio.timeout(ROUND + SLACK):
                while fake.hits == hits:  # a check is now waiting on the replica
                    await asyncio.sleep(0.01)
            left_at = loop.time()
        # Cancelled, not waited out: well under the check's timeout.
        assert loop.time() - left_at < TIMEOUT
        assert health_tasks() == []
