"""``dp-router demo``: a simulated MoE fleet, the gateway, one workload, several policies.

The fleet: N simulated replicas running the engine model (loadtest/engine,
``llama3-8b+moe``: top-2 of 8 experts, expert popularity Zipf(0.5)), the
last of which routes its tokens with a steep Zipf(1.5): its busiest expert
takes ~4x the mean instead of ~1.8x, the state of an expert-parallel
deployment whose expert placement no longer fits the traffic. Nothing else
differs, yet once its batches grow its MoE layers wait for that expert and
it serves about half as fast (loadtest/engine/moe.py): the heterogeneity a
good policy must route around, and one the gateway can see in the replica's
per-expert counters (router/experts.py) before the queue shows it.

What it does, in order, for each run (a policy, maybe with parameters):

1. starts the N replicas in ONE subprocess (one event loop, so on a small
   machine the replicas do not fight the gateway for CPU): ``dp-router
   replica --port 0 ...`` with the last replica's expert skew set
   (:func:`replicas_main`);
2. starts the gateway as a subprocess from a generated TOML config with that
   policy and waits for ``GET /readyz``;
3. runs the same multi-turn workload (same seed, same arrivals) through it
   with the in-process load generator, and takes one ``dp-router top`` frame
   when the arrivals stop (the streams still running);
4. reads the gateway's ``GET /admin/experts``: each replica's expert
   imbalance and the routing slowdown derived from it;
5. stops the gateway, then the replicas.

Replicas are restarted per run on purpose: their prefix caches and counters
start cold every time, so no policy benefits from the previous one's warm
cache. At the end it prints the comparison table (TTFT and E2E p50/p99,
throughput, errors, per-replica share, prefix-cache hit rate), the experts
table and the last run's ``dp-router top`` frame and, with ``--out``, writes
results.json, summary.md and charts.

Every child is stopped on exit, on Ctrl-C and on SIGTERM; children also get
SIGTERM from the kernel if the demo itself is killed (loadtest/procs.py), so
a demo never leaves servers behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest import procs
from loadtest.engine.engine import DEFAULT_REPLICA_PRESET, EngineConfig
from loadtest.loadgen import LoadConfig, conversations, run_load
from loadtest.procs import HOST, StartError
from loadtest.replica.config import SimReplicaConfig
from loadtest.report import RunResult, comparison_table, write_plots, write_results
from loadtest.workloads import Conversation

MODEL = "dp-demo"
ENGINE_PRESET = DEFAULT_REPLICA_PRESET  # "llama3-8b+moe"
# The skewed replica's Zipf exponent of expert popularity (the preset's is
# 0.5). 1.5 over 8 experts puts 52% of the routed tokens on the busiest
# expert, 4.2x its fair share (loadtest/engine/moe.py zipf_max_over_mean);
# loadtest/expert_compare.py uses the same value.
SKEW_ZIPF = 1.5
# vLLM's default is 128 running sequences; 32 bounds what an overloaded
# replica does to its streams: beyond it requests wait (visible in TTFT and to
# queue-aware policies) instead of every stream slowing down, so the skewed
# replica's tokens take at most ~45 ms and a run's tail stays short. 32 is
# still past the point where the skew costs: an expert's GEMM is bound on
# loading its weights below 16 tokens (MoEConfig.min_tokens_per_expert), so
# at 32 sequences (64 routed tokens) a balanced replica's busiest expert sits
# at that floor while the skewed one's takes 2x as long; at 8 sequences
# neither would differ.
MAX_NUM_SEQS = 32


@dataclass(frozen=True, slots=True)
class Run:
    """One row of the comparison: a policy and its ``[routing.params]``."""

    label: str
    policy: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def expert_signal(self) -> bool | None:
        """Whether this run routes on the expert slowdown (None: the policy cannot)."""
        if self.policy != "scored":
            return None
        return bool(self.params.get("expert_capacity", True))


# The runs to compare, in order; only registered policies are used, so the
# demo keeps working while policies come and go. The scored pair differs in
# the expert-aware signal alone: the same filters, scorers and weights.
DEFAULT_RUNS = (
    Run("round_robin", "round_robin"),
    Run("queue_depth", "queue_depth"),
    Run("prefix_affinity", "prefix_affinity"),
    Run("scored, experts off", "scored", {"expert_capacity": False}),
    Run("scored, experts on", "scored", {"expert_capacity": True}),
)
# --quick: the blind baseline against the expert-aware policy.
QUICK_RUNS = ("round_robin", "scored, experts on")
DEFAULT_REPLICAS = 3
DEFAULT_DURATION_S = 7.0  # per run: 5 runs + start-up + tails ~ one minute
QUICK_DURATION_S = 4.0  # 2 runs + start-up + tails ~ 15 s
# Output lengths are clamped so that the last requests of a run (on the
# skewed replica at its batch limit: ~45 ms x 128 = 6 s) do not double the
# demo's wall time; the chat workload's lognormal tail otherwise reaches
# thousands of tokens.
MAX_OUTPUT_TOKENS = 128
# Offered load as a share of the fleet's capacity as engine_capacity
# measures it (full batches, nothing cached: a pessimistic figure, and a 7 s
# run is shorter than a steady state anyway). At 0.9 a policy that
# sees the skew keeps every replica below its batch limit, while round-robin
# gives the skewed replica 1/N of the traffic, ~1.5x what it can serve (with
# 3 replicas its capacity is ~1/5 of the fleet's), so its decode steps
# stretch for the whole run: the difference the demo exists to show.
TARGET_UTILIZATION = 0.9
# Conversations sampled from the workload to estimate its mean cost.
RATE_SAMPLE = 300
# How long to wait for the gateway's admin API at the end of a run.
ADMIN_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    replicas: int
    runs: tuple[Run, ...]
    duration_s: float
    rate: float
    seed: int
    workload: str
    out: Path | None
    engine: str = ENGINE_PRESET
    skew: float | None = SKEW_ZIPF  # None: no replica skewed (a dense preset, one replica)
    max_num_seqs: int = MAX_NUM_SEQS


@dataclass(slots=True)
class RunOutput:
    result: RunResult
    top: str  # one ``dp-router top --once`` frame, taken when arrivals stopped


def skewed_name(n: int) -> str:
    return f"r{n}-skewed"


def replica_names(n: int, skewed: bool = True) -> list[str]:
    """Names as the gateway reports them; the skewed one (the last) says so."""
    names = [f"r{i + 1}" for i in range(n)]
    if skewed and n > 1:
        names[-1] = skewed_name(n)
    return names


def gateway_config(
    run: Run | str,
    seed: int,
    port: int,
    admin_port: int,
    urls: list[str],
    skewed: bool = True,
) -> str:
    """The TOML the gateway runs with (the format: config/example.toml)."""
    if isinstance(run, str):
        run = Run(run, run)
    replicas = [
        {"url": url, "name": name, "models": [MODEL]}
        for name, url in zip(replica_names(len(urls), skewed), urls, strict=True)
    ]
    sections: dict[str, Any] = {
        # The demo prints its own report; 2 s is enough to drain a demo's streams.
        "server": {"access_log": False, "shutdown_timeout_s": 2.0},
        # Slow start would ramp every fresh replica for 30 s: longer than a
        # demo run, and the same for all policies, so it only blurs them.
        "health": {"interval_s": 1.0, "slow_start_s": 0.0},
        "routing": {"policy": run.policy, "seed": seed},
    }
    if run.params:
        sections["routing.params"] = dict(run.params)
    return procs.gateway_toml(
        replicas,
        port=port,
        admin_port=admin_port,
        comment="generated by dp-router demo",
        **sections,
    )


# ---------------------------------------------------------------------------
# the fleet


def replica_argv(opts: DemoOptions) -> list[str]:
    """The replica process's command line (:func:`replicas_main`)."""
    entry = "import sys; from loadtest.demo import replicas_main; sys.exit(replicas_main())"
    argv = [sys.executable, "-c", entry]
    if opts.skew is not None and opts.replicas > 1:
        argv += ["--skew", str(opts.skew)]
    argv += ["--host", HOST, "--model", MODEL, "--engine", opts.engine, "--seed", str(opts.seed)]
    argv += ["--engine-opt", f"max_num_seqs={opts.max_num_seqs}"]
    # Port 0: the replica process binds free ports and reports them (no race).
    return argv + ["--port", "0"] * opts.replicas


def skew_last(cfg: SimReplicaConfig, zipf_s: float) -> SimReplicaConfig:
    """``cfg`` with its experts' popularity Zipf(``zipf_s``)."""
    from loadtest.engine import preset

    if cfg.engine is None:
        raise ValueError("--skew needs the engine model, not --paced")
    base = preset(
        cfg.engine,
        tp=cfg.engine_tp,
        pp=cfg.engine_pp,
        interconnect=cfg.engine_interconnect,
        **cfg.engine_overrides,
    ).moe
    if base is None:
        raise ValueError(f"--skew needs an MoE preset (+moe, +moe256), not {cfg.engine!r}")
    moe = dataclasses.replace(base, zipf_s=zipf_s)
    return dataclasses.replace(cfg, engine_overrides={**cfg.engine_overrides, "moe": moe})


def replicas_main(argv: list[str] | None = None) -> int:
    """The fleet's process: ``dp-router replica ARGS``, the last replica's
    expert popularity Zipf(Z) with a leading ``--skew Z``.

    Why not ``dp-router replica`` itself: its flags give every replica of a
    process one engine config, and the Zipf exponent lives in the nested
    MoEConfig, which ``--engine-opt KEY=VALUE`` cannot reach. So this builds
    the configs with the replica CLI's own parser, changes the last one, and
    serves them with its own loop: ready lines, signals and shutdown are the
    replica CLI's.
    """
    import uvloop

    from loadtest.replica import cli

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--skew", type=float)
    known, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = cli.build_parser().parse_args(rest)
    try:
        cfgs = cli.configs_from_args(args)
        if known.skew is not None:
            cfgs[-1] = skew_last(cfgs[-1], known.skew)
        uvloop.run(cli.serve(args.host, args.port, cfgs))
    except (ValueError, ImportError) as e:  # a bad preset or option
        print(f"dp-router demo replicas: {e}", file=sys.stderr)
        return 2
    return 0


@contextlib.asynccontextmanager
async def fleet(opts: DemoOptions, workdir: Path) -> AsyncIterator[list[str]]:
    """N replicas in one process, the last one skewed; yields their URLs."""
    argv = replica_argv(opts)
    child = await procs.spawn("replicas", argv, log=workdir / "replicas.log", stdout_pipe=True)
    try:
        ports = await child.ready_ports(opts.replicas)
        yield [f"http://{HOST}:{p}" for p in ports]
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def gateway(
    run: Run, opts: DemoOptions, urls: list[str], workdir: Path, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[str, str]]:
    """The gateway running ``run`` in front of ``urls``; yields its base and admin URLs."""
    port, admin_port = procs.free_ports(2)
    slug = run.label.replace(",", "").replace(" ", "-")
    config = workdir / f"gateway-{slug}.toml"
    config.write_text(
        gateway_config(run, opts.seed, port, admin_port, urls, skewed=opts.skew is not None)
    )
    argv = procs.dp_router("serve", "--config", str(config))
    child = await procs.spawn(f"gateway ({run.label})", argv, log=workdir / f"gateway-{slug}.log")
    try:
        base = f"http://{HOST}:{port}"
        await child.wait_http(base + "/readyz", session=session)
        yield base, f"http://{HOST}:{admin_port}"
    finally:
        await child.stop()


# ---------------------------------------------------------------------------
# one run


async def expert_views(session: aiohttp.ClientSession, admin: str) -> dict[str, dict[str, Any]]:
    """Per replica, what the gateway's GET /admin/experts says now; {} if it cannot."""
    try:
        timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)
        async with session.get(admin + "/admin/experts", timeout=timeout) as resp:
            if resp.status != 200:
                return {}
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for view in body.get("replicas", []):
        out[str(view["replica"])] = {
            k: view.get(k) for k in ("imbalance", "slowdown", "overflow_rate", "hot")
        }
    return out


async def top_frame(admin: str, delay_s: float = 0.0) -> str:
    """One ``dp-router top --once`` frame of the gateway, ``delay_s`` from now
    (top's blocking client, in a thread)."""
    from router import top

    await asyncio.sleep(delay_s)

    def frame() -> str:
        try:
            data = top.snapshot(admin, "")
        except (OSError, ValueError) as exc:
            return f"dp-router top: cannot read {admin}: {exc}\n"
        return top.render(admin, data, colour=False, clock=time.strftime("%H:%M:%S"))

    return await asyncio.to_thread(frame)


async def run_one(
    run: Run, opts: DemoOptions, workdir: Path, session: aiohttp.ClientSession
) -> RunOutput:
    async with (
        fleet(opts, workdir) as urls,
        gateway(run, opts, urls, workdir, session) as (base, admin),
    ):
        _say(f"{run.label}: watch it live with: dp-router top --admin {admin}")
        cfg = LoadConfig(
            target=base,
            model=MODEL,
            rate=opts.rate,
            duration_s=opts.duration_s,
            timeout_s=60.0,
            replica_metrics=[f"{u}/metrics" for u in urls],
        )
        workload = clamp_outputs(
            conversations(opts.workload, seed=opts.seed, requests=None, rate=opts.rate)
        )
        # The frame is taken when arrivals stop, while the fleet is still busy.
        frame = asyncio.create_task(top_frame(admin, delay_s=opts.duration_s))
        try:
            result = await run_load(
                cfg, workload, label=run.label, workload_name=opts.workload, progress=_tty()
            )
        except BaseException:
            frame.cancel()
            raise
        result.extra["policy"] = run.policy
        result.extra["params"] = dict(run.params)
        result.extra["experts"] = await expert_views(session, admin)
        return RunOutput(result, await frame)


async def run_demo(opts: DemoOptions) -> list[RunOutput]:
    outputs: list[RunOutput] = []
    with tempfile.TemporaryDirectory(prefix="dp-router-demo-") as tmp:
        workdir = Path(tmp)
        async with aiohttp.ClientSession() as session:
            for run in opts.runs:
                _say(f"{run.label}: starting {opts.replicas} replicas and the gateway")
                out = await run_one(run, opts, workdir, session)
                r = out.result
                _say(
                    f"{run.label}: {r.ok}/{r.requests} ok, "
                    f"TTFT p50 {_ms(r.ttft.p50)} p99 {_ms(r.ttft.p99)}"
                )
                outputs.append(out)
    return outputs


def _tty() -> bool:
    return sys.stderr.isatty()


def _ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.0f} ms"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def clamp_outputs(source: Iterable[Conversation]) -> Iterator[Conversation]:
    """The workload with output lengths capped at MAX_OUTPUT_TOKENS."""
    for conv in source:
        turns = tuple(
            dataclasses.replace(t, output_tokens=min(t.output_tokens, MAX_OUTPUT_TOKENS))
            for t in conv.turns
        )
        yield dataclasses.replace(conv, turns=turns)


# ---------------------------------------------------------------------------
# the report


def experts_table(results: Iterable[RunResult], skewed: str) -> str:
    """Per run: the gateway's view of the experts when the load ended, and
    what the skewed replica got and what its skew cost.

    ``imbalance`` is max / mean routed tokens per expert over the gateway's
    window (router/experts.py), ``slowdown`` the step time it implies, which
    the scored policy's ``expert_capacity`` weighs the queue with. The TPOT
    (time per output token) of the requests the skewed replica served,
    against the others', is what the skew costs: its decode steps wait for
    the busiest expert once its batches are big.
    """
    rows = []
    for r in results:
        views: Mapping[str, Mapping[str, Any]] = r.extra.get("experts") or {}
        mine = views.get(skewed, {})
        share = r.replica_share().get(skewed)
        tpot_mine = [t for rec in r.records if rec.replica == skewed and (t := rec.tpot_s)]
        tpot_others = [t for rec in r.records if rec.replica != skewed and (t := rec.tpot_s)]
        rows.append(
            [
                r.label,
                _signal(r),
                _x(mine.get("imbalance")),
                _x(mine.get("slowdown")),
                " / ".join(_x(v.get("imbalance")) for n, v in sorted(views.items()) if n != skewed)
                or "-",
                f"{_median_ms(tpot_mine)} / {_median_ms(tpot_others)}",
                "-" if share is None else f"{100 * share:.0f}%",
            ]
        )
    header = [
        "run",
        "expert signal",
        f"{skewed} imbalance",
        f"{skewed} slowdown",
        "others' imbalance",
        f"TPOT p50 {skewed} / others",
        f"{skewed} share",
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    note = (
        "\n\n(expert counters as the gateway reads them, GET /admin/experts: imbalance = "
        "busiest expert / mean expert, slowdown = the step time that implies; TPOT in ms)\n"
    )
    return "\n".join([line(header), sep, *(line(r) for r in rows)]) + note


def _median_ms(values: list[float]) -> str:
    return "-" if not values else f"{statistics.median(values) * 1000:.1f}"


def _signal(r: RunResult) -> str:
    if r.extra.get("policy") != "scored":
        return "-"
    return "on" if r.extra.get("params", {}).get("expert_capacity", True) else "off"


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


# ---------------------------------------------------------------------------
# the offered load


def engine_config(engine: str, zipf_s: float | None, max_num_seqs: int) -> EngineConfig:
    """One replica's engine config, as the replica process builds it."""
    from loadtest.engine import preset

    cfg = preset(engine, max_num_seqs=max_num_seqs)
    if zipf_s is not None and cfg.moe is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, zipf_s=zipf_s))
    return cfg


def engine_capacity(cfg: EngineConfig, sample: list[Conversation], seed: int) -> float:
    """Requests per second one engine sustains on ``sample``'s turns.

    All turns queued at once and run offline to the end (nothing cached: the
    demo must not overload the fleet under a policy that gets no cache hits,
    round-robin); the rate between the 10th and 90th percent of completions,
    which leaves out the ramp-up and the last stragglers.
    """
    from loadtest.engine import saturated_throughput

    turns = (
        (turn.prompt_tokens, turn.output_tokens, conv.domain)
        for conv in sample
        for turn in conv.turns
    )
    rate = saturated_throughput(cfg, turns, seed)
    if rate is None:
        raise StartError(f"no request of the workload fits in a {cfg.name} engine")
    return rate


def auto_rate(
    replicas: int,
    workload: str,
    seed: int,
    duration_s: float,
    *,
    engine: str = ENGINE_PRESET,
    skew: float | None = SKEW_ZIPF,
    max_num_seqs: int = MAX_NUM_SEQS,
) -> float:
    """Conversations per second that offer ``TARGET_UTILIZATION`` of the fleet.

    Each replica's capacity in requests per second is measured by running the
    workload's turns through its engine model (:func:`engine_capacity`: the
    skewed one separately). The workload's turns per conversation turn
    request capacity into a conversation arrival rate, so any workload
    (short chats or long traces) lands at the same utilization. A later turn
    counts only with the chance that it starts within the run: a
    conversation starts uniformly in [0, duration) and turn k waits the sum
    of the think times before it (5 s on average for "chat"), so a 4 s run
    sees mostly first turns.
    """
    source = conversations(workload, seed=seed, requests=RATE_SAMPLE * 4, rate=1.0)
    sample = list(itertools.islice(clamp_outputs(source), RATE_SAMPLE))
    if not any(conv.turns for conv in sample):
        raise StartError(f"workload {workload!r} produced no requests")
    offered = 0.0
    for conv in sample:
        waited = 0.0
        for k, turn in enumerate(conv.turns):
            waited += turn.think_time_s if k else 0.0
            offered += max(0.0, 1.0 - waited / duration_s)
    turns_per_conv = offered / len(sample)
    plain = engine_capacity(engine_config(engine, None, max_num_seqs), sample, seed)
    capacity_rps = plain * replicas
    if skew is not None and replicas > 1:
        skewed = engine_capacity(engine_config(engine, skew, max_num_seqs), sample, seed)
        capacity_rps += skewed - plain
    return TARGET_UTILIZATION * capacity_rps / turns_per_conv


# ---------------------------------------------------------------------------
# the command line


def available_runs(quick: bool = False) -> list[Run]:
    from policies.registry import POLICIES

    runs = [r for r in DEFAULT_RUNS if r.policy in POLICIES]
    return [r for r in runs if r.label in QUICK_RUNS] if quick else runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router demo",
        description="Start simulated MoE replicas (one with skewed experts) and the gateway, "
        "run one workload under several routing policies, and compare them.",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=DEFAULT_REPLICAS,
        help="simulated replicas (the last has skewed experts)",
    )
    p.add_argument("--policy", action="append", help="policy to compare (repeatable)")
    p.add_argument("--duration", type=float, help="seconds of load per run")
    p.add_argument(
        "--rate",
        type=float,
        help="conversations per second (default: 65%% of the simulated fleet's capacity)",
    )
    p.add_argument("--workload", default="chat", help="a loadtest.workloads name or trace file")
    p.add_argument(
        "--engine",
        metavar="PRESET",
        default=ENGINE_PRESET,
        help=f"the replicas' engine model preset (default {ENGINE_PRESET}; e.g. llama3-8b, "
        "llama3-8b+moe256; a dense preset has no experts to skew; docs/simulator.md)",
    )
    p.add_argument(
        "--skew",
        type=float,
        default=SKEW_ZIPF,
        metavar="Z",
        help=f"Zipf exponent of the last replica's expert popularity (default {SKEW_ZIPF}; "
        "the preset's is 0.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write results.json, summary.md and charts here")
    p.add_argument("--quick", action="store_true", help="two runs, short ones (~15 s)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas < 1:
        print("dp-router demo: --replicas must be >= 1", file=sys.stderr)
        return 2
    if not math.isfinite(args.skew) or args.skew < 0:
        print("dp-router demo: --skew must be a number >= 0", file=sys.stderr)
        return 2
    if args.policy:
        from policies.registry import POLICIES

        unknown = [p for p in args.policy if p not in POLICIES]
        if unknown:
            known = ", ".join(sorted(POLICIES))
            print(f"dp-router demo: unknown policy {unknown[0]!r}; known: {known}", file=sys.stderr)
            return 2
        runs = tuple(Run(p, p) for p in args.policy)
    else:
        runs = tuple(available_runs(args.quick))
    duration = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    try:
        moe = engine_config(args.engine, None, MAX_NUM_SEQS).moe
        skew = args.skew if moe is not None and args.replicas > 1 else None
        rate = args.rate or auto_rate(
            args.replicas, args.workload, args.seed, duration, engine=args.engine, skew=skew
        )
    except (StartError, ValueError) as exc:
        print(f"dp-router demo: {exc}", file=sys.stderr)
        return 2
    opts = DemoOptions(
        replicas=args.replicas,
        runs=runs,
        duration_s=duration,
        rate=rate,
        seed=args.seed,
        workload=args.workload,
        out=args.out,
        engine=args.engine,
        skew=skew,
    )
    skewed = skewed_name(opts.replicas) if skew is not None else None
    fleet_note = f" ({skewed}'s experts Zipf {skew:g})" if skewed else ""
    _say(
        f"{opts.replicas} x {opts.engine}{fleet_note}, "
        f"runs: {', '.join(r.label for r in runs)}; "
        f"{opts.duration_s:g} s each at {opts.rate:.2f} conversations/s; "
        "sticky sessions on (each conversation sends X-Session-ID)"
    )

    outputs = procs.run_tool("dp-router demo", lambda: run_demo(opts))
    if isinstance(outputs, int):
        return outputs
    results = [o.result for o in outputs]
    print()
    print(comparison_table(results))
    if skewed:
        print(experts_table(results, skewed))
    if outputs:
        last = outputs[-1].result.label
        print(f"dp-router top --once, when the arrivals of the last run ({last}) stopped:")
        print()
        print(outputs[-1].top)
    if opts.out:
        for path in write_results(results, opts.out):
            _say(f"wrote {path}")
        paths = write_plots(results, opts.out)
        if paths is None:
            _say("charts skipped: matplotlib is not installed (pip install 'dp-router[plots]')")
        else:
            for path in paths:
                _say(f"wrote {path}")
    # Errors are part of what a demo shows; only a run where nothing worked fails it.
    return 0 if all(r.ok > 0 for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
