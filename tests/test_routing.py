"""The route pipeline: filter -> pool -> affinity -> policy, on fleet snapshots."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from policies.base import BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView
from router.config import ReplicaConfig
from router.load import dispatch
from router.replicas import AdminState, Health, Ramp, Registry
from router.routing import PIN_HELD, NoRoute, Repin, Routed, Router


class LeastInFlight(BasePolicy):
    """Fewest in-flight per weight, ties by name; remembers what it was shown."""

    name = "test_least"

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[list[tuple[str, float]]] = []
        self.fleets: list[int] = []

    def choose(
        self, request: RouteRequest, candidates: Sequence[LoadView], fleet: FleetView, now: float
    ) -> Decision:
        self.shown.append([(c.name, c.weight) for c in candidates])
        self.fleets.append(fleet.version)
        best = min(candidates, key=lambda c: (c.in_flight / c.weight, c.name))
        return Decision(best.name, "least")


def registry(*names: str, models: tuple[str, ...] = ("m",), **kw: object) -> Registry:
    return Registry(
        tuple(
            ReplicaConfig(url=f"http://127.0.0.1:{9000 + i}", name=n, models=models, **kw)  # type: ignore[arg-type]
            for i, n in enumerate(names)
        )
    )


def req(model: str = "m", session: str | None = None) -> RouteRequest:
    return RouteRequest(model, session_key=session, prompt_tokens=10, expected_output_tokens=10)


def routed(result: Routed | NoRoute) -> Routed:
    assert isinstance(result, Routed), result
    return result


def test_policy_sees_routable_candidates_and_the_whole_fleet() -> None:
    reg = registry("a", "b", "c")
    reg.update("b", health=Health.UNHEALTHY)
    policy = LeastInFlight()
    r = routed(Router(policy).decide(req(), None, reg.snapshot, 0.0))
    assert r.replica.name == "a" and r.repin is None
    assert [n for n, _ in policy.shown[-1]] == ["a", "c"]
    assert policy.fleets[-1] == reg.snapshot.version


def test_no_route_reasons() -> None:
    reg = registry("a", "b")
    router = Router(LeastInFlight())
    assert router.decide(req("other"), None, reg.snapshot, 0.0) is NoRoute.UNKNOWN_MODEL
    pending = Registry((ReplicaConfig(url="http://127.0.0.1:1", name="x", models=None),))
    assert router.decide(req("other"), None, pending.snapshot, 0.0) is NoRoute.MODELS_PENDING
    assert router.decide(req(), None, reg.snapshot, 0.0, exclude=("a", "b")) is NoRoute.ALL_TRIED
    reg.update("a", ejected_until=10.0)
    reg.update("b", admin=AdminState.DRAINING)
    assert router.decide(req(), None, reg.snapshot, 5.0) is NoRoute.NONE_ROUTABLE
    # The ejection ends by the clock: no new version needed.
    assert routed(router.decide(req(), None, reg.snapshot, 10.0)).replica.name == "a"


def test_at_capacity_when_every_candidate_is_full() -> None:
    reg = registry("a", "b", max_concurrency=1)
    router = Router(LeastInFlight())
    for name in ("a", "b"):
        dispatch(reg.snapshot.replicas[name].load, 1)
    assert router.decide(req(), None, reg.snapshot, 0.0) is NoRoute.AT_CAPACITY


def test_panic_routes_to_unhealthy_but_never_to_drained() -> None:
    reg = registry("a", "b")
    reg.update("a", health=Health.UNHEALTHY)
    reg.update("b", admin=AdminState.DRAINED, health=Health.UNHEALTHY)
    router = Router(LeastInFlight())
    assert router.decide(req(), None, reg.snapshot, 0.0) is NoRoute.NONE_ROUTABLE
    assert routed(router.decide(req(), None, reg.snapshot, 0.0, panic=True)).replica.name == "a"


def test_slow_start_scales_weight_and_caps_concurrency() -> None:
    reg = registry("a", "b")
    reg.update("b", ramp=Ramp(start=0.0, duration=10.0, min_weight=0.1))
    policy = LeastInFlight()
    router = Router(policy)
    r = routed(router.decide(req(), None, reg.snapshot, 5.0))
    assert dict(policy.shown[-1]) == {"a": 1.0, "b": pytest.approx(0.5)}
    dispatch(r.replica.load, 1)
    # With a and b at 1 and 0 in flight, b (weight 0.5) may hold
    # max(1, floor(0.5 x fair share)) = 1: it gets the next one, then no more.
    r2 = routed(router.decide(req(), None, reg.snapshot, 5.0))
    assert r2.replica.name == "b"
    dispatch(r2.replica.load, 1)
    for _ in range(3):
        r3 = routed(router.decide(req(), None, reg.snapshot, 5.0))
        assert r3.replica.name == "a"
        dispatch(r3.replica.load, 1)
    # After the ramp the plain weight is back, with no new version.
    version = reg.snapshot.version
    routed(router.decide(req(), None, reg.snapshot, 10.0))
    assert dict(policy.shown[-1]) == {"a": 1.0, "b": 1.0}
    assert reg.snapshot.version == version


def test_session_without_pin_is_new() -> None:
    reg = registry("a", "b")
    r = routed(Router(LeastInFlight()).decide(req(session="s1"), None, reg.snapshot, 0.0))
    assert r.repin is Repin.NEW


def test_pin_holds_while_routable_and_under_the_bound() -> None:
    reg = registry("a", "b", "c")
    policy = LeastInFlight()
    r = routed(Router(policy).decide(req(session="s1"), "c", reg.snapshot, 0.0))
    assert (r.replica.name, r.decision.reason, r.repin) == ("c", PIN_HELD, None)
    assert policy.shown == []  # the policy was not asked


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"health": Health.UNHEALTHY}, Repin.UNHEALTHY),
        ({"ejected_until": 100.0}, Repin.UNHEALTHY),
        ({"admin": AdminState.DRAINING}, Repin.DRAINED),
        ({"admin": AdminState.DRAINED}, Repin.DRAINED),
        ({"models": frozenset({"other"})}, Repin.REMOVED),
    ],
)
def test_pin_breaks_with_its_reason(change: dict[str, object], why: Repin) -> None:
    reg = registry("a", "b")
    reg.update("b", **change)
    r = routed(Router(LeastInFlight()).decide(req(session="s"), "b", reg.snapshot, 0.0))
    assert (r.replica.name, r.repin) == ("a", why)


def test_pin_to_a_removed_or_failed_replica() -> None:
    reg = registry("a", "b")
    router = Router(LeastInFlight())
    r = routed(router.decide(req(session="s"), "gone", reg.snapshot, 0.0))
    assert r.repin is Repin.REMOVED
    r = routed(router.decide(req(session="s"), "b", reg.snapshot, 0.0, exclude=("b",)))
    assert (r.replica.name, r.repin) == ("a", Repin.FAILED)


def test_hot_session_moves_when_its_replica_passes_the_load_bound() -> None:
    reg = registry("a", "b", "c")
    router = Router(LeastInFlight(), load_bound_epsilon=0.25, session_load_floor=0)
    hits = moves = 0
    for _ in range(30):
        r = routed(router.decide(req(session="hot"), "a", reg.snapshot, 0.0))
        loads = [s.load.in_flight for s in reg.snapshot]
        bound = -(-(1.25 * (sum(loads) + 1)) // 3)
        assert r.replica.load.in_flight + 1 <= bound  # never past the bound
        if r.repin is None:
            hits += 1
        else:
            assert r.repin is Repin.OVERLOADED and r.replica.name != "a"
            moves += 1
        dispatch(r.replica.load, 1)
    assert hits > 0 and moves > 0


def test_a_policy_that_picks_outside_the_candidates_is_a_bug() -> None:
    class Rogue(LeastInFlight):
        def choose(self, request, candidates, fleet, now):  # type: ignore[no-untyped-def]
            return Decision("nobody", "rogue")

    reg = registry("a")
    with pytest.raises(RuntimeError):
        Router(Rogue()).decide(req(), None, reg.snapshot, 0.0)


def test_a_pin_holds_below_the_session_load_floor() -> None:
    """The second of two requests on three replicas: the bound is 1, but an
    engine with one request is idle enough to keep its session's cache."""
    reg = registry("a", "b", "c")
    router = Router(LeastInFlight(), session_load_floor=2)
    first = routed(router.decide(req(session="s"), "a", reg.snapshot, 0.0))
    dispatch(first.replica.load, 1)
    second = routed(router.decide(req(session="s"), "a", reg.snapshot, 0.0))
    assert (second.replica.name, second.repin) == ("a", None)
    dispatch(second.replica.load, 1)
    third = routed(router.decide(req(session="s"), "a", reg.snapshot, 0.0))
    assert (third.replica.name, third.repin) == ("b", Repin.OVERLOADED)
