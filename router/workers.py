"""``--workers N``: one supervisor, N data-path worker processes on one port.

One Python process relays at most one core's worth of requests. With
``[server] workers = N`` (or ``--workers N``; ``auto`` is one per CPU) the
gateway runs as:

- **the supervisor** (this module's :class:`Supervisor`, the process that
  was started): the control plane, :class:`router.app.Gateway` in role
  ``supervisor``. It owns the :class:`~router.replicas.Registry` (the one
  writer of replica status), health checks, model discovery, outlier
  detection and the admin listener (/metrics, /admin/*, probes). It serves
  no requests.
- **N workers** (``python -m router.worker``, see :mod:`router.worker`): the
  data plane, a ``Gateway`` in role ``worker``. Each binds the data port with
  ``SO_REUSEPORT``, so the kernel spreads new connections over them (by a
  hash of the connection's addresses: a keep-alive connection stays with one
  worker), and runs the same proxy as a single process. A worker's registry
  is written only by the snapshots the supervisor sends
  (:meth:`Registry.apply <router.replicas.Registry.apply>`); it runs no
  health checks and no discovery.

**Why subprocesses on a socketpair, not multiprocessing.** Each worker is
``subprocess``'s child (asyncio's ``create_subprocess_exec``) with its end of
a ``socketpair`` passed by ``pass_fds``: a fresh interpreter (no fork of a
process with a running event loop, threads and sockets), a plain argv that
``ps`` shows, no resource-tracker process, and a pipe the event loop reads
like any socket. ``multiprocessing``'s spawn would give the same fresh
interpreter, with blocking ``Connection`` objects in place of a socket and
a hidden helper process.

**Messages** are length-prefixed (4 bytes, big-endian) pickles of tuples of
plain values, on a private socketpair between a process and the children
it started (no one else can write to it):

============  =========  =====================================================
message       direction  payload
============  =========  =====================================================
``hello``     S -> W     the validated ``Config`` (the worker re-reads no file
                         or environment), the worker's index, N, log level
``fleet``     S -> W     every replica's status fields, whole, at each version
                         (name, url, api_key, models, weight, pool, admin,
                         health, ejected_until, ramp, max_concurrency share,
                         reported_draining)
                         and the model list; coalesced to one per loop turn
``load``      S -> W     replicas' load readings (scrapes, pushes), batched
                         every 20 ms (router/telemetry/share.py)
``metrics``   S -> W     a scrape: "send your metrics" (with a sequence number)
``ready``     W -> S     listening: pid and port
``outcomes``  W -> S     the data path's settled attempts (replica, outcome,
                         upstream status), batched every OUTCOME_BATCH_S
``metrics``   W -> S     the worker's collected metric families
============  =========  =====================================================

Deadlines (``ejected_until``, a ramp's start) are sent as they are: they are
``loop.time()`` values, and both asyncio's and uvloop's ``loop.time()`` read
``CLOCK_MONOTONIC``, one clock for every process on a Linux host (uvloop's
is libuv's millisecond-truncated, cached per loop turn: at most ~1 ms behind
``time.monotonic()``; ``tests/test_workers.py`` checks it).

**Outlier detection** needs every worker's evidence: a replica failing 5
times in a row shows each of 2 workers only about half of it. A worker's
detector is a :class:`RemoteOutlier`: each settled attempt is one list
append (a success right after a success is skipped: it changes nothing),
and one ``outcomes`` message every ``OUTCOME_BATCH_S`` (10 ms) carries them
to the supervisor, whose :class:`~router.outlier.OutlierDetector` decides on its
registry; the ejection reaches every worker with the next ``fleet``. With
N = 1 none of this exists: the proxy calls the detector directly.

**One /metrics.** On a scrape the supervisor asks each worker for its
families (``registry.collect()`` as plain tuples: a 1,000-replica worker
collects and pickles them in ~40 ms where ``generate_latest`` took ~110 ms,
and the supervisor unpickles in ~40 ms where prometheus_client's text
parser took ~300 ms) and merges them into one exposition, one HELP/TYPE per
family:

- the fleet's status and the control plane's work (``replica_*`` gauges,
  health transitions, ejections, model refresh failures) come from the
  supervisor alone; the per-replica in-flight and outstanding-token gauges
  there are the workers' sums (the supervisor's own load counters mirror
  them at each scrape, so /admin/replicas shows them too);
- everything the data path counts (requests, attempts, errors, retries,
  latencies, admission) is summed over the workers; a worker that does not
  answer within ``METRICS_TIMEOUT_S`` counts with its last answer, and a
  worker that died leaves its last-scraped counters in the totals, so a
  total never goes backwards (Prometheus would read a fall as a reset);
- per worker: ``dp_router_worker_pid`` (0 while it is down),
  ``dp_router_worker_restarts_total`` and ``dp_router_worker_requests_total``
  (how evenly the kernel spreads connections).

**Start and stop.** The supervisor first binds the data port itself
(:func:`reserve_port`): a port in use fails the start with one line before
any worker starts, and port 0 becomes one port for every worker. Start-up
waits until every worker listens; a worker that cannot start fails the start
(exit status 1). SIGTERM: the supervisor's readiness goes false and every
worker gets SIGTERM at once and runs the single-process shutdown order
(readiness false, waiters refused, ``shutdown_delay_s``, stop accepting,
in-flight requests get ``shutdown_timeout_s``, the rest cancelled); health
checks, outlier detection and /metrics keep running until the last worker
has exited. A worker that dies otherwise is restarted after a backoff
(``RESTART_BACKOFF_S``, doubling while it keeps dying young) and logged; a
worker whose supervisor is gone (its pipe closes) drains and exits.

What stays per worker (docs/workers.md): in-flight counts and the policies'
load view, admission queues, retry budgets, policy state (round-robin
schedules, prefix indexes, EWMAs) and the upstream connection pools.
``max_concurrency`` is divided: each worker may have ``ceil(max / N)``
requests in flight to a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import pickle
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from policies.load import Outcome
from router.app import Gateway, Role
from router.config import Config
from router.metrics import EXPERT_FAMILIES, PREFIX, WORKER_FAMILIES
from router.outlier import OutlierDetector, OutlierEvent
from router.outlier import report as report_ejection
from router.replicas import (
    AdminState,
    FleetSnapshot,
    Health,
    Ramp,
    Registry,
    ReplicaStatus,
)
from router.telemetry.share import load_message, ship_reports

log = logging.getLogger("dp_router.workers")

# A worker is an interpreter start plus the gateway's imports; on a busy
# 2-core machine that takes seconds. One not listening after this is not coming.
WORKER_START_TIMEOUT_S = 30.0
# Restart backoff: 0.5 s, doubling while a worker keeps dying within
# STABLE_AFTER_S of its start, at most 30 s (a crash loop must not eat the
# cores the other workers serve on).
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 30.0
STABLE_AFTER_S = 30.0
# After SIGTERM a worker takes shutdown_delay_s + shutdown_timeout_s; this
# much more, then SIGKILL.
STOP_GRACE_S = 5.0
# A worker sends its settled attempts to the supervisor at most this often.
# Per loop turn, a busy worker sent thousands of messages a second and the
# supervisor spent ~5 % of a core reading them; 10 ms later is nothing to an
# ejection (it follows failures over seconds).
OUTCOME_BATCH_S = 0.01
# A scrape waits this long for a worker's answer, then uses its last one.
METRICS_TIMEOUT_S = 2.0
# A worker stops sending outcomes while this much is queued towards the
# supervisor (a supervisor that cannot keep up): dropping evidence beats
# growing a buffer without bound.
MAX_OUTCOME_BACKLOG_BYTES = 4 * 1024 * 1024
# A sanity bound on one message (a 1,000-replica worker's metrics are ~0.4 MB).
MAX_MESSAGE_BYTES = 1 << 30

_HEADER = struct.Struct("!I")


class WorkerStartError(RuntimeError):
    """A worker did not start: the gateway cannot serve as configured."""


# --- the pipe -----------------------------------------------------------------


class Channel:
    """Length-prefixed pickled messages over one end of a socketpair.

    ``send`` never blocks (the transport buffers); ``receive`` raises
    ``EOFError`` (``asyncio.IncompleteReadError``) when the other side is gone.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet taken by the other side."""
        return self._writer.transport.get_write_buffer_size()

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_frame(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def send_frame(self, frame: bytes) -> None:
        """A pickled message (pickle once, send to many)."""
        if not self._writer.is_closing():
            self._writer.writelines((_HEADER.pack(len(frame)), frame))

    async def receive(self) -> Any:
        (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(f"message of {size} bytes")
        return pickle.loads(await self._reader.readexactly(size))

    def close(self) -> None:
        self._writer.close()


# --- fleet snapshots on the wire ------------------------------------------------


def wire_status(status: ReplicaStatus, workers: int) -> dict[str, Any]:
    """One replica's status as plain values; ``max_concurrency`` is each
    worker's share, ``ceil(max / workers)``."""
    ramp = status.ramp
    limit = status.load.max_concurrency
    return {
        "name": status.name,
        "url": status.url,
        "api_key": status.api_key,
        "models": sorted(status.models) if status.models is not None else None,
        "discovers_models": status.discovers_models,
        "weight": status.weight,
        "pool": status.pool,
        "admin": status.admin.value,
        "health": status.health.value,
        "ejected_until": status.ejected_until,
        "ramp": (
            None if ramp is None else (ramp.start, ramp.duration, ramp.aggression, ramp.min_weight)
        ),
        "max_concurrency": None if limit is None else math.ceil(limit / workers),
        "reported_draining": status.reported_draining,
    }


def fleet_message(
    snapshot: FleetSnapshot, model_list: list[dict[str, Any]], workers: int
) -> tuple[Any, ...]:
    return (
        "fleet",
        snapshot.version,
        [wire_status(status, workers) for status in snapshot],
        model_list,
    )


def status_fields(wire: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`wire_status`: what ``Registry.apply`` takes."""
    ramp = wire["ramp"]
    models = wire["models"]
    return {
        **wire,
        "models": frozenset(models) if models is not None else None,
        "admin": AdminState(wire["admin"]),
        "health": Health(wire["health"]),
        "ramp": None if ramp is None else Ramp(*ramp),
    }


def apply_fleet(registry: Registry, message: tuple[Any, ...]) -> FleetSnapshot:
    """A worker: publish the supervisor's ``fleet`` message as the next version."""
    _, _version, statuses, model_list = message
    return registry.apply((status_fields(s) for s in statuses), model_list)


# --- outcomes -------------------------------------------------------------------


class RemoteOutlier(OutlierDetector):
    """A worker's outlier detection: the evidence goes to the supervisor.

    The proxy feeds every settled attempt to :meth:`record`, as it would a
    local detector; here that is one list append (none for a success right
    after a success of the same replica), and one ``outcomes`` message per
    ``OUTCOME_BATCH_S`` carries the batch. The supervisor's
    detector decides, on every worker's evidence, and the ejection comes
    back in the next fleet snapshot, so :meth:`record` never returns an
    event. (The inherited operator methods are not used in a worker.)
    """

    def __init__(self, registry: Registry, channel: Channel) -> None:
        super().__init__(registry)
        self._channel = channel
        self._batch: list[tuple[str, str, int | None]] = []
        self._last: dict[str, Outcome] = {}  # each replica's last outcome in the batch
        self.dropped = 0

    def record(
        self, name: str, outcome: Outcome, now: float, *, status: int | None = None
    ) -> OutlierEvent | None:
        batch = self._batch
        if not batch:
            asyncio.get_running_loop().call_later(OUTCOME_BATCH_S, self._flush)
        elif outcome is Outcome.OK and self._last.get(name) is Outcome.OK:
            # A success after a success tells the detector nothing new (it
            # resets a count that is already 0).
            return None
        self._last[name] = outcome
        batch.append((name, outcome.value, status))
        return None

    def _flush(self) -> None:
        batch = self._batch
        self._batch = []
        self._last.clear()
        if self._channel.backlog > MAX_OUTCOME_BACKLOG_BYTES:
            if not self.dropped:
                log.warning("the supervisor is not keeping up: dropping outcome evidence")
            self.dropped += len(batch)
            return
        self._channel.send(("outcomes", batch))


# --- metrics --------------------------------------------------------------------

# (sample name, labels, value)
Sample = tuple[str, dict[str, str], float]
# (name, type, help, samples): a collected family as plain values
Family = tuple[str, str, str, list[Sample]]

# Families that describe the fleet's status or the control plane's own work:
# the supervisor's alone. The in-flight and outstanding-token gauges are
# there too because the supervisor mirrors the workers' sums into its own
# load counters before it collects (see Supervisor.refresh).
SUPERVISOR_FAMILIES = frozenset(
    f"{PREFIX}_{name}"
    for name in (
        "replica_in_flight",
        "replica_outstanding_tokens",
        "replica_healthy",
        "replica_routable",
        "replica_ejected",
        "replica_effective_weight",
        "health_transitions",
        "outlier_ejections",
        "models_refresh_failures",
        # Load reports are the supervisor's (router/telemetry); workers get
        # the readings in ``load`` messages and would only repeat them.
        "replica_reported_waiting",
        "replica_reported_running",
        "replica_reported_kv_usage",
        "replica_report_age_seconds",
        "replica_report_stale",
        "replica_reported_draining",
        "replica_rank_waiting",
        "replica_rank_running",
        "replica_rank_kv_usage",
        "load_reports",
        "load_reports_rejected",
    )
) | frozenset(
    # Expert telemetry is the supervisor's; workers get the slowdowns in
    # ``experts`` messages.
    EXPERT_FAMILIES
)
REQUESTS_FAMILY = f"{PREFIX}_requests"
_IN_FLIGHT_FAMILY = f"{PREFIX}_replica_in_flight"
_TOKENS_FAMILY = f"{PREFIX}_replica_outstanding_tokens"
# Counted things, which a dead worker leaves behind in the totals.
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})


def collect_families(registry: CollectorRegistry) -> list[Family]:
    """A registry's families as plain values (picklable, cheap to merge)."""
    return [
        (m.name, m.type, m.documentation, [(s.name, s.labels, s.value) for s in m.samples])
        for m in registry.collect()
    ]


def _key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample[0], tuple(sorted(sample[1].items()))


def merge_families(
    control: Iterable[Family],
    workers: Iterable[Iterable[Family]],
    *,
    supervisor_only: frozenset[str] = SUPERVISOR_FAMILIES,
) -> list[Family]:
    """One family per name: ``supervisor_only`` families from ``control``,
    every other family's samples summed over ``workers`` (``_created``: the
    earliest). Family order: the supervisor's, then any only workers have."""
    meta: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for name, typ, help_, samples in control:
        meta.setdefault(name, (typ, help_))
        acc = values.setdefault(name, {})
        if name in supervisor_only:
            for sample in samples:
                acc[_key(sample)] = sample
    for families in workers:
        for name, typ, help_, samples in families:
            if name in supervisor_only:
                continue
            meta.setdefault(name, (typ, help_))
            acc = values.setdefault(name, {})
            for sample in samples:
                key = _key(sample)
                seen = acc.get(key)
                if seen is None:
                    acc[key] = sample
                elif sample[0].endswith("_created"):
                    acc[key] = (sample[0], sample[1], min(seen[2], sample[2]))
                else:
                    acc[key] = (sample[0], sample[1], seen[2] + sample[2])
    return [(name, *meta[name], list(values[name].values())) for name in meta]


def cumulative(families: Iterable[Family]) -> list[Family]:
    """Only the counted families (counters, histograms): what outlives a worker."""
    return [f for f in families if f[1] in _CUMULATIVE]


def requests_of(families: Iterable[Family] | None) -> float:
    """The client requests a worker's families count."""
    for name, _, _, samples in families or ():
        if name == REQUESTS_FAMILY:
            return sum(v for s, _, v in samples if s.endswith("_total"))
    return 0.0


class _Families(Collector):
    def __init__(self, families: Iterable[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, typ, help_, samples in self._families:
            metric = Metric(name, help_, typ)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, labels, value)
            yield metric


def exposition(families: Iterable[Family]) -> bytes:
    """Prometheus text (format 0.0.4) of plain families."""
    return generate_latest(_Families(families))


# --- the supervisor -------------------------------------------------------------


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Check that ``host:port`` is free and keep it for the workers.

    A plain bind (SO_REUSEADDR, as a listener's) fails when anything listens
    there: another program, or another gateway whose SO_REUSEPORT workers
    ours would otherwise silently share the port with. Then SO_REUSEPORT
    sockets stay bound, not listening: they take no connections, keep the
    port from being handed out meanwhile, and port 0 becomes one port for
    every worker. Returns the sockets (close them at the end) and the port.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    held: list[socket.socket] = []
    try:
        for family, addr in addresses:
            bind_to = (addr[0], port, *addr[2:])
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(bind_to)
                port = probe.getsockname()[1]
            holder = socket.socket(family, socket.SOCK_STREAM)
            held.append(holder)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            holder.bind((addr[0], port, *addr[2:]))
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, port


@dataclass(eq=False)
class _Worker:
    """One worker slot: its current process (restarted in place) and pipe."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    pid: int = 0  # 0 while not serving
    restarts: int = 0
    young_deaths: int = 0  # deaths in a row within STABLE_AFTER_S: the backoff exponent
    families: list[Family] | None = None  # its last metrics answer
    retired_requests: float = 0.0
    ready: asyncio.Future[int] | None = None
    pending: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    def signal(self, sig: int) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


class Supervisor:
    """The control plane and its N worker processes (see the module docstring).

    ``start`` returns once every worker listens (``WorkerStartError`` if one
    cannot); ``shutdown`` drains every worker, then stops the rest.
    """

    def __init__(self, config: Config, *, log_level: str = "INFO") -> None:
        if config.server.workers < 2:
            raise ValueError("a supervisor runs 2 or more workers")
        self.config = config
        self.log_level = log_level
        self.gateway = Gateway(config, role=Role.SUPERVISOR, data_plane=self._serve)
        self.registry = self.gateway.registry
        self.metrics = self.gateway.metrics
        self.outlier = self.gateway.outlier
        self.gateway.admin_app.middlewares.append(self._admin_middleware())
        self.gateway.on_expert_signal = self._ship_experts
        self._workers = [_Worker(i) for i in range(config.server.workers)]
        self._stopping = asyncio.Event()
        self._seq = itertools.count()
        self._retired: list[Family] = []  # counters of workers that died
        self._frame: tuple[int, bytes] | None = None  # the last fleet message, pickled
        self._broadcast_pending = False
        self.port = 0

    @property
    def pids(self) -> list[int]:
        """The serving workers' process ids (0 for a worker that is down)."""
        return [w.pid for w in self._workers]

    async def start(self) -> None:
        await self.gateway.start()

    async def shutdown(self) -> None:
        await self.gateway.shutdown()

    # -- the data plane: worker processes ----------------------------------------

    @contextlib.asynccontextmanager
    async def _serve(self) -> AsyncIterator[int]:
        """Entered by the gateway where a single process starts its data
        listener, so it is left first: the workers drain while health
        checks, outlier detection and the admin listener still run."""
        server = self.config.server
        held, self.port = reserve_port(server.host, server.port)
        self.registry.subscribe(self._on_fleet_change)
        try:
            firsts = []
            for worker in self._workers:
                first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                worker.task = asyncio.create_task(
                    self._life(worker, first), name=f"worker-{worker.index}"
                )
                firsts.append(first)
            try:
                await asyncio.gather(*firsts)
            except BaseException:
                for first in firsts:
                    if not first.done():
                        first.cancel()
                    elif not first.cancelled():
                        first.exception()  # retrieved: one failure is reported
                raise
            with self._ship_reports():
                yield self.port
        finally:
            try:
                await self._stop_workers()
            finally:
                self.registry.unsubscribe(self._on_fleet_change)
                for sock in held:
                    sock.close()

    async def _life(self, worker: _Worker, first: asyncio.Future[None]) -> None:
        """Run one worker slot: start it, and restart it whenever it dies,
        until the supervisor stops. A failure before the first start
        completed fails ``first`` (the gateway's start) instead."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                started = loop.time()
                error: WorkerStartError | None = None
                try:
                    await self._start_worker(worker)
                except WorkerStartError as exc:
                    error = exc
                except Exception as exc:  # the pipe, most likely
                    error = WorkerStartError(f"worker {worker.index} did not start: {exc!r}")
                if error is not None:
                    if worker.proc is not None and worker.proc.returncode is None:
                        worker.signal(signal.SIGKILL)
                        await worker.proc.wait()
                    if not first.done():
                        first.set_exception(error)
                        return
                    if not self._stopping.is_set():
                        log.error("%s", error)
                else:
                    if not first.done():
                        first.set_result(None)
                    assert worker.proc is not None
                    await worker.proc.wait()
                code = worker.proc.returncode if worker.proc is not None else None
                self._retire(worker)
                if self._stopping.is_set():
                    return
                young = loop.time() - started < STABLE_AFTER_S
                worker.young_deaths = worker.young_deaths + 1 if young else 0
                delay = min(
                    RESTART_BACKOFF_S * 2 ** max(worker.young_deaths - 1, 0),
                    MAX_RESTART_BACKOFF_S,
                )
                log.warning(
                    "worker %d died (%s); restarting in %.1f s",
                    worker.index,
                    _exit_reason(code),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return
                worker.restarts += 1
        finally:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.signal(signal.SIGKILL)  # cancelled: leave nothing behind
                await worker.proc.wait()
            self._retire(worker)

    async def _start_worker(self, worker: _Worker) -> None:
        """Spawn the process, say hello, send the fleet, wait until it listens."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "router.worker",
                "--fd",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            raise WorkerStartError(f"worker {worker.index} could not be started: {exc}") from exc
        finally:
            child.close()
        worker.channel = channel = await Channel.connect(parent)
        worker.ready = asyncio.get_running_loop().create_future()
        # Port 0 was resolved by reserve_port: one port for every worker.
        server = dataclasses.replace(self.config.server, port=self.port)
        channel.send(
            (
                "hello",
                {
                    "config": dataclasses.replace(self.config, server=server),
                    "index": worker.index,
                    "workers": len(self._workers),
                    "log_level": self.log_level,
                },
            )
        )
        channel.send_frame(self._fleet_frame())
        # The load readings so far: a (re)started worker routes on them at once.
        channel.send(load_message(self.registry, set(self.registry.snapshot.names)))
        reader = asyncio.create_task(
            self._read(worker, channel), name=f"worker-{worker.index}-pipe"
        )
        exited = asyncio.create_task(worker.proc.wait())
        try:
            done, _ = await asyncio.wait(
                {worker.ready, exited},
                timeout=WORKER_START_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            exited.cancel()
        if worker.ready.done() and not worker.ready.cancelled():
            worker.pid = worker.ready.result()
            if self._stopping.is_set():
                worker.signal(signal.SIGTERM)
            log.info("worker %d (pid %d) serving on port %d", worker.index, worker.pid, self.port)
            return
        reader.cancel()
        if exited in done:
            why = _exit_reason(worker.proc.returncode)
        else:
            why = f"not listening after {WORKER_START_TIMEOUT_S:g} s"
            worker.signal(signal.SIGKILL)
            await worker.proc.wait()
        raise WorkerStartError(f"worker {worker.index} did not start: {why}")

    async def _read(self, worker: _Worker, channel: Channel) -> None:
        """Everything a worker says, until its pipe closes."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await channel.receive()
                kind = message[0]
                if kind == "outcomes":
                    self._outcomes(message[1], loop.time())
                elif kind == "metrics":
                    _, seq, families = message
                    worker.families = families
                    answered = worker.pending.pop(seq, None)
                    if answered is not None and not answered.done():
                        answered.set_result(None)
                elif kind == "ready":
                    if worker.ready is not None and not worker.ready.done():
                        worker.ready.set_result(int(message[1]))
                else:
                    log.error("worker %d sent an unknown message %r", worker.index, kind)
        except (EOFError, ConnectionError):
            pass  # the worker is gone; _life notices its exit
        except Exception:
            log.exception("reading worker %d's pipe failed", worker.index)
            worker.signal(signal.SIGKILL)  # a worker we cannot hear is restarted
        finally:
            channel.close()
            if worker.channel is channel:
                worker.channel = None

    def _retire(self, worker: _Worker) -> None:
        """A worker's process is gone: its last counters stay in the totals."""
        if worker.families is not None:
            self._retired = merge_families([], [self._retired, cumulative(worker.families)])
            worker.retired_requests += requests_of(worker.families)
            worker.families = None
        worker.pid = 0
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None
        for waiting in worker.pending.values():
            if not waiting.done():
                waiting.set_result(None)
        worker.pending.clear()

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker at once; SIGKILL to any still running
        after shutdown_delay_s + shutdown_timeout_s + STOP_GRACE_S."""
        self._stopping.set()
        for worker in self._workers:
            worker.signal(signal.SIGTERM)
        tasks = [w.task for w in self._workers if w.task is not None]
        if not tasks:
            return
        server = self.config.server
        grace = server.shutdown_delay_s + server.shutdown_timeout_s + STOP_GRACE_S
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d worker(s) still running after %.0f s: killed", len(late), grace)
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in self._workers:
            # (-SIGTERM: one that had not set up its handlers yet.)
            if worker.proc is not None and worker.proc.returncode not in (0, None, -signal.SIGTERM):
                log.warning("worker %d %s", worker.index, _exit_reason(worker.proc.returncode))

    # -- fleet snapshots ------------------------------------------------------------

    def _on_fleet_change(self, new: FleetSnapshot, old: FleetSnapshot) -> None:
        # Versions published in one loop turn (a health round) go out as one.
        if not self._broadcast_pending:
            self._broadcast_pending = True
            asyncio.get_running_loop().call_soon(self._broadcast)

    def _ship_reports(self) -> contextlib.AbstractContextManager[None]:
        """The supervisor's load readings to every worker (``load`` messages,
        router/telemetry/share.py), batched."""
        telemetry = self.gateway.telemetry
        if telemetry is None:
            return contextlib.nullcontext()

        def send(message: tuple[Any, ...]) -> None:
            frame = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
            for worker in self._workers:
                if worker.channel is not None:
                    worker.channel.send_frame(frame)

        return ship_reports(telemetry, self.registry, send)

    def _ship_experts(self, slowdowns: dict[str, float | None]) -> None:
        """Each replica's expert slowdown (router/experts.py), once a second,
        so the workers' scored policy weighs what the supervisor measures."""
        frame = pickle.dumps(("experts", slowdowns), pickle.HIGHEST_PROTOCOL)
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send_frame(frame)

    def _broadcast(self) -> None:
        self._broadcast_pending = False
        frame = self._fleet_frame()
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send_frame(frame)

    def _fleet_frame(self) -> bytes:
        snapshot = self.registry.snapshot
        if self._frame is None or self._frame[0] != snapshot.version:
            message = fleet_message(snapshot, self.registry.model_list(), len(self._workers))
            self._frame = (snapshot.version, pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        return self._frame[1]

    # -- outcomes ---------------------------------------------------------------------

    def _outcomes(self, batch: list[tuple[str, str, int | None]], now: float) -> None:
        detector = self.outlier
        if detector is None:
            return
        for name, outcome, status in batch:
            event = detector.record(name, Outcome(outcome), now, status=status)
            if event is not None:
                report_ejection(event, self.metrics)

    # -- metrics and the admin listener -------------------------------------------------

    async def refresh(self) -> None:
        """Ask every serving worker for its metrics (a worker that does not
        answer within METRICS_TIMEOUT_S keeps its last answer), then mirror
        the per-replica load sums into the supervisor's own counters."""
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []
        for worker in self._workers:
            if worker.channel is None or not worker.pid:
                continue
            seq = next(self._seq)
            answered: asyncio.Future[None] = loop.create_future()
            worker.pending[seq] = answered
            worker.channel.send(("metrics", seq))
            waiting.append(answered)
        if waiting:
            await asyncio.wait(waiting, timeout=METRICS_TIMEOUT_S)
        for worker in self._workers:
            for seq in [s for s, f in worker.pending.items() if f in waiting]:
                del worker.pending[seq]
        sums: dict[str, dict[str, float]] = {_IN_FLIGHT_FAMILY: {}, _TOKENS_FAMILY: {}}
        for worker in self._workers:
            for name, _, _, samples in worker.families or ():
                per_replica = sums.get(name)
                if per_replica is None:
                    continue
                for _, labels, value in samples:
                    replica = labels.get("replica", "")
                    per_replica[replica] = per_replica.get(replica, 0.0) + value
        in_flight, tokens = sums[_IN_FLIGHT_FAMILY], sums[_TOKENS_FAMILY]
        for status in self.registry:
            # The supervisor sends nothing itself: its load counters are
            # read only here, by /metrics and /admin/replicas.
            status.load.in_flight = int(in_flight.get(status.name, 0))
            status.load.outstanding_tokens = int(tokens.get(status.name, 0))

    def families(self) -> list[Family]:
        """Every family for /metrics: the supervisor's, the workers' summed,
        and the per-worker ones (call :meth:`refresh` first)."""
        live = [w.families for w in self._workers if w.families is not None]
        merged = merge_families(collect_families(self.metrics.registry), [self._retired, *live])
        per_worker: list[list[Sample]] = [[], [], []]
        for w in self._workers:
            labels = {"worker": str(w.index)}
            per_worker[0].append((f"{PREFIX}_worker_pid", labels, float(w.pid)))
            per_worker[1].append((f"{PREFIX}_worker_restarts_total", labels, float(w.restarts)))
            requests = w.retired_requests + requests_of(w.families)
            per_worker[2].append((f"{PREFIX}_worker_requests_total", labels, requests))
        for (name, typ, help_), samples in zip(WORKER_FAMILIES, per_worker, strict=True):
            merged.append((name, typ, help_, samples))
        return merged

    def _admin_middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """In front of the admin app (router.admin): /metrics and /admin/*
        read the workers' state first; /metrics answers with every worker's
        families; /readyz is not ready while no worker serves."""

        @web.middleware
        async def middleware(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            path = request.path
            if path == "/readyz" and not any(self.pids):
                return web.json_response({"status": "no_worker"}, status=503)
            if path == "/metrics" or path.startswith("/admin/"):
                await self.refresh()
            response = await handler(request)
            if path == "/metrics" and isinstance(response, web.Response) and response.status == 200:
                response.body = exposition(self.families())
            return response

        return middleware


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


async def supervise(config: Config, *, log_level: str = "INFO") -> int:
    """``dp-router serve`` with ``workers`` > 1: run until SIGTERM or SIGINT.

    Exit status 0 after a clean stop, 1 if the workers could not start.
    """
    supervisor = Supervisor(config, log_level=log_level)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await supervisor.start()
    except WorkerStartError as exc:
        print(f"dp-router: {exc}", file=sys.stderr)
        return 1
    log.info(
        "dp-router listening on %s:%d with %d workers (pids %s; admin %s:%d), policy %s, "
        "%d replicas",
        config.server.host,
        supervisor.port,
        len(supervisor.pids),
        " ".join(map(str, supervisor.pids)),
        config.admin.host,
        supervisor.gateway.admin_port,
        config.routing.policy,
        len(config.replicas),
    )
    await stop.wait()
    log.info("shutting down: readiness false, draining every worker")
    await supervisor.shutdown()
    log.info("stopped")
    return 0


__all__ = [
    "Channel",
    "RemoteOutlier",
    "Supervisor",
    "WorkerStartError",
    "apply_fleet",
    "collect_families",
    "exposition",
    "fleet_message",
    "merge_families",
    "reserve_port",
    "supervise",
]
