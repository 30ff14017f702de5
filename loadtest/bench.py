"""``dp-router bench``: the gateway's own overhead, measured against a direct path.

Every figure is taken in the same run twice, once straight to the upstream
and once through the gateway, so the difference is the gateway and nothing
else (same machine state, same upstream, same client):

- added latency p50/p99 at concurrency 1 (non-streaming, small body);
- throughput at concurrency 64 (small bodies, then 100 KB prompts);
- added time to first token of streams on keep-alive connections
  (sequential streaming requests from a small aiohttp client);
- the gateway's CPU time per request: the delta of its utime + stime
  (``/proc/PID/stat``) over a run, divided by the requests it served.

To measure the gateway and not the load generator, the gateway is pinned to
one core (``taskset``) and driven by wrk (a C load generator, from the system
packages) with a Lua script for the POST body; the upstream and wrk share
the other core. The upstream is a minimal aiohttp/uvloop server defined here
that answers from pre-built bytes: the simulated replica does more per
request (request log, prefix hashing, metrics), which on a shared core
would make the *direct* baseline, not the gateway, the bottleneck
(``--upstream replica`` measures with it instead).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from loadtest import procs
from loadtest.procs import HOST, Child, StartError
from loadtest.report import percentile

MODEL = "bench"
LUA_SCRIPT = Path(__file__).with_name("bench_post.lua")
SMALL_PROMPT_BYTES = 64
LARGE_PROMPT_BYTES = 100 * 1024  # a long-context prompt: the body the gateway must not copy
HIGH_CONCURRENCY = 64
STREAM_TOKENS = 16  # events per benchmark stream; TTFT only needs the first
DEFAULT_RUN_S = 5.0  # per wrk run: enough for a stable p99 at c=1 (~5k samples)
QUICK_RUN_S = 2.0
WARMUP_S = 1.0  # connection pools, code paths and CPU caches warm before measuring
DEFAULT_STREAMS = 300
# The streaming-heavy phase: concurrent streams of paced chunks, the load an
# LLM gateway mostly carries (a replica decoding 256 sequences at ~50 tokens/s
# sends ~12k chunks/s).
HEAVY_STREAMS = 256
HEAVY_CHUNKS = 100
HEAVY_DELAY_MS = 20.0
# The gateway's budget, for one gateway process on one core: CPU per small
# request, added latency at c=1 and added time to first token, and a 100 KB
# prompt costing at most twice a small one (the body is relayed, not copied
# or re-serialized).
TARGET_CPU_US = 200.0
TARGET_ADDED_P50_US = 250.0
TARGET_ADDED_TTFT_US = 1000.0
TARGET_LARGE_RATIO = 2.0
# Many streams flowing: a new stream's first token waits at most this much
# longer than direct.
TARGET_HEAVY_ADDED_TTFT_US = 5000.0


# ---- the fast upstream ------------------------------------------------------


def _upstream_main(port: int) -> int:
    """A minimal OpenAI-shaped upstream: pre-built answers, no bookkeeping."""
    from aiohttp import web

    completion = json.dumps(
        {
            "id": "cmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok " * STREAM_TOKENS},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": 16,
                "completion_tokens": STREAM_TOKENS,
                "total_tokens": 16 + STREAM_TOKENS,
            },
        }
    ).encode()
    events = [
        b'data: {"id":"cmpl-bench","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"ok "},"finish_reason":null}]}\n\n'
    ] * STREAM_TOKENS
    events.append(
        b'data: {"id":"cmpl-bench","object":"chat.completion.chunk","choices":[],'
        b'"usage":{"prompt_tokens":16,"completion_tokens":16,"total_tokens":32}}\n\n'
        b"data: [DONE]\n\n"
    )
    models = json.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
    ).encode()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body and b'"stream": true' not in body:
            return web.Response(body=completion, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # The streaming-heavy phase asks for N chunks this far apart, as an
        # engine decoding at a steady rate would send them (body fields, so
        # that any proxy in between passes them on).
        chunks, delay = len(events) - 1, 0.0
        if b'"bench_chunks"' in body:
            ask = json.loads(body)
            chunks = int(ask["bench_chunks"])
            delay = float(ask.get("bench_delay_ms", 0.0)) / 1000.0
        for _ in range(chunks):
            await resp.write(events[0])
            if delay:
                await asyncio.sleep(delay)
        await resp.write(events[-1])
        await resp.write_eof()
        return resp

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", ok)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", empty)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"ready {bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(serve())
    return 0


def _floor_main(port: int, upstream: str) -> int:
    """The floor: a bare aiohttp pass-through proxy (no routing, no accounting).

    Whatever an aiohttp-based gateway costs beyond this is its own logic; the
    rest is the framework (HTTP parsing on both sides, the client pool).
    """
    from aiohttp import web

    session: aiohttp.ClientSession | None = None
    skip = {"content-length", "transfer-encoding", "connection", "keep-alive"}

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.post(upstream + request.path, data=body, headers=headers) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in skip},
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def serve() -> None:
        nonlocal session
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0), auto_decompress=False
        )
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", forward)
        app.router.add_get("/readyz", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    uvloop.run(serve())
    return 0


# ---- processes --------------------------------------------------------------


def _pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


class BenchError(RuntimeError):
    pass


def _gateway_config(
    upstream: str, port: int, admin_port: int, policy: str, access_log: bool, workers: int = 1
) -> str:
    return procs.gateway_toml(
        [{"url": upstream, "name": "upstream", "models": [MODEL]}],
        port=port,
        admin_port=admin_port,
        comment="generated by dp-router bench",
        server={"access_log": access_log, "shutdown_timeout_s": 1.0, "workers": workers},
        health={"slow_start_s": 0.0},  # measure the steady state from the first request
        routing={"policy": policy},
    )


# ---- measurements -----------------------------------------------------------


@dataclass(slots=True)
class WrkRun:
    requests: int
    duration_s: float
    errors: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    cpu_us_per_request: float | None = None  # gateway runs only

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @classmethod
    def median(cls, runs: Sequence[WrkRun]) -> WrkRun:
        """Field-wise median of repeated runs (robust to one disturbed run)."""
        if len(runs) == 1:
            return runs[0]
        med = statistics.median
        cpus = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
        duration = med(r.duration_s for r in runs)
        return cls(
            requests=round(med(r.rps for r in runs) * duration),
            duration_s=duration,
            errors=sum(r.errors for r in runs),
            p50_us=med(r.p50_us for r in runs),
            p90_us=med(r.p90_us for r in runs),
            p99_us=med(r.p99_us for r in runs),
            mean_us=med(r.mean_us for r in runs),
            cpu_us_per_request=med(cpus) if cpus else None,
        )


async def wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    prompt_bytes: int,
    cpu: int | None,
    gateway: Child | None = None,
) -> WrkRun:
    """One wrk run (one thread: the other core is shared with the upstream)."""
    env = {
        **os.environ,
        "BENCH_MODEL": MODEL,
        "BENCH_PROMPT_BYTES": str(prompt_bytes),
        "BENCH_MAX_TOKENS": str(STREAM_TOKENS),
    }
    argv = [
        *_pin(cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url + "/v1/chat/completions",
    ]
    cpu_before = gateway.cpu_seconds() if gateway else 0.0
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    raw_out, raw_err = await proc.communicate()
    cpu_after = gateway.cpu_seconds() if gateway else 0.0
    stdout, stderr = raw_out.decode(errors="replace"), raw_err.decode(errors="replace")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {stderr.strip() or stdout}")
    data = json.loads(line.split(" ", 1)[1])
    requests = int(data["requests"])
    errors = sum(int(v) for v in data["errors"].values())
    return WrkRun(
        requests=requests,
        duration_s=data["duration_us"] / 1e6,
        errors=errors,
        p50_us=float(data["p50_us"]),
        p90_us=float(data["p90_us"]),
        p99_us=float(data["p99_us"]),
        mean_us=float(data["mean_us"]),
        cpu_us_per_request=(
            (cpu_after - cpu_before) * 1e6 / requests if gateway and requests else None
        ),
    )


async def stream_ttfts(url: str, n: int) -> list[float]:
    """TTFT of ``n`` sequential streams on one keep-alive connection, seconds."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x" * SMALL_PROMPT_BYTES}],
            "max_tokens": STREAM_TOKENS,
            "stream": True,
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    out: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(n + n // 10):  # the first tenth warms up and is dropped
            start = time.perf_counter()
            first: float | None = None
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                if r.status != 200:
                    raise BenchError(f"stream answered {r.status}: {await r.text()}")
                async for line in r.content:
                    if first is None and line.startswith(b"data:") and b'"content"' in line:
                        first = time.perf_counter() - start
            if first is None:
                raise BenchError("a benchmark stream carried no content")
            if i >= n // 10:
                out.append(first)
    return out


@dataclass(slots=True)
class StreamLoad:
    """One streaming-heavy run: TTFT of every stream, chunks relayed, and the
    gateway's CPU over the run (None for the direct path)."""

    ttft_s: list[float]
    chunks: int
    seconds: float
    cpu_s: float | None

    def summary(self) -> dict[str, float | None]:
        q = _quantiles_us(self.ttft_s)
        return {
            "ttft_p50_us": q["p50"],
            "ttft_p99_us": q["p99"],
            "chunks_per_s": self.chunks / self.seconds,
            "cpu_cores": None if self.cpu_s is None else self.cpu_s / self.seconds,
            "cpu_us_per_chunk": None
            if self.cpu_s is None or not self.chunks
            else self.cpu_s / self.chunks * 1e6,
        }


async def stream_load(
    url: str, streams: int, chunks: int, delay_ms: float, seconds: float, proc: Child | None
) -> StreamLoad:
    """``streams`` concurrent clients, each opening one paced stream after
    another for ``seconds``; a new stream's TTFT is measured while all the
    others are flowing."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x" * SMALL_PROMPT_BYTES}],
            "max_tokens": chunks,
            "stream": True,
            "bench_chunks": chunks,
            "bench_delay_ms": delay_ms,
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    ttfts: list[float] = []
    relayed = 0
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(end: float) -> None:
            nonlocal relayed
            while loop.time() < end:
                start = time.perf_counter()
                first = None
                async with session.post(
                    url + "/v1/chat/completions", data=body, headers=headers
                ) as r:
                    if r.status != 200:
                        raise BenchError(f"stream answered {r.status}: {await r.text()}")
                    async for chunk in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - start
                        relayed += chunk.count(b"data:")
                if first is not None:
                    ttfts.append(first)

        cpu0 = proc.cpu_seconds() if proc else None
        t0 = loop.time()
        await asyncio.gather(*(client(t0 + seconds) for _ in range(streams)))
        took = loop.time() - t0
        cpu = None if proc is None or cpu0 is None else proc.cpu_seconds() - cpu0
    return StreamLoad(ttfts, relayed, took, cpu)


# ---- the report -------------------------------------------------------------

SCENARIO_LABELS = {
    "c1_small": "c=1, small body",
    "c1_100k": "c=1, 100 KB prompt",
    "c64_small": "c=64, small body",
    "c64_100k": "c=64, 100 KB prompt",
}


@dataclass(slots=True)
class BenchResult:
    upstream: str
    run_s: float
    gateway_cpu: int | None
    client_cpu: int | None
    repeat: int = 1
    # scenario -> "direct" / "gateway" / "floor" (the bare proxy, with --floor)
    runs: dict[str, dict[str, WrkRun]] = field(default_factory=dict)
    ttft_us: dict[str, dict[str, float]] = field(default_factory=dict)
    # side -> StreamLoad.summary() of the streaming-heavy phase
    heavy: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "run_s": self.run_s,
            "gateway_cpu": self.gateway_cpu,
            "client_cpu": self.client_cpu,
            "repeat": self.repeat,
            "runs": {
                name: {side: {**asdict(r), "rps": r.rps} for side, r in pair.items()}
                for name, pair in self.runs.items()
            },
            "stream_ttft_us": self.ttft_us,
            "streaming_heavy": self.heavy,
            "targets": self.targets(),
        }

    def targets(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        small = self.runs.get("c64_small", {}).get("gateway")
        large = self.runs.get("c64_100k", {}).get("gateway")
        c1 = self.runs.get("c1_small")
        if small and small.cpu_us_per_request is not None:
            cpu = small.cpu_us_per_request
            out["cpu_per_small_request_us"] = _target(cpu, TARGET_CPU_US)
        if c1:
            added = c1["gateway"].p50_us - c1["direct"].p50_us
            out["added_p50_us"] = _target(added, TARGET_ADDED_P50_US)
        if self.ttft_us:
            added = self.ttft_us["gateway"]["p50"] - self.ttft_us["direct"]["p50"]
            out["added_stream_ttft_p50_us"] = _target(added, TARGET_ADDED_TTFT_US)
        if "gateway" in self.heavy and "direct" in self.heavy:
            g, d = self.heavy["gateway"], self.heavy["direct"]
            if g["ttft_p50_us"] is not None and d["ttft_p50_us"] is not None:
                added = g["ttft_p50_us"] - d["ttft_p50_us"]
                out["heavy_added_ttft_p50_us"] = _target(added, TARGET_HEAVY_ADDED_TTFT_US)
        if small and large and small.cpu_us_per_request and large.cpu_us_per_request:
            ratio = large.cpu_us_per_request / small.cpu_us_per_request
            out["cpu_100k_vs_small_ratio"] = _target(ratio, TARGET_LARGE_RATIO)
        return out

    def table(self) -> str:
        floor = any("floor" in pair for pair in self.runs.values())
        rows: list[list[str]] = []

        def add(label: str, d: float, g: float, f: float | None, unit: str, higher: bool) -> None:
            if not d:
                delta = "-"
            elif higher:
                delta = f"x{g / d:.2f}"
            else:
                delta = f"{g - d:+.0f} {unit} (x{g / d:.2f})"
            row = [label, f"{d:.0f} {unit}", f"{g:.0f} {unit}", delta]
            if floor:
                row.append("-" if f is None else f"{f:.0f} {unit}")
            rows.append(row)

        for key, label in SCENARIO_LABELS.items():
            pair = self.runs.get(key)
            if not pair:
                continue
            d, g, f = pair["direct"], pair["gateway"], pair.get("floor")
            if key.startswith("c1"):
                add(
                    f"{label}: latency p50",
                    d.p50_us,
                    g.p50_us,
                    f.p50_us if f else None,
                    "us",
                    False,
                )
                add(
                    f"{label}: latency p99",
                    d.p99_us,
                    g.p99_us,
                    f.p99_us if f else None,
                    "us",
                    False,
                )
            add(f"{label}: throughput", d.rps, g.rps, f.rps if f else None, "req/s", True)
        if self.ttft_us:
            d2, g2 = self.ttft_us["direct"], self.ttft_us["gateway"]
            f2 = self.ttft_us.get("floor")
            for q in ("p50", "p99"):
                label = f"stream TTFT {q} (keep-alive, c=1)"
                add(label, d2[q], g2[q], f2[q] if f2 else None, "us", False)
        header = ["measurement", "direct", "through gateway", "gateway adds / ratio"]
        if floor:
            header.append("bare aiohttp proxy")
        runs = "one run" if self.repeat == 1 else f"median of {self.repeat} interleaved runs"
        lines = [
            f"Gateway overhead ({runs} of {self.run_s:g} s per figure; upstream: {self.upstream}; "
            f"gateway on core {self.gateway_cpu}, wrk + upstream on core {self.client_cpu})",
            "",
            _md(header, rows),
            "",
            "CPU per request (utime+stime / requests served):",
            "",
        ]
        cpu_header = ["run", "gateway"] + (["bare aiohttp proxy"] if floor else [])
        cpu_rows = []
        for key, pair in self.runs.items():
            row = [SCENARIO_LABELS[key], _us(pair["gateway"].cpu_us_per_request)]
            if floor:
                row.append(_us(pair["floor"].cpu_us_per_request if "floor" in pair else None))
            cpu_rows.append(row)
        lines.append(_md(cpu_header, cpu_rows))
        errors = {
            f"{k}/{side}": r.errors
            for k, pair in self.runs.items()
            for side, r in pair.items()
            if r.errors
        }
        if errors:
            lines += ["", f"wrk errors (non-2xx, timeouts, resets): {errors}"]
        if self.heavy:
            lines += ["", "Streaming-heavy phase (concurrent paced streams):", ""]
            h_rows = []
            for side, h in self.heavy.items():
                cores = h["cpu_cores"]
                per_chunk = h["cpu_us_per_chunk"]
                h_rows.append(
                    [
                        side,
                        f"{h['chunks_per_s']:.0f}",
                        _us(h["ttft_p50_us"]),
                        _us(h["ttft_p99_us"]),
                        "-" if cores is None else f"{cores:.2f}",
                        _us(per_chunk),
                    ]
                )
            lines.append(
                _md(
                    ["path", "chunks/s", "TTFT p50", "TTFT p99", "CPU cores", "CPU per chunk"],
                    h_rows,
                )
            )
        lines += ["", "Targets (one gateway process on one core):", ""]
        t_rows = [
            [name, f"{t['value']:.2f}", f"<= {t['target']:g}", "ok" if t["ok"] else "MISSED"]
            for name, t in self.targets().items()
        ]
        lines.append(_md(["target", "measured", "goal", ""], t_rows))
        return "\n".join(lines) + "\n"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} us"


def _target(value: float, goal: float) -> dict[str, Any]:
    return {"value": value, "target": goal, "ok": value <= goal}


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def _quantiles_us(values: list[float]) -> dict[str, float]:
    data = sorted(values)
    return {
        "p50": percentile(data, 0.5) * 1e6,
        "p90": percentile(data, 0.9) * 1e6,
        "p99": percentile(data, 0.99) * 1e6,
        "mean": statistics.fmean(data) * 1e6,
    }


# ---- orchestration ----------------------------------------------------------


def _cpus() -> tuple[int | None, int | None]:
    """(gateway core, upstream + client core), or (None, None) with one core."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


@contextlib.asynccontextmanager
async def _processes(
    args: argparse.Namespace, workdir: Path
) -> AsyncIterator[tuple[str, str, Child, tuple[str, Child] | None]]:
    """The upstream, the gateway (and the bare proxy with --floor); all stopped on exit."""
    gw_cpu, other_cpu = _cpus()
    async with contextlib.AsyncExitStack() as stack:

        async def start(name: str, argv: list[str], *, stdout_pipe: bool = False) -> Child:
            child = await procs.spawn(
                name, argv, log=workdir / f"{name}.log", stdout_pipe=stdout_pipe
            )
            stack.push_async_callback(child.stop)
            return child

        if args.upstream == "replica":
            argv = procs.dp_router(
                "replica", "--port", "0", "--model", MODEL, "--paced", "--token-interval", "0",
                "--max-tokens", str(STREAM_TOKENS),
            )  # fmt: skip
        else:
            argv = procs.dp_router("bench", "_upstream", "0")
        up = await start("upstream", [*_pin(other_cpu), *argv], stdout_pipe=True)
        (up_port,) = await up.ready_ports(1)
        upstream = f"http://{HOST}:{up_port}"
        port, admin_port = procs.free_ports(2)
        config = workdir / "gateway.toml"
        config.write_text(
            _gateway_config(upstream, port, admin_port, args.policy, args.access_log, args.workers)
        )
        # The access log is an INFO record: WARNING would mute it even with
        # --access-log. Either way it goes to a file, as in production.
        level = "INFO" if args.access_log else "WARNING"
        argv = procs.dp_router("serve", "--config", str(config), "--log-level", level)
        # N workers need more than the one core a single process is pinned to.
        gw = await start("gateway", [*(_pin(gw_cpu) if args.workers == 1 else []), *argv])
        gateway = f"http://{HOST}:{port}"
        await gw.wait_http(gateway + "/readyz")
        floor: tuple[str, Child] | None = None
        if args.floor:
            (floor_port,) = procs.free_ports(1)
            argv = procs.dp_router("bench", "_floor", str(floor_port), upstream)
            fp = await start("floor", [*_pin(gw_cpu), *argv])
            await fp.wait_http(f"http://{HOST}:{floor_port}/readyz")
            floor = (f"http://{HOST}:{floor_port}", fp)
        yield upstream, gateway, gw, floor


async def run_bench(args: argparse.Namespace) -> BenchResult:
    gw_cpu, other_cpu = _cpus()
    if other_cpu is not None:
        # The Python parts of the client (TTFT streams) stay off the gateway's core.
        os.sched_setaffinity(0, {other_cpu})
    result = BenchResult(
        upstream=args.upstream,
        run_s=args.seconds,
        gateway_cpu=gw_cpu,
        client_cpu=other_cpu,
        repeat=args.repeat,
    )
    with tempfile.TemporaryDirectory(prefix="dp-router-bench-") as tmp:
        async with _processes(args, Path(tmp)) as (upstream, gateway, gw, floor):
            await _measure(args, result, upstream, gateway, gw, floor)
    return result


async def _measure(
    args: argparse.Namespace,
    result: BenchResult,
    upstream: str,
    gateway: str,
    gw: Child,
    floor: tuple[str, Child] | None,
) -> None:
    gw_cpu, other_cpu = result.gateway_cpu, result.client_cpu
    say = _say
    say(f"upstream {args.upstream} at {upstream}; gateway at {gateway} (core {gw_cpu})")
    # Warm-up at the highest concurrency, so every pool holds its connections.
    for url in [gateway] + ([floor[0]] if floor else []):
        await wrk(
            url,
            connections=HIGH_CONCURRENCY,
            seconds=WARMUP_S,
            prompt_bytes=SMALL_PROMPT_BYTES,
            cpu=other_cpu,
        )
    scenarios = [
        ("c1_small", 1, SMALL_PROMPT_BYTES),
        ("c64_small", HIGH_CONCURRENCY, SMALL_PROMPT_BYTES),
        ("c1_100k", 1, LARGE_PROMPT_BYTES),
        ("c64_100k", HIGH_CONCURRENCY, LARGE_PROMPT_BYTES),
    ]
    targets: list[tuple[str, str, Child | None]] = [
        ("direct", upstream, None),
        ("gateway", gateway, gw),
    ]
    if floor:
        targets.append(("floor", floor[0], floor[1]))
    for name, conns, size in scenarios:
        # Interleaved repetitions, so a noisy neighbour hits every side alike.
        reps: dict[str, list[WrkRun]] = {side: [] for side, _, _ in targets}
        for _ in range(args.repeat):
            for side, url, proc in targets:
                run = await wrk(
                    url,
                    connections=conns,
                    seconds=args.seconds,
                    prompt_bytes=size,
                    cpu=other_cpu,
                    gateway=proc,
                )
                reps[side].append(run)
        result.runs[name] = {side: WrkRun.median(runs) for side, runs in reps.items()}
        direct, via = result.runs[name]["direct"], result.runs[name]["gateway"]
        say(
            f"{name}: direct {direct.rps:.0f} req/s p50 {direct.p50_us:.0f} us; "
            f"gateway {via.rps:.0f} req/s p50 {via.p50_us:.0f} us, "
            f"{via.cpu_us_per_request or 0:.0f} us CPU/req"
        )
    result.ttft_us = {
        "direct": _quantiles_us(await stream_ttfts(upstream, args.streams)),
        "gateway": _quantiles_us(await stream_ttfts(gateway, args.streams)),
    }
    if floor:
        result.ttft_us["floor"] = _quantiles_us(await stream_ttfts(floor[0], args.streams))
    say(
        f"stream TTFT p50: direct {result.ttft_us['direct']['p50']:.0f} us, "
        f"gateway {result.ttft_us['gateway']['p50']:.0f} us"
    )
    if args.heavy_streams:
        for side, url, proc in [("direct", upstream, None), ("gateway", gateway, gw)] + (
            [("floor", floor[0], floor[1])] if floor else []
        ):
            load = await stream_load(
                url,
                args.heavy_streams,
                args.heavy_chunks,
                args.heavy_delay_ms,
                args.heavy_seconds,
                proc,
            )
            result.heavy[side] = load.summary()
            say(f"streaming-heavy {side}: {result.heavy[side]}")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router bench",
        description="Gateway overhead: direct-to-upstream vs through the gateway, same run.",
    )
    p.add_argument("--seconds", type=float, default=DEFAULT_RUN_S, help="per wrk run")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_RUN_S:g} s runs, fewer streams")
    p.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help="sequential TTFT streams")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per measurement, interleaved; the median is reported (3 on shared machines)",
    )
    p.add_argument("--upstream", choices=("minimal", "replica"), default="minimal")
    p.add_argument("--policy", default="round_robin", help="gateway policy (one upstream)")
    p.add_argument("--access-log", action="store_true", help="measure with access logging on")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway worker processes (docs/workers.md); above 1 the gateway is not pinned, "
        "and its CPU per request counts the supervisor process only",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure a bare aiohttp pass-through proxy on the gateway's core",
    )
    p.add_argument(
        "--heavy-streams",
        type=int,
        default=HEAVY_STREAMS,
        help="streaming-heavy phase: concurrent streams (0: skip the phase)",
    )
    p.add_argument("--heavy-chunks", type=int, default=HEAVY_CHUNKS, help="chunks per stream")
    p.add_argument(
        "--heavy-delay-ms", type=float, default=HEAVY_DELAY_MS, help="pause between chunks"
    )
    p.add_argument("--heavy-seconds", type=float, default=10.0, help="streaming-heavy run length")
    p.add_argument("--json", action="store_true", help="print results JSON to stdout")
    p.add_argument("--out", type=Path, help="write bench.json and bench.md here")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["_upstream"]:  # internal: the fast upstream subprocess
        return _upstream_main(int(argv[1]) if len(argv) > 1 else 0)
    if argv[:1] == ["_floor"]:  # internal: the bare-proxy floor subprocess
        return _floor_main(int(argv[1]), argv[2])
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0 or args.workers < 1:
        print(
            "dp-router bench: --repeat and --workers must be >= 1 and --seconds > 0",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.seconds = min(args.seconds, QUICK_RUN_S)
        args.streams = min(args.streams, 100)
        args.heavy_streams = min(args.heavy_streams, 32)
        args.heavy_chunks = min(args.heavy_chunks, 20)
        args.heavy_seconds = min(args.heavy_seconds, QUICK_RUN_S)
    if shutil.which("wrk") is None:
        print(
            "dp-router bench: wrk is not installed (Debian/Ubuntu: apt-get install -y wrk; "
            "macOS: brew install wrk)",
            file=sys.stderr,
        )
        return 2
    try:
        result = uvloop.run(run_bench(args))
    except (BenchError, StartError) as exc:
        print(f"dp-router bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(result.table())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        (args.out / "bench.md").write_text(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
