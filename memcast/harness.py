"""Child processes for the tests, the benchmarks and the demo: ``redis-server`` (alone or as a
Redis Cluster) and ``memcast serve`` on free loopback ports, each waited on until it answers.

One copy of "start it, poll until ready, show its log when it dies" instead of one per caller.
``python -m memcast.harness wait-ready URL`` is the same wait for shell scripts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import httpx
import redis


class HarnessError(RuntimeError):
    """A child process that did not start or did not become ready (the message holds its log)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(attempts: int = 200) -> int:
    """A free port for a cluster node: at most 55535, its bus port (10000 above) free too."""
    for _ in range(attempts):
        port = free_port()
        if port <= 55535 and _port_free(port + 10000):
            return port
    raise HarnessError("no free port pair (P, P + 10000) for a Redis Cluster node")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``MEMCAST_*`` a developer exported, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCAST_")}
    env.update(extra)
    return env


def memcast_command() -> list[str]:
    """The ``memcast`` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "memcast"
    return [str(script)] if script.exists() else [sys.executable, "-m", "memcast.cli"]


def _tail(path: Path | None, chars: int = 4000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


class RedisServer:
    """A ``redis-server`` child on loopback that can be stopped, killed and started again on the
    same port (with its data when ``persistent`` or the config file keeps an append-only file).

    ``config``: a redis.conf to start from (the deployment's); the command line then overrides
    port, bind address and directory, as docker-compose.yml does.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        persistent: bool = False,
        config: Path | None = None,
        log: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory, self.port = directory, port or free_port()
        self.persistent, self.config, self.log, self.extra_args = persistent, config, log, tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError("redis-server is not on PATH")
        args = [binary] + ([str(self.config)] if self.config else [])
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", ""]
        if self.config is None:
            args += ["--protected-mode", "no", "--loglevel", "warning"]
            # persistent: an append-only file fsynced on every write, so a restart keeps the data
            args += (
                ["--appendonly", "yes", "--appendfsync", "always"]
                if self.persistent
                else ["--appendonly", "no"]
            )
        return args + list(self.extra_args)

    def start(self, timeout: float = 20.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client(timeout=0.5) as client:
                    client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):  # not listening yet, or loading
                if self.process.poll() is not None:
                    raise HarnessError(
                        f"redis-server exited with {self.process.returncode}:\n{_tail(self.log)}"
                    ) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise HarnessError(
                        f"redis-server did not answer PING on {self.port}:\n{_tail(self.log)}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as ``docker compose stop`` sends: Redis writes its append-only file and exits."""
        code = 0
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisCluster:
    """A Redis Cluster of ``masters`` :class:`RedisServer` children on loopback, no replicas,
    the 16384 slots spread by ``redis-cli --cluster create``; :meth:`start` returns once every
    node reports ``cluster_state:ok``. :attr:`url` is the ``redis+cluster://`` URL memcast reads.
    A node in :attr:`nodes` can be stopped and started again on its port: it keeps its slots
    (``nodes.conf``) and, when ``persistent``, its data.
    """

    def __init__(
        self, directory: Path, masters: int = 3, *, persistent: bool = False, log: Path | None = None
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.directory = directory
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                free_cluster_port(),
                persistent=persistent,
                log=log,
                # nodes.conf is the node's own record of the cluster, kept in its --dir
                extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("redis-cli")
        if binary is None:
            raise HarnessError("redis-cli is not on PATH")
        try:
            for node in self.nodes:
                node.start()
            create = [binary, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
            done = subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise HarnessError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ok(self, timeout: float) -> None:
        """Until every node has heard of every slot's owner (the gossip takes a moment)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            with node.client() as client:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise HarnessError(f"the cluster on {node.port} is not ok within {timeout:.0f} s")
                    time.sleep(0.05)

    def owner(self, key: str) -> RedisServer:
        """The node that holds ``key`` (which must exist)."""
        for node in self.nodes:
            with node.client() as client:
                try:
                    if client.exists(key):
                        return node
                except redis.ResponseError:  # MOVED: another node owns the key's slot
                    continue
        raise HarnessError(f"no node holds {key}")

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess:
    """``memcast serve`` as a child on a free loopback port, configured by environment (as the
    compose file does) and by ``args``; :meth:`start` returns once ``/readyz`` answers 200."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        log: Path,
        port: int | None = None,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = clean_env() if env is None else dict(env)
        self.env = {**base, "MEMCAST_HOST": "127.0.0.1", "MEMCAST_PORT": str(self.port)}
        self.argv = [*(command or memcast_command()), "serve", *args]
        self.log, self.cwd = log, cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> ServeProcess:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        assert self.process is not None, "spawn() first"
        try:
            wait_ready(
                self.url, timeout, alive=lambda: self.process is not None and self.process.poll() is None
            )
        except HarnessError as exc:
            code = self.process.poll()
            self.stop()
            state = f"exited with {code}" if code is not None else "is not ready"
            raise HarnessError(f"memcast serve on {self.url} {state} ({exc}):\n{_tail(self.log)}") from None

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_ready(url: str, timeout: float = 120.0, alive: Callable[[], bool] | None = None) -> None:
    """Poll ``{url}/readyz`` until 200; ``alive()`` False (the process died) stops early."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if alive is not None and not alive():
            raise HarnessError("the process exited")
        if time.monotonic() > deadline:
            raise HarnessError(f"/readyz did not answer 200 within {timeout:.0f} s")
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memcast.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait-ready", help="wait until a memcast server's /readyz answers 200")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    try:
        wait_ready(args.url, args.timeout)
    except HarnessError as exc:
        sys.stderr.write(f"{args.url}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
