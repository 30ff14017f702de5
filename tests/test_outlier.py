"""Outlier ejection as a pure state machine, on a hand-advanced clock."""

from __future__ import annotations

from typing import Any

import pytest

from policies.load import Outcome
from router.outlier import EventKind, OutlierDetector, OutlierEvent

FLEET = [f"r{i}" for i in range(10)]


def detector(**kw: Any) -> OutlierDetector:
    """Envoy's defaults over a fleet of 10, with ``kw`` overriding."""
    d = OutlierDetector(**kw)
    d.set_members(FLEET, 0.0)
    return d


def fail(
    d: OutlierDetector,
    name: str,
    now: float,
    times: int = 5,
    outcome: Outcome = Outcome.HTTP_5XX,
    status: int | None = 503,
) -> list[OutlierEvent]:
    events: list[OutlierEvent] = []
    for _ in range(times):
        events += d.record(name, outcome, now, status=status)
    return events


def test_ejects_after_consecutive_failures_not_before() -> None:
    d = detector()
    assert fail(d, "r0", 0.0, times=4) == []
    assert not d.is_ejected("r0", 0.0)
    (event,) = fail(d, "r0", 0.0, times=1)
    assert event == OutlierEvent(EventKind.EJECTED, "r0", "status_503", 0.0, 1, 30.0)
    assert d.is_ejected("r0", 29.9)
    assert not d.is_ejected("r0", 30.0)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (Outcome.CONNECT_ERROR, "connect_error"),
        (Outcome.TIMEOUT, "timeout"),
        (Outcome.UPSTREAM_RESET, "upstream_reset"),
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


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429])
def test_4xx_never_counts(status: int) -> None:
    """M4: 50 client errors leave the replica in and its counter untouched."""
    d = detector()
    assert fail(d, "r2", 0.0, times=50, outcome=Outcome.HTTP_4XX, status=status) == []
    assert not d.is_ejected("r2", 0.0)
    assert d.consecutive("r2") == 0
    assert not d.counters


def test_500_is_not_a_gateway_failure_unless_configured() -> None:
    d = detector()
    assert fail(d, "r0", 0.0, times=20, status=500) == []
    d500 = detector(failure_statuses={500, 502, 503, 504})
    assert fail(d500, "r0", 0.0, status=500)[0].kind is EventKind.EJECTED


@pytest.mark.parametrize("outcome", [Outcome.DRAINING, Outcome.CLIENT_DISCONNECT])
def test_draining_and_client_disconnect_are_neutral(outcome: Outcome) -> None:
    d = detector()
    fail(d, "r3", 0.0, times=4)
    assert d.record("r3", outcome, 0.0, status=503) == []
    assert d.consecutive("r3") == 4  # neither counted nor reset
    assert fail(d, "r3", 0.0, times=1)[0].kind is EventKind.EJECTED


@pytest.mark.parametrize("outcome", [Outcome.OK, Outcome.HTTP_4XX])
def test_a_response_resets_the_count(outcome: Outcome) -> None:
    d = detector()
    fail(d, "r4", 0.0, times=4)
    d.record("r4", outcome, 0.0, status=400 if outcome is Outcome.HTTP_4XX else 200)
    assert fail(d, "r4", 0.0, times=4) == []
    assert not d.is_ejected("r4", 0.0)


def test_ejection_durations_grow_by_base_times_n_up_to_the_cap() -> None:
    """M8: a flapping replica is ejected for longer each time, up to the cap."""
    d = detector(base_ejection_s=30.0, max_ejection_s=100.0)
    now = 0.0
    durations = []
    for _ in range(8):
        (event,) = fail(d, "r5", now)
        durations.append(event.duration_s)
        now += event.duration_s
        (back,) = d.poll(now)
        assert back.kind is EventKind.UNEJECTED and back.reason == "expired"
        now += 2.0  # flap: fails again 2 s after coming back
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0, 100.0, 100.0]
    assert durations == sorted(durations)


def test_ejection_count_decays_after_a_healthy_period() -> None:
    d = detector(base_ejection_s=30.0, max_ejection_s=300.0, decay_interval_s=10.0)
    now = 0.0
    for _ in range(3):  # n = 3
        (event,) = fail(d, "r6", now)
        now += event.duration_s
        d.poll(now)
    assert d.ejection_count("r6", now) == 3
    assert d.ejection_count("r6", now + 9.9) == 3
    assert d.ejection_count("r6", now + 10.0) == 2
    assert d.ejection_count("r6", now + 25.0) == 1
    # Back after 25 s of health: n was 1, so this ejection is the 2nd: 60 s.
    (event,) = fail(d, "r6", now + 25.0)
    assert (event.ejections, event.duration_s) == (2, 60.0)
    # After a long healthy period it is forgiven entirely.
    now = now + 25.0 + event.duration_s
    d.poll(now)
    assert d.ejection_count("r6", now + 1000.0) == 0
    assert fail(d, "r6", now + 1000.0)[0].duration_s == 30.0


def test_max_percent_caps_ejections_but_ejects_at_least_one() -> None:
    """M10: with 10 % of 3 replicas, one is ejected and the rest overflow."""
    d = OutlierDetector(max_ejection_percent=10.0)
    d.set_members(["a", "b", "c"], 0.0)
    assert d.max_ejected() == 1
    assert fail(d, "a", 0.0)[0].kind is EventKind.EJECTED
    (overflow,) = fail(d, "b", 0.0)
    assert overflow.kind is EventKind.OVERFLOW
    assert d.ejected(0.0) == ["a"]
    assert d.counters[("overflow", "status_503")] == 1
    # Once a's ejection ends, b's next run of failures can eject it.
    assert [e.kind for e in fail(d, "b", 30.0)] == [EventKind.UNEJECTED, EventKind.EJECTED]
    assert d.ejected(30.0) == ["b"]


@pytest.mark.parametrize(
    ("members", "percent", "expected"),
    [(3, 10.0, 1), (3, 50.0, 1), (3, 67.0, 2), (3, 100.0, 3), (10, 10.0, 1), (20, 10.0, 2),
     (15, 10.0, 1), (10, 0.0, 0)],
)  # fmt: skip
def test_max_ejected(members: int, percent: float, expected: int) -> None:
    d = OutlierDetector(max_ejection_percent=percent)
    d.set_members([str(i) for i in range(members)], 0.0)
    assert d.max_ejected() == expected


def test_cap_holds_at_every_sample_when_most_replicas_fail() -> None:
    """M10: 2 of 3 keep failing for 10 minutes; never more than the cap out."""
    d = OutlierDetector(base_ejection_s=1.0, max_ejection_s=5.0, max_ejection_percent=50.0)
    d.set_members(["a", "b", "c"], 0.0)
    now = 0.0
    while now < 600.0:
        for name in ("a", "b"):
            d.record(name, Outcome.HTTP_5XX, now, status=502)
        d.record("c", Outcome.OK, now, status=200)
        assert len(d.ejected(now)) <= d.max_ejected() == 1
        assert "c" not in d.ejected(now)
        now += 0.1


def test_zero_percent_disables_ejection() -> None:
    d = detector(max_ejection_percent=0.0)
    assert fail(d, "r0", 0.0)[0].kind is EventKind.OVERFLOW
    assert not d.is_ejected("r0", 0.0)


def test_outcomes_while_ejected_are_ignored() -> None:
    d = detector()
    fail(d, "r7", 0.0)
    fail(d, "r7", 1.0, times=20)  # stragglers sent before the ejection
    d.record("r7", Outcome.OK, 2.0)
    assert d.ejection_count("r7", 2.0) == 1
    assert d.is_ejected("r7", 29.0)


def test_removed_member_reports_unejection_and_is_forgotten() -> None:
    d = detector()
    fail(d, "r8", 0.0)
    (event,) = d.set_members([n for n in FLEET if n != "r8"], 5.0)
    assert (event.kind, event.reason, event.duration_s) == (EventKind.UNEJECTED, "removed", 5.0)
    assert not d.is_ejected("r8", 5.0)
    assert d.ejected(5.0) == []


def test_manual_uneject() -> None:
    d = detector()
    fail(d, "r9", 0.0)
    event = d.uneject("r9", 3.0, reason="admin")
    assert event is not None and event.reason == "admin"
    assert not d.is_ejected("r9", 3.0)
    assert d.uneject("r9", 3.0) is None
    # The ejection still counts for the next one: n grows to 2.
    assert fail(d, "r9", 4.0)[0].duration_s == 60.0


def test_unknown_replicas_are_added_on_record() -> None:
    d = OutlierDetector(max_ejection_percent=100.0)
    assert fail(d, "new", 0.0)[0].kind is EventKind.EJECTED


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        OutlierDetector(consecutive_failures=0)
    with pytest.raises(ValueError):
        OutlierDetector(max_ejection_percent=101)
    with pytest.raises(ValueError):
        OutlierDetector(base_ejection_s=0)
