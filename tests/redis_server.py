"""A real ``redis-server`` for tests, on a free loopback port, and a Sentinel setup.

No mock of Redis anywhere (docs/sessions.md): a test that needs Redis starts
one here and can then break it the ways production breaks it:
:meth:`RedisServer.kill` (SIGKILL, a crash), :meth:`RedisServer.freeze` /
:meth:`RedisServer.thaw` (SIGSTOP / SIGCONT: a hung server whose sockets stay
open, the case only timeouts catch) and :meth:`RedisServer.restart` on the
same port (with ``persist=True`` the data survives a graceful stop).

Processes are started and stopped by loadtest/procs.py (own session, SIGTERM
to the child if the test process dies, SIGTERM then SIGKILL, always reaped);
the context managers here stop every process they started, whatever the test
did. Without a ``redis-server`` binary the test is skipped with the reason
(CI installs it: scripts/ensure-redis.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest import procs

HOST = procs.HOST
# redis-server starts in milliseconds; a loaded 2-core CI machine may need seconds.
START_TIMEOUT_S = 10.0
READY_POLL_S = 0.02
MASTER_NAME = "dp-test"
# Sentinel timings for a failover in a few seconds (production uses 5-30 s
# down-after): SDOWN after 500 ms of silence, and a stuck failover is retried
# after 2 * failover-timeout.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000
# Sentinels find each other through hello messages every 2 s; the replica
# shows up in the master's INFO; both must be known before a failover can
# get a majority.
SENTINEL_DISCOVERY_S = 15.0


def redis_server_binary() -> str:
    """The path of ``redis-server``, or skip the test saying why."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (scripts/ensure-redis.sh installs it)")
    return path


async def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One inline command over a fresh connection; the first reply line.

    Only for readiness checks and test set-up: stores under test use redis-py.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(" ".join(args).encode() + b"\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _info(port: int, section: str, timeout: float = 1.0) -> dict[str, str]:
    """``INFO section`` as a dict (RESP bulk reply read in full)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(f"INFO {section}\r\n".encode())
        await writer.drain()
        header = await asyncio.wait_for(reader.readline(), timeout)
        if not header.startswith(b"$"):
            return {}
        body = await asyncio.wait_for(reader.readexactly(int(header[1:]) + 2), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    out = {}
    for line in body.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


class RedisServer:
    """One ``redis-server`` (or sentinel) process on a fixed loopback port.

    The port stays the same across :meth:`restart`, as a real server's
    address does, so clients built from :attr:`url` reconnect by themselves.
    """

    def __init__(
        self,
        port: int,
        workdir: Path,
        *,
        persist: bool = False,
        extra_args: tuple[str, ...] = (),
        config_file: Path | None = None,
        name: str = "redis",
    ) -> None:
        self.port = port
        self.workdir = workdir
        self.persist = persist
        self.extra_args = extra_args
        self.config_file = config_file
        self.name = name
        self.child: procs.Child | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self.child is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.child.pid

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def argv(self) -> list[str]:
        argv = [redis_server_binary()]
        if self.config_file is not None:
            # Sentinel rewrites its config file: it must be ours and writable.
            argv += [str(self.config_file), "--sentinel"]
        argv += ["--port", str(self.port), "--bind", HOST, "--protected-mode", "no"]
        argv += ["--dir", str(self.workdir), "--logfile", ""]
        if self.config_file is None:
            if self.persist:
                # A graceful stop (SIGTERM) writes the RDB when save points exist;
                # the restarted server loads it.
                argv += ["--save", "3600 1", "--dbfilename", f"{self.name}.rdb"]
            else:
                argv += ["--save", "", "--appendonly", "no"]
        return [*argv, *self.extra_args]

    async def start(self) -> None:
        """Start and wait until it answers PING (not -LOADING) or fail with its log."""
        if self.running:
            return
        log = self.workdir / f"{self.name}-{self.port}.log"
        self.child = await procs.spawn(self.name, self.argv(), log=log, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if not self.child.running:
                await self.child.proc.wait()
                raise procs.StartError(
                    f"{self.name} on port {self.port} exited with "
                    f"{self.child.proc.returncode}:\n{self.child.tail()}"
                )
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                if (await _command(self.port, "PING")).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                await self.child.kill()
                raise procs.StartError(
                    f"{self.name} on port {self.port} not ready after "
                    f"{START_TIMEOUT_S:.0f} s:\n{self.child.tail()}"
                )
            await asyncio.sleep(READY_POLL_S)

    def freeze(self) -> None:
        """SIGSTOP: the process hangs with its sockets open (connects still
        complete in the kernel's backlog; nothing is answered)."""
        if self.child is not None:
            self.child.send(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.child is not None:
            self.child.send(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL: a crash (without ``persist``'s graceful save)."""
        if self.child is not None:
            await self.child.kill()

    async def stop(self) -> None:
        """SIGTERM (SIGCONT first if frozen), then SIGKILL; idempotent."""
        if self.child is not None:
            await self.child.stop()

    async def restart(self) -> None:
        """Stop if running, then start again on the same port."""
        await self.stop()
        await self.start()

    async def command(self, *args: str) -> bytes:
        """The first reply line of one inline command (test set-up only)."""
        return await _command(self.port, *args)

    async def info(self, section: str) -> dict[str, str]:
        return await _info(self.port, section)


async def _start_on_free_port(
    workdir: Path,
    *,
    name: str = "redis",
    persist: bool = False,
    extra_args: tuple[str, ...] = (),
    config_file: Path | None = None,
) -> RedisServer:
    """Start on a free port; a port taken between choosing and binding is retried."""
    last: Exception | None = None
    for _ in range(3):
        server = RedisServer(
            procs.free_ports(1)[0],
            workdir,
            persist=persist,
            extra_args=extra_args,
            config_file=config_file,
            name=name,
        )
        try:
            await server.start()
        except procs.StartError as exc:
            last = exc
            continue
        return server
    assert last is not None
    raise last


@contextlib.asynccontextmanager
async def redis_server(
    *, persist: bool = False, extra_args: tuple[str, ...] = ()
) -> AsyncIterator[RedisServer]:
    """A started ``redis-server`` in its own temp dir, stopped and removed on exit."""
    redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="dp-redis-") as tmp:
        server: RedisServer | None = None
        try:
            server = await _start_on_free_port(
                workdir=Path(tmp), persist=persist, extra_args=extra_args
            )
            yield server
        finally:
            if server is not None:
                await server.stop()


@dataclass
class SentinelSetup:
    """One master, one replica, three sentinels (quorum 2), all on loopback."""

    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]
    master_name: str = MASTER_NAME

    @property
    def sentinel_addresses(self) -> tuple[str, ...]:
        return tuple(s.address for s in self.sentinels)

    async def master_port(self) -> int | None:
        """The master's port as the first answering sentinel reports it."""
        for sentinel in self.sentinels:
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                info = await sentinel.info("sentinel")
                # master0:name=dp-test,status=ok,address=127.0.0.1:6380,slaves=1,sentinels=3
                fields = dict(
                    part.split("=", 1) for part in info.get("master0", "").split(",") if "=" in part
                )
                if "address" in fields:
                    return int(fields["address"].rsplit(":", 1)[1])
        return None

    async def wait_discovered(self, timeout: float = SENTINEL_DISCOVERY_S) -> None:
        """Until every sentinel knows the replica and both other sentinels."""
        deadline = time.monotonic() + timeout
        while True:
            ready = 0
            for sentinel in self.sentinels:
                with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                    line = (await sentinel.info("sentinel")).get("master0", "")
                    if "status=ok" in line and "slaves=1" in line and "sentinels=3" in line:
                        ready += 1
            if ready == len(self.sentinels):
                return
            if time.monotonic() > deadline:
                raise procs.StartError(f"sentinels did not discover each other in {timeout:.0f} s")
            await asyncio.sleep(0.1)


async def _wait_replica_linked(replica: RedisServer, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            if (await replica.info("replication")).get("master_link_status") == "up":
                return
        if time.monotonic() > deadline:
            raise procs.StartError(f"replica on {replica.port} did not sync in {timeout:.0f} s")
        await asyncio.sleep(READY_POLL_S * 5)


def _sentinel_id(i: int) -> str:
    return f"{i + 1:040x}"


def _sentinel_conf(master_port: int, replica_port: int, i: int, ports: list[int]) -> str:
    """Sentinel ``i``'s config: the master, the short timings, and the replica
    and the other sentinels already known (``known-replica``,
    ``known-sentinel`` with fixed ids), so no discovery round is needed."""
    lines = [
        f"sentinel myid {_sentinel_id(i)}",
        f"sentinel monitor {MASTER_NAME} {HOST} {master_port} 2",
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {MASTER_NAME} 1",
        f"sentinel known-replica {MASTER_NAME} {HOST} {replica_port}",
    ]
    lines += [
        f"sentinel known-sentinel {MASTER_NAME} {HOST} {port} {_sentinel_id(j)}"
        for j, port in enumerate(ports)
        if j != i
    ]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def redis_sentinel() -> AsyncIterator[SentinelSetup]:
    """A master, a replica of it and three sentinels monitoring it as
    :data:`MASTER_NAME` with short timings (a failover takes a few seconds).

    Yields once the sentinels know the replica and each other, so a killed
    master can be failed over; every process is stopped on exit.
    """
    redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="dp-sentinel-") as tmp:
        workdir = Path(tmp)
        started: list[RedisServer] = []
        try:
            # Diskless sync waits 5 s by default for more replicas to join: not here.
            master = await _start_on_free_port(
                workdir=workdir, name="master", extra_args=("--repl-diskless-sync-delay", "0")
            )
            started.append(master)
            replica = await _start_on_free_port(
                workdir=workdir,
                name="replica",
                extra_args=("--replicaof", HOST, str(master.port)),
            )
            started.append(replica)
            await _wait_replica_linked(replica)
            sentinels = []
            ports = procs.free_ports(3)
            for i in range(3):
                conf = workdir / f"sentinel-{i}.conf"
                conf.write_text(_sentinel_conf(master.port, replica.port, i, ports))
                sentinel = RedisServer(ports[i], workdir, config_file=conf, name=f"sentinel{i}")
                started.append(sentinel)
                sentinels.append(sentinel)
                await sentinel.start()
            setup = SentinelSetup(master, replica, sentinels)
            await setup.wait_discovered()
            yield setup
        finally:
            for server in reversed(started):
                await server.stop()
