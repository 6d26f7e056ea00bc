"""Two ``memcast serve`` processes on one real Redis: what one replica writes must never be
computed from a stream that another replica deleted (and re-created) meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from memcast.harness import ServeProcess, clean_env
from tests.service.conftest import SEQ_LEN, series
from tests.service.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow


@contextmanager
def serve(checkpoint_root: Path, redis_url: str, log_path: Path, cache_mb: float = 32) -> Iterator[str]:
    """A ``memcast serve`` process on ``redis_url``; yields its base URL once it is ready."""
    args = ["--checkpoints", str(checkpoint_root), "--redis-url", redis_url]
    env = {**clean_env(), "MEMCAST_RECORD_CACHE_MB": str(cache_mb)}
    with ServeProcess(args, env=env, log=log_path) as process:
        yield process.url


@pytest.mark.parametrize("cache_mb", [0, 32], ids=["read", "hint"])
def test_post_observations_recreated_stream_not_overwritten(
    checkpoint_root: Path, redis_url: str, tmp_path: Path, cache_mb: float
) -> None:
    """Replica 1 reads stream x and computes; replica 2 deletes and re-creates x; replica 1's
    write, computed from the deleted stream, must be refused and the re-creation kept.

    With its record cache off, replica 1 read x from Redis before computing: the request
    belongs to the deleted stream and gets 404. With the cache on, replica 1 computed from its
    hint (what it wrote when creating x), which is no read: refused all the same, it reads x
    again and applies the observations to the re-created stream, computed from that stream.

    Deterministic: a proxy between replica 1 and Redis holds replica 1's compare-and-set
    (the first EVALSHA it sends after the test arms it) until replica 2 is done.
    """
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with (
        TcpProxy(port) as proxy,
        serve(checkpoint_root, proxy.url, tmp_path / "r1.log", cache_mb) as r1,
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
        steps = 0
        if cache_mb:
            assert response.status_code == 200, response.text
            assert (response.json()["mode"], response.json()["steps"]) == ("none", 200)
            steps, version = 200, 2
        else:
            assert response.status_code == 404, response.text  # its stream is gone
            assert response.json()["error"]["type"] == "stream_not_found"
            version = 1
        for replica in (r1, r2):
            body = httpx.get(f"{replica}/v1/streams/x", timeout=10).json()
            assert (body["mode"], body["freq"], body["steps"], body["version"]) == (
                "none",
                "2h",
                steps,
                version,
            )
        # the re-created stream takes observations from either replica as usual
        later = {"timestamp": 10_000, "values": series(1)[0]["values"]}
        assert httpx.post(f"{r1}/v1/streams/x/observations", json=later, timeout=10).status_code == 200
        assert httpx.get(f"{r2}/v1/streams/x", timeout=10).json()["steps"] == steps + 1


def test_serve_processes_share_the_port_and_the_streams(
    checkpoint_root: Path, redis_url: str, tmp_path: Path
) -> None:
    """``MEMCAST_PROCESSES=2``: two server processes behind one port, each observation learned
    once whichever process takes it (the same compare-and-set as between replicas)."""
    args = ["--checkpoints", str(checkpoint_root), "--redis-url", redis_url, "--processes", "2"]
    with ServeProcess(args, log=tmp_path / "serve.log") as process:
        assert process.process is not None
        workers = [
            p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == process.process.pid
        ]
        assert len(workers) >= 2, "uvicorn did not start two worker processes"
        url = process.url
        assert (
            httpx.post(f"{url}/v1/streams", json={"id": "p", "history": series(SEQ_LEN)}).status_code == 201
        )
        rows = series(40, start=SEQ_LEN)

        def post(row: dict[str, object]) -> int:
            with httpx.Client(timeout=30) as client:  # a connection each: spread over the processes
                return client.post(f"{url}/v1/streams/p/observations", json=row).status_code

        codes: list[int] = []
        for start in range(0, len(rows), 8):  # 8 at a time, each batch in time order per stream
            threads = [
                threading.Thread(target=lambda r=r: codes.append(post(r))) for r in rows[start : start + 8]
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        # concurrent posts may arrive out of order: a later one first refuses the earlier (409);
        # every 200 is learned exactly once, and the stream's steps count exactly those
        assert set(codes) <= {200, 409} and codes.count(200) >= 5
        assert httpx.get(f"{url}/v1/streams/p").json()["steps"] == SEQ_LEN + codes.count(200)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_serve_refuses_processes_without_redis(
    checkpoint_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from memcast.cli import main

    assert main(["serve", "--checkpoints", str(checkpoint_root), "--processes", "2"]) == 2
    assert "needs MEMCAST_REDIS_URL" in capsys.readouterr().err
