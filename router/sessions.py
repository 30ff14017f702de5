"""Sticky sessions: the I/O around ``Router.decide`` (docs/sessions.md).

Every replica holds its own KV cache, so a conversation whose next turn lands
elsewhere recomputes its whole context. A session's pin (its replica) lives
in a :class:`~router.session_store.SessionStore`: in memory by default, in
Redis when several gateways (or ``--workers``) must agree.

The routing rules are in ``router.routing`` (the affinity step: a pin holds
while its replica is routable, in the session's pool and under the load
bound). This module does what that pure step cannot:

- the key: read from configured sources (a header, ``prompt_cache_key`` or
  ``user`` in the body), validated, and hashed with its source, so a client
  can neither craft store keys nor grow memory with long ones;
- the lookup before ``decide`` (one round trip: read and slide the TTL), and
  the write after it: an atomic first pin (the loser of a race follows the
  winner) or a compare-and-set re-pin (two gateways cannot flap a session);
- the outage: every remote call has an outer timeout and goes through a
  :class:`~router.breaker.CircuitBreaker`; when the store fails, the pins
  this gateway read or wrote recently (a bounded LRU) keep their sessions
  in place, and other sessions go to the rendezvous hash of their key over
  the routable replicas, which every gateway computes alike. No request
  fails, and none waits longer than ``op_timeout_s``, because of the store.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from policies.hashring import rendezvous
from router.breaker import BreakerState, CircuitBreaker
from router.config import RedisConfig, SessionsConfig
from router.metrics import Metrics
from router.replicas import FleetSnapshot
from router.session_key import parse_sources, session_key
from router.session_store import SessionStore, is_pool_exhausted

T = TypeVar("T")


class Placement(StrEnum):
    """How a session's request was placed: the X-Dp-Session header's value
    (``repinned`` is followed by ``:<reason>``)."""

    HIT = "hit"  # its pin held
    NEW = "new"  # first placement
    REPINNED = "repinned"  # moved: the reason is a routing.Repin
    FALLBACK = "fallback"  # the store was unavailable: local pin or rendezvous


class LocalPins:
    """The pins this gateway read or wrote recently: an LRU of bounded size,
    each pin good for one session TTL after it was last used.

    Consulted while the store is unavailable (or lost a pin), so that the
    sessions this gateway has seen stay where they are through an outage; a
    pin older than the TTL is gone here as it is in the store.
    """

    __slots__ = ("_clock", "_pins", "capacity", "ttl_s")

    def __init__(
        self, capacity: int, ttl_s: float = math.inf, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> str | None:
        entry = self._pins.get(key)
        if entry is None:
            return None
        replica, expires = entry
        now = self._clock()
        if now >= expires:
            del self._pins[key]
            return None
        self._pins[key] = (replica, now + self.ttl_s)  # sliding, as the store's
        self._pins.move_to_end(key)
        return replica

    def put(self, key: str, replica: str) -> None:
        if self.capacity <= 0:
            return
        pins = self._pins
        pins[key] = (replica, self._clock() + self.ttl_s)
        pins.move_to_end(key)
        while len(pins) > self.capacity:
            pins.popitem(last=False)

    def discard(self, key: str) -> None:
        self._pins.pop(key, None)

    def __len__(self) -> int:
        return len(self._pins)


class Unavailable(Exception):
    """The store did not answer (error, timeout, or the breaker is open)."""


@dataclass(slots=True)
class Lookup:
    """A session's pin as the request found it."""

    key: str
    pin: str | None  # what ``decide`` gets
    stored: bool  # the pin came from the store (a write-back is not needed)
    fallback: bool  # the store was unavailable


class Sessions:
    """The session store behind a breaker, with the outage fallback.

    ``remote`` stores (Redis) get the outer timeout and the breaker; the
    in-memory store cannot block or fail, so its calls go straight through.
    """

    def __init__(
        self,
        store: SessionStore,
        config: SessionsConfig,
        redis: RedisConfig,
        metrics: Metrics,
        *,
        first_placement_rendezvous: bool | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.sources = parse_sources(config.sources)
        self.max_key_length = config.max_key_length
        self.metrics = metrics
        self.remote = store.name != "memory"
        self.op_timeout_s = redis.op_timeout_s
        self.breaker = CircuitBreaker(redis.breaker_failures, redis.breaker_open_s)
        self.local = LocalPins(config.local_cache_size if self.remote else 0, config.ttl_s)
        self.rendezvous_first = (
            config.first_placement == "rendezvous"
            if first_placement_rendezvous is None
            else first_placement_rendezvous
        )
        metrics.session_breaker_state.set_function(lambda: float(self.breaker.state))
        metrics.session_local_pins.set_function(lambda: float(len(self.local)))

    def key(
        self,
        header: Callable[[bytes], bytes | None],
        body: Mapping[str, Any] | None,
        model: str,
    ) -> str | None:
        return session_key(self.sources, header, body, self.max_key_length, model)

    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """One store call: breaker, outer timeout, latency and error metrics.
        Raises Unavailable instead of any store error."""
        if not self.remote:
            return await call()
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        if not breaker.allow(loop.time()):
            raise Unavailable(op)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.op_timeout_s):
                result = await call()
        except asyncio.CancelledError:
            # The request went away (or shutdown): not the store's fault, but
            # a half-open probe must not stay claimed forever.
            breaker.abandon()
            raise
        except Exception as exc:
            if is_pool_exhausted(exc):
                # A burst of lookups on this gateway, not a sick store: fall
                # back for this request without tripping the breaker.
                self.metrics.session_store_errors.labels(op, "pool").inc()
                breaker.abandon()
                raise Unavailable(op) from exc
            error = "timeout" if isinstance(exc, TimeoutError) else _error_kind(exc)
            self.metrics.session_store_errors.labels(op, error).inc()
            was_open = breaker.state is BreakerState.OPEN
            breaker.failure(loop.time())
            if breaker.state is BreakerState.OPEN and not was_open:
                self.metrics.session_breaker_opens.inc()
            raise Unavailable(op) from exc
        breaker.success()
        self.metrics.session_store_seconds.observe((self.store.name, op), time.perf_counter() - t0)
        return result

    async def lookup(self, key: str) -> Lookup:
        """The session's pin: from the store (sliding its TTL), or while the
        store is unavailable, from this gateway's recent pins."""
        try:
            pin = await self._call("get", lambda: self.store.get(key))
        except Unavailable:
            return Lookup(key, self.local.get(key), stored=False, fallback=True)
        if pin is not None:
            self.local.put(key, pin)
            return Lookup(key, pin, stored=True, fallback=False)
        # Not in the store, but this gateway placed the session recently: the
        # store lost it (restarted empty, or failed over before replicating).
        # Keep the session where its cache is; the caller stores it again.
        return Lookup(key, self.local.get(key), stored=False, fallback=False)

    def place_by_hash(
        self, key: str, model: str, snapshot: FleetSnapshot, now: float
    ) -> str | None:
        """The rendezvous choice over the model's routable replicas: what every
        gateway with the same view picks without asking anyone."""
        healthy = snapshot.healthy_by_model.get(model, ())
        names = [r.name for r in healthy if r.ejected_until <= now]
        weights = {r.name: r.weight for r in healthy}
        return rendezvous(key, names, weights.__getitem__)

    async def claim(self, key: str, replica: str) -> str | None:
        """Store a first pin atomically; returns the winner (another gateway's
        pin if it got there first), or None if the store is unavailable (our
        own choice stands, remembered locally)."""
        self.local.put(key, replica)
        try:
            winner = await self._call("claim", lambda: self.store.claim(key, replica))
        except Unavailable:
            return None
        if winner != replica:
            self.local.put(key, winner)
        return winner

    async def repin(self, key: str, old: str | None, new: str) -> str | None:
        """Move a pin by compare-and-set; returns what the store holds now
        (another gateway's re-pin if it moved the session first), or None if
        the store is unavailable."""
        self.local.put(key, new)
        try:
            current = await self._call("repin", lambda: self.store.repin(key, old, new))
        except Unavailable:
            return None
        if current != new:
            self.local.put(key, current)
        return current

    async def describe(self, key: str) -> dict[str, Any]:
        """The admin view of one session (by its stored, hashed key)."""
        try:
            replica, ttl = await self._call("describe", lambda: self.store.describe(key))
        except Unavailable:
            return {
                "key": key,
                "store": self.store.name,
                "store_available": False,
                "local_pin": self.local.get(key),
            }
        return {
            "key": key,
            "store": self.store.name,
            "store_available": True,
            "replica": replica,
            "ttl_s": ttl,
            "local_pin": self.local.get(key) if self.remote else None,
        }

    async def close(self) -> None:
        await self.store.close()


def _error_kind(exc: Exception) -> str:
    name = type(exc).__name__
    if "Timeout" in name:
        return "timeout"
    if "Connection" in name or isinstance(exc, ConnectionError | OSError):
        return "connection"
    return "error"
