"""``dp-router demo``: a simulated fleet, the gateway, one workload, several policies.

What it does, in order, for each policy:

1. starts N simulated replicas in ONE subprocess (``dp-router replica --port
   P1 --port P2 ...``: one event loop, so on a small machine the replicas do
   not fight the gateway for CPU) and slows one of them down at runtime
   (``POST /_sim/config {"speed": F}``), the heterogeneity a good policy must
   route around;
2. starts the gateway as a subprocess from a generated TOML config with that
   policy and waits for ``GET /readyz``;
3. runs the same multi-turn workload (same seed, same arrivals) through it
   with the in-process load generator;
4. stops the gateway, then the replicas.

Replicas are restarted per policy on purpose: their prefix caches and
counters start cold every time, so no policy benefits from the previous one's
warm cache. At the end it prints the comparison table (TTFT and E2E p50/p99,
throughput, errors, per-replica share, prefix-cache hit rate) and, with
``--out``, writes results.json, summary.md and charts.

Every child is stopped on exit, on Ctrl-C and on SIGTERM; children also get
SIGTERM from the kernel if the demo itself is killed (PR_SET_PDEATHSIG), so a
demo never leaves servers behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from loadtest.loadgen import LoadConfig, conversations, run_load, run_with_uvloop
from loadtest.report import RunResult, comparison_table, write_plots, write_results
from loadtest.workload_types import Conversation

HOST = "127.0.0.1"
MODEL = "dp-demo"
# Preferred order of policies to compare; only registered ones are used, so
# the demo keeps working while policies come and go.
DEFAULT_POLICIES = ("round_robin", "queue_depth", "prefix_affinity", "least_request")
DEFAULT_POLICY_COUNT = 3
QUICK_POLICY_COUNT = 2
DEFAULT_REPLICAS = 3
DEFAULT_DURATION_S = 15.0  # per policy: 3 policies + start-up ~ one minute
QUICK_DURATION_S = 4.0  # 2 policies + start-up + tail ~ 15 s
# The replica model: 5 ms per token (200 tok/s per stream: a small model on a
# fast GPU, chosen so a one-minute demo completes hundreds of requests) and at
# most 8 sequences generating at once, so a burst queues and queueing shows in
# TTFT, which is what routing policies change.
TOKEN_INTERVAL_S = 0.005
TTFT_S = 0.03
# Prefill speed of the paced replicas: uncached prompt tokens add to TTFT at
# this rate (a scaled-down GPU, like the token pace), so a session that
# returns to the replica holding its context starts measurably faster.
PREFILL_TOKENS_PER_S = 5000.0
MAX_RUNNING = 8
# Output lengths are clamped so that the last requests of a run (on the slow
# replica: 3 x 5 ms x 256 = 3.8 s) do not double the demo's wall time; the
# chat workload's lognormal tail otherwise reaches thousands of tokens.
MAX_OUTPUT_TOKENS = 256
SLOW_FACTOR = 3.0  # one replica this much slower (an older GPU, a noisy neighbour)
# Offered load as a share of the fleet's capacity. At 0.65 a load-aware
# policy keeps every replica below saturation, while round-robin gives the
# slow replica 1/N of the traffic, about twice what it can serve (with 3
# replicas), so its queue grows for the whole run: the difference the demo
# exists to show.
TARGET_UTILIZATION = 0.65
# Conversations sampled from the workload to estimate its mean cost.
RATE_SAMPLE = 300
START_TIMEOUT_S = 30.0  # cold Python imports on a busy 2-core box take seconds
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    replicas: int
    policies: tuple[str, ...]
    duration_s: float
    rate: float
    seed: int
    workload: str
    out: Path | None
    token_interval_s: float = TOKEN_INTERVAL_S
    slow_factor: float = SLOW_FACTOR
    engine: str | None = None  # a loadtest.engine preset instead of the paced model


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (bound together, so they cannot repeat)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM me when the demo process dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


@dataclass(slots=True)
class Child:
    """A subprocess we started, with its log file for error messages."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


async def spawn(name: str, argv: Sequence[str], log: Path, *, pipe_stdout: bool) -> Child:
    logf = log.open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipe_stdout else logf,
            stderr=logf,
            # Own session: a terminal Ctrl-C reaches only the demo, which then
            # stops the gateway before the replicas (no error storm).
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    finally:
        logf.close()
    return Child(name, proc, log)


async def stop(child: Child) -> None:
    """SIGTERM, wait, then SIGKILL: the uvicorn-style graceful-then-forceful stop."""
    proc = child.proc
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class StartError(RuntimeError):
    pass


async def wait_replicas_ready(child: Child, count: int) -> list[int]:
    """Read ``ready <port> ...`` lines until all ``count`` replicas listen; their ports."""
    assert child.proc.stdout is not None
    ports: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(ports) < count:
        left = deadline - time.monotonic()
        try:
            line = await asyncio.wait_for(child.proc.stdout.readline(), max(left, 0.01))
        except TimeoutError:
            raise StartError(f"replicas not ready after {START_TIMEOUT_S:.0f} s") from None
        if not line:
            await child.proc.wait()
            raise StartError(
                f"replica process exited with {child.proc.returncode}:\n{child.tail()}"
            )
        if line.startswith(b"ready "):
            ports.append(int(line.split()[1]))
    return ports


async def _drain(stream: asyncio.StreamReader | None) -> None:
    """Keep reading a child's stdout so a full pipe can never block it."""
    if stream is None:
        return
    while await stream.read(65536):
        pass


async def wait_http_ready(child: Child, url: str, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.proc.returncode is not None:
            raise StartError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise StartError(f"{child.name} not ready at {url} after {START_TIMEOUT_S:.0f} s")


def replica_names(n: int) -> list[str]:
    """Names as the gateway reports them; the slow one says so."""
    return [f"r{i + 1}" + ("-slow" if i == n - 1 and n > 1 else "") for i in range(n)]


def gateway_config(policy: str, seed: int, port: int, admin_port: int, urls: list[str]) -> str:
    """The TOML the gateway runs with (see config/ for the documented format)."""
    names = replica_names(len(urls))
    lines = [
        "# generated by dp-router demo",
        "[server]",
        f'host = "{HOST}"',
        f"port = {port}",
        "access_log = false  # the demo prints its own report",
        "shutdown_timeout_s = 2.0",
        "",
        "[admin]",
        f'host = "{HOST}"',
        f"port = {admin_port}",
        "",
        "[health]",
        "interval_s = 1.0",
        # Slow start would ramp every fresh replica for 30 s: longer than a
        # demo run, and the same for all policies, so it only blurs them.
        "slow_start_s = 0.0",
        "",
        "[routing]",
        f'policy = "{policy}"',
        f"seed = {seed}",
    ]
    for name, url in zip(names, urls, strict=True):
        lines += ["", "[[replicas]]", f'url = "{url}"', f'name = "{name}"', f'models = ["{MODEL}"]']
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def fleet(
    opts: DemoOptions, workdir: Path, session: aiohttp.ClientSession
) -> AsyncIterator[list[str]]:
    """N replicas in one process, the last one slowed down; yields their URLs."""
    argv = [sys.executable, "-m", "router", "replica", "--host", HOST, "--model", MODEL]
    if opts.engine:
        argv += ["--engine", opts.engine, "--seed", str(opts.seed)]
    else:
        argv += ["--token-interval", str(opts.token_interval_s), "--ttft", str(TTFT_S)]
        argv += ["--prefill-rate", str(PREFILL_TOKENS_PER_S)]
        argv += ["--max-running", str(MAX_RUNNING)]
    # Port 0: the replica process binds free ports and reports them (no race).
    argv += ["--port", "0"] * opts.replicas
    child = await spawn("replicas", argv, workdir / "replicas.log", pipe_stdout=True)
    drain: asyncio.Task[None] | None = None
    try:
        ports = await wait_replicas_ready(child, opts.replicas)
        drain = asyncio.create_task(_drain(child.proc.stdout))
        urls = [f"http://{HOST}:{p}" for p in ports]
        if opts.replicas > 1 and opts.slow_factor != 1.0:
            await _slow_down(session, urls[-1], opts.slow_factor)
        yield urls
    finally:
        await stop(child)
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


async def _slow_down(session: aiohttp.ClientSession, url: str, factor: float) -> None:
    try:
        async with session.post(f"{url}/_sim/config", json={"speed": factor}) as resp:
            if resp.status != 200:
                raise StartError(f"POST {url}/_sim/config answered {resp.status}")
    except aiohttp.ClientError as exc:
        raise StartError(f"could not slow down {url}: {exc}") from None


@contextlib.asynccontextmanager
async def gateway(
    policy: str, opts: DemoOptions, urls: list[str], workdir: Path, session: aiohttp.ClientSession
) -> AsyncIterator[str]:
    """The gateway with ``policy`` in front of ``urls``; yields its base URL."""
    port, admin_port = free_ports(2)
    config = workdir / f"gateway-{policy}.toml"
    config.write_text(gateway_config(policy, opts.seed, port, admin_port, urls))
    argv = [sys.executable, "-m", "router", "serve", "--config", str(config)]
    child = await spawn(
        f"gateway ({policy})", argv, workdir / f"gateway-{policy}.log", pipe_stdout=False
    )
    try:
        base = f"http://{HOST}:{port}"
        await wait_http_ready(child, base + "/readyz", session)
        yield base
    finally:
        await stop(child)


async def run_policy(
    policy: str, opts: DemoOptions, workdir: Path, session: aiohttp.ClientSession
) -> RunResult:
    async with (
        fleet(opts, workdir, session) as urls,
        gateway(policy, opts, urls, workdir, session) as base,
    ):
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
        return await run_load(
            cfg, workload, label=policy, workload_name=opts.workload, progress=sys.stderr.isatty()
        )


async def run_demo(opts: DemoOptions) -> list[RunResult]:
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="dp-router-demo-") as tmp:
        workdir = Path(tmp)
        async with aiohttp.ClientSession() as session:
            for policy in opts.policies:
                _say(f"policy {policy}: starting {opts.replicas} replicas and the gateway")
                result = await run_policy(policy, opts, workdir, session)
                _say(
                    f"policy {policy}: {result.ok}/{result.requests} ok, "
                    f"TTFT p50 {_ms(result.ttft.p50)} p99 {_ms(result.ttft.p99)}"
                )
                results.append(result)
    return results


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


def auto_rate(
    replicas: int, workload: str, seed: int, slow_factor: float, duration_s: float
) -> float:
    """Conversations per second that offer ``TARGET_UTILIZATION`` of the fleet.

    A replica serves MAX_RUNNING requests at once, each taking about
    TTFT + output_tokens * TOKEN_INTERVAL; the slow one 1/slow_factor of that.
    The workload's mean output length and turns per conversation turn request
    capacity into a conversation arrival rate, so any workload (short chats or
    long traces) lands at the same utilization. A later turn counts only with
    the chance that it starts within the run: a conversation starts uniformly
    in [0, duration) and turn k waits the sum of the think times before it
    (5 s on average for "chat"), so a 4 s run sees mostly first turns.
    """
    source = conversations(workload, seed=seed, requests=RATE_SAMPLE * 4, rate=1.0)
    sample = list(itertools.islice(clamp_outputs(source), RATE_SAMPLE))
    turns = [t for conv in sample for t in conv.turns]
    if not turns:
        raise StartError(f"workload {workload!r} produced no requests")
    mean_out = sum(t.output_tokens for t in turns) / len(turns)
    mean_prompt = sum(t.prompt_tokens for t in turns) / len(turns)
    offered = 0.0
    for conv in sample:
        waited = 0.0
        for k, turn in enumerate(conv.turns):
            waited += turn.think_time_s if k else 0.0
            offered += max(0.0, 1.0 - waited / duration_s)
    turns_per_conv = offered / len(sample)
    # Capacity as if nothing were cached: the demo must not overload the
    # fleet under a policy that gets no cache hits (round-robin).
    service_s = TTFT_S + mean_prompt / PREFILL_TOKENS_PER_S + mean_out * TOKEN_INTERVAL_S
    speeds = replicas - 1 + 1 / slow_factor if replicas > 1 else 1.0
    capacity_rps = speeds * MAX_RUNNING / service_s
    return TARGET_UTILIZATION * capacity_rps / turns_per_conv


def available_policies() -> list[str]:
    from policies.registry import POLICIES

    return [p for p in DEFAULT_POLICIES if p in POLICIES]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router demo",
        description="Start simulated replicas and the gateway, run one workload under "
        "several routing policies, and compare them.",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=DEFAULT_REPLICAS,
        help="simulated replicas (the last is slow)",
    )
    p.add_argument("--policy", action="append", help="policy to compare (repeatable)")
    p.add_argument("--duration", type=float, help="seconds of load per policy")
    p.add_argument(
        "--rate",
        type=float,
        help="conversations per second (default: 65%% of the simulated fleet's capacity)",
    )
    p.add_argument("--workload", default="chat", help="a loadtest.workloads name or trace file")
    p.add_argument(
        "--engine",
        metavar="PRESET",
        help="simulate replicas with the engine model (e.g. llama2-7b) instead of fixed pacing",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write results.json, summary.md and charts here")
    p.add_argument("--quick", action="store_true", help="two policies, short runs (~15 s)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas < 1:
        print("dp-router demo: --replicas must be >= 1", file=sys.stderr)
        return 2
    if args.policy:
        from policies.registry import POLICIES

        unknown = [p for p in args.policy if p not in POLICIES]
        if unknown:
            known = ", ".join(sorted(POLICIES))
            print(f"dp-router demo: unknown policy {unknown[0]!r}; known: {known}", file=sys.stderr)
            return 2
        policies = tuple(args.policy)
    else:
        count = QUICK_POLICY_COUNT if args.quick else DEFAULT_POLICY_COUNT
        policies = tuple(available_policies()[:count])
    duration = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    try:
        rate = args.rate or auto_rate(
            args.replicas, args.workload, args.seed, SLOW_FACTOR, duration
        )
    except (StartError, ValueError) as exc:
        print(f"dp-router demo: {exc}", file=sys.stderr)
        return 2
    opts = DemoOptions(
        replicas=args.replicas,
        policies=policies,
        duration_s=duration,
        rate=rate,
        seed=args.seed,
        workload=args.workload,
        out=args.out,
        engine=args.engine,
    )
    slow = f" ({replica_names(opts.replicas)[-1]} is {opts.slow_factor:g}x slower)"
    _say(
        f"{opts.replicas} replicas{slow if opts.replicas > 1 else ''}, "
        f"policies {', '.join(policies)}, "
        f"{opts.duration_s:g} s each at {opts.rate:.2f} conversations/s"
    )
    if opts.engine and not args.rate:
        _say("note: the default rate assumes the paced replica model; pass --rate with --engine")

    async def guarded() -> list[RunResult]:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM like Ctrl-C: cancel, so every `finally` stops its children.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_demo(opts)

    try:
        results = run_with_uvloop(guarded())
    except KeyboardInterrupt:
        _say("interrupted; all processes stopped")
        return 130
    except asyncio.CancelledError:
        _say("terminated; all processes stopped")
        return 143
    except StartError as exc:
        print(f"dp-router demo: {exc}", file=sys.stderr)
        return 1
    print()
    print(comparison_table(results))
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
