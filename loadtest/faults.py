"""``dp-router faults``: what clients see when a replica dies or freezes under load.

Runs the real processes (one simulated replica per process, so a SIGKILL
takes exactly one down, and a gateway process) under a steady closed-loop
load of mixed streaming and non-streaming chats, then injects one fault:

- ``kill``: SIGKILL a replica, restart it on the same port after ``--down-for``;
- ``stop``: SIGSTOP a replica (TCP stays open, nothing answers), SIGCONT after
  ``--down-for``.

It reports the client requests that failed (before their first byte, and
in-band after it), how long until the victim stopped receiving new attempts,
and how long after the replica was back until it served again. The gateway
runs with the test timings (health every 0.5 s, fall 2, rise 2; first-byte
timeout 1 s; response timeout 3 s) so a run takes seconds; scale by your
own settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from loadtest.demo import (
    Child,
    free_ports,
    spawn,
    stop,
    wait_http_ready,
    wait_replicas_ready,
)

MODEL = "sim-model"
HEALTH_INTERVAL_S = 0.5
RISE = FALL = 2


@dataclass(slots=True)
class Outcome:
    t: float  # request start, seconds since the run started
    end: float
    stream: bool
    status: int
    ok: bool
    started: bool  # a first byte reached the client
    replica: str | None


@dataclass(slots=True)
class FaultReport:
    scenario: str
    requests: int
    failed_before_first_byte: int
    failed_in_band: int
    victim_out_after_s: float | None  # fault -> the gateway stops routing to it
    back_to_served_s: float | None
    p99_latency_before_ms: float
    p99_latency_during_ms: float
    notes: list[str] = field(default_factory=list)


def gateway_toml(port: int, admin_port: int, urls: list[str]) -> str:
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "access_log = false",
        "[admin]",
        f"port = {admin_port}",
        "[upstream]",
        "connect_timeout_s = 1.0",
        "first_byte_timeout_s = 1.0",
        "idle_timeout_s = 1.0",
        "response_timeout_s = 3.0",
        "[health]",
        f"interval_s = {HEALTH_INTERVAL_S}",
        "timeout_s = 0.4",
        f"healthy_threshold = {RISE}",
        f"unhealthy_threshold = {FALL}",
        "slow_start_s = 2.0",
        "[outlier]",
        "consecutive_failures = 3",
        "base_ejection_s = 2.0",
        "max_ejection_s = 10.0",
    ]
    for i, url in enumerate(urls):
        lines += ["[[replicas]]", f'url = "{url}"', f'name = "r{i}"', f'models = ["{MODEL}"]']
    return "\n".join(lines) + "\n"


async def _start_replica(port: int, logdir: Path) -> Child:
    child = await spawn(
        f"replica-{port}",
        [
            sys.executable,
            "-m",
            "router",
            "replica",
            "--port",
            str(port),
            "--model",
            MODEL,
            "--token-interval",
            "0.01",
        ],
        logdir / f"replica-{port}.log",
        pipe_stdout=True,
    )
    await wait_replicas_ready(child, 1)
    return child


async def run_scenario(
    scenario: str,
    replicas: int,
    concurrency: int,
    fault_at: float,
    down_for: float,
    duration: float,
) -> FaultReport:
    logdir = Path(tempfile.mkdtemp(prefix="dp-router-faults-"))
    ports = free_ports(replicas + 2)
    rports, gport, aport = ports[:replicas], ports[-2], ports[-1]
    urls = [f"http://127.0.0.1:{p}" for p in rports]
    children = [await _start_replica(p, logdir) for p in rports]
    cfg = logdir / "gateway.toml"
    cfg.write_text(gateway_toml(gport, aport, urls))
    gw = await spawn(
        "gateway",
        [sys.executable, "-m", "router", "serve", "--config", str(cfg)],
        logdir / "gateway.log",
        pipe_stdout=False,
    )
    base = f"http://127.0.0.1:{gport}"
    outcomes: list[Outcome] = []
    marks: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_http_ready(gw, base + "/readyz", session)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            deadline = t0 + duration

            async def worker(i: int) -> None:
                n = 0
                while loop.time() < deadline:
                    n += 1
                    stream = (i + n) % 2 == 0
                    outcomes.append(await _one(session, base, stream, loop, t0))

            async def inject() -> None:
                await asyncio.sleep(fault_at)
                victim = children[0]
                marks["fault"] = loop.time() - t0
                if scenario == "kill":
                    victim.proc.send_signal(signal.SIGKILL)
                    await victim.proc.wait()
                    await asyncio.sleep(down_for)
                    children[0] = await _start_replica(rports[0], logdir)
                else:
                    victim.proc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(down_for)
                    victim.proc.send_signal(signal.SIGCONT)
                marks["back"] = loop.time() - t0

            async def watch() -> None:
                """When the gateway stops (and resumes) routing to the victim."""
                admin = f"http://127.0.0.1:{aport}/admin/replicas"
                was = True
                while loop.time() < deadline:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(admin) as resp:
                            view = {r["name"]: r for r in (await resp.json())["replicas"]}
                        now = view["r0"]["routable"]
                        if was and not now and "fault" in marks and "out" not in marks:
                            marks["out"] = loop.time() - t0
                        was = now
                    await asyncio.sleep(0.02)

            await asyncio.gather(inject(), watch(), *(worker(i) for i in range(concurrency)))
    finally:
        await stop(gw)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGCONT)
            await stop(child)
    return _report(scenario, outcomes, marks)


async def _one(
    session: aiohttp.ClientSession,
    base: str,
    stream: bool,
    loop: asyncio.AbstractEventLoop,
    t0: float,
) -> Outcome:
    start = loop.time() - t0
    body = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello"}],
    }
    try:
        async with session.post(base + "/v1/chat/completions", json=body) as resp:
            data = await resp.read()
            ok = resp.status == 200 and (
                not stream or (data.rstrip().endswith(b"[DONE]") and b'"error"' not in data)
            )
            started = resp.status == 200 and len(data) > 0
            return Outcome(
                start,
                loop.time() - t0,
                stream,
                resp.status,
                ok,
                started,
                resp.headers.get("X-Dp-Replica"),
            )
    except aiohttp.ClientError:
        return Outcome(start, loop.time() - t0, stream, 0, False, False, None)


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))] * 1000


def _report(scenario: str, outcomes: list[Outcome], marks: dict[str, float]) -> FaultReport:
    fault, back = marks.get("fault", 0.0), marks.get("back", 0.0)
    failed = [o for o in outcomes if not o.ok]
    victim = "r0"
    served_again = [o.end for o in outcomes if o.replica == victim and o.ok and o.t >= back]
    before = [o.end - o.t for o in outcomes if o.end < fault]
    during = [o.end - o.t for o in outcomes if fault <= o.t < back]
    return FaultReport(
        scenario=scenario,
        requests=len(outcomes),
        failed_before_first_byte=sum(1 for o in failed if not o.started),
        failed_in_band=sum(1 for o in failed if o.started),
        victim_out_after_s=(marks["out"] - fault) if "out" in marks else None,
        back_to_served_s=(min(served_again) - back) if served_again else None,
        p99_latency_before_ms=_p99(before),
        p99_latency_during_ms=_p99(during),
    )


def _table(reports: list[FaultReport]) -> str:
    head = (
        "| fault | requests | failed before 1st byte | failed in-band | fault -> taken out "
        "| back -> serving again | p99 before | p99 during |"
    )
    rows = [head, "|" + "---|" * 8]
    for r in reports:
        last = "-" if r.victim_out_after_s is None else f"{r.victim_out_after_s:.2f} s"
        backs = "-" if r.back_to_served_s is None else f"{r.back_to_served_s:.2f} s"
        rows.append(
            f"| {r.scenario} | {r.requests} | {r.failed_before_first_byte} | "
            f"{r.failed_in_band} | {last} | {backs} | {r.p99_latency_before_ms:.0f} ms | "
            f"{r.p99_latency_during_ms:.0f} ms |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dp-router faults", description=__doc__.split("\n")[0])
    p.add_argument(
        "--scenario", action="append", choices=["kill", "stop"], help="repeatable; default both"
    )
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--fault-at", type=float, default=3.0, help="seconds into the run")
    p.add_argument("--down-for", type=float, default=4.0, help="seconds the replica is down")
    p.add_argument("--duration", type=float, default=14.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.replicas < 2:
        p.error("--replicas must be >= 2 (one victim, one survivor)")
    import uvloop

    reports = []
    for scenario in args.scenario or ["kill", "stop"]:
        print(
            f"[faults] {scenario}: {args.replicas} replicas, concurrency {args.concurrency}, "
            f"fault at {args.fault_at:g} s for {args.down_for:g} s",
            file=sys.stderr,
        )
        reports.append(
            uvloop.run(
                run_scenario(
                    scenario,
                    args.replicas,
                    args.concurrency,
                    args.fault_at,
                    args.down_for,
                    args.duration,
                )
            )
        )
    if args.json:
        for r in reports:
            print(json.dumps(asdict(r)))
    else:
        print(_table(reports))
    return 0


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
