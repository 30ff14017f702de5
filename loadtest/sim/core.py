"""The discrete-event core of the policy simulator: virtual clock, heapq, no I/O.

It drives the SAME code as the gateway: each simulated gateway has a
``router.replicas.Registry`` of the simulated replicas (``sim://r0`` ...)
and a ``router.routing.Router`` around its policy object from
policies.registry, and every request is routed by ``Router.decide`` on the
registry's snapshot (filter -> pool -> affinity -> policy), dispatched with
``router.load.dispatch`` and settled with ``Ticket.close``; the policy's
``on_dispatch`` / ``on_complete`` / ``observe`` hooks and the TTFT / TPOT
EWMAs are fed as the gateway feeds them. Only the replicas are modelled
(loadtest/sim/queue_model.py, or the engine model of loadtest/engine/).

Cost per request: a few heap operations and one decision. The decision
filters the fleet (O(N) whatever the policy: ~0.3 ms at 1,000 replicas,
``dp-router simulate --bench-decisions``), and full-scan policies add their
scan.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.engine.engine import DEFAULT_PRESET
from loadtest.sim.queue_model import PrefixCache, QueueModel
from loadtest.sim.workload import SimArrival, SimTurn
from policies.base import BasePolicy, RouteRequest
from policies.load import DEFAULT_LOAD_BOUND_EPSILON, Outcome
from policies.prefix import BLOCK_TOKENS
from router.config import ReplicaConfig
from router.load import Ticket, dispatch
from router.replicas import Registry
from router.routing import NoRoute, Router

# Event kinds, ordered so that at equal times completions free capacity
# before new arrivals look at the load.
_DONE, _FIRST, _STEP, _REPORT, _ARRIVE = range(5)
MODEL = "sim"


@dataclass
class SimConfig:
    replicas: int = 8
    service: str = "exp"  # exp | lognormal | engine
    mu: float = 1.0  # exp: service rate per slot
    slots: int = 1  # queue servers: requests in service at once
    slow_factor: float = 1.0  # replica r0 is this much slower
    slow_count: int = 1
    report_interval: float = 0.0  # > 0: replicas report waiting+running (and KV) this often
    warmup: float = 0.1  # fraction of requests (by arrival) left out of the statistics
    cache_blocks: int = 0  # queue servers: per-replica prefix cache in blocks (0: none)
    engine_preset: str = DEFAULT_PRESET
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # The output estimate the gateway would use (RouteRequest.expected_output_tokens):
    # "mean" = the workload's mean output (an EWMA's steady state), "oracle" = exact.
    expected_output: str = "mean"
    mean_output: float = 100.0
    # Sticky sessions: each conversation is a session, its pin shared by every
    # simulated gateway (as through Redis) and kept by the gateway's affinity
    # rules (router/routing.py); off: every turn is placed by the policy alone.
    sessions: bool = False
    load_bound_epsilon: float = DEFAULT_LOAD_BOUND_EPSILON


@dataclass
class SimResult:
    policy: str
    measured: int
    ttft: list[float]
    e2e: list[float]
    per_replica: list[int]
    per_replica_e2e: list[float]  # mean end-to-end per replica (measured requests)
    # Prefix-cache hit rate in tokens at first admission: the rate routing
    # can change (re-admissions after a preemption are in readmit_hit).
    cache_hit: float | None
    backlog_mid: int
    backlog_end: int
    # Requests in system per replica at each tenth of the arrivals (10 rows).
    checkpoints: list[list[int]]
    arrivals: int
    sim_time: float
    wall_s: float
    reasons: dict[str, int]

    # Replicas whose waiting queue never emptied during the second half of the
    # arrivals while their backlog grew (see ``unstable``).
    undrained: list[int] = field(default_factory=list)
    readmit_hit: float | None = None  # hit rate of re-admissions after a preemption
    preemptions: int = 0
    # Requests the engine refused (could never fit in its KV cache: vLLM's
    # 400); not in the latencies; a refused turn ends its conversation.
    rejected: int = 0
    # With sessions: placements by X-Dp-Session value (hit, new, repinned:<reason>).
    sessions: dict[str, int] = field(default_factory=dict)

    @property
    def unstable(self) -> bool:
        """Some replica's queue grew without bound: no steady state to report.

        Test: a replica whose waiting queue (requests not yet in service, or
        not yet admitted by the engine) never emptied between the half-way
        arrival and the last arrival. (Not "it grew": a trace's lengths drift
        over its hour, so an overloaded queue can shrink for a while and
        still never catch up.) A stable queue empties again and again (an
        M/M/1 at rho = 0.9 is idle 10% of the time); an overloaded one never
        does once it is behind (round-robin with one replica 1.5x slower at
        load 0.8 puts that replica at 115% utilisation). A run too short to
        see a stable queue drain (rho -> 1) is reported unstable too: it has
        not reached a steady state either.
        """
        return bool(self.undrained)

    @property
    def unstable_replicas(self) -> list[int]:
        return list(self.undrained)


class _Job:
    __slots__ = ("arrival", "g", "idx", "rep", "req", "svc", "t_arr", "t_first", "ticket", "turn")
    arrival: SimArrival
    g: int  # the gateway that routed it
    idx: int
    rep: int
    req: RouteRequest
    svc: str
    t_arr: float
    ticket: Ticket
    turn: SimTurn

    def __init__(self) -> None:
        self.t_first = -1.0


class _QReplica:
    __slots__ = ("busy", "cache", "queue", "slow")

    def __init__(self, slow: float, cache_blocks: int) -> None:
        self.busy = 0
        self.queue: deque[_Job] = deque()
        self.slow = slow
        self.cache = PrefixCache(cache_blocks) if cache_blocks > 0 else None


class _EReplica:
    __slots__ = ("engine", "slow", "stepping")

    def __init__(self, engine: Any, slow: float) -> None:
        self.engine = engine
        self.slow = slow
        self.stepping = False


def _percentile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return math.nan
    k = min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))
    return sorted_xs[k]


def summary(xs: list[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 of already-sorted samples."""
    if not xs:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    return {
        "mean": sum(xs) / len(xs),
        "p50": _percentile(xs, 0.50),
        "p90": _percentile(xs, 0.90),
        "p99": _percentile(xs, 0.99),
    }


def run(
    policy: BasePolicy | Sequence[BasePolicy],
    arrivals: Iterator[SimArrival],
    total_requests: int,
    cfg: SimConfig,
    service: QueueModel | None = None,
) -> SimResult:
    """Simulate ``arrivals`` through ``policy`` over ``cfg.replicas`` modelled replicas.

    ``total_requests`` is the number of requests (turns) the workload will
    produce, for the warm-up cut and the stability probes. A sequence of
    policies means that many gateways, each with its own policy object and
    its own registry, hence its own ReplicaLoad view (in-flight, local
    correction, EWMAs), taking requests in turn and sharing only the
    replicas' load reports: the multi-gateway herding case.
    """
    wall0 = time.perf_counter()
    n = cfg.replicas
    rng = random.Random(f"sim:{cfg.seed}")
    names = [f"r{i}" for i in range(n)]
    pols = list(policy) if isinstance(policy, Sequence) else [policy]
    gws = len(pols)
    configs = tuple(
        ReplicaConfig(url=f"sim://{name}", name=name, models=(MODEL,)) for name in names
    )
    registries = [Registry(configs) for _ in range(gws)]
    routers = [Router(p, load_bound_epsilon=cfg.load_bound_epsilon) for p in pols]
    sticky = cfg.sessions
    pins: dict[str, str] = {}  # conversation -> replica, shared by the gateways
    placements: dict[str, int] = {}
    # Per gateway, replica i's live load (shared by every snapshot of the registry).
    views = [[reg.snapshot.replicas[name].load for name in names] for reg in registries]
    index = {name: i for i, name in enumerate(names)}
    slow = [cfg.slow_factor if i < cfg.slow_count else 1.0 for i in range(n)]
    engine_mode = cfg.service == "engine"
    qreps: list[_QReplica] = []
    ereps: list[_EReplica] = []
    jobs_by_id: dict[str, _Job] = {}
    if engine_mode:
        from loadtest.engine import Engine, EngineRequest, preset

        ecfg = preset(cfg.engine_preset, **cfg.engine_overrides)
        ereps = [
            _EReplica(Engine(ecfg, random.Random(f"engine:{cfg.seed}:{i}")), slow[i])
            for i in range(n)
        ]
    else:
        assert service is not None
        qreps = [_QReplica(slow[i], cfg.cache_blocks) for i in range(n)]
    observes = [getattr(p, "observe", None) for p in pols]
    on_dispatches = [p.on_dispatch for p in pols]
    on_completes = [p.on_complete for p in pols]
    oracle = cfg.expected_output == "oracle"
    mean_out = round(cfg.mean_output)

    heap: list[tuple[float, int, int, Any]] = []
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    warm = int(total_requests * cfg.warmup)
    half = total_requests // 2
    in_system = 0
    rep_in = [0] * n
    last_drain = [0.0] * n  # last time replica i had nobody waiting
    t_half = 0.0
    undrained: list[int] = []
    checkpoints: list[list[int]] = []
    tenth = {total_requests * k // 10 for k in range(1, 11)}
    backlog_mid = backlog_end = 0
    dispatched = 0
    ttfts: list[float] = []
    e2es: list[float] = []
    per_rep = [0] * n
    per_rep_sum = [0.0] * n
    reasons: dict[str, int] = {}
    rejected = 0
    now = 0.0

    if cfg.report_interval > 0:
        push(heap, (cfg.report_interval, -1, _REPORT, None))

    def start_queue(job: _Job, t: float) -> None:
        nonlocal seq
        rep = qreps[job.rep]
        rep.busy += 1
        turn = job.turn
        cached = 0
        if rep.cache is not None:
            hashes = job.req.block_hashes
            if hashes:
                cached = rep.cache.lookup_insert(hashes) * BLOCK_TOKENS
        total, first = service.sample(turn.prompt_tokens, turn.output_tokens, cached, rng)  # type: ignore[union-attr]
        total *= rep.slow
        first *= rep.slow
        seq += 1
        if first <= 0.0:
            first_token(job, t)
        else:
            push(heap, (t + first, seq, _FIRST, job))
            seq += 1
        push(heap, (t + total, seq, _DONE, job))

    def first_token(job: _Job, t: float) -> None:
        job.t_first = t
        ttft = t - job.t_arr
        load = views[job.g][job.rep]
        load.ttft.add(ttft, t)
        observe = observes[job.g]
        if observe is not None:
            observe(load.name, ttft, None, t)

    def step_engine(i: int, t: float) -> None:
        nonlocal seq
        rep = ereps[i]
        res = rep.engine.step(t)
        seq += 1
        push(heap, (t + res.duration_s * rep.slow, seq, _STEP, (i, res)))
        rep.stepping = True

    def finish(job: _Job, t: float) -> None:
        nonlocal in_system, seq
        in_system -= 1
        rep_in[job.rep] -= 1
        load = views[job.g][job.rep]
        observe = observes[job.g]
        job.ticket.close(Outcome.OK)
        out = job.turn.output_tokens
        if job.t_first < 0:
            first_token(job, t)
        if out > 1:
            tpot = (t - job.t_first) / (out - 1)
            load.tpot.add(tpot, t)
            if observe is not None:
                observe(load.name, None, tpot, t)
        on_completes[job.g](job.req, load.name, Outcome.OK, t)
        if job.idx >= warm:
            e2e = t - job.t_arr
            ttfts.append(job.t_first - job.t_arr)
            e2es.append(e2e)
            per_rep[job.rep] += 1
            per_rep_sum[job.rep] += e2e
        arr = job.arrival
        k = arr.turns.index(job.turn) if len(arr.turns) > 1 else 0
        if k + 1 < len(arr.turns):
            nxt = arr.turns[k + 1]
            seq += 1
            push(heap, (t + nxt.think_s, seq, _ARRIVE, (arr, nxt)))

    def reject(job: _Job, t: float) -> None:
        """The engine's 400: settled at once, as the gateway settles a 4xx."""
        nonlocal in_system, rejected
        rejected += 1
        in_system -= 1
        rep_in[job.rep] -= 1
        job.ticket.close(Outcome.HTTP_4XX)
        on_completes[job.g](job.req, views[job.g][job.rep].name, Outcome.HTTP_4XX, t)

    def arrive(arr: SimArrival, turn: SimTurn, t: float) -> None:
        nonlocal dispatched, in_system, backlog_mid, backlog_end, seq, t_half
        hashes = turn.hashes
        req = RouteRequest(
            MODEL,
            prompt_tokens=turn.prompt_tokens,
            max_tokens=turn.output_tokens if oracle else None,
            expected_output_tokens=turn.output_tokens if oracle else mean_out,
            prompt_text=turn.prompt_text() if hashes is None else "",
            block_hashes=hashes,
            request_id=arr.id,
        )
        g = dispatched % gws
        pin = None
        if sticky:
            req.session_key = arr.id
            pin = pins.get(arr.id)
        routed = routers[g].decide(req, pin, registries[g].snapshot, t)
        if isinstance(routed, NoRoute):
            raise RuntimeError(f"no route ({routed}) although every replica is routable")
        if sticky:
            if routed.repin is None:
                placement = "hit"
            else:
                pins[arr.id] = routed.replica.name
                placement = "new" if pin is None else f"repinned:{routed.repin.value}"
            placements[placement] = placements.get(placement, 0) + 1
        reason = routed.decision.reason
        reasons[reason] = reasons.get(reason, 0) + 1
        name = routed.replica.name
        i = index[name]
        job = _Job()
        job.arrival, job.turn, job.req, job.rep, job.t_arr, job.g = arr, turn, req, i, t, g
        job.idx = dispatched
        dispatched += 1
        job.ticket = dispatch(routed.replica.load, req.cost_tokens)
        on_dispatches[g](req, name, t)
        in_system += 1
        rep_in[i] += 1
        if dispatched in tenth:
            checkpoints.append(list(rep_in))
        if dispatched == half:
            backlog_mid, t_half = in_system, t
        if dispatched == total_requests:
            backlog_end = in_system
            if half:
                undrained.extend(j for j in range(n) if last_drain[j] < t_half)
        if engine_mode:
            rid = f"{arr.id}#{job.idx}"
            eng = ereps[i].engine
            if eng.refusal(turn.prompt_tokens, turn.output_tokens) is not None:
                reject(job, t)
                return
            job.svc = rid
            jobs_by_id[rid] = job
            eng.add_request(
                EngineRequest(
                    rid, turn.prompt_tokens, turn.output_tokens, req.block_hashes, arr.domain
                ),
                t,
            )
            if not ereps[i].stepping:
                step_engine(i, t)
        else:
            rep = qreps[i]
            if rep.busy < service.slots:  # type: ignore[union-attr]
                last_drain[i] = t
                start_queue(job, t)
            else:
                rep.queue.append(job)

    nxt_arr = next(arrivals, None)
    while True:
        if heap and (nxt_arr is None or heap[0][0] <= nxt_arr.t):
            now, _, kind, payload = pop(heap)
            if kind == _DONE:
                job = payload
                finish(job, now)
                rep = qreps[job.rep]
                rep.busy -= 1
                if rep.queue:
                    start_queue(rep.queue.popleft(), now)
                if not rep.queue:
                    last_drain[job.rep] = now
            elif kind == _FIRST:
                first_token(payload, now)
            elif kind == _STEP:
                i, res = payload
                ereps[i].stepping = False
                for rid in res.emitted:
                    job = jobs_by_id[rid]
                    if job.t_first < 0:
                        first_token(job, now)
                for rid in res.finished:
                    finish(jobs_by_id.pop(rid), now)
                eng = ereps[i].engine
                if eng.num_waiting == 0:
                    last_drain[i] = now
                if eng.has_work():
                    step_engine(i, now)
            elif kind == _ARRIVE:
                arr, turn = payload
                arrive(arr, turn, now)
            else:  # _REPORT
                for i in range(n):
                    if engine_mode:
                        e = ereps[i].engine
                        q, kv = float(e.num_running + e.num_waiting), e.kv_usage()
                    else:
                        r = qreps[i]
                        q, kv = float(r.busy + len(r.queue)), None
                    for view in views:
                        view[i].record_report(q, kv, now)
                if nxt_arr is not None or in_system:
                    seq += 1
                    push(heap, (now + cfg.report_interval, seq, _REPORT, None))
        elif nxt_arr is not None:
            now = nxt_arr.t
            arrive(nxt_arr, nxt_arr.turns[0], now)
            nxt_arr = next(arrivals, None)
        else:
            break

    ttfts.sort()
    e2es.sort()
    readmit_hit: float | None = None
    preemptions = 0
    if engine_mode:
        engines = [r.engine for r in ereps]
        q = sum(e.prefix_queries for e in engines)
        cache_hit: float | None = sum(e.prefix_hits for e in engines) / q if q else None
        rq = sum(e.readmit_queries for e in engines)
        readmit_hit = sum(e.readmit_hits for e in engines) / rq if rq else None
        preemptions = sum(e.preemptions for e in engines)
    else:
        caches = [r.cache for r in qreps if r.cache is not None]
        q = sum(c.queries for c in caches)
        cache_hit = sum(c.hits for c in caches) / q if q else None
    return SimResult(
        policy=getattr(pols[0], "name", type(pols[0]).__name__),
        measured=len(e2es),
        ttft=ttfts,
        e2e=e2es,
        per_replica=per_rep,
        per_replica_e2e=[
            s / c if c else math.nan for s, c in zip(per_rep_sum, per_rep, strict=True)
        ],
        cache_hit=cache_hit,
        backlog_mid=backlog_mid,
        backlog_end=backlog_end,
        checkpoints=checkpoints,
        undrained=undrained,
        arrivals=dispatched,
        sim_time=now,
        wall_s=time.perf_counter() - wall0,
        reasons=reasons,
        readmit_hit=readmit_hit,
        preemptions=preemptions,
        rejected=rejected,
        sessions=placements,
    )
