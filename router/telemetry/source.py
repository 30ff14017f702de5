"""The gateway's load telemetry: scrapes, the push listener, and what they write.

:func:`load_telemetry` is the async context manager the app enters with its
control plane (next to health checks): a scrape loop per replica that has
one, the push listener if ``[telemetry] push_listen`` is set, and the
per-rank metrics. On exit every task is cancelled and awaited and the
listener closed.

Each replica's source is its ``telemetry`` key, else ``[telemetry] source``
(:func:`plan_for`):

- ``auto`` (the default): scrape its metrics (the engine found from the
  names; a TensorRT-LLM replica answering 404 on ``/metrics`` is tried at
  ``/prometheus/metrics``), accept its pushes if it has a token, and read
  the ORCA header the proxy asks for;
- ``scrape``, ``push``, ``header``: that one source; ``none``: nothing.

What a report changes, and through whom (docs/ARCHITECTURE.md, "Who writes
replica state"): the numbers go on the replica's live
:class:`~router.load.ReplicaLoad` (:func:`router.telemetry.reading.record`);
the replica's own "draining" is status, written with
``Registry.update(name, reported_draining=...)``, so routing's filter drops
it and every worker hears of it with the next fleet snapshot. Expert
counters go to the ``on_experts`` callback (``ExpertTelemetry.record``).

A reported drain is a lease (``DRAIN_LEASE_S``): each push that says
"draining" renews it, and one that nobody renews expires, so a replica
whose pusher died returns to rotation (health checks still guard it).

Scrape loops are jittered (+-10 % per interval, and a random first delay
so a fleet is not scraped in lockstep), bounded (``scrape_timeout_s``,
``scrape_max_bytes``) and back off on failures (up to
``MAX_BACKOFF_FACTOR`` x the interval), so a replica without metrics costs
a request every few seconds, not every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from policies.load import DEFAULT_REPORT_MAX_AGE_S
from router.config import Config
from router.experts import ExpertSample
from router.metrics import Metrics, RankSample
from router.replicas import FleetSnapshot, Registry, ReplicaStatus
from router.telemetry.push import Refusal, create_push_app, push_listener, token_key
from router.telemetry.reading import RankReading, Reading, Source, record
from router.telemetry.report import LoadReport
from router.telemetry.scrape import PRESETS, Preset, ScrapeError, custom_preset, parse_metrics

log = logging.getLogger("dp_router.telemetry")

# (replica, samples, now): ExpertTelemetry.record's shape.
ExpertSink = Callable[[str, Sequence[ExpertSample], float], object]
# Told the replica's name after each accepted scrape or push.
ReportListener = Callable[[str], None]

# +-10 % per interval: N gateways do not scrape in lockstep.
JITTER = 0.1
# A failing replica is scraped at most this many intervals apart (doubling).
MAX_BACKOFF_FACTOR = 8
# A push older than the replica's last one by less than this is a reordered
# request and refused; further back it is a restart or a clock step, and
# starts a new order (refusing it would leave the replica stale for as long
# as its clock went back).
ORDER_WINDOW_S = 30.0
# A reported drain lasts this long unless a push renews it: ten reports'
# worth of max age, so a few lost pushes never end a drain, and a pusher
# that died (its replica draining forever) is undone within a minute.
DRAIN_LEASE_S = 10 * DEFAULT_REPORT_MAX_AGE_S
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one replica's load comes from."""

    source: str  # auto, scrape, push, header, none
    engine: str  # auto, vllm, sglang, trtllm, custom
    metrics_path: str

    @property
    def scrapes(self) -> bool:
        return self.source in ("auto", "scrape")

    @property
    def pushes(self) -> bool:
        return self.source in ("auto", "push")

    @property
    def reads_header(self) -> bool:
        return self.source in ("auto", "header")


def plan_for(config: Config, name: str) -> Plan:
    """``name``'s plan: its own keys, else the ``[telemetry]`` defaults."""
    t = config.telemetry
    rep = next((r for r in config.replicas if r.name == name), None)
    engine = (rep.engine if rep else "") or t.engine
    default_path = PRESETS[engine].metrics_path if engine in PRESETS else t.metrics_path
    return Plan(
        source=(rep.telemetry if rep else "") or t.source,
        engine=engine,
        metrics_path=(rep.metrics_path if rep else "") or default_path,
    )


class Telemetry:
    """Scrapes and pushes for a fleet (see the module docstring).

    ``clock`` is the loop clock the registry's other writers and the
    policies use: every report is stamped with it at receipt.
    """

    def __init__(
        self,
        registry: Registry,
        config: Config,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        rng: random.Random,
        *,
        clock: Callable[[], float] | None = None,
        on_experts: ExpertSink | None = None,
        on_ep_ranks: ExpertSink | None = None,
    ) -> None:
        self._registry = registry
        self._config = config
        self._t = config.telemetry
        self._metrics = metrics
        self._session = session
        self._rng = rng
        self._clock = clock if clock is not None else asyncio.get_running_loop().time
        self._on_experts = on_experts
        self._on_ep_ranks = on_ep_ranks
        self._plans: dict[str, Plan] = {}
        self._custom = custom_preset(self._t.metric_names)
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._paths: dict[str, str] = {}
        self._fails: dict[str, int] = {}
        self._ranks: dict[str, tuple[RankReading, ...]] = {}
        self._push_order: dict[str, float] = {}
        self._listeners: list[ReportListener] = []
        self._drain_leases: dict[str, asyncio.TimerHandle] = {}
        self.drain_lease_s = DRAIN_LEASE_S
        self.push_port: int | None = None

    # --- what others read ---------------------------------------------------------

    def plan(self, name: str) -> Plan:
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = plan_for(self._config, name)
        return plan

    def stale(self, status: ReplicaStatus, now: float) -> bool | None:
        """True while ``status`` has telemetry but no fresh report; None without telemetry."""
        if self.plan(status.name).source == "none":
            return None
        at = status.load.reported_at
        return at is None or now - at > DEFAULT_REPORT_MAX_AGE_S

    def rank_samples(self) -> list[RankSample]:
        return [
            RankSample(name, r.rank, r.waiting, r.running, r.kv_usage)
            for name, ranks in list(self._ranks.items())
            for r in ranks
        ]

    def subscribe(self, listener: ReportListener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: ReportListener) -> None:
        self._listeners.remove(listener)

    # --- scraping -----------------------------------------------------------------

    async def scrape_once(self, name: str, url: str) -> bool:
        """Scrape ``name`` once and record what it says; False on any failure
        (counted by reason)."""
        plan = self.plan(name)
        path = self._paths.get(name, plan.metrics_path)
        try:
            text = await self._fetch(url, path, name)
            preset = self._preset(plan)
            reading = parse_metrics(
                text,
                preset,
                max_experts=self._t.push_max_experts,
                max_layers=self._t.push_max_layers,
            )
        except ScrapeError as exc:
            self._metrics.load_reports_rejected.labels(Source.SCRAPE.value, exc.reason).inc()
            return False
        current = self._registry.get(name)
        if current is None or current.url != url:
            return False  # removed or replaced while we read: not its load
        self._ranks[name] = reading.ranks
        self.accept(current, reading, Source.SCRAPE, self._clock())
        return True

    async def _fetch(self, url: str, path: str, name: str) -> str:
        headers = {}
        status = self._registry.get(name)
        if status is not None and status.api_key:
            headers["Authorization"] = f"Bearer {status.api_key}"
        max_bytes = self._t.scrape_max_bytes
        try:
            async with self._session.get(
                url.rstrip("/") + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._t.scrape_timeout_s),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    self._try_trtllm_path(name, path, resp.status)
                    raise ScrapeError("http_status", f"GET {path}: {resp.status}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise ScrapeError("too_large", f"{resp.content_length} bytes")
                body = bytearray()
                while chunk := await resp.content.read(_READ_CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        raise ScrapeError("too_large", f"more than {max_bytes} bytes")
        except TimeoutError:
            raise ScrapeError("timeout", "timed out") from None
        except aiohttp.ClientConnectionError:
            raise ScrapeError("connect_error", "connection failed") from None
        except aiohttp.ClientError:
            raise ScrapeError("http_error", "bad HTTP answer") from None
        return body.decode("utf-8", "replace")

    def _try_trtllm_path(self, name: str, path: str, status: int) -> None:
        """auto on the default path, and a 404: trtllm-serve's metrics live
        elsewhere; try there from now on (and back, if that 404s too)."""
        plan = self.plan(name)
        if status != 404 or plan.engine != "auto" or plan.metrics_path != self._t.metrics_path:
            return
        other = PRESETS["trtllm"].metrics_path
        self._paths[name] = other if path != other else plan.metrics_path

    def _preset(self, plan: Plan) -> Preset | None:
        if plan.engine == "custom":
            return self._custom
        return PRESETS.get(plan.engine)  # auto: None, detected per scrape

    async def _scrape_loop(self, name: str, url: str) -> None:
        loop = asyncio.get_running_loop()
        interval = self._t.scrape_interval_s
        await asyncio.sleep(self._rng.uniform(0, interval))  # spread the fleet
        while True:
            started = loop.time()
            try:
                ok = await self.scrape_once(name, url)
            except Exception:
                log.exception("scraping %s failed; the next scrape runs as usual", name)
                ok = False
            fails = 0 if ok else self._fails.get(name, 0) + 1
            self._fails[name] = fails
            factor = min(2 ** max(fails - 1, 0), MAX_BACKOFF_FACTOR)
            wait = interval * factor * (1 + self._rng.uniform(-JITTER, JITTER))
            await asyncio.sleep(max(0.0, started + wait - loop.time()))

    def sync(self, snapshot: FleetSnapshot) -> None:
        """One scrape loop per member that scrapes; none for departed ones."""
        wanted = {s.name: s.url for s in snapshot if self.plan(s.name).scrapes}
        for name, (url, task) in list(self._tasks.items()):
            if wanted.get(name) != url:
                task.cancel()
                del self._tasks[name]
        for name, url in wanted.items():
            if name not in self._tasks:
                task = asyncio.create_task(self._scrape_loop(name, url), name=f"scrape-{name}")
                self._tasks[name] = (url, task)
        for gone in [n for n in self._ranks if n not in snapshot.names]:
            del self._ranks[gone]
        for gone in [n for n in self._push_order if n not in snapshot.names]:
            del self._push_order[gone]
        for gone in [n for n in self._drain_leases if n not in snapshot.names]:
            self._drain_leases.pop(gone).cancel()

    async def stop(self) -> None:
        for lease in self._drain_leases.values():
            lease.cancel()
        self._drain_leases.clear()
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- pushes -------------------------------------------------------------------

    def accept_push(self, owner: str, report: LoadReport) -> None:
        """A report the listener authenticated as ``owner``'s; raises
        :class:`~router.telemetry.push.Refusal`."""
        status = self._registry.get(owner)
        if status is None:
            raise Refusal("unknown_replica", 404, f"{owner!r} is not in the fleet")
        if not self.plan(owner).pushes:
            raise Refusal("push_disabled", 409, f"{owner!r} is configured for another source")
        last = self._push_order.get(owner)
        if last is not None and last - ORDER_WINDOW_S < report.timestamp < last:
            raise Refusal("out_of_order", 409, "older than this replica's last report")
        self._push_order[owner] = report.timestamp
        self.accept(status, report.reading, Source.PUSH, self._clock())

    # --- the one place a scrape or push is applied ---------------------------------

    def accept(self, status: ReplicaStatus, reading: Reading, source: Source, now: float) -> None:
        """Write ``reading`` (received at ``now``) on ``status``'s replica."""
        name = status.name
        if not record(status.load, reading, now, source):
            # Half a queue (running without waiting), or nothing at all.
            self._metrics.load_reports_rejected.labels(source.value, "no_waiting").inc()
            return
        if reading.ranks_dropped:
            log.warning(
                "replica %s reports %d DP ranks beyond the caps: summed, not kept apart",
                name,
                reading.ranks_dropped,
            )
        if reading.draining is not None:
            self._lease_drain(name, reading.draining)
            if reading.draining != status.reported_draining:
                self._registry.update(name, reported_draining=reading.draining)
                log.warning(
                    "replica %s reports %s", name, "draining" if reading.draining else "ready again"
                )
        self._metrics.load_reports.labels(name, source.value).inc()
        for sink, samples in (
            (self._on_experts, reading.experts),
            (self._on_ep_ranks, reading.ep_ranks),
        ):
            if sink is not None and samples:
                try:
                    sink(name, samples, now)
                except Exception:
                    # A bug in expert bookkeeping must not stop load reports.
                    log.exception("expert counters of %s were not recorded", name)
        for listener in self._listeners:
            listener(name)

    def _lease_drain(self, name: str, draining: bool) -> None:
        """Renew ``name``'s drain lease (``draining``) or end it."""
        old = self._drain_leases.pop(name, None)
        if old is not None:
            old.cancel()
        if draining:
            self._drain_leases[name] = asyncio.get_running_loop().call_later(
                self.drain_lease_s, self._drain_expired, name
            )

    def _drain_expired(self, name: str) -> None:
        self._drain_leases.pop(name, None)
        status = self._registry.get(name)
        if status is not None and status.reported_draining:
            self._registry.update(name, reported_draining=False)
            log.warning(
                "replica %s: no push renewed its drain for %.0f s; back in rotation",
                name,
                self.drain_lease_s,
            )


@contextlib.asynccontextmanager
async def load_telemetry(
    registry: Registry,
    config: Config,
    metrics: Metrics,
    rng: random.Random,
    *,
    clock: Callable[[], float] | None = None,
    on_experts: ExpertSink | None = None,
    on_ep_ranks: ExpertSink | None = None,
) -> AsyncIterator[Telemetry]:
    """Run the fleet's load telemetry for the body of the ``async with``.

    Scrapes start at once (each after a random fraction of an interval);
    the push listener, if configured, listens before this yields (its port
    in ``Telemetry.push_port``). A push listener that cannot bind fails the
    start. On exit: scrape tasks cancelled and awaited, listener closed,
    session closed, rank metrics unregistered.
    """
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                # One scrape in flight per replica; never the data path's pool.
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=1),
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        )
        telemetry = Telemetry(
            registry,
            config,
            metrics,
            session,
            rng,
            clock=clock,
            on_experts=on_experts,
            on_ep_ranks=on_ep_ranks,
        )
        metrics.watch_ranks(telemetry.rank_samples)
        stack.callback(metrics.watch_ranks, None)
        t = config.telemetry
        if t.push_listen:

            def push_rejected(reason: str) -> None:
                metrics.load_reports_rejected.labels(Source.PUSH.value, reason).inc()

            tokens = {token_key(r.push_token): r.name for r in config.replicas if r.push_token}
            app = create_push_app(
                tokens,
                telemetry.accept_push,
                push_rejected,
                max_bytes=t.push_max_bytes,
                max_experts=t.push_max_experts,
                max_layers=t.push_max_layers,
            )
            telemetry.push_port = await stack.enter_async_context(
                push_listener(app, t.push_listen, count_rejected=push_rejected)
            )

        def on_change(new: FleetSnapshot, old: FleetSnapshot) -> None:
            telemetry.sync(new)

        registry.subscribe(on_change)
        stack.callback(registry.unsubscribe, on_change)
        stack.push_async_callback(telemetry.stop)
        telemetry.sync(registry.snapshot)
        yield telemetry


__all__ = ["ExpertSink", "Plan", "ReportListener", "Telemetry", "load_telemetry", "plan_for"]
