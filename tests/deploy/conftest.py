"""Processes for the loopback topology test: redis-server with docker/redis.conf and `memcast serve`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.deploy import _deploy as d


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any MEMCAST_* a developer exported, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCAST_")}
    env.update(extra)
    return env


class ConfiguredRedis:
    """redis-server running the repository's docker/redis.conf on loopback, data in ``data_dir``.

    Overrides on the command line, as the compose file does: ``--port``, ``--bind 127.0.0.1``
    and ``--dir``; plus ``--save ""`` so that only the append-only file (the file's
    ``appendonly yes`` / ``appendfsync everysec``) can bring state back after a restart.
    """

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = d.free_port()
        self.data_dir, self.log = data_dir, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        assert redis_server is not None, "redis-server must be on PATH (CI installs it)"
        argv = [redis_server, str(d.REDIS_CONF), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.data_dir), "--save", ""]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.exceptions.ConnectionError:  # not listening yet, or loading the AOF
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer PING:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, as `docker compose stop` sends: Redis fsyncs the AOF and exits 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


class Api:
    """One `memcast serve` process configured like the compose `api` service: by environment."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.port = d.free_port()
        self.env = {**env, "MEMCAST_HOST": "127.0.0.1", "MEMCAST_PORT": str(self.port)}
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(d.BIN / "memcast"), *self.argv], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 90) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"api {self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"api {self.name} not ready after {timeout}s:\n{self.log.read_text()}")
            time.sleep(0.1)

    def probe(self, path: str) -> int:
        """Exit status of the container health probe (docker/healthcheck.py) against this API."""
        return subprocess.run(
            [str(d.BIN / "python"), str(d.HEALTHCHECK_SCRIPT), path],
            env=clean_env(MEMCAST_PORT=str(self.port)),
            capture_output=True,
            timeout=30,
        ).returncode

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def configured_redis(tmp_path: Path) -> Iterator[ConfiguredRedis]:
    """Not the suite's shared ``redis_server``: this one runs docker/redis.conf, per test."""
    data = tmp_path / "redis-data"
    data.mkdir()
    server = ConfiguredRedis(data, tmp_path / "redis.log")
    try:
        yield server
    finally:
        server.kill()
