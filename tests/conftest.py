"""Shared fixtures: a real ``redis-server`` (and a real 3-master Redis Cluster) on free loopback
ports, and the store parameter."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from memcast.harness import RedisCluster, RedisServer, free_port

__all__ = ["ALL_STORES", "RedisServer", "free_port", "with_cluster"]

STORES = ("embedded", "redis")
# The cluster adds a few seconds of start-up per session and a slower client: the store contract
# and a few HTTP tests run on it too (``@with_cluster``), not the whole suite.
ALL_STORES = (*STORES, "cluster")
with_cluster = pytest.mark.parametrize("store_kind", ALL_STORES, indirect=True)


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server or redis-cli is not on PATH")
    directory = tmp_path_factory.mktemp("cluster")
    cluster = RedisCluster(directory, log=directory / "nodes.log")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """``redis+cluster://`` of a 3-master cluster, every node emptied."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Run a test once per state store (``@with_cluster``: on the cluster too); a Redis one
    starts empty."""
    if request.param != "embedded":
        request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_url")
    return request.param


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """The MEMCAST_REDIS_URL for the parametrised store (``None``: embedded)."""
    if store_kind == "embedded":
        return None
    return request.getfixturevalue("redis_cluster_url" if store_kind == "cluster" else "redis_url")
