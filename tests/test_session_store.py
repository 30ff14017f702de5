"""The session stores: one contract over MemoryStore and a real RedisStore, then
what only Redis can do wrong (hung, killed, exhausted, failed over).

Redis is a real redis-server on a free loopback port (tests/redis_server.py).
Time bounds are the configured timeouts plus 0.5 s of slack, never speed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import redis.asyncio as redis_asyncio
import redis.exceptions as redis_errors

from router.config import RedisConfig, SessionsConfig
from router.session_store import KEY_SPACE, MemoryStore, RedisStore, SessionStore, create_store
from tests.redis_server import RedisServer, redis_sentinel, redis_server

SLACK_S = 0.5
T = TypeVar("T")
# Short enough that a hung-Redis test takes a fraction of a second, long
# enough that a loaded 2-core machine answers a live Redis in time.
OP_TIMEOUT_S = 0.2
POOL_TIMEOUT_S = 0.2
TTL_S = 60.0
PREFIX = "t:"


# For the contract tests, which are about answers, not time: a loaded CI
# machine must not turn a slow answer into a failure.
LENIENT = {"op_timeout_s": 2.0, "pool_timeout_s": 5.0}


def redis_cfg(srv: RedisServer, **overrides: Any) -> RedisConfig:
    values: dict[str, Any] = {
        "url": srv.url,
        "key_prefix": PREFIX,
        "op_timeout_s": OP_TIMEOUT_S,
        "max_connections": 8,
        "pool_timeout_s": POOL_TIMEOUT_S,
    }
    values.update(overrides)
    return RedisConfig(**values)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A store kind for the contract tests.

    ``open`` gives another handle on the same pins (for Redis a second client,
    as a second gateway has; for memory the same store: one process, one
    map); ``advance`` lets time pass (the fake clock, or real sleep).
    """

    kind: str
    open: Callable[[float], Awaitable[SessionStore]]
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    opened: list[SessionStore] = []
    if request.param == "memory":
        clock = FakeClock()
        stores: dict[float, MemoryStore] = {}

        async def open_memory(ttl_s: float) -> SessionStore:
            return stores.setdefault(ttl_s, MemoryStore(ttl_s, 10_000, clock))

        async def advance_clock(seconds: float) -> None:
            clock.now += seconds

        yield Backend("memory", open_memory, advance_clock)
        return
    async with redis_server() as srv:

        async def open_redis(ttl_s: float) -> SessionStore:
            store = RedisStore.create(redis_cfg(srv, **LENIENT), ttl_s)
            opened.append(store)
            return store

        try:
            yield Backend("redis", open_redis, asyncio.sleep)
        finally:
            for store in opened:
                await store.close()


async def test_claim_pins_once_and_get_reads_it(backend: Backend) -> None:
    store = await backend.open(TTL_S)
    assert await store.get("a1") is None
    assert await store.claim("a1", "r1") == "r1"
    assert await store.claim("a1", "r2") == "r1"  # the first pin wins
    assert await store.get("a1") == "r1"
    replica, ttl = await store.describe("a1")
    assert replica == "r1"
    assert ttl is not None and 0 < ttl <= TTL_S
    await store.delete("a1")
    assert await store.get("a1") is None
    assert await store.describe("a1") == (None, None)
    await store.delete("a1")  # deleting a missing pin is fine
    assert await store.claim("a1", "r2") == "r2"


async def test_repin_is_compare_and_set(backend: Backend) -> None:
    store = await backend.open(TTL_S)
    await store.claim("b1", "r1")
    # Another gateway already moved the session r1 -> r2: our r1 -> r3 is stale.
    assert await store.repin("b1", "r1", "r2") == "r2"
    assert await store.repin("b1", "r1", "r3") == "r2"
    assert await store.get("b1") == "r2"
    # A pin that is gone can be re-pinned whatever the caller saw.
    assert await store.repin("b2", "r9", "r4") == "r4"
    # old=None means "I saw no pin": it does not overwrite one that appeared.
    assert await store.repin("b2", None, "r5") == "r4"
    assert await store.repin("b3", None, "r5") == "r5"
    _, ttl = await store.describe("b2")
    assert ttl is not None and ttl > 0


async def test_concurrent_claims_agree_on_one_winner(backend: Backend) -> None:
    first, second = await backend.open(TTL_S), await backend.open(TTL_S)
    keys = [f"c{i}" for i in range(200)]
    results = await asyncio.gather(
        *(first.claim(k, "gw1-pick") for k in keys),
        *(second.claim(k, "gw2-pick") for k in keys),
    )
    ours, theirs = results[: len(keys)], results[len(keys) :]
    assert ours == theirs
    for key, winner in zip(keys, ours, strict=True):
        assert winner in ("gw1-pick", "gw2-pick")
        assert await first.get(key) == winner


async def test_concurrent_repins_converge(backend: Backend) -> None:
    """Two gateways see r1 fail at once and pick different replicas: both
    end on the same one, so the session does not flap."""
    first, second = await backend.open(TTL_S), await backend.open(TTL_S)
    keys = [f"d{i}" for i in range(100)]
    for key in keys:
        await first.claim(key, "r1")
    results = await asyncio.gather(
        *(first.repin(k, "r1", "r2") for k in keys),
        *(second.repin(k, "r1", "r3") for k in keys),
    )
    ours, theirs = results[: len(keys)], results[len(keys) :]
    assert ours == theirs
    for key, winner in zip(keys, ours, strict=True):
        assert winner in ("r2", "r3")
        assert await second.get(key) == winner


async def test_get_and_claim_slide_the_ttl_describe_does_not(backend: Backend) -> None:
    store = await backend.open(10.0)
    await store.claim("e1", "r1")
    await backend.advance(0.3)
    _, before = await store.describe("e1")
    _, unchanged = await store.describe("e1")
    assert before is not None and unchanged is not None and unchanged <= before <= 9.8
    assert await store.get("e1") == "r1"
    _, after_get = await store.describe("e1")
    assert after_get is not None and after_get > before
    await backend.advance(0.3)
    assert await store.claim("e1", "r2") == "r1"  # a lost claim refreshes the winner's TTL
    _, after_claim = await store.describe("e1")
    assert after_claim is not None and after_claim > 9.8


async def test_a_pin_expires_after_ttl_without_touches(backend: Backend) -> None:
    store = await backend.open(0.3)
    await store.claim("f1", "r1")
    await store.claim("f2", "r1")
    await backend.advance(0.6)
    assert await store.get("f1") is None
    assert await store.describe("f2") == (None, None)
    assert await store.claim("f2", "r2") == "r2"  # an expired pin is claimable again


OPS = ("get", "claim", "repin", "delete", "describe")


async def run_random_ops(store: SessionStore, seed: int, n: int) -> list[Any]:
    """A seeded sequence over every path (first pin, touch, lost claim,
    won and lost re-pin, delete); the results, TTLs reduced to "has one"."""
    rng = random.Random(seed)
    keys = [f"{i:02x}" for i in range(40)]
    replicas = ["r1", "r2", "r3"]
    out: list[Any] = []
    for _ in range(n):
        op, key = rng.choice(OPS), rng.choice(keys)
        if op == "get":
            out.append(await store.get(key))
        elif op == "claim":
            out.append(await store.claim(key, rng.choice(replicas)))
        elif op == "repin":
            old = rng.choice([None, *replicas])
            out.append(await store.repin(key, old, rng.choice(replicas)))
        elif op == "delete":
            out.append(await store.delete(key))
        else:
            replica, ttl = await store.describe(key)
            out.append((replica, ttl is not None and ttl > 0))
    return out


async def test_random_operations_match_the_memory_store_and_leave_a_ttl_on_every_key(
    redis_srv: RedisServer,
) -> None:
    """Same 1000 operations on both stores: same answers at every step (the
    memory store is the model), and afterwards every Redis key has a TTL
    (a SET without PX would have cleared it)."""
    memory = MemoryStore(TTL_S, 10_000, FakeClock())
    shared = RedisStore.create(redis_cfg(redis_srv, **LENIENT), TTL_S)
    plain = redis_asyncio.Redis.from_url(redis_srv.url, decode_responses=True)
    try:
        expected = await run_random_ops(memory, seed=12345, n=1000)
        actual = await run_random_ops(shared, seed=12345, n=1000)
        assert actual == expected
        keys = [k async for k in plain.scan_iter(match=PREFIX + KEY_SPACE + "*", count=100)]
        assert len(keys) == len(memory) > 0
        for key in keys:
            ttl_ms = await plain.pttl(key)
            assert 0 < ttl_ms <= TTL_S * 1000, key
    finally:
        await shared.close()
        await plain.aclose()


# ---------------------------------------------------------------------------
# the memory store alone


async def test_memory_store_stays_bounded_and_evicts_least_recently_used() -> None:
    store = MemoryStore(TTL_S, 100, FakeClock())
    await store.claim("hot", "r1")
    for i in range(1000):
        await store.claim(f"k{i}", "r2")
        await store.get("hot")  # touched: never the least recently used
        assert len(store) <= 100
    assert await store.get("hot") == "r1"
    assert await store.get("k999") == "r2"
    assert await store.get("k0") is None


async def test_memory_store_drops_expired_pins_by_the_injected_clock() -> None:
    clock = FakeClock()
    store = MemoryStore(5.0, 1000, clock)
    for i in range(50):
        await store.claim(f"old{i}", "r1")
    clock.now += 4.0
    await store.get("old0")  # slid: expires at 9 s from the start
    clock.now += 2.0
    await store.claim("new", "r2")  # an insert drops the expired front
    assert len(store) == 2
    assert await store.get("old0") == "r1"
    _, ttl = await store.describe("old0")
    assert ttl == pytest.approx(5.0)


def test_memory_store_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        MemoryStore(0, 10, FakeClock())
    with pytest.raises(ValueError):
        MemoryStore(1, 0, FakeClock())


def test_create_store_picks_redis_when_configured() -> None:
    sessions = SessionsConfig(ttl_s=30.0, memory_max_sessions=7)
    memory = create_store(SimpleNamespace(redis=RedisConfig(), sessions=sessions), FakeClock())
    assert isinstance(memory, MemoryStore) and memory.name == "memory"
    for redis_config in (
        RedisConfig(url="redis://127.0.0.1:1/0"),
        RedisConfig(sentinels=("127.0.0.1:1",), master_name="m"),
    ):
        store = create_store(SimpleNamespace(redis=redis_config, sessions=sessions), FakeClock())
        assert isinstance(store, RedisStore) and store.name == "redis"
    with pytest.raises(ValueError, match="master_name"):
        RedisStore.create(RedisConfig(sentinels=("127.0.0.1:1",)), 30.0)
    with pytest.raises(ValueError, match="host:port"):
        RedisStore.create(RedisConfig(sentinels=("nohost",), master_name="m"), 30.0)


# ---------------------------------------------------------------------------
# Redis failing


def store_calls(store: RedisStore) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "get": lambda: store.get("g1"),
        "claim": lambda: store.claim("g2", "r1"),
        "repin": lambda: store.repin("g1", "r1", "r2"),
        "delete": lambda: store.delete("g3"),
        "describe": lambda: store.describe("g1"),
    }


# Set-up and recovery checks retry until this deadline: on a loaded machine a
# single call may miss a 0.2 s budget, which is not what these tests are about.
SETTLE_S = 5.0


async def until_ok(call: Callable[[], Awaitable[T]]) -> T:
    """The first successful result of ``call``, retried on store errors until SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            return await call()
        except (redis_errors.RedisError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def client_count(plain: redis_asyncio.Redis) -> int:
    return len(await plain.client_list())


async def test_frozen_redis_fails_each_call_within_the_op_timeout(redis_srv: RedisServer) -> None:
    cfg = redis_cfg(redis_srv, max_connections=8)
    warm = RedisStore.create(cfg, TTL_S)  # pooled connections open before the freeze
    cold = RedisStore.create(cfg, TTL_S)  # connects to the frozen server (the kernel accepts)
    plain = redis_asyncio.Redis.from_url(redis_srv.url, decode_responses=True)

    async def alone(call: Callable[[], Awaitable[object]]) -> float:
        """redis-py's socket timeout ends it."""
        started = time.monotonic()
        with pytest.raises(redis_errors.TimeoutError):
            await call()
        return time.monotonic() - started

    async def as_the_caller_runs_it(call: Callable[[], Awaitable[object]]) -> float:
        """Whichever fires first: the caller's asyncio.timeout or the socket timeout."""
        started = time.monotonic()
        with pytest.raises((TimeoutError, redis_errors.TimeoutError)):
            async with asyncio.timeout(OP_TIMEOUT_S):
                await call()
        return time.monotonic() - started

    try:
        await until_ok(lambda: warm.claim("g1", "r1"))
        for _ in range(4):  # open a few pooled connections
            await asyncio.gather(*(warm.get("g1") for _ in range(8)), return_exceptions=True)
        redis_srv.freeze()
        for store in (warm, cold):
            for run in (alone, as_the_caller_runs_it):
                calls = store_calls(store).values()
                durations = await asyncio.gather(*(run(call) for call in calls))
                assert max(durations) < OP_TIMEOUT_S + SLACK_S, (run.__name__, durations)
        redis_srv.thaw()
        for store in (warm, cold):
            assert await until_ok(partial(store.get, "g1")) == "r1"
            assert await until_ok(partial(store.repin, "g1", "r1", "r1")) == "r1"
        assert await client_count(plain) <= 2 * cfg.max_connections + 1
    finally:
        redis_srv.thaw()
        await warm.close()
        await cold.close()
        await plain.aclose()


async def test_cancelled_calls_drop_their_connection_and_leak_no_pool_slot(
    redis_srv: RedisServer,
) -> None:
    """The caller's asyncio.timeout cancels a call mid-read: redis-py must
    close that connection (else the next call would read the old reply) and
    give the slot back (else the pool shrinks for good)."""
    cfg = redis_cfg(redis_srv, max_connections=4, op_timeout_s=0.3, pool_timeout_s=0.05)
    store = RedisStore.create(cfg, TTL_S)
    plain = redis_asyncio.Redis.from_url(redis_srv.url, decode_responses=True)
    keys = [f"{i:02x}" for i in range(40)]
    outer_s = 0.05  # the caller's budget, well before the socket timeout

    async def cancelled(key: str) -> None:
        started = time.monotonic()
        # Python 3.11 only: asyncio.wait_for (redis-py's send) can swallow a
        # cancellation that lands as the send completes (CPython gh-86296,
        # fixed in 3.12); the call then ends at the socket timeout instead.
        with pytest.raises((TimeoutError, redis_errors.TimeoutError)):
            async with asyncio.timeout(outer_s):
                await store.get(key)
        assert time.monotonic() - started < outer_s + cfg.op_timeout_s + SLACK_S

    try:
        for i, key in enumerate(keys):
            await until_ok(partial(store.claim, key, f"r{i}"))
        redis_srv.freeze()
        # Every request is sent, then cancelled while waiting for the reply;
        # pool waiters are cancelled too.
        await asyncio.gather(*(cancelled(k) for k in keys))
        redis_srv.thaw()
        # A connection kept with its reply pending would answer the next
        # call with the previous key's replica. max_connections calls at a
        # time: every pooled connection is used, none waits for the pool.
        for _ in range(3):
            for start in range(0, len(keys), cfg.max_connections):
                chunk = list(enumerate(keys))[start : start + cfg.max_connections]
                answers = await asyncio.gather(*(until_ok(partial(store.get, k)) for _, k in chunk))
                assert answers == [f"r{i}" for i, _ in chunk]
        assert await client_count(plain) <= cfg.max_connections + 1
        # Every slot is still there: with Redis hung again, max_connections
        # concurrent calls all get a connection and time out on the read;
        # a leaked slot would show as "No connection available".
        redis_srv.freeze()
        results = await asyncio.gather(
            *(store.get(k) for k in keys[: cfg.max_connections]), return_exceptions=True
        )
        assert all(isinstance(r, redis_errors.TimeoutError) for r in results), results
    finally:
        redis_srv.thaw()
        await store.close()
        await plain.aclose()


async def test_killed_redis_fails_fast_and_the_store_recovers_after_restart(
    redis_srv: RedisServer,
) -> None:
    await redis_srv.kill()
    # Created while Redis is down: no connection attempt, no error.
    store = RedisStore.create(redis_cfg(redis_srv), TTL_S)
    try:
        for name, call in store_calls(store).items():
            started = time.monotonic()
            with pytest.raises(redis_errors.ConnectionError):
                await call()
            assert time.monotonic() - started < OP_TIMEOUT_S + SLACK_S, name
        await redis_srv.start()
        assert await until_ok(lambda: store.claim("h1", "r1")) == "r1"
        # Several pooled connections, all about to be dead.
        await asyncio.gather(*(store.get("h1") for _ in range(8)), return_exceptions=True)
        await redis_srv.kill()
        with pytest.raises(redis_errors.ConnectionError):
            await store.get("h1")
        await redis_srv.start()
        # Every pooled connection is dead: each is checked on checkout and
        # reconnected, so no call after the restart fails.
        results = await asyncio.gather(
            *(store.get("h1") for _ in range(16)), return_exceptions=True
        )
        # None: not persisted, the session re-pins. (A busy machine may make
        # a connect miss op_timeout_s; a stale connection's error is the bug.)
        assert not any(isinstance(r, redis_errors.ConnectionError) for r in results), results
        assert all(r is None or isinstance(r, redis_errors.TimeoutError) for r in results)
        # The scripts are loaded again (NOSCRIPT).
        assert await until_ok(lambda: store.repin("h1", None, "r2")) == "r2"
    finally:
        await store.close()


async def test_pins_survive_a_graceful_restart_with_persistence() -> None:
    async with redis_server(persist=True) as srv:
        store = RedisStore.create(redis_cfg(srv), TTL_S)
        try:
            await until_ok(lambda: store.claim("p1", "r1"))
            await srv.restart()
            assert await until_ok(lambda: store.get("p1")) == "r1"
            _, ttl = await store.describe("p1")
            assert ttl is not None and ttl > 0
            # NOSCRIPT -> loaded again
            assert await until_ok(lambda: store.repin("p1", "r1", "r2")) == "r2"
        finally:
            await store.close()


async def test_pool_exhaustion_is_bounded_in_connections_and_in_time(
    redis_srv: RedisServer,
) -> None:
    cfg = redis_cfg(redis_srv, max_connections=20)
    store = RedisStore.create(cfg, TTL_S)
    plain = redis_asyncio.Redis.from_url(redis_srv.url, decode_responses=True)
    # Configured waits, plus the slack, plus 0.5 s for 500 callers' own CPU time.
    bound = cfg.pool_timeout_s + cfg.op_timeout_s + SLACK_S + 0.5

    async def timed_get() -> tuple[float, object]:
        started = time.monotonic()
        try:
            result: object = await store.get("q1")
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            result = exc
        return time.monotonic() - started, result

    try:
        await until_ok(lambda: store.claim("q1", "r1"))
        counts: list[int] = []
        storm = asyncio.gather(*(timed_get() for _ in range(500)))
        while not storm.done():
            counts.append(await client_count(plain))
        outcomes = await storm
        counts.append(await client_count(plain))
        assert max(counts) <= cfg.max_connections + 1
        assert max(d for d, _ in outcomes) < bound
        # The losers were told the pool is full (or, a few, that a connect
        # took longer than op_timeout_s); nobody got a wrong answer.
        for _, result in outcomes:
            assert result == "r1" or isinstance(result, redis_errors.RedisError), result
        # Hung Redis: every caller still ends, the excess after the pool wait.
        redis_srv.freeze()
        outcomes = await asyncio.gather(*(timed_get() for _ in range(500)))
        assert max(d for d, _ in outcomes) < bound
        assert all(isinstance(r, redis_errors.RedisError) for _, r in outcomes)
        redis_srv.thaw()
        assert await until_ok(lambda: store.get("q1")) == "r1"
        assert await client_count(plain) <= cfg.max_connections + 1
    finally:
        redis_srv.thaw()
        await store.close()
        await plain.aclose()


# ---------------------------------------------------------------------------
# Sentinel

FAILOVER_DEADLINE_S = 15.0


@pytest.mark.slow
async def test_sentinel_store_follows_a_failover() -> None:
    async with redis_sentinel() as setup:
        cfg = RedisConfig(
            sentinels=setup.sentinel_addresses,
            master_name=setup.master_name,
            key_prefix=PREFIX,
            op_timeout_s=OP_TIMEOUT_S,
            max_connections=8,
            pool_timeout_s=POOL_TIMEOUT_S,
        )
        store = RedisStore.create(cfg, TTL_S)
        master = redis_asyncio.Redis.from_url(setup.master.url)
        try:
            assert await until_ok(lambda: store.claim("s1", "r1")) == "r1"
            # Replication is asynchronous: wait for the replica to have it.
            assert await master.execute_command("WAIT", 1, 2000) == 1
            await setup.master.kill()
            started = time.monotonic()
            while True:
                try:
                    async with asyncio.timeout(OP_TIMEOUT_S):
                        pinned = await store.repin("s2", None, "r2")
                    break
                except (TimeoutError, redis_errors.RedisError):
                    # Until the sentinels agree the master is down (ODOWN) and
                    # promote the replica: MasterNotFoundError or refused.
                    assert time.monotonic() - started < FAILOVER_DEADLINE_S
                    await asyncio.sleep(0.05)
            assert pinned == "r2"
            assert await setup.master_port() == setup.replica.port
            # The pin made before the failover.
            assert await until_ok(lambda: store.get("s1")) == "r1"
        finally:
            await master.aclose()
            await store.close()
