"""Bulk observations on Redis: an outage writes nothing, and a retry storm across two server
processes learns every observation exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from memcast.harness import ServeProcess
from service.settings import Settings
from tests.conftest import RedisServer
from tests.service.conftest import SEQ_LEN, running, series, state_content
from tests.service.test_bulk import bulk_items
from tests.service.test_streams import forecast_matrix


def _settings(checkpoint_root: Path, url: str) -> Settings:
    return Settings(checkpoint_dir=checkpoint_root, redis_url=url, torch_threads=None, store_timeout_s=1.0)


async def test_post_bulk_observations_redis_down_503_nothing_written(
    own_redis: RedisServer,
    checkpoint_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running(_settings(checkpoint_root, own_redis.url)) as api:
        for sid in ("a", "b"):
            await api.create(sid, series(SEQ_LEN))
        before = {sid: await api.record(sid) for sid in ("a", "b")}
        items = bulk_items({sid: series(3, start=SEQ_LEN) for sid in ("a", "b")})

        own_redis.stop()  # down before the read
        response = await api.client.post("/v1/observations", json={"observations": items})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "store_unavailable"
        own_redis.start()

        store = api.app.state.engine.store
        write_many = store.write_many

        async def stop_then_write(writes):  # noqa: ANN001, ANN202
            own_redis.stop()  # read and computed; the write pipeline fails
            return await write_many(writes)

        monkeypatch.setattr(store, "write_many", stop_then_write)
        response = await api.client.post("/v1/observations", json={"observations": items})
        assert response.status_code == 503
        monkeypatch.setattr(store, "write_many", write_many)
        own_redis.start()

        for sid in ("a", "b"):
            after = await api.record(sid)
            assert after.version == before[sid].version
            assert state_content(after.state) == state_content(before[sid].state)
        retried = await api.client.post("/v1/observations", json={"observations": items})
        assert retried.status_code == 200 and retried.json()["applied"] == len(items)


@pytest.mark.slow
def test_post_bulk_observations_retry_storm_learns_each_once(
    checkpoint_root: Path, redis_url: str, tmp_path: Path
) -> None:
    """The same bulk body 20 times at once, through two server processes on one Redis."""
    args = ["--checkpoints", str(checkpoint_root), "--redis-url", redis_url]
    data = {f"s{k}": series(6, start=SEQ_LEN, scale=1 + k / 4) for k in range(8)}
    items = bulk_items(data)
    with (
        ServeProcess(args, log=tmp_path / "r1.log") as r1,
        ServeProcess(args, log=tmp_path / "r2.log") as r2,
    ):
        with httpx.Client(timeout=60) as client:
            for sid in data:
                for prefix in ("storm-", "ref-"):
                    created = client.post(
                        f"{r1.url}/v1/streams", json={"id": prefix + sid, "history": series(SEQ_LEN)}
                    )
                    assert created.status_code == 201, created.text
            for sid, rows in data.items():
                assert (
                    client.post(
                        f"{r2.url}/v1/streams/ref-{sid}/observations", json={"observations": rows}
                    ).status_code
                    == 200
                )

        body = {"observations": [{**item, "stream_id": "storm-" + item["stream_id"]} for item in items]}

        async def storm() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                posts = [client.post(f"{(r1, r2)[k % 2].url}/v1/observations", json=body) for k in range(20)]
                return await asyncio.gather(*posts)

        responses = asyncio.run(storm())
        applied = [0] * len(items)
        for response in responses:
            assert response.status_code == 200, response.text
            for k, item in enumerate(response.json()["observations"]):
                assert item["status"] in ("applied", "duplicate") or item["code"] == 503, item
                applied[k] += item["status"] == "applied"
        assert applied == [1] * len(items)  # each observation learned from once, across 20 requests

        with httpx.Client(timeout=60) as client:
            for sid in data:
                got = client.get(f"{r2.url}/v1/streams/storm-{sid}/forecast").json()
                ref = client.get(f"{r1.url}/v1/streams/ref-{sid}/forecast").json()
                assert got["steps"] == ref["steps"] == SEQ_LEN + 6
                torch.testing.assert_close(forecast_matrix(got), forecast_matrix(ref), rtol=1e-4, atol=1e-5)
