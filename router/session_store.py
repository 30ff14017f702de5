"""Where session pins live: session key -> replica name, each with a sliding TTL.

Two stores with one contract (:class:`SessionStore`): :class:`MemoryStore`
for one gateway, :class:`RedisStore` when several gateways must agree on a
session's replica. The contract, in both:

- every write path leaves a TTL on the key (first pin, touch, re-pin), so a
  forgotten session costs memory for at most ``ttl_s``;
- the first pin is atomic: two gateways claiming one new session at once
  both get the same winner, and follow it;
- a re-pin is a compare-and-set against the replica the caller saw, so two
  gateways that both saw a replica fail cannot flap the session between two
  new ones: the second follows the first's choice.

Errors (Redis down, hung, pool exhausted) propagate as exceptions: the
caller's circuit breaker counts them and decides what to do without Redis.
The caller also bounds each call with ``asyncio.timeout``; a cancelled call
drops its connection (redis-py closes a connection whose read was
interrupted, so the next user of that connection cannot read a stale reply).
Measured behaviour and the configuration are in docs/sessions.md.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from router.config import RedisConfig, SessionsConfig

__all__ = [
    "KEY_SPACE",
    "STORE_ERRORS",
    "MemoryStore",
    "RedisStore",
    "SessionStore",
    "create_store",
    "is_pool_exhausted",
]

# Under the configured key_prefix, so that other data can share the prefix later.
KEY_SPACE = "sess:"

# What a store call raises when the store is unavailable: redis-py's errors
# (ConnectionError, including Sentinel's MasterNotFoundError and a full pool's
# "No connection available"; TimeoutError of a socket) and the caller's own
# asyncio.timeout. Anything else is a bug and should be loud.
STORE_ERRORS: tuple[type[Exception], ...] = (RedisError, TimeoutError)
# redis-py's message when BlockingConnectionPool waited pool_timeout_s in vain.
_POOL_EXHAUSTED = "No connection available"


def is_pool_exhausted(exc: BaseException) -> bool:
    """This process had no free connection in time: a local burst, which says
    nothing about the store's health (the breaker must not count it)."""
    return isinstance(exc, RedisConnectionError) and _POOL_EXHAUSTED in str(exc)


class SessionStore(Protocol):
    """Session pins: key -> replica name, each with a sliding TTL.

    Keys arrive already validated and hashed by the caller (hex, <= 64
    chars); stores add their prefix.
    """

    name: str  # "memory" | "redis"

    async def get(self, key: str) -> str | None:
        """The pinned replica, sliding the TTL in the same step."""
        ...

    async def claim(self, key: str, replica: str) -> str:
        """Atomic first pin; the winner (``replica`` if we won). The key
        carries a fresh TTL afterwards either way."""
        ...

    async def repin(self, key: str, old: str | None, new: str) -> str:
        """Compare-and-set: if the pin is still ``old`` (or gone), pin ``new``.
        Returns the pin now stored, so that the caller follows the winner."""
        ...

    async def delete(self, key: str) -> None: ...

    async def describe(self, key: str) -> tuple[str | None, float | None]:
        """(replica, seconds of TTL left) for the admin view; does not slide."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """One gateway's pins: an LRU with a sliding TTL and a size bound.

    Every entry has the same TTL and every touch moves it to the end, so the
    LRU order is also the expiry order: expired entries are dropped from the
    front on each insert (and lazily on read), with no background task. At
    ``max_sessions`` the least recently used pin goes, whatever its TTL.
    """

    name = "memory"

    def __init__(self, ttl_s: float, max_sessions: int, clock: Callable[[], float]) -> None:
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError("MemoryStore needs ttl_s > 0 and max_sessions >= 1")
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (replica, expiry)

    def __len__(self) -> int:
        return len(self._pins)

    def _live(self, key: str, now: float) -> str | None:
        entry = self._pins.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._pins[key]
            return None
        return entry[0]

    def _put(self, key: str, replica: str, now: float) -> None:
        self._pins[key] = (replica, now + self._ttl_s)
        self._pins.move_to_end(key)
        while self._pins:
            oldest_key, (_, expiry) = next(iter(self._pins.items()))
            if expiry > now and len(self._pins) <= self._max:
                break
            del self._pins[oldest_key]

    async def get(self, key: str) -> str | None:
        now = self._clock()
        replica = self._live(key, now)
        if replica is not None:
            self._put(key, replica, now)
        return replica

    async def claim(self, key: str, replica: str) -> str:
        now = self._clock()
        winner = self._live(key, now) or replica
        self._put(key, winner, now)
        return winner

    async def repin(self, key: str, old: str | None, new: str) -> str:
        now = self._clock()
        current = self._live(key, now)
        winner = new if current is None or current == old else current
        self._put(key, winner, now)
        return winner

    async def delete(self, key: str) -> None:
        self._pins.pop(key, None)

    async def describe(self, key: str) -> tuple[str | None, float | None]:
        now = self._clock()
        replica = self._live(key, now)
        if replica is None:
            return None, None
        return replica, self._pins[key][1] - now

    async def close(self) -> None:
        self._pins.clear()


# First pin: SET NX wins or loses atomically; a loser reads the winner and
# slides its TTL in the same script, so the key has a TTL afterwards even if
# something wrote it without one. One round trip either way.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return ARGV[1]
end
return redis.call('GETEX', KEYS[1], 'PX', ARGV[2])
"""

# Re-pin by compare-and-set. ARGV[3], the pin the caller saw, is absent when
# it saw none. The loser's pin is returned (and its TTL slid: the caller is
# about to use it), so two gateways re-pinning at once converge on one replica.
_REPIN = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return current
"""

# TCP keepalive on idle pooled connections: probe after 30 s idle, every 5 s,
# 3 misses (redis-py 8's default; 5.x set none, leaving the OS's 2 hours).
# A dead peer on a busy connection is caught sooner, by op_timeout_s.
_KEEPALIVE = {
    name: value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


def _connection_kwargs(cfg: RedisConfig, *, tcp: bool = True) -> dict[str, Any]:
    """Every connection setting spelled out: redis-py's defaults moved between
    5.x and 8.x (socket timeouts None -> 5 s, retries 0 -> 3 -> 10), and each
    of them would break the hot path's budget if it came back."""
    kwargs: dict[str, Any] = {
        # One budget for connect and for each reply; the caller's asyncio.timeout
        # of the same length bounds the whole call (pool wait included).
        "socket_timeout": cfg.op_timeout_s,
        "socket_connect_timeout": cfg.op_timeout_s,
        # No retries inside redis-py: a retry would spend a second budget the
        # caller does not have; the caller's breaker decides about retrying.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_error": [],
        # No PING before a command on an idle connection: with retries off it
        # adds a round trip and catches nothing the command itself would not.
        "health_check_interval": 0,
        "decode_responses": True,  # replica names are text
        "encoding": "utf-8",
        "protocol": 2,  # RESP2: no push messages, no maintenance notifications
        # No CLIENT SETNAME on connect. (CLIENT SETINFO, pipelined with
        # it, stays: the way to turn it off differs between 7.x and 8.x.)
        "client_name": None,
    }
    if tcp:
        kwargs["socket_keepalive"] = True
        kwargs["socket_keepalive_options"] = {getattr(socket, k): v for k, v in _KEEPALIVE.items()}
    return kwargs


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery with BlockingConnectionPool's bounded wait.

    redis-py's SentinelConnectionPool derives from the plain pool, which
    fails at once with "Too many connections" when full; the hot path wants
    the same bounded wait as the standalone store (pool_timeout_s). The MRO
    puts Sentinel's address discovery before the blocking get/release.
    """


def _sentinel_addresses(sentinels: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for item in sentinels:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"redis.sentinels: {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


class RedisStore:
    """Pins in Redis, shared by every gateway that uses the same Redis and prefix.

    Key ``<key_prefix>sess:<key>`` -> replica name, with a PX TTL of
    ``ttl_s`` on every write path. Build with :meth:`create`; nothing
    connects until the first call, so a gateway starts while Redis is down.
    """

    name = "redis"

    def __init__(
        self, client: Redis, key_prefix: str, ttl_s: float, sentinel: Sentinel | None = None
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("RedisStore needs ttl_s > 0")
        self._client = client
        self._sentinel = sentinel
        self._prefix = key_prefix + KEY_SPACE
        # Milliseconds, so a fractional ttl_s (tests) is kept; never 0 (PX 0 is an error).
        self._ttl_ms = max(1, round(ttl_s * 1000))
        # EVALSHA, and SCRIPT LOAD + EVALSHA on NOSCRIPT (a restarted or
        # failed-over server): redis-py's Script object does both.
        self._claim = client.register_script(_CLAIM)
        self._repin = client.register_script(_REPIN)

    @classmethod
    def create(cls, cfg: RedisConfig, ttl_s: float) -> RedisStore:
        """Standalone from ``cfg.url``, or the master through Sentinel when
        ``cfg.sentinels`` and ``cfg.master_name`` are set. Does not connect."""
        if cfg.sentinels:
            if not cfg.master_name:
                raise ValueError("redis.sentinels needs redis.master_name")
            kwargs = _connection_kwargs(cfg)
            # The sentinels get the same budget and no retries: discovery runs
            # inside a call's budget whenever a connection to the master is made.
            sentinel = Sentinel(
                _sentinel_addresses(cfg.sentinels),
                sentinel_kwargs=dict(kwargs),
                **kwargs,
            )
            client = sentinel.master_for(
                cfg.master_name,
                connection_pool_class=_BlockingSentinelPool,
                max_connections=cfg.max_connections,
                timeout=cfg.pool_timeout_s,
            )
            return cls(client, cfg.key_prefix, ttl_s, sentinel)
        if not cfg.url:
            raise ValueError("RedisStore needs redis.url or redis.sentinels")
        pool = BlockingConnectionPool.from_url(
            cfg.url,
            max_connections=cfg.max_connections,
            timeout=cfg.pool_timeout_s,
            **_connection_kwargs(cfg, tcp=not cfg.url.startswith("unix:")),
        )
        return cls(Redis.from_pool(pool), cfg.key_prefix, ttl_s)

    def key(self, key: str) -> str:
        """The Redis key of session ``key``."""
        return self._prefix + key

    async def get(self, key: str) -> str | None:
        # decode_responses=True: str, never bytes.
        return cast("str | None", await self._client.getex(self.key(key), px=self._ttl_ms))

    async def claim(self, key: str, replica: str) -> str:
        winner = await self._claim(keys=[self.key(key)], args=[replica, self._ttl_ms])
        # The script always answers a name; nil would mean a script bug, and
        # the string "None" must never become a pin.
        if winner is None:
            raise RedisError("claim script returned nil")
        return str(winner)

    async def repin(self, key: str, old: str | None, new: str) -> str:
        args: list[str | int] = [new, self._ttl_ms]
        if old is not None:
            args.append(old)
        return str(await self._repin(keys=[self.key(key)], args=args))

    async def delete(self, key: str) -> None:
        await self._client.delete(self.key(key))

    async def describe(self, key: str) -> tuple[str | None, float | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(self.key(key))
            pipe.pttl(self.key(key))
            replica, pttl = await pipe.execute()
        if replica is None:
            return None, None
        # PTTL: -1 means no TTL (not written by this store), -2 gone meanwhile.
        return replica, (pttl / 1000 if pttl >= 0 else None)

    async def close(self) -> None:
        await self._client.aclose()
        if self._sentinel is not None:
            # Sentinel.aclose() is new in redis-py 8; closing its clients works in 7.x too.
            for sentinel_client in self._sentinel.sentinels:
                await sentinel_client.aclose()


class _StoreConfig(Protocol):
    @property
    def redis(self) -> RedisConfig: ...

    @property
    def sessions(self) -> SessionsConfig: ...


def create_store(cfg: _StoreConfig, clock: Callable[[], float]) -> SessionStore:
    """Redis when ``redis.url`` or ``redis.sentinels`` is set, else memory.

    ``clock`` (monotonic seconds) is the memory store's; Redis keeps its own time.
    """
    if cfg.redis.url or cfg.redis.sentinels:
        return RedisStore.create(cfg.redis, cfg.sessions.ttl_s)
    return MemoryStore(cfg.sessions.ttl_s, cfg.sessions.memory_max_sessions, clock)
