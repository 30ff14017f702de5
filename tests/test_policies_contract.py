"""One contract over every registered policy (Envoy/Finagle style), and the
rules that keep ``policies/`` the bottom layer.

Whatever a policy does, it must: answer None for no candidates, pick the only
candidate, never pick outside the candidates it was given, repeat itself
under the same seed, survive replicas leaving the fleet with requests in
flight, and ignore feedback about replicas it never saw. Its module must
document when to use it, its formula, its source and how it fails, and
every parameter it accepts.

``policies/`` imports nothing of ours but itself and none of the gateway's
I/O libraries, reads no clock and uses no module-level randomness: the same
objects then run in the gateway, in the simulator and in these tests.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import random
import re
from pathlib import Path

import pytest

from policies import registry
from policies.base import BasePolicy, RouteRequest
from policies.load import Outcome
from router.load import ReplicaLoad, Ticket, dispatch
from tests.fakes import Fleet, choose

NAMES = sorted(registry.POLICIES)
SYSTEM = "You are a helpful assistant. " * 40  # ~1,100 chars: 4 full prefix blocks
REPO = Path(__file__).resolve().parents[1]
POLICIES_DIR = REPO / "policies"


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


# -- documentation -------------------------------------------------------------

# What an operator choosing a policy needs, each as a labelled part of the
# policy module's docstring: when it fits, what it computes, where it comes
# from (a paper or a system to compare with) and how it goes wrong.
DOC_SECTIONS = {
    "when to use": r"\bwhen to use\b",
    "formula": r"\bformula\b",
    "source": r"\bsource:\s*\S",
    "failure": r"\b(how it fails|fails when|fails like)\b",
}


def test_every_policy_documents_when_formula_source_failure() -> None:
    missing = []
    for cls in registry.POLICIES.values():
        doc = (importlib.import_module(cls.__module__).__doc__ or "").lower()
        missing += [f"{cls.name}: {s}" for s, rx in DOC_SECTIONS.items() if not re.search(rx, doc)]
    assert missing == []


def test_every_policy_parameter_is_documented() -> None:
    """A config key that the docstring does not name is a key nobody can find."""
    missing = []
    for cls in registry.POLICIES.values():
        doc = importlib.import_module(cls.__module__).__doc__ or ""
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind is param.KEYWORD_ONLY and f"``{param.name}``" not in doc:
                missing.append(f"{cls.name}: {param.name}")
    assert missing == []


def test_policies_cite_only_documents_in_the_repository() -> None:
    """Comments may point at a file of this repository (``docs/....md``), or at
    public work by name; a document that is not here is a dead reference."""
    dead = []
    for path in sorted(POLICIES_DIR.rglob("*.py")):
        for ref in re.findall(r"[\w./-]+\.md\b", path.read_text()):
            if not (REPO / ref).exists():
                dead.append(f"{path.name}: {ref}")
    assert dead == []


# -- layering and purity ---------------------------------------------------------

# policies/ is the bottom layer: router and loadtest import it, never the
# other way round, and the gateway's I/O libraries stay out of it.
FORBIDDEN_IMPORTS = frozenset({"router", "loadtest", "aiohttp", "prometheus_client", "redis"})
# Clocks, event loops and sockets: a policy gets ``now`` and does no I/O.
IMPURE_IMPORTS = frozenset({"time", "datetime", "asyncio", "socket", "threading"})
FORBIDDEN_RANDOM = {
    "random", "randint", "randrange", "choice", "choices", "shuffle", "sample",
    "uniform", "gauss", "expovariate", "seed", "getrandbits", "lognormvariate",
}  # fmt: skip


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``source``, at any depth.

    ``import a.b``; ``from a import b`` (both ``a`` and ``a.b``, since ``b``
    may be a module); relative imports resolved against ``package`` (the
    importing module's package); ``importlib.import_module("x")`` and
    ``__import__("x")`` with a literal name.
    """
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base: list[str] = []
            if node.level:
                parts = package.split(".") if package else []
                base = parts[: max(0, len(parts) - (node.level - 1))]
            if node.module:
                base = base + node.module.split(".")
            if base:
                out.append((node.lineno, ".".join(base)))
            out += [
                (node.lineno, ".".join([*base, alias.name]))
                for alias in node.names
                if alias.name != "*"
            ]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if (
                fname in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                out.append((node.lineno, arg.value))
    return out


def layer_offences(source: str, package: str, where: str = "") -> list[str]:
    return [
        f"{where}:{line}: imports {mod}"
        for line, mod in imported_modules(source, package)
        if mod.split(".")[0] in FORBIDDEN_IMPORTS | IMPURE_IMPORTS
    ]


def randomness_offences(source: str, where: str = "") -> list[str]:
    """Module-level random use (``random.random()``, ``from random import
    shuffle``, an alias of the module): only ``random.Random`` instances,
    injected, are allowed."""
    tree = ast.parse(source)
    aliases = {"random"}
    offences = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "random"}
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            bad = [a.name for a in node.names if a.name != "Random"]
            offences += [f"{where}:{node.lineno}: from random import {b}" for b in bad]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr in FORBIDDEN_RANDOM
        ):
            offences.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return offences


def policy_sources() -> list[tuple[str, str, str]]:
    """(path relative to the repo, package, source) for every module under policies/."""
    out = []
    for path in sorted(POLICIES_DIR.rglob("*.py")):
        rel = path.relative_to(REPO)
        package = ".".join(rel.parent.parts)
        out.append((str(rel), package, path.read_text()))
    return out


def test_policies_import_nothing_above_them() -> None:
    sources = policy_sources()
    assert len(sources) > 10
    offences = [o for rel, pkg, src in sources for o in layer_offences(src, pkg, rel)]
    assert offences == []


def test_policies_read_no_clock_and_no_global_random() -> None:
    offences = [o for rel, _pkg, src in policy_sources() for o in randomness_offences(src, rel)]
    assert offences == []


@pytest.mark.parametrize(
    "source",
    [
        "import router",
        "import router.load as rl",
        "from router.load import ReplicaLoad",
        "from router import load",
        "from .. import router",
        "from ..loadtest.sim import core",
        "def f():\n    import aiohttp\n",
        "class C:\n    def m(self):\n        from prometheus_client import Counter\n",
        "import redis.asyncio",
        "import importlib\nimportlib.import_module('loadtest.sim')",
        "__import__('redis')",
        "import time",
        "from time import monotonic",
        "def f():\n    from datetime import datetime\n",
        "import asyncio",
    ],
)
def test_layer_check_catches_every_import_form(source: str) -> None:
    assert layer_offences(source, "policies") != []


@pytest.mark.parametrize(
    "source",
    [
        "from policies import signals",
        "from . import signals",
        "from .load import LoadView",
        "import math\nfrom collections.abc import Sequence",
    ],
)
def test_layer_check_allows_policies_and_the_standard_library(source: str) -> None:
    assert layer_offences(source, "policies") == []


@pytest.mark.parametrize(
    "source",
    [
        "import random\nx = random.random()",
        "import random as r\ndef f():\n    return r.choice([1])",
        "from random import shuffle",
    ],
)
def test_randomness_check_catches_module_level_random(source: str) -> None:
    assert randomness_offences(source) != []


def test_randomness_check_allows_an_injected_generator() -> None:
    ok = (
        "import random\n"
        "class P:\n"
        "    def __init__(self, rng: random.Random):\n"
        "        self.x = rng.random()\n"
    )
    assert randomness_offences(ok) == []
