"""``dp-router compare-live``: the gateway's policies and sglang-router's, one fleet, one workload.

The simulator (``dp-router simulate``) compares policies on a virtual clock;
this runs them for real, on one machine, so the routers' own behaviour
(their load tracking, retries, CPU) is part of the result. For each run and
each target, in this order:

1. start a fresh simulated fleet: ``--replicas`` replicas of ``dp-router
   replica`` in one process (one event loop: on a small machine they do not
   fight the routers for CPU), the engine model with its default preset
   (prefill cost of uncached tokens, prefix caching, continuous batching;
   docs/replica.md), the same ``--seed``. Fresh each time, so every target
   starts with cold caches and zeroed counters: no target is handed the
   previous one's warm cache;
2. start the router in front of it: the gateway (``dp-router serve``) with
   one policy, or sglang-router (``python -m sglang_router.launch_router
   --policy cache_aware``) from its own virtualenv, which attaches to the
   replicas as to any OpenAI-compatible server with ``/health``;
3. drive the same workload through it with the load generator
   (loadtest/loadgen.py): ``chat`` by default, multi-turn conversations
   whose every turn resends the growing context, so where a turn lands
   decides whether its context is still cached; same seed, same arrivals;
4. read the first-admission prefix-cache hit rate from the replicas'
   ``vllm:prefix_cache_*`` counters, each replica's completed count from
   ``/_sim/stats`` and the router's CPU time from /proc, then stop the
   router and the fleet.

Runs are interleaved (run 1 of every target, then run 2 ...), so a slow
drift of the machine (another process, thermal) spreads over all targets
instead of landing on one. Every run uses the same seed: the spread between
runs is the noise of the live system, not of the workload.

Without ``X-Session-ID`` by default: sglang-router ignores it, so sending it
would compare the gateway's sticky sessions with sglang-router's policy.
``--session-header`` measures the gateway as a chat client with session ids
would see it.

Every child is stopped on exit, on Ctrl-C and on SIGTERM, and gets SIGTERM
from the kernel if this process dies (loadtest/procs.py). docs/live-compare.md
has the setup of the peer and a measured table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest import procs
from loadtest.engine.engine import DEFAULT_REPLICA_PRESET
from loadtest.loadgen import LoadConfig, conversations, run_load
from loadtest.procs import HOST, Child, StartError
from loadtest.report import RunResult
from loadtest.workloads import Conversation

MODEL = "dp-live"
SGLANG = "sglang"  # a target "sglang:<policy>" runs sglang-router with that policy
# sglang-router 0.3's --policy choices for a regular (not prefill/decode) fleet.
SGLANG_POLICIES = ("cache_aware", "power_of_two", "round_robin", "random")
# Compared by default; a gateway policy that is not registered (yet) is
# skipped with a note, and so is sglang-router when it is not installed.
DEFAULT_TARGETS = ("queue_depth", "prefix_affinity", "predicted_ttft", "sglang:cache_aware")
# The peer lives in its own virtualenv, never in the project's: its
# dependencies (fastapi, pydantic, ...) must not leak into ours.
DEFAULT_SGLANG_VENV = Path.home() / ".cache" / "dp-router-peers" / "sglang-router"

DEFAULT_REPLICAS = 4
DEFAULT_RUNS = 3
DEFAULT_WORKLOAD = "chat"
DEFAULT_DURATION_S = 45.0
QUICK_DURATION_S = 6.0
# Conversations per second per replica (Poisson). One engine-model replica
# sustains 13.6 chat requests/s with every request uncached
# (loadtest.sim.cli.engine_capacity, batches of up to 128); 10 conversations
# a second per replica offer about 80 % of that over a 45 s run (a turn every
# ~10 s of answer and think time, so most conversations get 1-2 turns in).
# Measured with four replicas: at 8 per replica the routers differ in cache
# hits only; at 12, every policy queues. The routers then use about a fifth
# of a core and the replicas' process a quarter (both printed per run), so
# the two cores measure routing, not CPU starvation.
RATE_PER_REPLICA = 10.0
# Output lengths are capped: the chat workload's lognormal tail reaches
# thousands of tokens, and one such answer started near the end of a run
# would outlast it by a minute at a loaded replica's pace. A smoke run caps
# harder, so its tail is short.
MAX_OUTPUT_TOKENS = 512
QUICK_MAX_OUTPUT_TOKENS = 32
REQUEST_TIMEOUT_S = 60.0
# sglang-router registers its workers in the background after it starts
# listening; it is ready once it reports all of them healthy.
SGLANG_READY_TIMEOUT_S = procs.START_TIMEOUT_S
READY_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Target:
    """One router under test: the gateway with a policy, or sglang-router with one."""

    name: str  # as given: "queue_depth", "sglang:cache_aware"
    router: str  # "gateway" or SGLANG
    policy: str


def parse_target(text: str) -> Target:
    """``POLICY`` (a gateway policy) or ``sglang:POLICY``; ValueError if neither."""
    router, sep, policy = text.partition(":")
    if not sep:
        return Target(text, "gateway", text)
    if router != SGLANG or policy not in SGLANG_POLICIES:
        raise ValueError(
            f"unknown target {text!r}: a gateway policy, or sglang:<{'|'.join(SGLANG_POLICIES)}>"
        )
    return Target(text, SGLANG, policy)


@dataclass(frozen=True, slots=True)
class Options:
    targets: tuple[Target, ...]
    runs: int
    replicas: int
    duration_s: float
    rate: float
    seed: int
    workload: str
    session_header: bool
    sglang_python: Path
    max_output_tokens: int = MAX_OUTPUT_TOKENS


@dataclass(slots=True)
class Measured:
    """One run of one target: the load generator's result and what the fleet said."""

    result: RunResult
    router_cpu_s: float
    fleet_cpu_s: float  # the replicas' process: near one core, their clock lags
    completed: list[int]  # per replica, from /_sim/stats

    @property
    def busiest_share(self) -> float:
        total = sum(self.completed)
        return max(self.completed) / total if total else math.nan


@dataclass(slots=True)
class TargetRuns:
    target: Target
    runs: list[Measured] = field(default_factory=list)


# ---- children ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def fleet(opts: Options, workdir: Path, tag: str) -> AsyncIterator[tuple[list[str], Child]]:
    """``opts.replicas`` engine-model replicas in one process; yields their URLs and it."""
    argv = procs.dp_router("replica", "--host", HOST, "--model", MODEL, "--seed", str(opts.seed))
    argv += ["--port", "0"] * opts.replicas  # free ports, reported on the ready lines
    child = await procs.spawn(
        "replicas", argv, log=workdir / f"replicas-{tag}.log", stdout_pipe=True
    )
    try:
        ports = await child.ready_ports(opts.replicas)
        yield [f"http://{HOST}:{p}" for p in ports], child
    finally:
        await child.stop()


def gateway_config(policy: str, seed: int, port: int, admin_port: int, urls: list[str]) -> str:
    """The gateway's TOML (config/example.toml has every key)."""
    replicas = [{"url": url, "name": f"r{i + 1}", "models": [MODEL]} for i, url in enumerate(urls)]
    return procs.gateway_toml(
        replicas,
        port=port,
        admin_port=admin_port,
        comment="generated by dp-router compare-live",
        server={"access_log": False, "shutdown_timeout_s": 2.0},
        # Slow start would ramp every fresh replica for 30 s, most of a run;
        # sglang-router has none, and the fleet is equal and fresh each time.
        health={"interval_s": 1.0, "slow_start_s": 0.0},
        routing={"policy": policy, "seed": seed},
    )


@contextlib.asynccontextmanager
async def gateway(
    target: Target, opts: Options, urls: list[str], workdir: Path, tag: str
) -> AsyncIterator[tuple[str, Child]]:
    port, admin_port = procs.free_ports(2)
    config = workdir / f"gateway-{tag}.toml"
    config.write_text(gateway_config(target.policy, opts.seed, port, admin_port, urls))
    argv = procs.dp_router("serve", "--config", str(config))
    child = await procs.spawn(f"gateway ({target.name})", argv, log=workdir / f"{tag}.log")
    try:
        base = f"http://{HOST}:{port}"
        await child.wait_http(base + "/readyz")
        yield base, child
    finally:
        await child.stop()


def sglang_argv(python: Path, policy: str, urls: Sequence[str], port: int, prom: int) -> list[str]:
    """sglang-router's command line (``launch_router --help`` of sglang-router 0.3)."""
    return [
        str(python),
        "-m",
        "sglang_router.launch_router",
        "--host",
        HOST,
        "--port",
        str(port),
        "--worker-urls",
        *urls,
        "--policy",
        policy,
        # Its Prometheus listener defaults to 0.0.0.0:29000: two runs, or
        # anything else on 29000, would collide; and nothing leaves loopback.
        "--prometheus-host",
        HOST,
        "--prometheus-port",
        str(prom),
        # The default grace period is 180 s; the load is over when we stop it.
        "--shutdown-grace-period-secs",
        "2",
        "--log-level",
        "warn",
    ]


@contextlib.asynccontextmanager
async def sglang_router(
    target: Target, opts: Options, urls: list[str], workdir: Path, tag: str
) -> AsyncIterator[tuple[str, Child]]:
    port, prom = procs.free_ports(2)
    argv = sglang_argv(opts.sglang_python, target.policy, urls, port, prom)
    child = await procs.spawn(f"sglang-router ({target.name})", argv, log=workdir / f"{tag}.log")
    try:
        base = f"http://{HOST}:{port}"
        await _wait_sglang_workers(child, base, len(urls))
        yield base, child
    finally:
        await child.stop()


async def _wait_sglang_workers(child: Child, base: str, n: int) -> None:
    """Until ``GET /readiness`` reports all ``n`` workers healthy.

    It answers before its workers are registered (they are added by a
    background job), and a request routed then fails with no worker.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SGLANG_READY_TIMEOUT_S
    seen: object = None
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if not child.running:
                code = child.proc.returncode
                raise StartError(f"{child.name} exited with {code}:\n{child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(
                    base + "/readiness", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    seen = await resp.json(content_type=None)
                if isinstance(seen, dict) and seen.get("healthy_workers") == n:
                    return
            await asyncio.sleep(READY_POLL_S)
    raise StartError(
        f"{child.name}: not all {n} workers healthy after {SGLANG_READY_TIMEOUT_S:.0f} s "
        f"(last /readiness: {seen!r}):\n{child.tail()}"
    )


def sglang_installed(python: Path) -> bool:
    """Whether ``python`` exists and imports sglang_router."""
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import sglang_router"], capture_output=True, timeout=60, check=False
    )
    return probe.returncode == 0


# ---- one run ----------------------------------------------------------------


def capped(conv: Conversation, limit: int) -> Conversation:
    """``conv`` with every turn's output at most ``limit`` tokens."""
    turns = tuple(
        dataclasses.replace(t, output_tokens=min(t.output_tokens, limit)) for t in conv.turns
    )
    return dataclasses.replace(conv, turns=turns)


async def completed_per_replica(urls: Sequence[str]) -> list[int]:
    """Each replica's completed requests (``GET /_sim/stats``); -1 where it did not answer."""
    out = []
    async with aiohttp.ClientSession() as session:
        for url in urls:
            try:
                async with session.get(
                    url + "/_sim/stats", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    out.append(int((await resp.json())["completed"]))
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
                out.append(-1)
    return out


async def run_target(target: Target, opts: Options, workdir: Path, run: int) -> Measured:
    tag = f"{target.name.replace(':', '-')}-run{run}"
    start_router = sglang_router if target.router == SGLANG else gateway
    async with (
        fleet(opts, workdir, tag) as (urls, replicas),
        start_router(target, opts, urls, workdir, tag) as (base, router),
    ):
        cfg = LoadConfig(
            target=base,
            model=MODEL,
            rate=opts.rate,
            duration_s=opts.duration_s,
            timeout_s=REQUEST_TIMEOUT_S,
            replica_metrics=[f"{u}/metrics" for u in urls],
            session_header=opts.session_header,
        )
        source = conversations(opts.workload, seed=opts.seed, requests=None, rate=opts.rate)
        workload = (capped(c, opts.max_output_tokens) for c in source)
        cpu_before = router.cpu_seconds(), replicas.cpu_seconds()
        result = await run_load(
            cfg,
            workload,
            label=f"{target.name} #{run}",
            workload_name=opts.workload,
            progress=sys.stderr.isatty(),
        )
        router_cpu = router.cpu_seconds() - cpu_before[0]
        fleet_cpu = replicas.cpu_seconds() - cpu_before[1]
        completed = await completed_per_replica(urls)
    return Measured(result, router_cpu, fleet_cpu, completed)


async def compare(opts: Options) -> list[TargetRuns]:
    out = [TargetRuns(t) for t in opts.targets]
    with tempfile.TemporaryDirectory(prefix="dp-router-compare-live-") as tmp:
        for run in range(1, opts.runs + 1):
            for entry in out:
                _say(f"run {run}/{opts.runs}: {entry.target.name}")
                m = await run_target(entry.target, opts, Path(tmp), run)
                r = m.result
                _say(
                    f"run {run}/{opts.runs}: {entry.target.name}: {r.ok}/{r.requests} ok, "
                    f"TTFT p50 {_ms(r.ttft.p50)} p99 {_ms(r.ttft.p99)} ms, "
                    f"prefix hit {_pct(r.prefix_hit_rate)}, CPU router {m.router_cpu_s:.1f} s, "
                    f"replicas {m.fleet_cpu_s:.1f} s in {r.wall_s:.0f} s"
                )
                entry.runs.append(m)
    return out


# ---- report -----------------------------------------------------------------

# Table columns: (header, JSON key, value of one run in SI units, formatter).
Column = tuple[str, str, Callable[[Measured], float], Callable[[float], str]]


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _errors(m: Measured) -> float:
    return float(sum(m.result.errors.values()))


def _hit(m: Measured) -> float:
    return math.nan if m.result.prefix_hit_rate is None else m.result.prefix_hit_rate


COLUMNS: tuple[Column, ...] = (
    ("TTFT p50 ms", "ttft_p50_s", lambda m: m.result.ttft.p50, _ms),
    ("TTFT p99 ms", "ttft_p99_s", lambda m: m.result.ttft.p99, _ms),
    ("E2E p50 ms", "e2e_p50_s", lambda m: m.result.e2e.p50, _ms),
    ("E2E p99 ms", "e2e_p99_s", lambda m: m.result.e2e.p99, _ms),
    ("req/s", "rps", lambda m: m.result.rps, lambda x: _num(x, 2)),
    ("errors", "errors", _errors, lambda x: _num(x, 0)),
    ("prefix hit (1st adm.)", "prefix_hit_rate", _hit, _pct),
    ("busiest replica", "busiest_replica_share", lambda m: m.busiest_share, _pct),
    ("router CPU s", "router_cpu_s", lambda m: m.router_cpu_s, lambda x: _num(x, 1)),
)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the runs' values, NaN-free; all NaN if none is a number."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan, math.nan, math.nan
    return statistics.median(xs), xs[0], xs[-1]


def table(results: Sequence[TargetRuns]) -> str:
    """Per target, each column as ``median [min-max]`` over the runs (markdown)."""
    header = ["target", "runs", *(c[0] for c in COLUMNS)]
    rows = []
    for entry in results:
        cells = [entry.target.name, str(len(entry.runs))]
        for _, _, value, fmt in COLUMNS:
            mid, lo, hi = spread([value(m) for m in entry.runs])
            cells.append(fmt(mid) if len(entry.runs) < 2 else f"{fmt(mid)} [{fmt(lo)}-{fmt(hi)}]")
        rows.append(cells)
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def to_json(
    opts: Options, results: Sequence[TargetRuns], skipped: dict[str, str]
) -> dict[str, Any]:
    targets = []
    for entry in results:
        summary = {}
        for _, key, value, _ in COLUMNS:
            mid, lo, hi = spread([value(m) for m in entry.runs])
            summary[key] = {"median": _finite(mid), "min": _finite(lo), "max": _finite(hi)}
        targets.append(
            {
                "target": entry.target.name,
                "router": entry.target.router,
                "policy": entry.target.policy,
                "summary": summary,
                "runs": [
                    {
                        **m.result.to_json(with_records=False),
                        "router_cpu_s": m.router_cpu_s,
                        "fleet_cpu_s": m.fleet_cpu_s,
                        "completed_per_replica": m.completed,
                    }
                    for m in entry.runs
                ],
            }
        )
    return {
        "setup": describe(opts),
        "targets": targets,
        "skipped": skipped,
    }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def describe(opts: Options) -> dict[str, Any]:
    return {
        "replicas": opts.replicas,
        "replica_model": DEFAULT_REPLICA_PRESET,
        "workload": opts.workload,
        "rate_conversations_per_s": opts.rate,
        "duration_s": opts.duration_s,
        "runs": opts.runs,
        "seed": opts.seed,
        "session_header": opts.session_header,
        "max_output_tokens": opts.max_output_tokens,
    }


def _say(msg: str) -> None:
    print(f"[compare-live] {msg}", file=sys.stderr, flush=True)


# ---- CLI --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router compare-live",
        description="Run the gateway's policies and sglang-router's against the same "
        "simulated fleet, workload and seed, and compare them (docs/live-compare.md).",
    )
    p.add_argument(
        "--target",
        action="append",
        metavar="POLICY|sglang:POLICY",
        help=f"what to compare (repeatable; default {' '.join(DEFAULT_TARGETS)})",
    )
    p.add_argument("--runs", type=int, help=f"runs per target (default {DEFAULT_RUNS})")
    p.add_argument("--replicas", type=int, default=DEFAULT_REPLICAS)
    p.add_argument("--duration", type=float, help="seconds of load per run (default 45)")
    p.add_argument(
        "--rate",
        type=float,
        help=f"conversations per second, Poisson (default {RATE_PER_REPLICA:g} per replica)",
    )
    p.add_argument(
        "--max-output-tokens",
        type=int,
        help=f"cap on each answer's length (default {MAX_OUTPUT_TOKENS})",
    )
    p.add_argument("--workload", default=DEFAULT_WORKLOAD, help="a loadtest.workloads name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--session-header",
        action="store_true",
        help="send X-Session-ID (the gateway's sticky sessions; sglang-router ignores it)",
    )
    p.add_argument(
        "--sglang-python",
        type=Path,
        default=DEFAULT_SGLANG_VENV / "bin" / "python",
        help="the interpreter of sglang-router's own virtualenv",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON results here")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: one run per target, {QUICK_DURATION_S:g} s, outputs of at most "
        f"{QUICK_MAX_OUTPUT_TOKENS} tokens (unless given)",
    )
    return p


def resolve_targets(
    names: Sequence[str], explicit: bool, sglang_python: Path
) -> tuple[list[Target], dict[str, str]]:
    """The targets to run and the skipped ones with why; ValueError for a bad explicit one.

    A default target that cannot run is skipped with a note; a target named
    on the command line that cannot run is an error.
    """
    from policies.registry import POLICIES

    targets: list[Target] = []
    skipped: dict[str, str] = {}
    have_sglang: bool | None = None
    for name in names:
        target = parse_target(name)
        why = None
        if target.router == "gateway" and target.policy not in POLICIES:
            why = f"not a registered gateway policy (known: {', '.join(sorted(POLICIES))})"
        elif target.router == SGLANG:
            if have_sglang is None:
                have_sglang = sglang_installed(sglang_python)
            if not have_sglang:
                why = (
                    f"sglang-router is not installed at {sglang_python} "
                    "(docs/live-compare.md: python3 -m venv ...; pip install sglang-router)"
                )
        if why is None:
            targets.append(target)
        elif explicit:
            raise ValueError(f"{name}: {why}")
        else:
            skipped[name] = why
    return targets, skipped


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else DEFAULT_RUNS)
    duration = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    rate = args.rate or RATE_PER_REPLICA * args.replicas
    max_out = args.max_output_tokens or (
        QUICK_MAX_OUTPUT_TOKENS if args.quick else MAX_OUTPUT_TOKENS
    )
    if min(runs, args.replicas, duration, rate, max_out) <= 0:
        print(
            "dp-router compare-live: --runs, --replicas, --duration, --rate and "
            "--max-output-tokens must be > 0",
            file=sys.stderr,
        )
        return 2
    try:
        conversations(args.workload, seed=args.seed, requests=1, rate=rate)
        targets, skipped = resolve_targets(
            args.target or DEFAULT_TARGETS, bool(args.target), args.sglang_python
        )
    except ValueError as exc:
        print(f"dp-router compare-live: {exc}", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        _say(f"skipping {name}: {why}")
    if not targets:
        print("dp-router compare-live: nothing to run", file=sys.stderr)
        return 2
    opts = Options(
        targets=tuple(targets),
        runs=runs,
        replicas=args.replicas,
        duration_s=duration,
        rate=rate,
        seed=args.seed,
        workload=args.workload,
        session_header=args.session_header,
        sglang_python=args.sglang_python,
        max_output_tokens=max_out,
    )
    _say(
        f"{opts.replicas} x {DEFAULT_REPLICA_PRESET} replicas (fresh per run), {opts.workload} "
        f"at {opts.rate:g} conversations/s for {opts.duration_s:g} s, seed {opts.seed}, "
        f"{opts.runs} run(s) of {', '.join(t.name for t in targets)}"
    )

    results = procs.run_tool("dp-router compare-live", lambda: compare(opts))
    if isinstance(results, int):
        return results
    data = json.dumps(to_json(opts, results, skipped), indent=1)
    if args.out:
        args.out.write_text(data + "\n")
        _say(f"wrote {args.out}")
    if args.json:
        print(data)
    else:
        setup = describe(opts)
        print(", ".join(f"{k} {v}" for k, v in setup.items()))
        print()
        print(table(results))
        print("\n(median of the runs [min-max]; latencies in ms)")
    # A run where nothing succeeded is a failed comparison; errors otherwise are results.
    return 0 if all(m.result.ok > 0 for e in results for m in e.runs) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
