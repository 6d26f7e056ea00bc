"""Redis stopped mid-run: 503 with Retry-After and nothing partial; recovery without a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings
from tests.conftest import RedisServer
from tests.service.conftest import SEQ_LEN, running, series, state_content


async def test_redis_down_503_then_recovers(own_redis: RedisServer, checkpoint_root: Path) -> None:
    settings = Settings(
        checkpoint_dir=checkpoint_root, redis_url=own_redis.url, torch_threads=None, store_timeout_s=1.0
    )
    async with running(settings) as api:
        await api.create("s1", series(SEQ_LEN))
        assert (await api.post("s1", series(2, start=SEQ_LEN))).status_code == 200
        before = await api.record("s1")

        own_redis.stop()
        for method, path, body in [
            ("POST", "/v1/streams/s1/observations", {"timestamp": SEQ_LEN + 2, "values": [1.0, 2.0]}),
            ("GET", "/v1/streams/s1", None),
            ("GET", "/v1/streams/s1/forecast", None),
            ("POST", "/v1/streams", {"id": "s2"}),
        ]:
            response = await api.client.request(method, path, json=body)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "store_unavailable"
        ready = await api.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"] == {"models": True, "store": False}
        assert (await api.client.get("/healthz")).status_code == 200

        own_redis.start()  # same port, same data directory
        assert (await api.client.get("/readyz")).status_code == 200
        after = await api.record("s1")
        assert after.version == before.version and after.steps == before.steps
        assert state_content(after.state) == state_content(before.state)  # nothing partial, nothing lost
        response = await api.post("s1", [{"timestamp": SEQ_LEN + 2, "values": [1.0, 2.0]}])
        assert response.status_code == 200 and response.json()["steps"] == SEQ_LEN + 3
        assert (await api.client.get("/v1/streams/s2")).status_code == 404
        text = (await api.client.get("/metrics")).text
        assert 'memcast_errors_total{kind="store_unavailable"} 4.0' in text


async def test_redis_lost_between_read_and_write_503_nothing_partial(
    own_redis: RedisServer, checkpoint_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        checkpoint_dir=checkpoint_root, redis_url=own_redis.url, torch_threads=None, store_timeout_s=1.0
    )
    async with running(settings) as api:
        await api.create("s1", series(SEQ_LEN))
        before = await api.record("s1")
        store = api.app.state.engine.store
        write = store.compare_and_set

        async def stop_then_write(record, expected_version):  # noqa: ANN001, ANN202
            own_redis.stop()  # the state was read and the model has run; the write fails
            return await write(record, expected_version)

        monkeypatch.setattr(store, "compare_and_set", stop_then_write)
        response = await api.post("s1", series(3, start=SEQ_LEN))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        monkeypatch.setattr(store, "compare_and_set", write)

        own_redis.start()
        after = await api.record("s1")
        assert after.version == before.version and state_content(after.state) == state_content(before.state)
        retried = await api.post("s1", series(3, start=SEQ_LEN))  # the client's retry is learned once
        assert [o["status"] for o in retried.json()["observations"]] == ["applied"] * 3
        assert retried.json()["steps"] == SEQ_LEN + 3
