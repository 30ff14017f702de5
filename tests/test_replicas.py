"""The registry: one writer of replica status, immutable versioned snapshots."""

from __future__ import annotations

import dataclasses

import pytest

from router.config import ReplicaConfig
from router.replicas import AdminState, FleetSnapshot, Health, Ramp, Registry


def configs(*names: str, models: tuple[str, ...] | None = ("m",)) -> tuple[ReplicaConfig, ...]:
    return tuple(
        ReplicaConfig(url=f"http://127.0.0.1:{9000 + i}", name=n, models=models)
        for i, n in enumerate(names)
    )


def test_starts_at_version_one_with_configured_state() -> None:
    reg = Registry(configs("a", "b"), initial_health=Health.UNKNOWN)
    snap = reg.snapshot
    assert snap.version == 1
    assert snap.names == {"a", "b"}
    assert [s.name for s in snap.serving("m")] == ["a", "b"]
    assert all(s.health is Health.UNKNOWN and not s.routable(0.0) for s in snap)
    assert all(s.admin is AdminState.ACTIVE for s in snap)


def test_update_bumps_version_only_on_change() -> None:
    reg = Registry(configs("a", "b"), initial_health=Health.UNKNOWN)
    assert reg.update("a", health=Health.HEALTHY)
    assert reg.snapshot.version == 2
    assert not reg.update("a", health=Health.HEALTHY)  # same value: no new version
    assert reg.snapshot.version == 2
    assert not reg.update("nobody", health=Health.HEALTHY)
    assert reg.snapshot.version == 2


def test_old_snapshots_never_change() -> None:
    reg = Registry(configs("a"))
    before = reg.snapshot
    reg.update("a", admin=AdminState.DRAINING, ejected_until=5.0)
    after = reg.snapshot
    assert before.get("a").admin is AdminState.ACTIVE  # type: ignore[union-attr]
    assert after.get("a").admin is AdminState.DRAINING  # type: ignore[union-attr]
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.get("a").health = Health.UNHEALTHY  # type: ignore[misc, union-attr]


def test_load_counters_are_shared_across_versions() -> None:
    reg = Registry(configs("a"))
    load = reg.snapshot.get("a").load  # type: ignore[union-attr]
    reg.update("a", weight=3.0)
    assert reg.snapshot.get("a").load is load  # type: ignore[union-attr]
    assert load.weight == 3.0  # stamped when the version was published


def test_only_status_fields_may_change() -> None:
    reg = Registry(configs("a"))
    with pytest.raises(TypeError):
        reg.update("a", url="http://evil.example/")
    with pytest.raises(TypeError):
        reg.update("a", load=None)


def test_listeners_see_every_new_version_in_order() -> None:
    reg = Registry(configs("a", "b"))
    seen: list[tuple[int, int]] = []

    def listener(new: FleetSnapshot, old: FleetSnapshot) -> None:
        seen.append((old.version, new.version))

    reg.subscribe(listener)
    reg.update("a", health=Health.UNHEALTHY)
    reg.update("b", ejected_until=3.0)
    reg.unsubscribe(listener)
    reg.update("b", ejected_until=0.0)
    assert seen == [(1, 2), (2, 3)]


def test_routable_needs_healthy_active_and_not_ejected() -> None:
    reg = Registry(configs("a"))
    assert reg.snapshot.get("a").routable(10.0)  # type: ignore[union-attr]
    reg.update("a", ejected_until=12.0)
    status = reg.snapshot.get("a")
    assert status is not None
    assert not status.routable(11.9) and status.routable(12.0)  # ejection ends by the clock
    reg.update("a", ejected_until=0.0, admin=AdminState.DRAINING)
    assert not reg.snapshot.get("a").routable(20.0)  # type: ignore[union-attr]
    reg.update("a", admin=AdminState.ACTIVE, health=Health.UNHEALTHY)
    assert not reg.snapshot.get("a").routable(20.0)  # type: ignore[union-attr]


def test_discovered_models_reindex_and_clear_pending() -> None:
    reg = Registry(configs("a", "b", models=None))
    assert reg.snapshot.models_pending
    assert not reg.snapshot.knows_model("llama")
    assert reg.set_models("a", [{"id": "llama", "object": "model"}])
    assert not reg.set_models("a", [{"id": "llama", "object": "model"}])
    snap = reg.snapshot
    assert snap.models_pending  # b has not answered yet
    assert [s.name for s in snap.serving("llama")] == ["a"]
    reg.set_models("b", [{"id": "llama"}, {"id": "qwen"}])
    assert not reg.snapshot.models_pending
    assert [m["id"] for m in reg.model_list()] == ["llama", "qwen"]


def test_membership_changes_are_versions_too() -> None:
    reg = Registry(configs("a"), initial_health=Health.UNKNOWN)
    added = reg.add(ReplicaConfig(url="http://127.0.0.1:9100", name="c", models=("m",)))
    assert added.health is Health.UNKNOWN  # checked before it gets traffic
    assert reg.snapshot.names == {"a", "c"} and reg.snapshot.version == 2
    with pytest.raises(ValueError):
        reg.add(ReplicaConfig(url="http://127.0.0.1:9101", name="c", models=("m",)))
    assert reg.remove("a")
    assert not reg.remove("a")
    assert reg.snapshot.names == {"c"} and reg.snapshot.version == 3


def test_ramp_is_evaluated_with_now() -> None:
    ramp = Ramp(start=10.0, duration=20.0, aggression=1.0, min_weight=0.1)
    assert ramp.factor(5.0) == 0.1  # not started (an ejection still running)
    assert ramp.factor(10.0) == 0.1
    assert ramp.factor(11.0) == pytest.approx(0.1)  # floor: 1/20 < 0.1
    assert ramp.factor(20.0) == pytest.approx(0.5)
    assert ramp.factor(30.0) == 1.0
    assert ramp.active(29.9) and not ramp.active(30.0)
    fast = Ramp(start=0.0, duration=100.0, aggression=2.0, min_weight=0.1)
    assert fast.factor(25.0) == pytest.approx(0.5)  # (1/4) ** (1/2)


def test_a_ramp_does_not_publish_versions() -> None:
    reg = Registry(configs("a"))
    reg.update("a", ramp=Ramp(start=0.0, duration=30.0))
    version = reg.snapshot.version
    status = reg.snapshot.get("a")
    assert status is not None
    factors = [status.ramp_factor(t) for t in (0.0, 10.0, 20.0, 30.0)]
    assert factors == sorted(factors) and factors[-1] == 1.0
    assert reg.snapshot.version == version
