"""Cross-stream micro-batching: one model call for several streams equals one call each."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from models import UpdateMode
from service.compute import compute, compute_batch, decode
from service.errors import StateIncompatible
from service.registry import load_registry
from service.settings import Settings
from tests.service.conftest import SEQ_LEN, running, series
from tests.service.test_streams import expected_forecast, forecast_matrix


async def test_concurrent_streams_share_model_calls(settings: Settings, checkpoint_root: Path) -> None:
    data = {f"s{i}": series(SEQ_LEN + 6, scale=0.5 + i / 4) for i in range(12)}
    async with running(settings.model_copy(update={"batch_streams": 8, "workers_threads": 1})) as api:
        await asyncio.gather(*(api.create(sid) for sid in data))

        async def feed(sid: str) -> None:
            for row in data[sid]:
                assert (await api.client.post(f"/v1/streams/{sid}/observations", json=row)).status_code == 200

        await asyncio.gather(*(feed(sid) for sid in data))
        text = (await api.client.get("/metrics")).text
        calls = _sample(text, "memcast_batch_streams_count")
        assert _sample(text, "memcast_batch_streams_sum") == 12 * (SEQ_LEN + 6)
        assert calls < 12 * (SEQ_LEN + 6)  # some calls served several streams
        assert _sample(text, 'memcast_batch_streams_bucket{le="8.0"}') == calls  # never over batch_streams
        for sid, rows in data.items():
            _, forecast = expected_forecast(
                checkpoint_root / "small", [r["values"] for r in rows], "memory_only"
            )
            body = (await api.client.get(f"/v1/streams/{sid}/forecast")).json()
            assert body["steps"] == SEQ_LEN + 6
            torch.testing.assert_close(forecast_matrix(body), forecast, rtol=1e-4, atol=1e-5)


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


@pytest.fixture(scope="module")
def small(checkpoint_root: Path):  # noqa: ANN201
    return load_registry(checkpoint_root).get("small")


@pytest.mark.parametrize("mode", [UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL], ids=lambda m: m.value)
def test_compute_batch_equals_one_stream_at_a_time(small, mode: UpdateMode) -> None:  # noqa: ANN001
    blobs = [
        compute(small, None, [r["values"] for r in series(SEQ_LEN + k, scale=1 + k)], mode).state
        for k in range(4)
    ]
    blobs.append(compute(small, None, [[1.0, 2.0]], mode).state)  # not ready yet: no forecast
    rows = [[10.0 + k, 5.0 - k] for k in range(5)]
    batched = compute_batch(small, blobs, rows, mode)
    for blob, row, got in zip(blobs, rows, batched, strict=True):
        alone = compute(small, blob, [row], mode)
        assert got.steps == alone.steps
        if alone.forecast is None:
            assert got.forecast is None
        else:
            torch.testing.assert_close(
                torch.tensor(got.forecast), torch.tensor(alone.forecast), rtol=1e-4, atol=1e-5
            )
        a, b = decode(small, got.state), decode(small, alone.state)
        for key, value in b.items(include_nested=True, leaves_only=True):
            torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-5)


def test_compute_batch_isolates_bad_and_odd_states(small) -> None:  # noqa: ANN001
    mode = UpdateMode.MEMORY_ONLY
    plain = compute(small, None, [[1.0, 2.0]], mode).state
    own_weights = compute(small, None, [[1.0, 2.0]], UpdateMode.FULL_MODEL).state
    results = compute_batch(small, [plain, b"not a state", own_weights], [[3.0, 4.0]] * 3, mode)
    assert isinstance(results[1], StateIncompatible)
    assert results[0].steps == results[2].steps == 2  # the other two still computed (one by one)
    assert "params" in decode(small, results[2].state).keys()


async def test_batching_off_computes_one_stream_per_call(settings: Settings) -> None:
    async with running(settings.model_copy(update={"batch_streams": 1})) as api:
        await asyncio.gather(*(api.create(f"s{i}", series(SEQ_LEN)) for i in range(3)))
        await asyncio.gather(*(api.post(f"s{i}", series(2, start=SEQ_LEN)) for i in range(3)))
        text = (await api.client.get("/metrics")).text
        assert _sample(text, 'memcast_batch_streams_bucket{le="1.0"}') == _sample(
            text, "memcast_batch_streams_count"
        )
