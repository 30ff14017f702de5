"""``dp-router replica``: serve simulated replicas, one ``--port`` each, in one event loop.

The flags, the fault header and the runtime knobs are documented in
docs/replica.md. Each replica prints ``ready <port> name=<name> url=<url>
metrics=<flavour> model=<engine preset or paced>`` once it listens (``--port
0`` binds a free port and reports it there); SIGTERM or SIGINT stops them all
cleanly.

Which model times the tokens: the engine model with
loadtest.engine.DEFAULT_REPLICA_PRESET unless told otherwise (a replica that
looks like a GPU: prefill cost of uncached tokens, prefix caching, batching,
expert counters); ``--paced``, or any of the paced model's own flags
(``--token-interval``, ``--ttft``, ``--prefill-rate``, ``--max-running``)
without ``--engine``, selects the fast fixed-pacing model gateway tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

import uvloop
from aiohttp import web

from loadtest.engine.engine import DEFAULT_REPLICA_PRESET
from loadtest.replica.config import DEFAULT_MAX_MODEL_LEN, SimReplicaConfig
from loadtest.replica.server import STATE_KEY, app_runner, bound_port, create_replica_app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router replica",
        description="Run simulated vLLM/SGLang replica(s); one --port per replica, one loop.",
    )
    p.add_argument(
        "--port",
        type=int,
        action="append",
        required=True,
        help="port to serve a replica on (repeat for more; 0 = any free port)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        help="served model name (repeatable; default sim-model)",
    )
    p.add_argument(
        "--name", help="replica name (default host:port; suffixed -i with several ports)"
    )
    pm = p.add_argument_group(
        "paced model (fast fixed pacing, for gateway tests; any of these selects it)"
    )
    pm.add_argument(
        "--paced",
        action="store_true",
        help="time tokens with the paced model instead of the engine model",
    )
    pm.add_argument(
        "--token-interval",
        type=float,
        help=f"seconds per output token (default {SimReplicaConfig.token_interval_s})",
    )
    pm.add_argument("--ttft", type=float, help="seconds to the first token (default 0)")
    pm.add_argument(
        "--prefill-rate",
        type=float,
        help="tokens/s: uncached prompt tokens add to TTFT (default 0 = fixed TTFT)",
    )
    pm.add_argument(
        "--max-running",
        type=int,
        metavar="N",
        help="at most N requests generate at once; the rest wait (FIFO)",
    )
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens when not requested")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="prompt + output token limit (vLLM's context-length 400 beyond it)",
    )
    p.add_argument(
        "--metrics", choices=("vllm", "sglang"), default="vllm", help="metric names on /metrics"
    )
    p.add_argument(
        "--not-ready-for",
        type=float,
        default=0.0,
        metavar="S",
        help="for S seconds /health is 200 but /v1/* answers 503 (loading)",
    )
    p.add_argument(
        "--flap-period",
        type=float,
        default=0.0,
        metavar="S",
        help="alternate OK and 503-for-everything every S seconds",
    )
    p.add_argument("--speed", type=float, default=1.0, help="slow-down factor (10 = 10x slower)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    e = p.add_argument_group("engine model (the default)")
    e.add_argument(
        "--engine",
        metavar="PRESET",
        help=f"loadtest.engine preset (default {DEFAULT_REPLICA_PRESET}; e.g. llama3-8b, "
        "llama3-8b+moe256, llama2-70b; docs/simulator.md)",
    )
    e.add_argument(
        "--engine-tp",
        type=int,
        default=None,
        help="tensor-parallel GPUs (default: fewest that fit)",
    )
    e.add_argument("--engine-pp", type=int, default=1)
    e.add_argument("--engine-interconnect", default="nvlink", choices=("nvlink", "pcie5"))
    e.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an EngineConfig field (value parsed as JSON if it can be)",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=0,
        help="engine RNG seed; replica i of this process uses seed + i",
    )
    return p


def _engine_overrides(opts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in opts:
        key, sep, raw = opt.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-opt expects KEY=VALUE, got {opt!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def engine_choice(args: argparse.Namespace) -> str | None:
    """The engine preset these flags ask for, or None for the paced model."""
    paced_flags = (args.token_interval, args.ttft, args.prefill_rate, args.max_running)
    if args.engine is not None:
        if args.paced:
            raise ValueError("--paced and --engine exclude each other")
        return str(args.engine)
    if args.paced or any(v is not None for v in paced_flags):
        return None
    return DEFAULT_REPLICA_PRESET


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def configs_from_args(args: argparse.Namespace) -> list[SimReplicaConfig]:
    ports: list[int] = args.port
    overrides = _engine_overrides(args.engine_opt)
    engine = engine_choice(args)
    base = SimReplicaConfig
    cfgs = []
    for i, port in enumerate(ports):
        if args.name:
            name = args.name if len(ports) == 1 else f"{args.name}-{i}"
        else:
            name = f"{args.host}:{port}"  # port 0 is renamed once bound
        cfgs.append(
            SimReplicaConfig(
                name=name,
                models=tuple(args.models or ("sim-model",)),
                token_interval_s=_or(args.token_interval, base.token_interval_s),
                ttft_s=_or(args.ttft, base.ttft_s),
                prefill_tokens_per_s=_or(args.prefill_rate, base.prefill_tokens_per_s),
                default_max_tokens=args.max_tokens,
                max_model_len=args.max_model_len,
                metrics=args.metrics,
                not_ready_for_s=args.not_ready_for,
                flap_period_s=args.flap_period,
                max_running=args.max_running,
                api_key=args.api_key,
                speed=args.speed,
                exit_on_die=True,
                engine=engine,
                engine_tp=args.engine_tp,
                engine_pp=args.engine_pp,
                engine_interconnect=args.engine_interconnect,
                engine_overrides=overrides,
                seed=args.seed + i,
            )
        )
    return cfgs


async def serve(host: str, ports: Sequence[int], cfgs: Sequence[SimReplicaConfig]) -> None:
    """Serve every replica until SIGTERM/SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for port, cfg in zip(ports, cfgs, strict=True):
            app = create_replica_app(cfg)
            runner = app_runner(app)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            bound = bound_port(runner)
            state = app[STATE_KEY]
            if port == 0 and cfg.name == f"{host}:0":
                state.cfg = dataclasses.replace(cfg, name=f"{host}:{bound}")
            print(
                f"ready {bound} name={state.cfg.name} url=http://{host}:{bound} "
                f"metrics={cfg.metrics} model={cfg.engine or 'paced'}",
                flush=True,
            )
        await stop.wait()
    finally:
        # Concurrently: each runner may wait SHUTDOWN_TIMEOUT_S for its
        # stragglers, and N replicas should not take N times as long to stop.
        await asyncio.gather(*(runner.cleanup() for runner in runners))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfgs = configs_from_args(args)
    except ValueError as e:
        print(f"dp-router replica: {e}", file=sys.stderr)
        return 2
    try:
        uvloop.run(serve(args.host, args.port, cfgs))
    except (ValueError, ImportError) as e:  # a bad --engine preset or option
        print(f"dp-router replica: {e}", file=sys.stderr)
        return 2
    return 0
