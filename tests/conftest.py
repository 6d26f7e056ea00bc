"""Shared fixtures: a real ``redis-server`` on a free loopback port, and the store parameter."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from memcast.harness import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture(params=["embedded", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Run a test once per state store; the Redis one starts empty."""
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    return request.param


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """The MEMCAST_REDIS_URL for the parametrised store (``None``: embedded)."""
    return request.getfixturevalue("redis_url") if store_kind == "redis" else None
