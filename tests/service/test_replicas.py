"""Two ``memcast serve`` processes on one real Redis: what one replica writes must never be
computed from a stream that another replica deleted (and re-created) meanwhile."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.service.conftest import SEQ_LEN, series
from tests.service.tcp_proxy import TcpProxy
from tests.service.test_e2e import memcast_command

pytestmark = pytest.mark.slow


@contextmanager
def serve(checkpoint_root: Path, redis_url: str, log_path: Path) -> Iterator[str]:
    """A ``memcast serve`` process on ``redis_url``; yields its base URL once it is ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCAST_")}
    args = ["serve", "--port", str(port), "--checkpoints", str(checkpoint_root), "--redis-url", redis_url]
    with log_path.open("wb") as log:
        process = subprocess.Popen([*memcast_command(), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("memcast serve did not become ready:\n" + log_path.read_text())
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=20)


def test_post_observations_recreated_stream_not_overwritten(
    checkpoint_root: Path, redis_url: str, tmp_path: Path
) -> None:
    """Replica 1 reads stream x and computes; replica 2 deletes and re-creates x; replica 1's
    write, computed from the deleted stream, must be refused and the re-creation kept.

    Deterministic: a proxy between replica 1 and Redis holds replica 1's compare-and-set
    (the first EVALSHA it sends after the test arms it) until replica 2 is done.
    """
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with (
        TcpProxy(port) as proxy,
        serve(checkpoint_root, proxy.url, tmp_path / "r1.log") as r1,
        serve(checkpoint_root, redis_url, tmp_path / "r2.log") as r2,
    ):
        created = httpx.post(f"{r1}/v1/streams", json={"id": "x", "history": series(SEQ_LEN)}, timeout=10)
        assert created.status_code == 201, created.text

        proxy.hold(b"EVALSHA")
        answer: dict[str, httpx.Response] = {}
        batch = {"observations": series(200, start=SEQ_LEN)}
        writer = threading.Thread(
            target=lambda: answer.setdefault(
                "r1", httpx.post(f"{r1}/v1/streams/x/observations", json=batch, timeout=30)
            )
        )
        writer.start()
        try:
            assert proxy.held.wait(timeout=20), "replica 1 never tried to write"
            assert httpx.delete(f"{r2}/v1/streams/x", timeout=10).status_code == 204
            recreated = httpx.post(
                f"{r2}/v1/streams", json={"id": "x", "mode": "none", "freq": "2h"}, timeout=10
            )
            assert recreated.status_code == 201, recreated.text
        finally:
            proxy.release()
            writer.join(timeout=30)

        response = answer["r1"]
        assert response.status_code == 404, response.text  # its stream is gone
        assert response.json()["error"]["type"] == "stream_not_found"
        for replica in (r1, r2):
            body = httpx.get(f"{replica}/v1/streams/x", timeout=10).json()
            assert (body["mode"], body["freq"], body["steps"], body["version"]) == ("none", "2h", 0, 1)
        # the re-created stream takes observations from either replica as usual
        assert httpx.post(f"{r1}/v1/streams/x/observations", json=series(1)[0], timeout=10).status_code == 200
        assert httpx.get(f"{r2}/v1/streams/x", timeout=10).json()["steps"] == 1
