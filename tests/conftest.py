from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.redis_server import RedisServer, redis_server


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def redis_srv() -> AsyncIterator[RedisServer]:
    """A real redis-server on a free port (tests/redis_server.py); skips without the binary."""
    async with redis_server() as server:
        yield server
