"""Fixtures of the tests that run real servers against the real Redis on 127.0.0.1:6379.

Unit tests (tests/unit) need neither and do not see these fixtures; tests/e2e uses them too.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from callscribe.engine.base import Engine
from callscribe.service import Service
from callscribe.settings import Settings
from tests.support import REDIS_URL, ServiceFactory, free_port, free_port_range


@pytest.fixture(scope="session", autouse=True)
def _redis_is_up() -> None:
    out = subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True, text=True)
    if out.stdout.strip() != "PONG":
        pytest.exit("Redis is not answering on 127.0.0.1:6379 (make test starts it)", returncode=3)


@pytest.fixture
def key_prefix() -> str:
    return f"cstest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def make_service(key_prefix: str) -> ServiceFactory:
    """`async with make_service(jitter_ms=40) as svc:` a real bridge on free ports.
    `engine=` runs it on an engine the test already started (e.g. the session's vLLM, or a
    ScriptedEngine from tests/scripted_engine.py where recognition itself is not under test)."""

    @asynccontextmanager
    async def factory(engine: Engine | None = None, **overrides: Any) -> AsyncIterator[Service]:
        values: dict[str, Any] = {
            "redis_url": REDIS_URL,
            "key_prefix": key_prefix,
            "http_port": 0,
            "rtp_port": free_port(),
            "rtp_port_range": free_port_range(),
            "audiosocket_port": 0,
        }
        values.update(overrides)
        async with Service(Settings(**values), engine=engine) as service:
            yield service

    return factory
