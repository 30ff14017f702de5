"""One contract over every registered policy (Envoy/Finagle style).

Whatever a policy does, it must: answer None for no candidates, pick the only
candidate, never pick outside the candidates it was given, repeat itself
under the same seed, survive replicas leaving with requests in flight, and
ignore feedback about replicas it never saw.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from policies import registry
from policies.base import BasePolicy, RouteRequest
from policies.load import Outcome
from router.load import ReplicaLoad, Ticket, dispatch
from tests.fakes import Fleet, choose

NAMES = sorted(registry.POLICIES)
SYSTEM = "You are a helpful assistant. " * 40  # ~1,100 chars: 4 full prefix blocks


def make_request(rng: random.Random, i: int) -> RouteRequest:
    text = SYSTEM + f"question {i} " + "x" * rng.randrange(0, 600)
    return RouteRequest(
        "m",
        prompt_text=text,
        prompt_tokens=len(text) // 4,
        expected_output_tokens=rng.randrange(1, 300),
        request_id=str(i),
    )


def replicas(n: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(name=f"r{i}") for i in range(n)]


def drive(policy: BasePolicy, loads: list[ReplicaLoad], steps: int, seed: int) -> list[str | None]:
    """Route ``steps`` requests with feedback, settling some as we go; returns the picks."""
    rng = random.Random(seed)
    fleet = Fleet.of(loads)
    open_: list[tuple[Ticket, RouteRequest, str]] = []
    picks: list[str | None] = []
    now = 0.0
    for i in range(steps):
        now += rng.expovariate(10.0)
        req = make_request(rng, i)
        d = policy.choose(req, loads, fleet, now)
        picks.append(d.replica)
        if d.replica is None:
            continue
        load = next(c for c in loads if c.name == d.replica)
        policy.on_dispatch(req, d.replica, now)
        open_.append((dispatch(load, req.cost_tokens), req, d.replica))
        if i % 7 == 3:
            load.record_report(float(load.in_flight + rng.randrange(3)), rng.random(), now)
        while open_ and rng.random() < 0.5:
            ticket, r, name = open_.pop(rng.randrange(len(open_)))
            ticket.close(Outcome.OK)
            policy.observe(name, rng.uniform(0.05, 0.5), rng.uniform(0.01, 0.05), now)
            ticket.load.ttft.add(rng.uniform(0.05, 0.5), now)
            ticket.load.tpot.add(rng.uniform(0.01, 0.05), now)
            policy.on_complete(r, name, Outcome.OK, now)
    return picks


@pytest.fixture(params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_empty_candidates_choose_nothing(name: str) -> None:
    policy = registry.create(name, seed=1)
    d = policy.choose(make_request(random.Random(0), 0), [], Fleet.of(["r0"]), 0.0)
    assert d.replica is None
    assert d.reason


def test_single_candidate_is_chosen(name: str) -> None:
    policy = registry.create(name, seed=1)
    only = replicas(1)
    only[0].in_flight = 50
    for i in range(20):
        assert choose(policy, make_request(random.Random(i), i), only, float(i)).replica == "r0"


def test_never_picks_outside_candidates(name: str) -> None:
    policy = registry.create(name, seed=2)
    loads = replicas(6)
    fleet = Fleet.of(loads)
    rng = random.Random(3)
    for i in range(300):
        subset = [c for c in loads if rng.random() < 0.6] or loads[:1]
        req = make_request(rng, i)
        d = policy.choose(req, subset, fleet, float(i))
        assert d.replica in {c.name for c in subset}
        policy.on_dispatch(req, d.replica, float(i))  # type: ignore[arg-type]
        dispatch(next(c for c in loads if c.name == d.replica), req.cost_tokens)
        if i % 3 == 0:
            for c in loads:
                c.in_flight = max(0, c.in_flight - 1)


def test_same_seed_same_sequence(name: str) -> None:
    a = drive(registry.create(name, seed=42), replicas(5), 400, seed=9)
    b = drive(registry.create(name, seed=42), replicas(5), 400, seed=9)
    assert a == b
    assert len(set(a)) > 1, "a load-aware or random policy spreads over 400 requests"


def test_replica_removed_while_requests_in_flight(name: str) -> None:
    policy = registry.create(name, seed=5)
    loads = replicas(4)
    rng = random.Random(6)
    tickets = []
    for i in range(40):
        req = make_request(rng, i)
        d = choose(policy, req, loads, float(i))
        assert d.replica is not None
        policy.on_dispatch(req, d.replica, float(i))
        load = next(c for c in loads if c.name == d.replica)
        tickets.append((dispatch(load, 10), req, d.replica))
    gone = loads.pop(1)  # r1 leaves the fleet with requests still in flight
    after = Fleet.of(loads, version=2)
    for i in range(40, 80):
        d = policy.choose(make_request(rng, i), loads, after, float(i))
        assert d.replica not in (None, gone.name)
    for ticket, req, replica in tickets:  # their completions still arrive
        ticket.close(Outcome.UPSTREAM_RESET if replica == gone.name else Outcome.OK)
        policy.on_complete(req, replica, ticket.outcome or Outcome.OK, 90.0)
        policy.observe(replica, 0.2, 0.02, 90.0)
    assert gone.in_flight == 0
    d = policy.choose(make_request(rng, 99), loads, after, 100.0)
    assert d.replica in {c.name for c in loads}


def test_unknown_replica_in_feedback_is_a_no_op(name: str) -> None:
    plain = registry.create(name, seed=8)
    fed = registry.create(name, seed=8)
    req = make_request(random.Random(1), 1)
    fed.on_dispatch(req, "never-seen", 0.0)
    fed.on_complete(req, "never-seen", Outcome.OK, 0.0)
    fed.on_complete(req, "never-seen", Outcome.TIMEOUT, 0.0)
    fed.observe("never-seen", 1.0, 0.1, 0.0)
    assert drive(plain, replicas(4), 200, seed=3) == drive(fed, replicas(4), 200, seed=3)


def test_unknown_parameter_is_a_config_error(name: str) -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        registry.create(name, {"no_such_param": 1})


def test_zero_weight_replica_is_avoided_when_others_exist(name: str) -> None:
    policy = registry.create(name, seed=4)
    loads = replicas(3)
    loads[0].weight = 0.0
    picks = drive(policy, loads, 300, seed=2)
    # Weighted policies never pick it; the others may, but it must stay rare.
    assert picks.count("r0") <= 300 // 3


def test_registry_lists_every_policy_once() -> None:
    lines = registry.describe()
    assert [line.split(":")[0] for line in lines] == NAMES
    assert all(": " in line and len(line) < 120 for line in lines)
    assert registry.DEFAULT_POLICY == "queue_depth"
    with pytest.raises(ValueError, match="unknown policy"):
        registry.create("nope")


def test_every_policy_documents_when_formula_source_failure() -> None:
    import importlib

    for cls in registry.POLICIES.values():
        doc = (importlib.import_module(cls.__module__).__doc__ or "").lower()
        assert "when to use" in doc, cls.name
        assert "fail" in doc, cls.name
        assert "source" in doc or "from" in doc, cls.name


FORBIDDEN_RANDOM = {
    "random", "randint", "randrange", "choice", "choices", "shuffle", "sample",
    "uniform", "gauss", "expovariate", "seed", "getrandbits", "lognormvariate",
}  # fmt: skip


def test_policies_read_no_clock_and_no_global_random() -> None:
    """Purity: no time.*, no module-level random.* (random.Random is fine)."""
    root = Path(__file__).resolve().parents[1] / "policies"
    offences = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    mods = [node.module or ""]
                    if node.module == "random":
                        bad = [a.name for a in node.names if a.name != "Random"]
                        offences += [f"{path.name}: from random import {b}" for b in bad]
                for m in mods:
                    if m.split(".")[0] in ("time", "datetime", "asyncio", "aiohttp", "socket"):
                        offences.append(f"{path.name}: imports {m}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
                and node.attr in FORBIDDEN_RANDOM
            ):
                offences.append(f"{path.name}:{node.lineno}: random.{node.attr}")
    assert offences == []
