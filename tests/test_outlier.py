"""Outlier ejection on a hand-advanced clock, writing to a real Registry.

Row numbers (M4, M8, M10) are the test matrix in ``docs/reliability.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from policies.load import Outcome
from router.config import ReplicaConfig
from router.outlier import EventKind, OutlierDetector, OutlierEvent
from router.replicas import Health, Ramp, Registry

FLEET = [f"r{i}" for i in range(10)]


def registry(names: Iterable[str] = FLEET) -> Registry:
    return Registry(
        tuple(ReplicaConfig(url="http://127.0.0.1:1", name=name, models=("m",)) for name in names),
        initial_health=Health.HEALTHY,
    )


def detector(reg: Registry | None = None, **kw: Any) -> OutlierDetector:
    """Envoy's defaults over a fleet of 10, with ``kw`` overriding."""
    return OutlierDetector(registry() if reg is None else reg, **kw)


def fail(
    d: OutlierDetector,
    name: str,
    now: float,
    times: int = 5,
    outcome: Outcome = Outcome.HTTP_5XX,
    status: int | None = 503,
) -> list[OutlierEvent]:
    events = [d.record(name, outcome, now, status=status) for _ in range(times)]
    return [e for e in events if e is not None]


def ejected(reg: Registry, now: float) -> list[str]:
    return sorted(s.name for s in reg.snapshot if s.ejected(now))


def test_ejects_after_consecutive_failures_not_before() -> None:
    reg = registry()
    d = detector(reg)
    assert fail(d, "r0", 0.0, times=4) == []
    assert ejected(reg, 0.0) == []
    version = reg.snapshot.version
    (event,) = fail(d, "r0", 0.0, times=1)
    assert event == OutlierEvent(EventKind.EJECTED, "r0", "status_503", 0.0, 1, 30.0)
    # The ejection is status: one registry update, one new version.
    assert reg.snapshot.version == version + 1
    status = reg.snapshot.get("r0")
    assert status is not None and status.ejected_until == 30.0
    assert status.ejected(29.9) and not status.routable(29.9)
    # Expiry is only time passing: no call to the detector is needed.
    assert not status.ejected(30.0) and status.routable(30.0)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (Outcome.CONNECT_ERROR, "connect_error"),
        (Outcome.TIMEOUT, "timeout"),
        (Outcome.UPSTREAM_RESET, "upstream_reset"),
        (Outcome.BAD_RESPONSE, "bad_response"),
    ],
)
def test_local_origin_failures_count(outcome: Outcome, reason: str) -> None:
    d = detector()
    events = fail(d, "r1", 1.0, outcome=outcome, status=None)
    assert [(e.kind, e.reason) for e in events] == [(EventKind.EJECTED, reason)]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_statuses_count(status: int) -> None:
    d = detector()
    assert fail(d, "r1", 1.0, status=status)[0].reason == f"status_{status}"


def test_a_5xx_without_a_status_counts() -> None:
    d = detector()
    assert fail(d, "r1", 1.0, status=None)[0].reason == "http_5xx"


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429])
def test_4xx_never_counts(status: int) -> None:
    """M4: 50 client errors leave the replica in and its counter untouched."""
    reg = registry()
    d = detector(reg)
    version = reg.snapshot.version
    assert fail(d, "r2", 0.0, times=50, outcome=Outcome.HTTP_4XX, status=status) == []
    assert ejected(reg, 0.0) == []
    assert d.consecutive("r2") == 0
    assert reg.snapshot.version == version  # no status change at all


def test_500_is_not_a_gateway_failure_unless_configured() -> None:
    d = detector()
    assert fail(d, "r0", 0.0, times=20, status=500) == []
    d500 = detector(failure_statuses={500, 502, 503, 504})
    assert fail(d500, "r0", 0.0, status=500)[0].kind is EventKind.EJECTED


@pytest.mark.parametrize("outcome", [Outcome.DRAINING, Outcome.CLIENT_DISCONNECT, Outcome.INTERNAL])
def test_draining_client_disconnect_and_internal_are_neutral(outcome: Outcome) -> None:
    d = detector()
    fail(d, "r3", 0.0, times=4)
    assert d.record("r3", outcome, 0.0, status=503) is None
    assert d.consecutive("r3") == 4  # neither counted nor reset
    assert fail(d, "r3", 0.0, times=1)[0].kind is EventKind.EJECTED


@pytest.mark.parametrize("outcome", [Outcome.OK, Outcome.HTTP_4XX])
def test_a_response_resets_the_count(outcome: Outcome) -> None:
    reg = registry()
    d = detector(reg)
    fail(d, "r4", 0.0, times=4)
    d.record("r4", outcome, 0.0, status=400 if outcome is Outcome.HTTP_4XX else 200)
    assert fail(d, "r4", 0.0, times=4) == []
    assert ejected(reg, 0.0) == []


def test_ejection_durations_grow_by_base_times_n_up_to_the_cap() -> None:
    """M8: a flapping replica is ejected for longer each time, up to the cap."""
    d = detector(base_ejection_s=30.0, max_ejection_s=100.0)
    now = 0.0
    durations = []
    for _ in range(8):
        (event,) = fail(d, "r5", now)
        durations.append(event.duration_s)
        now += event.duration_s + 2.0  # flap: fails again 2 s after coming back
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0, 100.0, 100.0]


def test_ejection_count_decays_after_a_healthy_period() -> None:
    d = detector(base_ejection_s=30.0, max_ejection_s=300.0, decay_interval_s=10.0)
    now = 0.0
    for _ in range(3):  # n = 3
        (event,) = fail(d, "r6", now)
        now += event.duration_s
    assert d.ejection_count("r6", now - 1.0) == 3  # no decay while ejected
    assert d.ejection_count("r6", now) == 3
    assert d.ejection_count("r6", now + 9.9) == 3
    assert d.ejection_count("r6", now + 10.0) == 2
    assert d.ejection_count("r6", now + 25.0) == 1
    # Back after 25 s of health: n was 1, so this ejection is the 2nd: 60 s.
    (event,) = fail(d, "r6", now + 25.0)
    assert (event.ejections, event.duration_s) == (2, 60.0)
    # After a long healthy period it is forgiven entirely.
    now = now + 25.0 + event.duration_s
    assert d.ejection_count("r6", now + 1000.0) == 0
    assert fail(d, "r6", now + 1000.0)[0].duration_s == 30.0


def test_max_percent_caps_ejections_but_ejects_at_least_one() -> None:
    """M10: with 10 % of 3 replicas, one is ejected and the rest overflow."""
    reg = registry(["a", "b", "c"])
    d = detector(reg, max_ejection_percent=10.0)
    assert d.max_ejected() == 1
    assert fail(d, "a", 0.0)[0].kind is EventKind.EJECTED
    (overflow,) = fail(d, "b", 0.0)
    assert (overflow.kind, overflow.reason, overflow.duration_s) == (
        EventKind.OVERFLOW,
        "status_503",
        0.0,
    )
    assert ejected(reg, 0.0) == ["a"]
    # Once a's ejection ends, b's next run of failures can eject it.
    assert [e.kind for e in fail(d, "b", 30.0)] == [EventKind.EJECTED]
    assert ejected(reg, 30.0) == ["b"]


@pytest.mark.parametrize(
    ("members", "percent", "expected"),
    [(3, 10.0, 1), (3, 50.0, 1), (3, 67.0, 2), (3, 100.0, 3), (10, 10.0, 1), (20, 10.0, 2),
     (15, 10.0, 1), (10, 0.0, 0)],
)  # fmt: skip
def test_max_ejected(members: int, percent: float, expected: int) -> None:
    d = detector(registry(str(i) for i in range(members)), max_ejection_percent=percent)
    assert d.max_ejected() == expected


def test_the_cap_follows_membership() -> None:
    reg = registry(str(i) for i in range(10))
    d = detector(reg, max_ejection_percent=20.0)
    assert d.max_ejected() == 2
    for i in range(10, 20):
        reg.add(ReplicaConfig(url="http://127.0.0.1:1", name=str(i), models=("m",)))
    assert d.max_ejected() == 4


def test_cap_holds_at_every_sample_when_most_replicas_fail() -> None:
    """M10: 2 of 3 keep failing for 10 minutes; never more than the cap out."""
    reg = registry(["a", "b", "c"])
    d = detector(reg, base_ejection_s=1.0, max_ejection_s=5.0, max_ejection_percent=50.0)
    now = 0.0
    while now < 600.0:
        for name in ("a", "b"):
            d.record(name, Outcome.HTTP_5XX, now, status=502)
        d.record("c", Outcome.OK, now, status=200)
        out = ejected(reg, now)
        assert len(out) <= d.max_ejected() == 1
        assert "c" not in out
        now += 0.1


def test_zero_percent_disables_ejection() -> None:
    reg = registry()
    d = detector(reg, max_ejection_percent=0.0)
    assert fail(d, "r0", 0.0)[0].kind is EventKind.OVERFLOW
    assert ejected(reg, 0.0) == []


def test_outcomes_while_ejected_are_ignored() -> None:
    reg = registry()
    d = detector(reg)
    fail(d, "r7", 0.0)
    assert fail(d, "r7", 1.0, times=20) == []  # stragglers sent before the ejection
    d.record("r7", Outcome.OK, 2.0)
    assert d.ejection_count("r7", 2.0) == 1
    assert ejected(reg, 29.0) == ["r7"]


def test_ejection_sets_a_ramp_that_starts_when_it_ends() -> None:
    """A replica back from an ejection is cold: it ramps like a restarted one."""
    reg = registry()
    d = detector(reg, slow_start_s=10.0, slow_start_aggression=2.0, slow_start_min_weight=0.2)
    fail(d, "r0", 0.0)
    status = reg.snapshot.get("r0")
    assert status is not None and status.ramp == Ramp(30.0, 10.0, 2.0, 0.2)
    assert status.ramp_factor(30.0) == pytest.approx(0.2)
    assert status.ramp_factor(32.5) == pytest.approx(0.5)  # sqrt(2.5 / 10)
    assert status.ramp_factor(40.0) == 1.0


def test_without_slow_start_an_ejection_clears_any_ramp() -> None:
    reg = registry()
    reg.update("r0", ramp=Ramp(0.0, 100.0))
    d = detector(reg)
    fail(d, "r0", 1.0)
    status = reg.snapshot.get("r0")
    assert status is not None and status.ramp is None


def test_removed_replica_is_ignored_and_its_evidence_forgotten() -> None:
    reg = registry()
    d = detector(reg)
    fail(d, "r8", 0.0, times=4)
    reg.remove("r8")
    assert d.record("r8", Outcome.HTTP_5XX, 0.0, status=503) is None
    d.record("r0", Outcome.OK, 0.0)  # any record after the change prunes
    assert d.consecutive("r8") == 0
    # Back under the same name: a fresh start.
    reg.add(ReplicaConfig(url="http://127.0.0.1:1", name="r8", models=("m",)))
    assert fail(d, "r8", 0.0, times=4) == []


def test_manual_uneject() -> None:
    reg = registry()
    d = detector(reg, slow_start_s=10.0)
    fail(d, "r9", 0.0)
    assert d.uneject("r9", 3.0)
    status = reg.snapshot.get("r9")
    assert status is not None and status.routable(3.0)
    assert status.ramp == Ramp(3.0, 10.0)  # cold: ramps from the lift
    assert not d.uneject("r9", 3.0)
    assert not d.uneject("unknown", 3.0)
    # The ejection still counts for the next one: n grows to 2.
    assert fail(d, "r9", 4.0)[0].duration_s == 60.0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        detector(consecutive_failures=0)
    with pytest.raises(ValueError):
        detector(max_ejection_percent=101)
    with pytest.raises(ValueError):
        detector(base_ejection_s=0)
    with pytest.raises(ValueError):
        detector(decay_interval_s=0)
    with pytest.raises(ValueError):
        detector(slow_start_s=-1.0)
    with pytest.raises(ValueError):
        detector(slow_start_min_weight=0.0)
