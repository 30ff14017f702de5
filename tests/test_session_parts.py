"""The pieces of sticky sessions, one by one: the breaker's states, the
local pin cache's bounds and expiry, the rendezvous hash, following another
gateway's pin, and the key's scope."""

from __future__ import annotations

import pytest

from policies.base import RouteRequest
from policies.hashring import rendezvous
from router.breaker import BreakerState, CircuitBreaker
from router.config import ReplicaConfig
from router.replicas import AdminState, Health, Ramp, Registry
from router.routing import PIN_HELD, Router
from router.session_key import parse_sources, session_key
from router.sessions import LocalPins
from tests.test_routing import LeastInFlight


def test_breaker_opens_probes_once_and_closes() -> None:
    b = CircuitBreaker(failures=3, open_s=2.0)
    for t in (0.0, 0.1):
        assert b.allow(t)
        b.failure(t)
    b.success()  # a success resets the streak
    for t in (0.2, 0.3, 0.4):
        assert b.allow(t)
        b.failure(t)
    assert b.state is BreakerState.OPEN and b.opens == 1
    assert not b.allow(1.0)  # open: nobody waits on the store
    assert b.allow(2.5)  # one probe after open_s ...
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow(2.5)  # ... only one
    b.failure(2.6)  # the probe failed: open again, for open_s
    assert b.state is BreakerState.OPEN and not b.allow(3.0)
    assert b.allow(4.7)
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow(4.8)


def test_an_abandoned_probe_frees_the_half_open_slot() -> None:
    b = CircuitBreaker(failures=1, open_s=1.0)
    b.failure(0.0)
    assert b.allow(1.5)
    b.abandon()  # the request was cancelled mid-probe: not a verdict
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow(1.6)


def test_local_pins_are_bounded_and_expire_after_the_ttl() -> None:
    now = [0.0]
    pins = LocalPins(capacity=3, ttl_s=10.0, clock=lambda: now[0])
    for i in range(5):
        pins.put(f"k{i}", f"r{i}")
    assert len(pins) == 3 and pins.get("k0") is None and pins.get("k4") == "r4"
    now[0] = 9.0
    assert pins.get("k3") == "r3"  # used: its TTL slides
    now[0] = 15.0
    assert pins.get("k2") is None  # last used at 0: expired
    assert pins.get("k3") == "r3"
    pins.discard("k3")
    assert pins.get("k3") is None
    assert len(LocalPins(capacity=0)) == 0


def test_rendezvous_is_stable_and_moves_only_the_removed_names_keys() -> None:
    names = [f"r{i}" for i in range(5)]
    keys = [f"session-{i}" for i in range(2000)]
    before = {k: rendezvous(k, names) for k in keys}
    assert before == {k: rendezvous(k, list(reversed(names))) for k in keys}
    share = sum(1 for v in before.values() if v == "r0") / len(keys)
    assert 0.15 < share < 0.25
    after = {k: rendezvous(k, names[1:]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r0" for k in moved)
    heavy = {k: rendezvous(k, names, lambda n: 4.0 if n == "r0" else 1.0) for k in keys}
    assert sum(1 for v in heavy.values() if v == "r0") / len(keys) > 0.4
    assert rendezvous("k", []) is None


def _registry(*names: str) -> Registry:
    return Registry(
        [ReplicaConfig(url=f"http://{n}:1", name=n, models=("m",)) for n in names],
        initial_health=Health.HEALTHY,
    )


def test_follow_takes_the_winners_replica_only_if_it_can_serve() -> None:
    reg = _registry("a", "b")
    router = Router(LeastInFlight())
    req = RouteRequest("m", session_key="s")
    followed = router.follow(req, "b", reg.snapshot, 0.0)
    assert followed is not None
    assert (followed.replica.name, followed.decision.reason, followed.repin) == (
        "b",
        PIN_HELD,
        None,
    )
    assert router.follow(req, "b", reg.snapshot, 0.0, exclude=("b",)) is None
    assert router.follow(RouteRequest("other", session_key="s"), "b", reg.snapshot, 0.0) is None
    reg.update("b", admin=AdminState.DRAINING)
    assert router.follow(req, "b", reg.snapshot, 0.0) is None
    reg.update("b", admin=AdminState.ACTIVE, ramp=Ramp(start=0.0, duration=30.0))
    assert router.follow(req, "b", reg.snapshot, 1.0) is None  # warming: no waiver
    assert router.follow(req, "gone", reg.snapshot, 0.0) is None


@pytest.mark.parametrize("model", ["chat-model", "title-model"])
def test_a_session_has_one_pin_per_model(model: str) -> None:
    sources = parse_sources(("header:x-session-id",))

    def key(m: str) -> str | None:
        return session_key(sources, lambda _: b"conv-1", None, 256, m)

    assert key(model) == key(model)
    assert key("chat-model") != key("title-model")
    assert key(model) is not None and len(key(model) or "") == 32
