"""``dp-router simulate``: routing policies side by side on a virtual clock.

Every ``--policy`` runs on the same workload, seed and fleet, through the
same routing pipeline and load accounting as the gateway (loadtest/sim/core.py),
and one table compares them: TTFT and end-to-end mean/p50/p99, per-replica
share, imbalance, cache hit rate. A policy whose queue grows without bound is
reported as ``unstable``, not as a latency.

Examples::

    dp-router simulate --policies round_robin,p2c,queue_depth \\
        --replicas 8 --load 0.8 --workload azure-conv --service lognormal
    dp-router simulate --service engine --workload mooncake --requests 12000 \\
        --policies queue_depth,prefix_affinity --load 0.95   # the trace at its own timestamps
    dp-router simulate --policy p2c:d=3,replacement=true --replicas 1000 --requests 1000000
    dp-router simulate --theory-checks          # against queueing theory, full size
    dp-router simulate --bench-decisions        # microseconds per pick
    dp-router simulate --quality-checks         # SGLang and llm-d prefix benchmarks

``--load RHO`` is the offered load as a fraction of the fleet's saturation
throughput, slow replicas included: for ``exp`` sum(slots x mu / slowdown);
for ``lognormal`` slots / (mean service time of the workload's mean lengths,
no cache hits) per replica; for ``engine`` a calibration run of the workload
on one engine at saturation (no prefix reuse). Prefix-cache hits make the
real capacity larger, so a prefix-heavy workload at --load 0.8 is lighter
than 0.8.

Arrivals: a trace (azure-conv, azure-code, mooncake, a trace file) arrives at
its own timestamps, divided by the speed-up that brings the run's requests to
the asked rate (``--speed X`` gives that factor directly, as in ``dp-router
loadtest``): its bursts and lulls are kept. ``--arrivals poisson`` resamples
them as Poisson arrivals at the same rate; synthetic workloads are Poisson.
The report's header says which.

The engine reports per policy: the prefix-cache hit rate in tokens at first
admission (what routing changes; a preempted request's re-admission finds
its own blocks and is reported apart), preemptions, and requests rejected
because they could never fit in a replica's KV cache (vLLM's 400). How the
engine presets were derived and how far to trust them: docs/simulator.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

from loadtest.engine.engine import DEFAULT_PRESET
from loadtest.sim import core
from loadtest.sim.queue_model import QueueModel, make_queue_model
from loadtest.sim.workload import (
    ARRIVALS,
    BUILTIN,
    SimArrival,
    arrival_mode,
    open_workload,
    trace_rate,
)
from policies import registry

# Requests read to estimate a workload's mean lengths and turns: the whole
# run up to this many (a trace's first 2,000 rows can differ from its mean by
# 25%: Azure conv's do, which made "--load 0.8" a 0.64 load).
MAX_SAMPLE_REQUESTS = 50_000
# Engine calibration: this many requests at once on one engine; throughput
# is measured between the 10th and 90th percentile of completions, where
# the batch is full.
CALIBRATION_REQUESTS = 600


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value;key=value`` (values: int, float, true/false,
    inf, JSON for tables and lists, else text). Commas also separate
    parameters outside JSON values: ``p2c:d=3,replacement=true``,
    ``scored:weights={"queue": 1, "prefix": 4};filters=[]``."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in _split_params(rest):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"policy parameter {item!r} is not key=value")
        params[key.strip()] = _value(raw.strip())
    return name.strip(), params


def _split_params(rest: str) -> list[str]:
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch in ",;" and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i for i in items if i.strip()]


def _value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("inf", "infinity"):
        return math.inf
    if raw[:1] in ("{", "["):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"policy parameter value {raw!r} is not valid JSON: {exc}") from None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def split_policies(specs: str) -> list[str]:
    """``--policies a,b:k=v,k2=v2,c`` -> ["a", "b:k=v,k2=v2", "c"].

    A comma starts a new policy unless what follows is a ``key=value``
    parameter of the previous one (no ``:`` before its ``=``) or sits inside
    a JSON value; ``--policy`` (repeatable) takes any spec as it is.
    """
    out: list[str] = []
    for item in _split_params(specs.replace(";", "\0")):
        item = item.replace("\0", ";").strip()
        head = item.split("=", 1)[0]
        if out and "=" in item and ":" not in head:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def policy_label(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    return (
        name
        + ":"
        + ",".join(
            f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict | list) else v}"
            for k, v in params.items()
        )
    )


def workload_means(name: str, seed: int, requests: int) -> tuple[float, float, float]:
    """(mean prompt tokens, mean output tokens, mean turns per conversation) of the
    first ``requests`` requests (at most MAX_SAMPLE_REQUESTS): the run's own."""
    convs = open_workload(
        name, seed=seed, requests=min(requests, MAX_SAMPLE_REQUESTS), rate=1.0, arrivals="poisson"
    )
    p = o = turns = convs_n = 0
    for arr in convs:
        convs_n += 1
        for t in arr.turns:
            p += t.prompt_tokens
            o += t.output_tokens
            turns += 1
    if turns == 0:
        raise ValueError(f"workload {name!r} is empty")
    return p / turns, o / turns, turns / convs_n


def engine_capacity(
    preset: str, workload: str, seed: int, overrides: dict[str, Any], requests: int = 600
) -> float:
    """Requests per second one engine sustains on this workload's lengths.

    Calibrated on CALIBRATION_REQUESTS requests taken at an even stride from
    the run's first ``requests`` (not its first 600: a trace's head is not
    its mean), all queued at once, without prefix hashes; requests the
    engine would refuse (larger than its KV cache) are left out, as in the run.
    """
    from loadtest.engine import preset as make_preset
    from loadtest.engine import saturated_throughput

    total = min(requests, MAX_SAMPLE_REQUESTS)
    stride = max(1, total // CALIBRATION_REQUESTS)
    convs = open_workload(workload, seed=seed, requests=total, rate=1.0, arrivals="poisson")
    turns = (
        (t.prompt_tokens, t.output_tokens, None)
        for arr in itertools.islice(convs, 0, None, stride)
        for t in arr.turns
    )
    rate = saturated_throughput(make_preset(preset, **overrides), turns, seed)
    if rate is None:
        raise ValueError(f"no request of {workload!r} fits in a {preset!r} engine's KV cache")
    return rate


def engine_gpus(args: argparse.Namespace) -> int:
    """GPUs per replica: TP (the fewest that fit when not given) x PP."""
    from loadtest.engine import preset

    cfg = preset(args.engine_preset, **engine_layout(args))
    return cfg.tp * cfg.pp


def engine_layout(args: argparse.Namespace) -> dict[str, Any]:
    """The parallel layout of each replica: 8 x TP1 and 2 x TP4 use the same GPUs."""
    return {"tp": args.engine_tp, "pp": args.engine_pp, "interconnect": args.engine_interconnect}


def _tpot(res: Any, mean_output: float) -> float:
    """Mean time per output token after the first: (E2E - TTFT) / (output - 1)."""
    t, e = core.summary(res.ttft), core.summary(res.e2e)
    if mean_output <= 1 or math.isnan(t["mean"]) or math.isnan(e["mean"]):
        return math.nan
    return (e["mean"] - t["mean"]) / (mean_output - 1)


def fleet_capacity(args: argparse.Namespace, service: QueueModel | None) -> float:
    """Saturation throughput of the fleet in requests per second."""
    slow = [args.slow_replica if i < 1 else 1.0 for i in range(args.replicas)]
    if args.service == "engine":
        one = engine_capacity(
            args.engine_preset, args.workload, args.seed, engine_layout(args), args.requests
        )
        return sum(one / s for s in slow)
    assert service is not None
    if args.service == "exp":
        per = service.slots * args.mu
    else:
        p, o, _ = workload_means(args.workload, args.seed, args.requests)
        per = service.slots / service.mean(p, o)
    return sum(per / s for s in slow)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = list(args.policy or [])
    for group in args.policies or []:
        names.extend(split_policies(group))
    specs = [parse_policy(s) for s in (names or [registry.DEFAULT_POLICY])]
    for name, params in specs:
        registry.create(name, params)  # validate every policy before running any
    service = (
        None
        if args.service == "engine"
        else make_queue_model(args.service, slots=args.slots, mu=args.mu)
    )
    mode = arrival_mode(args.workload, args.arrivals)
    mean_p, mean_o, turns = workload_means(args.workload, args.seed, args.requests)
    capacity = fleet_capacity(args, service)
    speed: float | None = None
    if args.speed is not None:
        native = trace_rate(args.workload, args.requests) if mode == "trace" else None
        if native is None:
            raise ValueError("--speed replays a trace's own timestamps: give a trace workload")
        if args.speed <= 0:
            raise ValueError("--speed must be > 0")
        speed, rate = args.speed, native * args.speed
    else:
        rate = args.rate if args.rate is not None else args.load * capacity
    if mode == "trace" and speed is None:
        native = trace_rate(args.workload, args.requests)
        assert native is not None
        speed = rate / native
    conv_rate = rate / turns
    cache_blocks = args.cache_blocks
    if cache_blocks is None:
        cache_blocks = 0 if args.service == "exp" else 4096
    out = []
    for name, params in specs:
        cfg = core.SimConfig(
            replicas=args.replicas,
            service=args.service,
            mu=args.mu,
            slots=args.slots,
            slow_factor=args.slow_replica,
            report_interval=args.report_interval,
            warmup=args.warmup,
            cache_blocks=cache_blocks,
            engine_preset=args.engine_preset,
            engine_overrides=engine_layout(args),
            seed=args.seed,
            expected_output=args.expected_output,
            mean_output=mean_o,
            sessions=args.sessions,
        )
        conv: Iterator[SimArrival] = open_workload(
            args.workload,
            seed=args.seed,
            requests=args.requests,
            rate=conv_rate,
            speed=speed,
            arrivals=mode,
        )
        gateways = [registry.create(name, params, seed=args.seed + g) for g in range(args.gateways)]
        res = core.run(gateways, conv, args.requests, cfg, service)
        total = sum(res.per_replica) or 1
        shares = [c / total for c in res.per_replica]
        mean_share = 1.0 / args.replicas
        rec: dict[str, Any] = {
            "policy": policy_label(name, params),
            "workload": args.workload,
            "service": args.service,
            "replicas": args.replicas,
            "gateways": args.gateways,
            "report_interval": args.report_interval,
            "seed": args.seed,
            "rate": rate,
            "load": rate / capacity,
            "arrivals": mode,
            "speed": speed,
            "engine_preset": args.engine_preset if args.service == "engine" else None,
            "slow_replica": args.slow_replica,
            "requests": res.arrivals,
            "measured": res.measured,
            "unstable": res.unstable,
            "unstable_replicas": [f"r{i}" for i in res.unstable_replicas],
            "backlog_mid": res.backlog_mid,
            "backlog_end": res.backlog_end,
            "capacity_rps": capacity,
            "gpus": args.replicas * engine_gpus(args) if args.service == "engine" else None,
            "tpot_mean_s": _tpot(res, mean_o),
            "ttft": core.summary(res.ttft),
            "e2e": core.summary(res.e2e),
            "share": shares,
            "imbalance": max(shares) / mean_share if shares else math.nan,
            "replica_e2e_mean": res.per_replica_e2e,
            "cache_hit": res.cache_hit,
            "readmit_hit": res.readmit_hit,
            "preemptions": res.preemptions,
            "rejected": res.rejected,
            "sessions": "sticky" if args.sessions else "none",
            "session_placements": res.sessions,
            "reasons": res.reasons,
            "sim_time_s": res.sim_time,
            "wall_s": res.wall_s,
            "mean_prompt_tokens": mean_p,
            "mean_output_tokens": mean_o,
        }
        out.append(rec)
        if args.json:
            print(json.dumps(rec, allow_nan=True), flush=True)
    return out


def _ms(x: float, unit_s: bool) -> str:
    if math.isnan(x):
        return "-"
    return f"{x * 1000:.0f}" if unit_s else f"{x:.3f}"


def format_table(recs: list[dict[str, Any]]) -> str:
    if not recs:
        return ""
    r0 = recs[0]
    unit_s = r0["service"] != "exp"  # exp runs are in units of the mean service time
    unit = "ms" if unit_s else "x 1/mu"
    arrivals = r0["arrivals"]
    if arrivals == "trace":
        arrivals += f" (its own timestamps x{r0['speed']:.3g} speed)"
    head = (
        f"workload={r0['workload']} service={r0['service']} replicas={r0['replicas']} "
        + (f"preset={r0['engine_preset']} " if r0.get("engine_preset") else "")
        + f"arrivals={arrivals} "
        f"rate={r0['rate']:.3f}/s load={r0['load']:.2f} seed={r0['seed']} "
        f"requests={r0['requests']} slow_replica={r0['slow_replica']:g} "
        f"gateways={r0['gateways']} report_interval={r0['report_interval']:g} "
        f"sessions={r0.get('sessions', 'none')} "
        f"capacity={r0['capacity_rps']:.2f} req/s"
        + (f" gpus={r0['gpus']}" if r0.get("gpus") else "")
        + "\n"
        f"latencies in {unit}; share = % of requests; imbalance = max share / mean share; "
        "hit = prefix-cache hit rate in tokens at first admission"
        + ("; preempt = preemptions; rej = requests refused (never fit)" if unit_s else "")
    )
    engine = r0["service"] == "engine"
    cols = [
        "policy",
        "ttft mean",
        "p50",
        "p99",
        "e2e mean",
        "p50",
        "p99",
        "tpot",
        "imbal",
        "r0 share",
        "fast e2e",
        "hit",
        *(["preempt", "rej"] if engine else []),
        "wall s",
    ]
    rows = [cols]
    for r in recs:
        t, e = r["ttft"], r["e2e"]
        fast = [x for x in r["replica_e2e_mean"][1:] if not math.isnan(x)]
        fast_mean = sum(fast) / len(fast) if fast else math.nan
        if r["unstable"]:
            lat = ["unstable"] + ["-"] * 6
            fast_s = "-"
        else:
            lat = [
                _ms(t["mean"], unit_s),
                _ms(t["p50"], unit_s),
                _ms(t["p99"], unit_s),
                _ms(e["mean"], unit_s),
                _ms(e["p50"], unit_s),
                _ms(e["p99"], unit_s),
                _ms(r["tpot_mean_s"], unit_s) if unit_s else "-",
            ]
            fast_s = _ms(fast_mean, unit_s)
        hit = "-" if r["cache_hit"] is None else f"{r['cache_hit']:.1%}"
        rows.append(
            [
                r["policy"],
                *lat,
                f"{r['imbalance']:.2f}",
                f"{r['share'][0]:.1%}",
                fast_s,
                hit,
                *([str(r["preemptions"]), str(r["rejected"])] if engine else []),
                f"{r['wall_s']:.1f}",
            ]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    lines = [head]
    for k, row in enumerate(rows):
        cells = [
            str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
            for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if r0["replicas"] <= 16:
        lines.append("")
        lines.append("per-replica share (%):")
        for r in recs:
            shares = " ".join(f"{s * 100:5.1f}" for s in r["share"])
            lines.append(f"  {r['policy']:<{widths[0]}}  {shares}")
    lines.append(
        "(r0 share: the slow replica's share when --slow-replica is set; fast e2e: mean "
        "end-to-end on the other replicas)"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router simulate",
        description="Discrete-event simulator: routing policies side by side on one workload.",
    )
    p.add_argument("--policy", action="append", help="policy name[:k=v,...] (repeatable)")
    p.add_argument(
        "--policies",
        action="append",
        metavar="A,B,...",
        help="several policies at once, comma-separated (with --policy: all of them)",
    )
    p.add_argument("--replicas", type=int, default=8)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--load", type=float, default=0.8, help="fraction of saturation throughput")
    g.add_argument("--rate", type=float, help="requests per second (overrides --load)")
    g.add_argument(
        "--speed",
        type=float,
        help="trace replay: this many times the trace's own pace (as dp-router loadtest --speed)",
    )
    p.add_argument(
        "--arrivals",
        choices=ARRIVALS,
        default=None,
        help="trace: a trace's own timestamps, rescaled to the load (default for traces); "
        "poisson: resampled (default for the others)",
    )
    p.add_argument("--requests", type=int, default=20_000)
    names = ", ".join(itertools.chain(BUILTIN, ["<loadtest workload>", "PATH"]))
    p.add_argument("--workload", default="exp", help=f"workload: {names}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sessions",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="sticky sessions: each conversation pinned to a replica by the gateway's "
        "affinity rules (pins shared by all --gateways, as through Redis)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per policy on stdout")
    p.add_argument(
        "--slow-replica",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="replica r0 is FACTOR times slower",
    )
    p.add_argument("--service", choices=("exp", "lognormal", "engine"), default="exp")
    p.add_argument("--mu", type=float, default=1.0, help="exp: service rate per slot")
    p.add_argument("--slots", type=int, default=1, help="queue servers: requests served at once")
    p.add_argument(
        "--cache-blocks",
        type=int,
        default=None,
        help="queue servers: prefix cache per replica, in 64-token blocks "
        "(default 4096 for lognormal, 0 for exp)",
    )
    p.add_argument(
        "--engine-preset",
        default=DEFAULT_PRESET,
        help="loadtest.engine preset: llama3-8b (default), llama2-7b, llama2-70b, "
        "+moe or +moe256 variants (docs/simulator.md)",
    )
    p.add_argument(
        "--engine-tp",
        type=int,
        default=None,
        help="tensor-parallel GPUs per replica (default: the fewest the preset fits on)",
    )
    p.add_argument("--engine-pp", type=int, default=1, help="pipeline stages per replica")
    p.add_argument("--engine-interconnect", default="nvlink", choices=("nvlink", "pcie5"))
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateways sharing the replicas (own policy and in-flight view each; "
        "requests alternate between them; only load reports are shared)",
    )
    p.add_argument(
        "--report-interval",
        type=float,
        default=0.0,
        help="seconds between replica load reports (0: none, in-flight only)",
    )
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of requests not measured")
    p.add_argument(
        "--expected-output",
        choices=("mean", "oracle"),
        default="mean",
        help="output estimate the gateway routes on: the workload mean, or exact",
    )
    p.add_argument(
        "--theory-checks",
        action="store_true",
        help="check the simulator against queueing theory at full size (minutes)",
    )
    p.add_argument("--quick", action="store_true", help="with --theory-checks: CI sizes")
    p.add_argument("--bench-decisions", action="store_true", help="microseconds per pick")
    p.add_argument(
        "--quality-checks",
        action="store_true",
        help="SGLang's and llm-d's prefix-routing benchmarks with the engine model",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.theory_checks:
            from loadtest.sim import theory

            results = []
            for c in theory.checks(
                "ci" if args.quick else "full", progress=lambda s: print(s, file=sys.stderr)
            ):
                results.append(c)
            print(theory.format_checks(results))
            return 0 if all(c.ok for c in results) else 1
        if args.bench_decisions:
            from loadtest.sim import decisions

            print(decisions.format_bench(decisions.bench(args.seed)))
            return 0
        if args.quality_checks:
            from loadtest.sim import quality

            return quality.main(args)
        if args.replicas < 1 or args.requests < 1 or args.gateways < 1:
            raise ValueError("--replicas, --requests and --gateways must be >= 1")
        recs = run_all(args)
    except ValueError as exc:
        print(f"dp-router simulate: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(format_table(recs))
    return 0
