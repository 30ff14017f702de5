"""Health verdicts and slow start on a hand clock; the checker on real sockets."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from router.health import HealthChecker, HealthState, HealthTransition, SlowStart

# --- HealthState ----------------------------------------------------------------


def test_unknown_replica_is_not_healthy_and_one_success_decides() -> None:
    state = HealthState(rise=2, fall=3)
    assert not state.healthy and not state.known
    assert state.observe(True, 1.0) == HealthTransition(True, "passed", 1.0, first=True)
    assert state.healthy and state.since == 1.0
    # Healthy at start: no ramp (HAProxy never slow-starts at proxy start).
    assert state.slow_start_factor(1.0) == 1.0


def test_one_failure_decides_the_first_verdict() -> None:
    state = HealthState(rise=2, fall=3)
    transition = state.observe(False, 0.0, reason="connect_error")
    assert transition == HealthTransition(False, "connect_error", 0.0, first=True)
    assert state.known and not state.healthy and state.since is None


def test_fall_threshold() -> None:
    state = HealthState(rise=2, fall=3)
    state.observe(True, 0.0)
    assert state.observe(False, 1.0) is None
    assert state.observe(False, 2.0) is None
    assert state.healthy
    transition = state.observe(False, 3.0, reason="timeout")
    assert transition is not None and not transition.healthy and transition.reason == "timeout"
    assert not state.healthy


def test_rise_threshold_and_interleaved_results_reset_the_streak() -> None:
    state = HealthState(rise=2, fall=1)
    state.observe(False, 0.0)
    assert state.observe(True, 1.0) is None
    assert state.observe(False, 2.0) is None  # still down; the up-streak is gone
    assert state.observe(True, 3.0) is None
    transition = state.observe(True, 4.0)
    assert transition == HealthTransition(True, "passed", 4.0)
    assert state.since == 4.0


def test_a_success_resets_the_failure_streak() -> None:
    state = HealthState(rise=2, fall=3)
    state.observe(True, 0.0)
    state.observe(False, 1.0)
    state.observe(False, 2.0)
    state.observe(True, 3.0)
    state.observe(False, 4.0)
    state.observe(False, 5.0)
    assert state.healthy


def test_non_expected_status_fails_at_once() -> None:
    state = HealthState(rise=2, fall=3)
    state.observe(True, 0.0)
    transition = state.observe(False, 1.0, immediate=True, reason="unexpected_status")
    assert transition is not None and not transition.healthy
    assert transition.reason == "unexpected_status"


def test_recovery_after_failure_starts_slow_start() -> None:
    state = HealthState(rise=1, fall=1, slow_start=SlowStart(window_s=10.0))
    state.observe(True, 0.0)
    state.observe(False, 5.0)
    state.observe(True, 20.0)
    assert state.slow_start_factor(20.0) == pytest.approx(0.1)
    assert state.slow_start_factor(25.0) == pytest.approx(0.5)
    assert state.slow_start_factor(30.0) == 1.0
    # Going down again ends the ramp; coming back restarts it.
    state.observe(False, 26.0)
    assert state.slow_start_factor(26.0) == 1.0  # not routable anyway
    state.observe(True, 40.0)
    assert state.slow_start_factor(41.0) == pytest.approx(0.1)


def test_replica_added_at_runtime_can_ramp_from_its_first_success() -> None:
    state = HealthState(slow_start=SlowStart(window_s=10.0), slow_start_on_first=True)
    state.observe(True, 100.0)
    assert state.slow_start_factor(105.0) == pytest.approx(0.5)


def test_invalid_thresholds() -> None:
    with pytest.raises(ValueError):
        HealthState(rise=0)


# --- SlowStart ------------------------------------------------------------------


@pytest.mark.parametrize("aggression", [0.5, 1.0, 1.5, 3.0])
def test_slow_start_curve_is_monotonic_bounded_and_ends_at_one(aggression: float) -> None:
    ramp = SlowStart(window_s=30.0, aggression=aggression, min_weight=0.1)
    ramp.begin(100.0)
    samples = [ramp.factor(100.0 + t / 10) for t in range(0, 400)]
    assert samples == sorted(samples)
    assert min(samples) == pytest.approx(0.1)
    assert all(0.1 <= f <= 1.0 for f in samples)
    assert ramp.factor(130.0) == 1.0
    assert not ramp.active(130.0)


def test_slow_start_matches_envoys_formula() -> None:
    ramp = SlowStart(window_s=20.0, aggression=2.0, min_weight=0.1)
    ramp.begin(0.0)
    # (t / window) ** (1 / aggression): 5 s into 20 s at aggression 2 -> 0.5
    assert ramp.factor(5.0) == pytest.approx(0.5)
    assert ramp.factor(0.1) == pytest.approx(0.1)  # floor: sqrt(0.005) = 0.07


def test_zero_window_disables_slow_start() -> None:
    ramp = SlowStart(window_s=0.0)
    ramp.begin(0.0)
    assert ramp.factor(0.0) == 1.0


def test_invalid_slow_start() -> None:
    with pytest.raises(ValueError):
        SlowStart(min_weight=0.0)
    with pytest.raises(ValueError):
        SlowStart(aggression=0.0)


# --- HealthChecker against a real server -----------------------------------------

INTERVAL = 0.2
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


@asynccontextmanager
async def serve(fake: FakeReplica, port: int = 0) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/health", fake.health)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{bound}"
    finally:
        fake.release.set()
        await runner.cleanup()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, healthy: bool, reason: str) -> None:
        self.seen.append((name, healthy, reason))

    async def wait_for(self, expected: tuple[str, bool, str], timeout: float) -> None:
        """Wait for ``expected`` to be reported, then forget what was seen."""
        async with asyncio.timeout(timeout):
            while expected not in self.seen:
                await asyncio.sleep(0.01)
        self.seen.clear()


def checker(
    targets: Callable[[], list[tuple[str, str]]], changes: Changes, **kw: float
) -> HealthChecker:
    params = {"interval_s": INTERVAL, "timeout_s": 0.3, "rise": 2, "fall": 2}
    params.update(kw)
    return HealthChecker(
        targets,
        changes,
        interval_s=params["interval_s"],
        timeout_s=params["timeout_s"],
        rise=int(params["rise"]),
        fall=int(params["fall"]),
        slow_start_s=5.0,
        rng=random.Random(12345),
    )


async def test_first_round_runs_before_start_returns() -> None:
    up, down = FakeReplica(), FakeReplica()
    down.status = 503
    changes = Changes()
    async with serve(up) as up_url, serve(down) as down_url:
        targets = [("up", up_url), ("down", down_url)]
        async with checker(lambda: targets, changes) as hc:
            assert hc.is_healthy("up")
            assert not hc.is_healthy("down")
            assert sorted(changes.seen) == [
                ("down", False, "unexpected_status"),
                ("up", True, "passed"),
            ]
            assert hc.slow_start_factor("up") == 1.0  # present at start: no ramp


async def test_flipping_health_status_marks_down_at_once_and_up_after_rise() -> None:
    fake = FakeReplica()
    changes = Changes()
    async with serve(fake) as url, checker(lambda: [("a", url)], changes) as hc:
        assert hc.is_healthy("a")
        changes.seen.clear()
        fake.status = 503
        # A non-expected status fails at once: within one interval (+ jitter).
        await changes.wait_for(("a", False, "unexpected_status"), INTERVAL * 1.1 + SLACK)
        assert not hc.is_healthy("a")
        fake.status = 200
        await changes.wait_for(("a", True, "passed"), 2 * INTERVAL * 1.1 + SLACK)
        state = hc.state("a")
        assert state is not None and state.healthy
        # Seen failed, so it ramps (slow_start_s=5 in these tests).
        assert hc.slow_start_factor("a") < 1.0


async def test_dead_replica_fails_after_fall_connect_errors() -> None:
    fake = FakeReplica()
    changes = Changes()
    async with serve(fake) as url:
        port = int(url.rsplit(":", 1)[1])
        hc = checker(lambda: [("a", url)], changes)
        await hc.start()
        try:
            assert hc.is_healthy("a")
        except BaseException:
            await hc.stop()
            raise
    # The server is gone: connection refused, counted toward fall (2).
    try:
        await changes.wait_for(("a", False, "connect_error"), 2 * INTERVAL * 1.1 + SLACK)
        assert hc.counters["connect_error"] >= 2
        # Restart on the same port: re-admitted after rise (2) checks (M11).
        async with serve(fake, port=port):
            await changes.wait_for(("a", True, "passed"), 2 * INTERVAL * 1.1 + SLACK)
    finally:
        await hc.stop()


async def test_hanging_replica_times_out() -> None:
    fake = FakeReplica()
    changes = Changes()
    async with serve(fake) as url, checker(lambda: [("a", url)], changes, fall=1) as hc:
        fake.hang = True
        await changes.wait_for(("a", False, "timeout"), INTERVAL * 1.1 + 0.3 + SLACK)
        assert not hc.is_healthy("a")


async def test_unreachable_at_start_is_unhealthy_not_routable() -> None:
    changes = Changes()
    async with checker(lambda: [("gone", closed_port_url())], changes) as hc:
        assert not hc.is_healthy("gone")
        assert changes.seen == [("gone", False, "connect_error")]


async def test_membership_changes_are_picked_up() -> None:
    a, b = FakeReplica(), FakeReplica()
    changes = Changes()
    async with serve(a) as a_url, serve(b) as b_url:
        targets = [("a", a_url)]
        async with checker(lambda: list(targets), changes) as hc:
            targets.append(("b", b_url))
            hc.refresh()
            await changes.wait_for(("b", True, "passed"), SLACK)
            # Added at runtime: it ramps from its first success.
            assert hc.slow_start_factor("b") < 1.0
            targets.remove(("a", a_url))
            hc.refresh()
            assert hc.state("a") is None
            await asyncio.sleep(0.05)  # a probe cancelled mid-request may still land
            hits = a.hits
            await asyncio.sleep(2 * INTERVAL)
            assert a.hits == hits  # no more checks of a removed replica


async def test_a_failing_callback_does_not_stop_the_checks() -> None:
    fake = FakeReplica()
    calls: list[bool] = []

    def explode(name: str, healthy: bool, reason: str) -> None:
        calls.append(healthy)
        raise RuntimeError("boom")

    async with serve(fake) as url:
        hc = HealthChecker(
            lambda: [("a", url)], explode, interval_s=INTERVAL, timeout_s=0.3, fall=1
        )
        async with hc:
            fake.status = 500
            async with asyncio.timeout(INTERVAL * 1.1 + SLACK):
                while len(calls) < 2:
                    await asyncio.sleep(0.01)
    assert calls == [True, False]


async def test_stop_leaves_no_tasks_behind() -> None:
    fake = FakeReplica()
    async with serve(fake) as url:
        hc = checker(lambda: [("a", url), ("b", url)], Changes())
        await hc.start()
        await asyncio.sleep(INTERVAL)
        assert len([t for t in asyncio.all_tasks() if t.get_name().startswith("health")]) == 3
        await hc.stop()
        # The checker's own tasks are gone (the server's handlers may linger).
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("health")]
