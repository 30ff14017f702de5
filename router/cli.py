"""``dp-router serve | check-config | policies | top``.

Config problems end the process with one line naming the key and exit code 2,
never a traceback. Flags cover quick starts without a file (``--replica URL``
repeatable, ``--port``, ``--admin-port``, ``--policy``, ``--workers``); with a
file, flags override it. ``--workers N`` (N > 1) runs a supervisor and N
data-path worker processes (``router.workers``, docs/workers.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from typing import Any

from policies import registry as policy_registry
from router import access_log
from router import config as config_mod
from router.config import Config, ConfigError

log = logging.getLogger("dp_router")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dp-router serve", description="Run the gateway.")
    p.add_argument("--config", help="TOML config file (see config/example.toml)")
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="replica base URL (repeatable); added to those in the config",
    )
    p.add_argument("--host", help="data listener address")
    p.add_argument("--port", type=int, help="data listener port")
    p.add_argument("--admin-port", type=int, help="admin listener port (binds 127.0.0.1)")
    p.add_argument("--policy", help="routing policy (see `dp-router policies`)")
    p.add_argument(
        "--workers",
        metavar="N",
        help='data-path processes sharing the port (default 1; "auto": one per CPU)',
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help="keep session pins in Redis, shared by every gateway using it "
        "(default: in memory, this process only)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def build_config(args: argparse.Namespace) -> Config:
    data: dict[str, Any] = {}
    if args.config:
        import tomllib

        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{args.config}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{args.config}: invalid TOML: {exc}") from None
    replicas = list(data.get("replicas", []))
    replicas += [{"url": url} for url in args.replica]
    data["replicas"] = replicas
    server = dict(data.get("server", {}))
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.workers is not None:
        value = args.workers.strip()
        server["workers"] = int(value) if value.lstrip("-").isdigit() else value
    if server:
        data["server"] = server
    if args.admin_port is not None:
        data["admin"] = {**data.get("admin", {}), "port": args.admin_port}
    if args.redis_url is not None:
        data["redis"] = {**data.get("redis", {}), "url": args.redis_url}
    if args.policy is not None:
        routing = dict(data.get("routing", {}))
        if routing.get("policy") != args.policy:
            routing.pop("params", None)  # params belong to the file's policy
        routing["policy"] = args.policy
        data["routing"] = routing
    return config_mod.from_dict(data)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    access_log.setup(sys.stderr)


async def run(cfg: Config) -> None:
    from router.app import Gateway

    gateway = Gateway(cfg)
    await gateway.start()
    # Everything built so far lives as long as the process: out of the
    # collector's way, every later collection scans only request garbage
    # (docs/performance.md: about 2% of CPU per request).
    gc.freeze()
    log.info(
        "dp-router listening on %s:%d (admin %s:%d), policy %s, %d replicas",
        cfg.server.host,
        gateway.data_port,
        cfg.admin.host,
        gateway.admin_port,
        cfg.routing.policy,
        len(cfg.replicas),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: readiness false, draining in-flight requests")
    finally:
        await gateway.shutdown()
        log.info("stopped")


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"dp-router: config error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        if cfg.server.workers > 1:
            from router.workers import supervise

            return uvloop.run(supervise(cfg, log_level=args.log_level))
        uvloop.run(run(cfg))
    except OSError as exc:
        print(f"dp-router: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def check_config(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dp-router check-config")
    p.add_argument("file")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.file)
    except ConfigError as exc:
        print(f"{args.file}: config error: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(r.name for r in cfg.replicas)
    print(f"{args.file}: ok ({len(cfg.replicas)} replicas: {names}; policy {cfg.routing.policy})")
    return 0


def list_policies(argv: list[str]) -> int:
    for line in policy_registry.describe():
        print(line)
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "check-config":
        return check_config(rest)
    if command == "policies":
        return list_policies(rest)
    if command == "top":
        from router.top import main as top

        return top(rest)
    raise SystemExit(f"unknown command {command}")
