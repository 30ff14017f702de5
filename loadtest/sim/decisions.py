"""Decision cost per policy: microseconds per ``choose`` at 8, 100 and 1,000 replicas.

The gateway's budget is ~200 us of CPU per request in total, so ``choose``
must be a small part of it. Targets at 1,000 replicas: P2C < 20 us, full
scans < 200 us, the scored composition < 1 ms. The last column is the whole
route decision at 1,000 replicas (``router.routing.Router.decide``: filter,
pool, affinity, then ``choose``), what the gateway and the simulator pay.

Setup: a fleet snapshot of replicas (``router.replicas.Registry``) with
random in-flight counts (0-9), outstanding tokens, fresh load reports with
KV usage and latency EWMAs; a 2,000-token prompt whose prefix blocks the
prefix-aware policies have seen on 50 replicas. Block hashes are
precomputed (RouteRequest caches them per request, and hashing is the data
path's cost, not the policy's). Best of 3 repeats.
"""

from __future__ import annotations

import functools
import random
import timeit
from collections.abc import Callable
from typing import Any, cast

from policies import registry
from policies.base import Policy, RouteRequest
from policies.prefix import block_hashes
from router.config import ReplicaConfig
from router.load import ReplicaLoad
from router.replicas import FleetSnapshot, Registry
from router.routing import Router

SIZES = (8, 100, 1000)
# Registered policies with their defaults, plus the variants a large fleet
# would configure (queue_depth sampling 2 instead of scanning all).
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (("queue_depth", {"d": 2}),)
TARGET_US = {"p2c": 20.0, "peak_ewma": 20.0, "scored": 1000.0}
FULL_SCAN_TARGET_US = 200.0


def _fleet(n: int, rng: random.Random) -> tuple[FleetSnapshot, list[ReplicaLoad]]:
    configs = tuple(
        ReplicaConfig(url=f"sim://replica-{i}", name=f"replica-{i}", models=("m",))
        for i in range(n)
    )
    fleet = Registry(configs).snapshot
    loads = [status.load for status in fleet]
    for c in loads:
        c.in_flight = rng.randrange(10)
        c.outstanding_tokens = c.in_flight * rng.randrange(200, 2000)
        c.record_report(float(c.in_flight + rng.randrange(3)), rng.random(), 0.0)
        c.ttft.add(rng.uniform(0.05, 0.5), 0.0)
        c.tpot.add(rng.uniform(0.01, 0.05), 0.0)
    return fleet, loads


def _us_per_call(call: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=3)) / number * 1e6


def bench(seed: int = 0) -> list[dict[Any, Any]]:
    rng = random.Random(seed)
    text = "".join(rng.choice("abcdefgh ") for _ in range(8000))
    req = RouteRequest(
        "m",
        prompt_tokens=2000,
        expected_output_tokens=200,
        prompt_text=text,
        block_hashes=block_hashes(text),
    )
    out = []
    specs: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in registry.POLICIES]
    specs += VARIANTS
    for name, params in specs:
        label = name + "".join(f":{k}={v}" for k, v in params.items())
        row: dict[Any, Any] = {"policy": label}
        for n in SIZES:
            fleet, loads = _fleet(n, rng)
            policy = registry.create(name, params, seed=seed)
            for c in loads[: min(50, n)]:
                policy.on_dispatch(req, c.name, 0.0)
            number = max(20, 20_000 // n)
            choose = cast(Policy, policy).choose
            row[n] = _us_per_call(functools.partial(choose, req, loads, fleet, 1.0), number)
            if n == SIZES[-1]:
                decide = Router(policy).decide
                row["decide"] = _us_per_call(
                    functools.partial(decide, req, None, fleet, 1.0), number
                )
        target = TARGET_US.get(name, FULL_SCAN_TARGET_US) if not params else TARGET_US["p2c"]
        row["target_us"] = target
        row["ok"] = row[1000] < target
        out.append(row)
    return out


def format_bench(rows: list[dict[Any, Any]]) -> str:
    lines = [
        f"{'policy':<16} {'8':>9} {'100':>9} {'1000':>9}   target@1000  "
        f"{'decide@1000':>11}  (us per pick)"
    ]
    for r in rows:
        lines.append(
            f"{r['policy']:<16} {r[8]:>9.1f} {r[100]:>9.1f} {r[1000]:>9.1f}   "
            f"< {r['target_us']:<6.0f} {'ok  ' if r['ok'] else 'OVER'}  {r['decide']:>11.1f}"
        )
    return "\n".join(lines)
