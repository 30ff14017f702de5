"""One data-path worker of ``dp-router serve --workers N``: ``python -m router.worker --fd FD``.

Started by the supervisor (``router.workers``), never by hand: ``FD`` is this
process's end of the supervisor's socketpair. The worker reads its config
from the first message, applies the supervisor's fleet before it listens,
then serves the data port (SO_REUSEPORT) with the same proxy a single
process runs. Its registry is written only by the ``fleet`` messages; its
settled attempts go back as ``outcomes``; a ``metrics`` request is answered
with its collected families.

SIGTERM or SIGINT: the single process's shutdown order (readiness false,
waiters refused, ``shutdown_delay_s``, stop accepting, in-flight requests
get ``shutdown_timeout_s``, the rest cancelled), exit status 0. The same
when the supervisor is gone (the pipe closes): an orphaned worker drains and
exits rather than serving with a fleet nobody updates.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

from router.app import Gateway, Role
from router.cli import setup_logging
from router.config import Config
from router.replicas import Registry
from router.telemetry.share import apply_load_message
from router.workers import Channel, RemoteOutlier, apply_fleet, collect_families

log = logging.getLogger("dp_router.workers")


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index``'s config: with a routing seed, seed + index, so that
    seeded workers do not make the same random choices in step."""
    seed = config.routing.seed
    if seed is None:
        return config
    return dataclasses.replace(
        config, routing=dataclasses.replace(config.routing, seed=seed + index)
    )


async def _receive(channel: Channel, gateway: Gateway) -> None:
    """The supervisor's messages, until its pipe closes."""
    while True:
        message = await channel.receive()
        kind = message[0]
        if kind == "fleet":
            apply_fleet(gateway.registry, message)
        elif kind == "load":
            apply_load_message(gateway.registry, message)
        elif kind == "experts":
            for name, slowdown in message[1].items():
                status = gateway.registry.get(name)
                if status is not None:
                    status.load.expert_slowdown = slowdown
        elif kind == "metrics":
            channel.send(("metrics", message[1], collect_families(gateway.metrics.registry)))
        else:
            log.error("unknown message %r from the supervisor", kind)


async def run(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    channel = await Channel.connect(sock)
    kind, hello = await channel.receive()
    if kind != "hello":
        raise RuntimeError(f"expected hello from the supervisor, got {kind!r}")
    # Before the gateway is built: the access log reads the level once.
    setup_logging(hello["log_level"])
    index: int = hello["index"]
    config = worker_config(hello["config"], index)

    def outlier(registry: Registry) -> RemoteOutlier | None:
        return RemoteOutlier(registry, channel) if config.outlier.enabled else None

    gateway = Gateway(config, role=Role.WORKER, outlier=outlier)
    # The fleet before the first request: the config's replicas are not
    # checked here, the supervisor's verdicts are.
    apply_fleet(gateway.registry, await channel.receive())
    receiver = asyncio.create_task(_receive(channel, gateway), name="supervisor-pipe")
    orphaned = False

    def receiver_done(task: asyncio.Task[Any]) -> None:
        nonlocal orphaned
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, EOFError | ConnectionError):
            log.error("worker %d: the supervisor's pipe failed", index, exc_info=exc)
        orphaned = not stop.is_set()
        stop.set()

    receiver.add_done_callback(receiver_done)
    try:
        await gateway.start()
        gc.freeze()  # as router/cli.py does: start-up objects out of the collector's way
        channel.send(("ready", os.getpid(), gateway.data_port))
        await stop.wait()
        if orphaned:
            log.warning("worker %d: the supervisor is gone; draining", index)
        await gateway.shutdown()
    finally:
        receiver.cancel()
        channel.close()
        # Stopping already: a second SIGTERM (the supervisor's, after a
        # Ctrl-C reached the whole process group) must not kill the process
        # between the loop's end and its exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m router.worker",
        description="A dp-router data-path worker (started by `dp-router serve --workers N`).",
    )
    p.add_argument("--fd", type=int, required=True, help="this end of the supervisor's pipe")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    import uvloop

    try:
        return uvloop.run(run(sock))
    except OSError as exc:
        print(f"dp-router worker: cannot listen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
