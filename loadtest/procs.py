"""Child processes: free ports, spawn, wait until ready, stop; and the gateway's config file.

The one process harness of ``dp-router demo``, ``bench``, ``faults`` and the
tests (tests/harness.py): each starts simulated replicas and gateways as
child processes the same way, waits for them the same way and stops them
the same way, uvicorn's order: SIGTERM, wait, then SIGKILL, and always reap.

- :func:`spawn` starts a child in its own session (a terminal's Ctrl-C
  reaches only the parent, which then stops its children in order) that the
  kernel sends SIGTERM if the parent dies (Linux ``PR_SET_PDEATHSIG``), so a
  crashed tool never leaves servers behind;
- :meth:`Child.ready_ports` reads the ``ready <port> ...`` lines a replica
  process prints (``dp-router replica --port 0`` binds free ports and
  reports them: no race for a port); :meth:`Child.wait_http` polls a URL
  until it answers 200 (a gateway's ``/readyz``);
- :meth:`Child.stop` is the graceful-then-forceful stop;
- :func:`gateway_toml` writes the gateway's TOML config (the format is in
  config/example.toml) from plain values: every tool that runs a gateway
  process writes its config here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

T = TypeVar("T")

HOST = "127.0.0.1"
# Cold Python imports on a busy 2-core machine take seconds; a child that is
# not up after this long is not coming.
START_TIMEOUT_S = 30.0
# SIGTERM, then this long for a graceful exit (a gateway drains its streams,
# replicas give stragglers SHUTDOWN_TIMEOUT_S), then SIGKILL.
STOP_TIMEOUT_S = 5.0
READY_POLL_S = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class StartError(RuntimeError):
    """A child did not become ready; the message carries the end of its log."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on the loopback (bound together, so they cannot repeat).

    The ports are free when this returns, not reserved: prefer ``--port 0``
    and :meth:`Child.ready_ports` where the child supports it.
    """
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


def dp_router(*args: str) -> list[str]:
    """The argv of ``dp-router ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "router", *args]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM me when my parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Child:
    """A process we started; stop it with :meth:`stop` (idempotent)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path | None) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 20) -> str:
        """The end of the child's log (stderr, and stdout unless piped)."""
        if self.log is None:
            return ""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def _failed(self, what: str) -> StartError:
        tail = self.tail()
        return StartError(f"{self.name} {what}" + (f":\n{tail}" if tail else ""))

    def send(self, sig: int) -> None:
        """Send ``sig``, if the child is still there."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def ready_ports(self, count: int, timeout: float = START_TIMEOUT_S) -> list[int]:
        """Read ``ready <port> ...`` lines until ``count`` replicas listen; their ports.

        Afterwards the rest of stdout is read and dropped in the background,
        so a full pipe can never block the child.
        """
        stdout = self.proc.stdout
        if stdout is None:
            raise RuntimeError(f"{self.name}: spawned without a stdout pipe")
        ports: list[int] = []
        deadline = time.monotonic() + timeout
        while len(ports) < count:
            left = max(deadline - time.monotonic(), 0.01)
            try:
                line = await asyncio.wait_for(stdout.readline(), left)
            except TimeoutError:
                raise self._failed(f"not ready after {timeout:.0f} s") from None
            if not line:
                await self.proc.wait()
                raise self._failed(f"exited with {self.proc.returncode} before it was ready")
            if line.startswith(b"ready "):
                ports.append(int(line.split()[1]))
        self._drain = asyncio.create_task(_discard(stdout), name=f"{self.name}-stdout")
        return ports

    async def wait_http(
        self,
        url: str,
        timeout: float = START_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Poll ``url`` until it answers 200; StartError if the child exits or time runs out."""
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.running:
                    raise self._failed(f"exited with {self.proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(READY_POLL_S)
        raise self._failed(f"not ready at {url} after {timeout:.0f} s")

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; always reaped.

        A stopped child (SIGSTOP) gets SIGCONT first, or it could not act on
        the SIGTERM.
        """
        if self.running:
            self.send(signal.SIGCONT)
            self.send(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.send(signal.SIGKILL)
                await self.proc.wait()
        await self._stop_drain()

    async def kill(self) -> None:
        """SIGKILL (a crash), and reap."""
        self.send(signal.SIGKILL)
        await self.proc.wait()
        await self._stop_drain()

    async def _stop_drain(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None

    def cpu_seconds(self) -> float:
        """utime + stime of the child and its live descendants (a gateway
        with ``--workers N`` serves from its children), from /proc (Linux)."""
        return sum(_cpu_ticks(pid) for pid in _tree(self.pid)) / CLK_TCK


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants that are alive now."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return out


def _cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0  # exited meanwhile
    # After "pid (comm)": utime and stime (fields 14 and 15) are at 11 and 12.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log: Path | None = None,
    stdout_pipe: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Child:
    """Start ``argv``; stderr (and stdout, unless piped) go to ``log``, else to ours.

    ``stdout_pipe``: keep stdout for :meth:`Child.ready_ports`.
    """
    logf = log.open("ab") if log is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    finally:
        if logf is not None:
            logf.close()
    return Child(name, proc, log)


# ---------------------------------------------------------------------------
# the gateway's config file


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def gateway_toml(
    replicas: Sequence[Mapping[str, Any]],
    *,
    port: int,
    admin_port: int,
    host: str = HOST,
    comment: str | None = None,
    **sections: Mapping[str, Any],
) -> str:
    """The gateway's TOML config: ``[server]`` and ``[admin]`` on ``host``,
    then ``sections`` in order (``routing={"policy": "p2c"}``, ``health=...``;
    keys given for ``server`` or ``admin`` add to theirs), then one
    ``[[replicas]]`` table per mapping (``url``, ``name``, ``models``...).
    """
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": host, "port": port},
        "admin": {"host": host, "port": admin_port},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines = [f"# {comment}"] if comment else []
    for name, values in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items())]
    for replica in replicas:
        lines += ["", "[[replicas]]", *(f"{k} = {_toml_value(v)}" for k, v in replica.items())]
    return "\n".join(lines).lstrip("\n") + "\n"


def run_tool(prog: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T | int:
    """Run a tool that starts processes (the demo, compare-live) on uvloop.

    SIGTERM cancels the run like Ctrl-C does, so every ``finally`` stops the
    children it started. Returns ``main``'s result, or the exit code to end
    with: 130 interrupted, 143 terminated, 1 a process that would not start
    (its reason printed).
    """

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    say = f"[{prog.removeprefix('dp-router ')}]"
    try:
        return uvloop.run(guarded())
    except KeyboardInterrupt:
        print(f"{say} interrupted; all processes stopped", file=sys.stderr, flush=True)
        return 130
    except asyncio.CancelledError:
        print(f"{say} terminated; all processes stopped", file=sys.stderr, flush=True)
        return 143
    except StartError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
