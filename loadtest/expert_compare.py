"""What the expert-aware signal changes: skewed MoE replicas in the engine simulator.

``python -m loadtest.expert_compare [--replicas 8 --skewed 2 --load 0.6 0.75 0.85]``

A fleet of MoE engines (loadtest/engine, the ``+moe`` preset: top-2 of 8
experts, Zipf(0.5) popularity) where ``--skewed`` replicas route with a
steeper Zipf (``--skew``, default 1.5): their busiest expert takes ~4x the
mean instead of ~1.8x, the state of an expert-parallel deployment whose
expert placement no longer fits the traffic. Two engine modes:

- ``dropless`` (vLLM, SGLang): the skewed replicas' MoE layers wait for the
  busiest expert, so their steps are ~1.9x longer;
- ``capacity`` (Switch/GShard capacity factor 1.25): they do not slow
  down, they drop the tokens over capacity (overflow: answers degrade).

The same scored policy (default weights) routes the same arrivals twice:
with ``expert_capacity`` off and on. Every ``--report-interval`` seconds the
replicas report their queue and KV usage (``ReplicaLoad.record_report``) and
their cumulative per-expert counters to the gateway's own
``router.experts.ExpertTelemetry``, whose ``slowdown`` is written into
``ReplicaLoad.expert_slowdown``, as the gateway does.

Why its own event loop rather than loadtest/sim/core.py: the core builds
every replica from one engine config and knows no expert reports; the
routing path (Registry snapshot, ``Router.decide``, ``dispatch`` /
``Ticket.close``) is the same objects.

Columns: p50/p99 TTFT and p99 end-to-end (seconds), the share of requests
the skewed replicas got, and the share of routed expert tokens dropped
fleet-wide (capacity mode).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass, replace
from typing import Any

from loadtest.engine import Engine, EngineRequest, preset
from loadtest.engine.engine import EngineConfig, StepResult
from loadtest.engine.moe import MoEConfig
from loadtest.sim.cli import engine_capacity
from loadtest.sim.core import summary
from loadtest.sim.workload import SimArrival, open_workload
from policies import registry as policies
from policies.base import RouteRequest
from policies.load import Outcome
from router.config import ExpertsConfig, ReplicaConfig
from router.experts import ExpertSample, ExpertTelemetry
from router.load import Ticket, dispatch
from router.replicas import Registry
from router.routing import NoRoute, Router

MODEL = "sim"
_STEP, _REPORT, _ARRIVE = range(3)


@dataclass(frozen=True, slots=True)
class Scenario:
    mode: str  # dropless | capacity
    load: float  # arrival rate over the fleet's measured capacity
    expert_capacity: bool


@dataclass(slots=True)
class Outcomes:
    ttft: list[float]
    e2e: list[float]
    skewed_share: float
    overflow: float  # dropped / routed expert tokens, whole fleet, whole run
    slowdowns: list[float]  # the signal per replica, mean over the reports that had one


def engine_configs(args: argparse.Namespace, mode: str) -> list[EngineConfig]:
    base = preset(args.preset)
    assert base.moe is not None, "the preset must be an MoE variant (+moe, +moe256)"
    moe = replace(base.moe, mode=mode)
    normal = replace(base, moe=moe)
    skewed = replace(base, moe=replace(moe, zipf_s=args.skew))
    return [skewed if i < args.skewed else normal for i in range(args.replicas)]


def fleet_capacity(args: argparse.Namespace, configs: list[EngineConfig]) -> float:
    """Requests per second the fleet sustains (each distinct config calibrated once)."""
    by_moe: dict[MoEConfig | None, float] = {}
    for c in configs:
        if c.moe not in by_moe:
            by_moe[c.moe] = engine_capacity(
                args.preset, args.workload, args.seed, {"moe": c.moe}, args.requests
            )
    return sum(by_moe[c.moe] for c in configs)


def run(
    args: argparse.Namespace, configs: list[EngineConfig], rate: float, expert_capacity: bool
) -> Outcomes:
    n = len(configs)
    names = [f"r{i}" for i in range(n)]
    reg = Registry(tuple(ReplicaConfig(url=f"sim://{m}", name=m, models=(MODEL,)) for m in names))
    policy = policies.create("scored", {"expert_capacity": expert_capacity}, seed=args.seed)
    router = Router(policy)
    loads = [reg.snapshot.replicas[m].load for m in names]
    experts = ExpertTelemetry(ExpertsConfig(window_s=args.window))
    experts.set_members(names)
    slow_sum = [0.0] * n
    slow_n = [0] * n
    engines = [Engine(c, random.Random(f"engine:{args.seed}:{i}")) for i, c in enumerate(configs)]
    stepping = [False] * n
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    jobs: dict[str, tuple[float, int, Ticket, RouteRequest, list[float]]] = {}
    ttft: list[float] = []
    e2e: list[float] = []
    per_rep = [0] * n
    warm = int(args.requests * 0.1)
    arrivals = open_workload(args.workload, seed=args.seed, requests=args.requests, rate=rate)
    mean_out = 300  # sharegpt's mean output (the gateway's EWMA steady state)
    heapq.heappush(heap, (args.report_interval, seq, _REPORT, None))
    k = 0
    nxt: SimArrival | None = next(arrivals, None)
    now = 0.0

    def step(i: int, t: float) -> None:
        nonlocal seq
        res = engines[i].step(t)
        seq += 1
        heapq.heappush(heap, (t + res.duration_s, seq, _STEP, (i, res)))
        stepping[i] = True

    while nxt is not None or heap:
        if heap and (nxt is None or heap[0][0] <= nxt.t):
            now, _, kind, payload = heapq.heappop(heap)
            if kind == _STEP:
                i, res = payload
                stepping[i] = False
                _settle(res, jobs, loads, now, ttft, e2e, per_rep, warm)
                if engines[i].has_work():
                    step(i, now)
            else:
                for i, (eng, load) in enumerate(zip(engines, loads, strict=True)):
                    queue = float(eng.num_running + eng.num_waiting)
                    load.record_report(queue, eng.kv_usage(), now)
                    st = eng.stats()
                    moe = configs[i].moe
                    over = st["expert_overflow"] if moe and moe.mode == "capacity" else None
                    experts.record(
                        load.name,
                        [ExpertSample(None, tuple(st["expert_tokens"]), over and tuple(over))],
                        now,
                    )
                    load.expert_slowdown = s = experts.slowdown(load.name, now)
                    if s is not None:
                        slow_sum[i] += s
                        slow_n[i] += 1
                if nxt is not None or jobs:
                    seq += 1
                    heapq.heappush(heap, (now + args.report_interval, seq, _REPORT, None))
            continue
        assert nxt is not None
        now = nxt.t
        turn = nxt.turns[0]
        req = RouteRequest(
            MODEL,
            prompt_tokens=turn.prompt_tokens,
            expected_output_tokens=mean_out,
            block_hashes=(),
            request_id=nxt.id,
        )
        routed = router.decide(req, None, reg.snapshot, now)
        if isinstance(routed, NoRoute):
            raise RuntimeError(f"no route: {routed}")
        i = names.index(routed.replica.name)
        ticket = dispatch(routed.replica.load, req.cost_tokens)
        policy.on_dispatch(req, routed.replica.name, now)
        rid = f"{nxt.id}#{k}"
        jobs[rid] = (now, k, ticket, req, [])
        k += 1
        eng = engines[i]
        out = max(1, min(turn.output_tokens, eng.config.kv_capacity_tokens - turn.prompt_tokens))
        eng.add_request(EngineRequest(rid, turn.prompt_tokens, out, (), nxt.domain), now)
        if not stepping[i]:
            step(i, now)
        nxt = next(arrivals, None)
    routed_tokens = dropped = 0
    for eng in engines:
        st = eng.stats()
        routed_tokens += sum(st["expert_tokens"])
        dropped += sum(st["expert_overflow"])
    total = sum(per_rep) or 1
    return Outcomes(
        sorted(ttft),
        sorted(e2e),
        sum(per_rep[: args.skewed]) / total,
        dropped / routed_tokens if routed_tokens else 0.0,
        [x / c if c else float("nan") for x, c in zip(slow_sum, slow_n, strict=True)],
    )


def _settle(
    res: StepResult,
    jobs: dict[str, tuple[float, int, Ticket, RouteRequest, list[float]]],
    loads: list[Any],
    now: float,
    ttft: list[float],
    e2e: list[float],
    per_rep: list[int],
    warm: int,
) -> None:
    for rid in res.emitted:
        t_arr, _, ticket, _, first = jobs[rid]
        if not first:
            first.append(now)
            ticket.load.ttft.add(now - t_arr, now)
    for rid in res.finished:
        t_arr, idx, ticket, _, first = jobs.pop(rid)
        ticket.close(Outcome.OK)
        if idx >= warm:
            ttft.append(first[0] - t_arr)
            e2e.append(now - t_arr)
            per_rep[int(ticket.load.name[1:])] += 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.expert_compare",
        description="p99 TTFT and overflow with and without the expert-aware signal.",
    )
    p.add_argument("--preset", default="llama2-7b+moe")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--skewed", type=int, default=2, help="replicas r0.. with the steep Zipf")
    p.add_argument("--skew", type=float, default=1.5, help="their Zipf exponent (others 0.5)")
    p.add_argument("--load", type=float, nargs="+", default=[0.6, 0.75, 0.85])
    p.add_argument("--modes", nargs="+", default=["dropless", "capacity"])
    p.add_argument("--workload", default="sharegpt")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--report-interval", type=float, default=1.0)
    p.add_argument("--window", type=float, default=10.0, help="[experts] window_s")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.skewed <= args.replicas:
        print("--skewed must be between 0 and --replicas", file=sys.stderr)
        return 2
    head = (
        f"{'mode':<9} {'load':>5} {'signal':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'E2E p99':>8} {'skewed share':>12} {'overflow':>9}  slowdown r0 / r{args.replicas - 1}"
    )
    print(
        f"{args.replicas} x {args.preset}, r0-r{args.skewed - 1} Zipf {args.skew} "
        f"(others 0.5), {args.workload}, {args.requests} requests, scored policy"
    )
    print(head)
    for mode in args.modes:
        configs = engine_configs(args, mode)
        cap = fleet_capacity(args, configs)
        for load in args.load:
            for on in (False, True):
                o = run(args, configs, load * cap, on)
                t, e = summary(o.ttft), summary(o.e2e)
                print(
                    f"{mode:<9} {load:>5.2f} {'on' if on else 'off':>6} {t['p50']:>9.3f} "
                    f"{t['p99']:>9.3f} {e['p99']:>8.2f} {o.skewed_share:>12.3f} "
                    f"{o.overflow:>9.4f}  {o.slowdowns[0]:.2f} / {o.slowdowns[-1]:.2f}",
                    flush=True,
                )
    print(f"(fair share of the skewed replicas: {args.skewed / args.replicas:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
