"""Processes for the loopback topology test: redis-server with docker/redis.conf and `memcast serve`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from memcast.harness import RedisServer, ServeProcess, clean_env
from tests.deploy import _deploy as d

__all__ = ["Api", "clean_env", "configured_redis_server"]


def configured_redis_server(data_dir: Path, log: Path) -> RedisServer:
    """redis-server running the repository's docker/redis.conf on loopback, data in ``data_dir``.

    Overrides on the command line, as the compose file does: ``--port``, ``--bind 127.0.0.1``
    and ``--dir``; plus ``--save ""`` so that only the append-only file (the file's
    ``appendonly yes`` / ``appendfsync everysec``) can bring state back after a restart.
    """
    return RedisServer(data_dir, config=d.REDIS_CONF, log=log)


class Api(ServeProcess):
    """One `memcast serve` process configured like the compose `api` service: by environment."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        super().__init__(env=env, log=log)
        self.argv = [str(d.BIN / "memcast"), *argv]  # the compose command names `serve` itself
        self.name = name
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def probe(self, path: str) -> int:
        """Exit status of the container health probe (docker/healthcheck.py) against this API."""
        return subprocess.run(
            [str(d.BIN / "python"), str(d.HEALTHCHECK_SCRIPT), path],
            env=clean_env(MEMCAST_PORT=str(self.port)),
            capture_output=True,
            timeout=30,
        ).returncode

    def stop(self, timeout: float = 20.0) -> None:
        self.http.close()
        super().stop(timeout)


@pytest.fixture
def configured_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Not the suite's shared ``redis_server``: this one runs docker/redis.conf, per test."""
    server = configured_redis_server(tmp_path / "redis-data", tmp_path / "redis.log")
    try:
        yield server
    finally:
        server.kill()
