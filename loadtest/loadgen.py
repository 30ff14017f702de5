"""``dp-router loadtest``: drive an OpenAI-compatible endpoint with a workload.

Works against anything that speaks ``/v1/chat/completions``: the gateway, one
replica directly, or another router, so the same numbers compare them.

Two loops:

- open loop (``--rate R``, or a trace's own timestamps): each conversation
  starts at its ``arrival_s`` whatever the server is doing, and each later
  turn is sent ``think_time_s`` after the previous answer completed. This is
  the loop that exposes queueing: a slow server does not slow the arrivals.
- closed loop (``--concurrency C``): C workers, each runs conversations turn
  after turn with no think time, so exactly C requests are in flight. Good
  for throughput ceilings; it hides queueing delay (coordinated omission).

No new turn starts after ``--duration`` or once ``--requests`` turns were
sent; the run then waits for what is in flight. Per request it records TTFT
(first SSE event carrying content), TPOT, end-to-end latency, output tokens,
the error kind, and the replica that served it (``x-dp-replica``).

Efficiency matters on small machines (the generator must not steal the CPU of
the gateway it measures): one aiohttp session with a pool sized to the
concurrency, request bodies serialized once, and SSE events JSON-parsed only
until the first content and for the usage / error events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

from loadtest.replica.server import DOMAIN_HEADER
from loadtest.report import (
    ErrorKind,
    RequestRecord,
    RunResult,
    comparison_table,
    load_results,
    markdown_summary,
    summarize,
    write_plots,
    write_results,
)
from loadtest.workloads import WORKLOADS, Conversation, Turn, load_workload

T = TypeVar("T")

REPLICA_HEADER = "x-dp-replica"
SESSION_HEADER = "x-session-id"

# Per-request limit; long enough for a few thousand tokens at vLLM decode
# speeds, short enough that a hung upstream cannot stall a run forever.
DEFAULT_TIMEOUT_S = 120.0
# Open loop has no natural concurrency; this caps sockets so a stalled server
# cannot make the generator open thousands (requests beyond it queue in the
# client pool and that wait is counted in their latency, as it should be).
OPEN_LOOP_MAX_CONNECTIONS = 1024
# Conversations generated per batch when the run is bounded by time only.
WORKLOAD_BATCH = 2000
# Progress bar refresh: often enough to look alive, rarely enough to be free.
PROGRESS_INTERVAL_S = 0.25
DEFAULT_WORKLOAD = "chat"
# Conversations looked at to tell a trace (timestamps) from a synthetic
# workload generated without --rate (everything at t=0). Traces may start
# with a few simultaneous requests (Mooncake does), never with this many.
NO_TIMESTAMPS_PEEK = 50

# vLLM's counters, in tokens (v1 names; prometheus_client strips "_total"
# from family names, so both spellings are matched on sample names).
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")


@dataclass(slots=True)
class LoadConfig:
    """One run's settings (the CLI flags, minus output options)."""

    target: str
    model: str | None = None  # None: ask the target's /v1/models
    rate: float | None = None  # open loop: Poisson conversation arrivals per second
    concurrency: int | None = None  # closed loop
    duration_s: float | None = None
    requests: int | None = None
    stream: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S
    api_key: str | None = None
    replica_metrics: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    # Send each conversation's id as X-Session-ID (sticky routing at the
    # gateway); off to compare policies without stickiness.
    session_header: bool = True

    def __post_init__(self) -> None:
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("give --rate (open loop) or --concurrency (closed loop), not both")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give --duration or --requests (or both)")

    @property
    def mode(self) -> str:
        sessions = "session header" if self.session_header else "no session header"
        if self.concurrency is not None:
            return f"concurrency={self.concurrency}, {sessions}"
        if self.rate is not None:
            return f"rate={self.rate:g} conversations/s, {sessions}"
        return f"trace arrivals, {sessions}"


def base_url(target: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all mean the same server."""
    url = target.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


# ---- one request ------------------------------------------------------------


class _Sender:
    """Sends turns and turns responses into :class:`RequestRecord` objects."""

    def __init__(self, cfg: LoadConfig, session: aiohttp.ClientSession, model: str, t0: float):
        self.cfg = cfg
        self.session = session
        self.model = model
        self.t0 = t0
        self.url = base_url(cfg.target) + "/v1/chat/completions"
        self.timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        self.base_headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            self.base_headers["Authorization"] = f"Bearer {cfg.api_key}"

    def body(self, turn: Turn) -> bytes:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": turn.messages(),
            "max_tokens": turn.output_tokens,
            "stream": self.cfg.stream,
        }
        if self.cfg.stream:
            payload["stream_options"] = {"include_usage": True}
        return json.dumps(payload, separators=(",", ":")).encode()

    async def send(self, conv: Conversation, index: int, turn: Turn) -> RequestRecord:
        headers = dict(self.base_headers)
        if self.cfg.session_header:
            headers[SESSION_HEADER] = conv.id
        # The simulated replica's MoE model draws expert popularity per
        # domain; real servers ignore the header.
        if conv.domain:
            headers[DOMAIN_HEADER] = conv.domain
        data = self.body(turn)
        now = time.perf_counter
        start = now()
        rec = RequestRecord(
            conversation=conv.id,
            turn=index,
            start_s=start - self.t0,
            e2e_s=0.0,
            prompt_tokens=turn.prompt_tokens,
        )
        got_headers = False
        try:
            async with self.session.post(
                self.url, data=data, headers=headers, timeout=self.timeout
            ) as resp:
                got_headers = True
                rec.status = resp.status
                rec.replica = resp.headers.get(REPLICA_HEADER)
                if resp.status >= 400:
                    await resp.read()
                    rec.error = ErrorKind.HTTP
                elif self.cfg.stream:
                    await self._read_stream(resp, rec, start)
                else:
                    await self._read_json(resp, rec)
        except TimeoutError:
            rec.error = ErrorKind.TIMEOUT
        except aiohttp.ClientError:
            rec.error = ErrorKind.TRUNCATED if got_headers else ErrorKind.CONNECT
        rec.e2e_s = now() - start
        return rec

    @staticmethod
    async def _read_json(resp: aiohttp.ClientResponse, rec: RequestRecord) -> None:
        try:
            obj = json.loads(await resp.read())
        except ValueError:
            rec.error = ErrorKind.TRUNCATED
            return
        if not isinstance(obj, dict) or "error" in obj or "choices" not in obj:
            rec.error = ErrorKind.IN_BAND
            return
        usage = obj.get("usage") or {}
        rec.output_tokens = int(usage.get("completion_tokens") or 0)

    @staticmethod
    async def _read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, start: float) -> None:
        """Consume an SSE stream; parse JSON only where it tells us something.

        Reads whatever bytes arrived (``iter_any``) and splits lines itself:
        one await per network read instead of one per line (measured: 0.75
        instead of 0.91 ms of CPU per 16-token stream).
        """
        state = _StreamState()
        tail = b""
        async for chunk in resp.content.iter_any():
            if state.finished:
                continue  # read to the end anyway: a fully read response keeps its connection
            lines = (tail + chunk).split(b"\n") if tail else chunk.split(b"\n")
            tail = lines.pop()
            for raw in lines:
                if raw.startswith(b"data:") and state.feed(raw[5:].strip(), rec, start):
                    break
        if tail.startswith(b"data:") and not state.finished:
            state.feed(tail[5:].strip(), rec, start)
        if rec.error is None and not state.done:
            rec.error = ErrorKind.TRUNCATED
        rec.output_tokens = (
            state.usage_tokens if state.usage_tokens is not None else state.content_events
        )


class _StreamState:
    """What a stream told us so far; ``feed`` returns True when it is over."""

    __slots__ = ("content_events", "done", "finished", "usage_tokens")

    def __init__(self) -> None:
        self.content_events = 0
        self.usage_tokens: int | None = None
        self.done = False  # saw [DONE]
        self.finished = False  # nothing more to read ([DONE] or an error)

    def feed(self, payload: bytes, rec: RequestRecord, start: float) -> bool:
        if payload == b"[DONE]":
            self.done = self.finished = True
            return True
        if rec.ttft_s is None or b'"error"' in payload or b'"completion_tokens"' in payload:
            try:
                obj = json.loads(payload)
            except ValueError:
                rec.error = ErrorKind.TRUNCATED
                self.finished = True
                return True
            if not isinstance(obj, dict) or "error" in obj or obj.get("object") == "error":
                rec.error = ErrorKind.IN_BAND
                self.finished = True
                return True
            usage = obj.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                self.usage_tokens = int(usage["completion_tokens"])
            if _has_content(obj):
                self.content_events += 1
                if rec.ttft_s is None:
                    rec.ttft_s = time.perf_counter() - start
        elif b'"content"' in payload or b'"text"' in payload:
            self.content_events += 1
        return False


def _has_content(obj: dict[str, Any]) -> bool:
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("content"):
            return True
        if choice.get("text"):
            return True
    return False


# ---- metrics scraping -------------------------------------------------------


async def scrape_prefix_counters(
    session: aiohttp.ClientSession, urls: Iterable[str]
) -> tuple[float, float] | None:
    """Sum of vLLM prefix-cache (queries, hits) over ``urls``; None if none answered."""
    from prometheus_client.parser import text_string_to_metric_families

    queries = hits = 0.0
    answered = False
    for url in urls:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            continue
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in PREFIX_QUERIES:
                        queries += sample.value
                        answered = True
                    elif sample.name in PREFIX_HITS:
                        hits += sample.value
        except ValueError:
            continue
    return (queries, hits) if answered else None


def hit_rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if before is None or after is None:
        return None
    queries, hits = after[0] - before[0], after[1] - before[1]
    return hits / queries if queries > 0 else None


async def discover_model(
    session: aiohttp.ClientSession, target: str, headers: dict[str, str]
) -> str:
    """The first model the target lists, so ``--model`` is optional."""
    url = base_url(target) + "/v1/models"
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(10)) as resp:
            data = await resp.json(content_type=None)
        return str(data["data"][0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
        raise SystemExit(f"loadtest: could not list models at {url}; pass --model") from None


# ---- workloads --------------------------------------------------------------


def conversations(
    workload: str,
    *,
    seed: int,
    requests: int | None,
    rate: float | None,
    speed: float = 1.0,
) -> Iterator[Conversation]:
    """The workload as a stream of conversations (``loadtest.workloads`` names or a trace).

    With ``requests`` it is exactly that many turns. Without (a run bounded by
    time only) batches are generated on demand with fresh seeds, continuing
    arrival times and unique ids, so a long run never needs to know its
    request count up front. A bad name or file raises ValueError here, at
    once, not in the middle of a run.
    """
    if requests is not None:
        return load_workload(workload, seed=seed, requests=requests, rate=rate, speed=speed)
    first = load_workload(workload, seed=seed, requests=WORKLOAD_BATCH, rate=rate, speed=speed)
    return _batches(first, workload, seed=seed, rate=rate, speed=speed)


def _batches(
    first: Iterator[Conversation], workload: str, *, seed: int, rate: float | None, speed: float
) -> Iterator[Conversation]:
    batch, offset, source = 0, 0.0, first
    while True:
        last = offset
        empty = True
        for conv in source:
            empty = False
            if batch:
                conv = dataclasses.replace(
                    conv, id=f"{conv.id}.b{batch}", arrival_s=conv.arrival_s + offset
                )
            last = max(last, conv.arrival_s)
            yield conv
        if empty:
            return
        batch, offset = batch + 1, last
        source = load_workload(
            workload, seed=seed + batch, requests=WORKLOAD_BATCH, rate=rate, speed=speed
        )


# ---- the run ----------------------------------------------------------------


class _Budget:
    """Shared stop conditions: request count, deadline, and an external stop."""

    def __init__(self, cfg: LoadConfig, t0: float, stop: asyncio.Event) -> None:
        self.left = cfg.requests if cfg.requests is not None else math.inf
        self.deadline = t0 + cfg.duration_s if cfg.duration_s is not None else math.inf
        self.stop = stop
        self.started = 0
        self.done = 0
        self.errors = 0

    def take(self) -> bool:
        """Reserve one request, or say the run is over."""
        if self.left <= 0 or self.stop.is_set() or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def run_load(
    cfg: LoadConfig,
    workload: Iterable[Conversation],
    *,
    label: str = "run",
    workload_name: str = "",
    stop: asyncio.Event | None = None,
    progress: bool = False,
) -> RunResult:
    """Run ``workload`` against ``cfg.target`` and summarize what was seen."""
    stop = stop or asyncio.Event()
    pool = cfg.concurrency or OPEN_LOOP_MAX_CONNECTIONS
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool, ttl_dns_cache=300)
    records: list[RequestRecord] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        model = cfg.model or await discover_model(session, cfg.target, _auth(cfg))
        before = await scrape_prefix_counters(session, cfg.replica_metrics)
        t0 = time.perf_counter()
        sender = _Sender(cfg, session, model, t0)
        budget = _Budget(cfg, t0, stop)
        bar = asyncio.create_task(_progress(cfg, budget, t0)) if progress else None

        async def one(conv: Conversation, index: int, turn: Turn) -> None:
            budget.started += 1
            rec = await sender.send(conv, index, turn)
            records.append(rec)
            budget.done += 1
            budget.errors += not rec.ok

        try:
            if cfg.concurrency is not None:
                await _closed_loop(cfg.concurrency, workload, budget, one)
            else:
                await _open_loop(workload, budget, one, t0)
        finally:
            if bar is not None:
                bar.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await bar
                print(file=sys.stderr)
        wall = max((r.start_s + r.e2e_s for r in records), default=time.perf_counter() - t0)
        after = await scrape_prefix_counters(session, cfg.replica_metrics)
    records.sort(key=lambda r: r.start_s)
    return summarize(
        records,
        wall_s=wall,
        label=label,
        target=cfg.target,
        workload=workload_name,
        mode=cfg.mode,
        prefix_hit_rate=hit_rate(before, after),
        extra={"model": model, "stream": cfg.stream},
    )


def _auth(cfg: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


SendFn = Callable[[Conversation, int, Turn], Coroutine[Any, Any, None]]


async def _open_loop(
    workload: Iterable[Conversation], budget: _Budget, one: SendFn, t0: float
) -> None:
    async def converse(conv: Conversation) -> None:
        for index, turn in enumerate(conv.turns):
            if index and turn.think_time_s > 0:
                if time.perf_counter() + turn.think_time_s >= budget.deadline:
                    return  # the next turn would start after the run: do not wait for it
                await _sleep_or_stop(turn.think_time_s, budget.stop)
            if not budget.take():
                return
            await one(conv, index, turn)

    tasks: set[asyncio.Task[None]] = set()
    try:
        for conv in workload:
            if t0 + conv.arrival_s >= budget.deadline:
                break
            delay = t0 + conv.arrival_s - time.perf_counter()
            if await _sleep_or_stop(delay, budget.stop):
                break
            if not budget.take():
                break
            budget.left += 1  # only a peek: converse() takes it for real
            task = asyncio.create_task(converse(conv))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        # Cancelled (Ctrl-C, demo shutdown) or failed: no conversation may
        # outlive the run and its HTTP session.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _closed_loop(
    concurrency: int, workload: Iterable[Conversation], budget: _Budget, one: SendFn
) -> None:
    source = iter(workload)

    async def worker() -> None:
        for conv in source:  # the iterator is shared: each conversation goes to one worker
            for index, turn in enumerate(conv.turns):
                if not budget.take():
                    return
                await one(conv, index, turn)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _sleep_or_stop(delay: float, stop: asyncio.Event) -> bool:
    """Sleep ``delay`` seconds (at least one loop turn); True if ``stop`` was set."""
    if delay <= 0:
        await asyncio.sleep(0)  # a burst of arrivals must still let requests run
    else:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


async def _progress(cfg: LoadConfig, budget: _Budget, t0: float) -> None:
    """A one-line progress bar on stderr (only used when stderr is a TTY)."""
    width = 30
    while True:
        elapsed = time.perf_counter() - t0
        fractions = []
        if cfg.duration_s:
            fractions.append(elapsed / cfg.duration_s)
        if cfg.requests:
            fractions.append(budget.done / cfg.requests)
        frac = min(1.0, max(fractions, default=0.0))
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(
            f"\r[{bar}] {elapsed:6.1f}s  {budget.done} done  "
            f"{budget.started - budget.done} in flight  {budget.errors} errors "
        )
        sys.stderr.flush()
        await asyncio.sleep(PROGRESS_INTERVAL_S)


# ---- CLI --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router loadtest",
        description="Drive load at an OpenAI-compatible endpoint and report latencies.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="base URL, e.g. http://127.0.0.1:8000")
    what.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="no load: print saved runs side by side (results.json files or --out dirs)",
    )
    p.add_argument(
        "--workload",
        default=DEFAULT_WORKLOAD,
        help=f"workload name ({', '.join(WORKLOADS)}) or a trace file (Azure CSV, Mooncake JSONL)",
    )
    loop = p.add_mutually_exclusive_group()
    loop.add_argument(
        "--rate",
        type=float,
        help="open loop: Poisson conversation arrivals per second (default without "
        "--concurrency: the workload's own timestamps, e.g. a trace)",
    )
    loop.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--duration", type=float, help="seconds during which requests are started")
    p.add_argument("--requests", type=int, help="number of requests (turns) to send")
    p.add_argument("--speed", type=float, default=1.0, help="trace replay speed-up factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model name (default: the target's first /v1/models entry)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--session-header",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each conversation's id as X-Session-ID (sticky sessions at a gateway); "
        "--no-session-header compares policies without stickiness",
    )
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per request, s")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument(
        "--replica-metrics",
        action="append",
        default=[],
        metavar="URL",
        help="replica /metrics URL for the prefix-cache hit rate (repeatable)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra request header (repeatable), e.g. x-sim-fault:status=503",
    )
    p.add_argument("--label", default="run", help="name of this run in reports")
    p.add_argument("--json", action="store_true", help="print results JSON to stdout")
    p.add_argument("--out", type=Path, help="directory for results.json and summary.md")
    p.add_argument("--plots", action="store_true", help="PNG charts into --out (matplotlib)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        return _compare(args.compare, args.out)
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            print(f"dp-router loadtest: --header expects NAME:VALUE, got {item!r}", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    try:
        cfg = LoadConfig(
            target=args.target,
            model=args.model,
            rate=args.rate,
            concurrency=args.concurrency,
            duration_s=args.duration,
            requests=args.requests,
            stream=args.stream,
            session_header=args.session_header,
            timeout_s=args.timeout,
            api_key=args.api_key,
            replica_metrics=args.replica_metrics,
            headers=headers,
        )
    except ValueError as exc:
        print(f"dp-router loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        workload = conversations(
            args.workload, seed=args.seed, requests=args.requests, rate=args.rate, speed=args.speed
        )
    except ValueError as exc:
        print(f"dp-router loadtest: {exc}", file=sys.stderr)
        return 2
    if cfg.rate is None and cfg.concurrency is None:
        head = list(itertools.islice(workload, NO_TIMESTAMPS_PEEK))
        if len(head) > 1 and all(c.arrival_s == 0.0 for c in head):
            print(
                f"dp-router loadtest: workload {args.workload!r} has no timestamps; "
                "give --rate or --concurrency",
                file=sys.stderr,
            )
            return 2
        workload = itertools.chain(head, workload)

    async def run() -> RunResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # First Ctrl-C: stop starting requests, finish and report. Second: abort.
        loop.add_signal_handler(signal.SIGINT, _first_interrupt, loop, stop)
        return await run_load(
            cfg,
            workload,
            label=args.label,
            workload_name=args.workload,
            stop=stop,
            progress=sys.stderr.isatty(),
        )

    result = run_with_uvloop(run())
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(markdown_summary(result))
    if args.out:
        for path in write_results([result], args.out):
            print(f"wrote {path}", file=sys.stderr)
    if args.plots:
        paths = write_plots([result], args.out or Path("."))
        if paths is None:
            print("plots skipped: matplotlib is not installed", file=sys.stderr)
        else:
            for path in paths:
                print(f"wrote {path}", file=sys.stderr)
    return 0 if result.ok else 1


def _compare(paths: list[Path], out: Path | None) -> int:
    """Saved runs side by side (policy A's run vs policy B's, from their --out dirs)."""
    runs: list[RunResult] = []
    for path in paths:
        file = path / "results.json" if path.is_dir() else path
        try:
            runs += load_results(file)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"dp-router loadtest: cannot read {file}: {exc}", file=sys.stderr)
            return 2
    print(comparison_table(runs))
    if out:
        for written in write_results(runs, out):
            print(f"wrote {written}", file=sys.stderr)
    return 0


def _first_interrupt(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    print("\ninterrupted: finishing requests in flight (Ctrl-C again to abort)", file=sys.stderr)
    stop.set()
    loop.remove_signal_handler(signal.SIGINT)


def run_with_uvloop(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop (cheaper per request: more CPU for the server)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
