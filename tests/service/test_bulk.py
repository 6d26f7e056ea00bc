"""POST /v1/observations: many streams in one request, on both stores.

The reference is always the one-stream endpoint: a bulk request must end in the state and
forecast that the same observations posted one by one end in.
"""

from __future__ import annotations

import binascii
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import UpdateMode
from service import schemas
from service.compute import compute, compute_many, decode
from service.registry import load_registry
from service.settings import Settings
from tests.service.conftest import SEQ_LEN, Api, running, series
from tests.service.test_accuracy import _sample
from tests.service.test_streams import forecast_matrix


def bulk_items(data: dict[str, list[dict[str, Any]]], seed: int = 0) -> list[dict[str, Any]]:
    """Every stream's observations as bulk items, streams interleaved at random (each stream's
    own in time order)."""
    rng = random.Random(seed)
    queues = {sid: list(rows) for sid, rows in data.items()}
    items = []
    while queues:
        sid = rng.choice(sorted(queues))
        items.append({"stream_id": sid, **queues[sid].pop(0)})
        if not queues[sid]:
            del queues[sid]
    return items


def assert_close_json(a: Any, b: Any, rel: float = 1e-6) -> None:
    """Equal structure and equal values, floats up to ``rel``: B streams in one model call
    equal B single calls up to float rounding (a batched matmul may round differently). An
    accuracy's arrays (base64 floats) are compared as their floats."""
    if isinstance(a, dict) and "f8" in a and isinstance(b, dict):
        a, b = _decoded(a), _decoded(b)
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=rel, abs=1e-9)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_close_json(a[key], b[key], rel)
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close_json(x, y, rel)
    else:
        assert a == b


def _decoded(arrays: dict[str, Any]) -> dict[str, Any]:
    """``service.accuracy``'s base64 float fields as lists of floats."""
    return {
        k: np.frombuffer(binascii.a2b_base64(v), dtype="<f8").tolist() if k in ("f8", "last") else v
        for k, v in arrays.items()
    }


def assert_schema_body(body: dict[str, Any]) -> None:
    """The bulk body is built as plain dicts (``service.bulk``): it must be what the documented
    ``BulkObservationsOut`` dumps to, field for field."""
    assert schemas.BulkObservationsOut.model_validate(body).model_dump(mode="json") == body


def assert_same_stream(api: Api, a: Any, b: Any) -> None:
    assert (a.steps, a.last_timestamp, a.recent, a.mode) == (b.steps, b.last_timestamp, b.recent, b.mode)
    model = api.app.state.registry.get(a.model)
    sa, sb = decode(model, a.state), decode(model, b.state)
    assert set(sa.keys(include_nested=True, leaves_only=True)) == set(
        sb.keys(include_nested=True, leaves_only=True)
    )
    for key, value in sb.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(sa[key], value, rtol=1e-4, atol=1e-5)
    if b.forecast is None:
        assert a.forecast is None
    else:
        torch.testing.assert_close(torch.tensor(a.forecast), torch.tensor(b.forecast), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combine", [True, False], ids=["combined", "adapted"])
@pytest.mark.parametrize("mode", ["memory_only", "full_model"])
async def test_post_bulk_observations_equals_one_by_one(api: Api, mode: str, combine: bool) -> None:
    data = {f"s{k}": series(SEQ_LEN + 4 + k, scale=0.5 + k / 3) for k in range(5)}
    for sid in data:
        await api.create(f"bulk-{sid}", data[sid][:3], mode=mode, combine=combine)
        await api.create(f"one-{sid}", data[sid][:3], mode=mode, combine=combine)
    rest = {sid: rows[3:] for sid, rows in data.items()}
    for sid, rows in rest.items():
        for row in rows:
            response = await api.client.post(f"/v1/streams/one-{sid}/observations", json=row)
            assert response.status_code == 200, response.text
    items = bulk_items({f"bulk-{sid}": rows for sid, rows in rest.items()})
    response = await api.client.post("/v1/observations", json={"observations": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_schema_body(body)
    assert body["applied"] == len(items) and body["duplicates"] == body["errors"] == 0
    assert [o["status"] for o in body["observations"]] == ["applied"] * len(items)
    assert [(o["stream_id"], o["timestamp"]) for o in body["observations"]] == [
        (i["stream_id"], i["timestamp"]) for i in items
    ]
    streams = {s["stream_id"]: s for s in body["streams"]}
    for sid in data:
        assert_same_stream(api, await api.record(f"bulk-{sid}"), await api.record(f"one-{sid}"))
        one = (await api.client.get(f"/v1/streams/one-{sid}/forecast")).json()
        got = streams[f"bulk-{sid}"]
        assert (got["code"], got["steps"], got["last_timestamp"]) == (
            200,
            one["steps"],
            one["last_timestamp"],
        )
        torch.testing.assert_close(forecast_matrix(got), forecast_matrix(one), rtol=1e-4, atol=1e-5)

    again = await api.client.post("/v1/observations", json={"observations": items, "forecasts": "none"})
    assert again.json()["duplicates"] == len(items) and again.json()["applied"] == 0
    assert_schema_body(again.json())
    assert all(s["forecast"] is None for s in again.json()["streams"])
    for sid in data:  # a re-posted request is learned from once
        assert (await api.record(f"bulk-{sid}")).version == 2


async def test_post_bulk_observations_one_bad_stream_applies_the_others(api: Api) -> None:
    for sid in ("a", "b", "c"):
        await api.create(sid, series(SEQ_LEN))
    before = await api.record("b")
    rows = series(3, start=SEQ_LEN)
    items = [
        {"stream_id": "a", **rows[0]},
        {"stream_id": "b", **rows[0]},
        {"stream_id": "a", **rows[1]},
        {"stream_id": "b", "timestamp": SEQ_LEN + 1, "values": {"load_a": 1.0, "nope": 2.0}},
        {"stream_id": "c", **rows[0]},
        {"stream_id": "b", **rows[2]},
        {"stream_id": "c", "timestamp": "not a time", "values": [1.0, 2.0]},
        {"stream_id": "missing", **rows[0]},
        {"stream_id": "bad id!", **rows[0]},
        {"no": "stream"},
    ]
    response = await api.client.post("/v1/observations", json={"observations": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_schema_body(body)
    statuses = [(o["status"], o["code"]) for o in body["observations"]]
    assert statuses == [
        ("applied", 200),
        ("error", 422),
        ("applied", 200),
        ("error", 422),
        ("error", 422),
        ("error", 422),
        ("error", 422),
        ("error", 404),
        ("error", 422),
        ("error", 422),
    ]
    errors = [o["error"] for o in body["observations"]]
    assert errors[3]["field"] == "observations.3.values" and "nope" in errors[3]["message"]
    assert errors[1]["field"] == errors[5]["field"] == "observations.3.values"  # the stream's culprit
    assert errors[6]["field"] == "observations.6.timestamp"
    assert errors[7]["type"] == "stream_not_found"
    assert errors[8]["field"] == "observations.8.stream_id"
    assert errors[9]["field"] == "observations.9.stream_id"
    assert (body["applied"], body["errors"]) == (2, 8)
    assert (await api.record("a")).steps == SEQ_LEN + 2
    after = await api.record("b")
    assert (after.version, after.state) == (before.version, before.state)  # nothing written for b
    assert (await api.record("c")).version == 1
    assert (await api.client.get("/v1/streams/missing")).status_code == 404


async def test_post_bulk_observations_sorts_each_stream_by_time(api: Api) -> None:
    await api.create("x", series(SEQ_LEN))
    await api.create("y", series(SEQ_LEN))
    rows = series(4, start=SEQ_LEN)
    items = [{"stream_id": "x", **row} for row in reversed(rows)]
    response = await api.client.post("/v1/observations", json={"observations": items})
    assert response.status_code == 200
    assert [o["timestamp"] for o in response.json()["observations"]] == [
        r["timestamp"] for r in reversed(rows)
    ]
    await api.post("y", rows)
    assert_same_stream(api, await api.record("x"), await api.record("y"))


async def test_post_bulk_observations_conflict_is_the_streams_own(api: Api) -> None:
    await api.create("x", series(SEQ_LEN + 2))
    await api.create("y", series(SEQ_LEN))
    items = [
        {"stream_id": "x", "timestamp": 0, "values": [99.0, 99.0]},  # a rewrite of the past
        {"stream_id": "y", **series(1, start=SEQ_LEN)[0]},
    ]
    body = (await api.client.post("/v1/observations", json={"observations": items})).json()
    assert [o["code"] for o in body["observations"]] == [409, 200]
    assert body["observations"][0]["error"]["type"] == "out_of_order"
    assert body["streams"][0]["error"]["details"]["last_timestamp"] == SEQ_LEN + 1


async def test_post_bulk_observations_creates_missing_streams(api: Api) -> None:
    await api.create("old", series(SEQ_LEN))
    items = [{"stream_id": sid, **row} for row in series(SEQ_LEN + 1) for sid in ("n1", "n2")]
    items += [{"stream_id": "old", **row} for row in series(2, start=SEQ_LEN)]
    create = {"model": "plain", "mode": "full_model", "freq": "2h"}
    response = await api.client.post("/v1/observations", json={"observations": items, "create": create})
    assert response.status_code == 200, response.text
    streams = {s["stream_id"]: s for s in response.json()["streams"]}
    assert (streams["n1"]["code"], streams["n1"]["created"], streams["old"]["created"]) == (201, True, False)
    for sid in ("n1", "n2"):
        summary = (await api.client.get(f"/v1/streams/{sid}")).json()
        assert (summary["model"], summary["mode"], summary["freq"]) == ("plain", "full_model", "2h")
        assert summary["steps"] == SEQ_LEN + 1 and summary["version"] == 1
    await api.create("ref", series(SEQ_LEN + 1), model="plain", mode="full_model", freq="2h")
    assert_same_stream(api, await api.record("n1"), await api.record("ref"))
    assert (await api.client.get("/v1/streams/old")).json()["model"] == "small"  # existing: kept as it is

    unknown = await api.client.post(
        "/v1/observations", json={"observations": items[:1], "create": {"model": "nope"}}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "model"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"observations": []}, 422, "observations"),
        ({"observations": "x"}, 422, "observations"),
        ({"observations": [1]}, 422, "observations.0"),
        ({}, 422, "observations"),
        (
            {"observations": [{"stream_id": "a", "timestamp": 1, "values": [1, 2]}], "forecasts": "all"},
            422,
            "forecasts",
        ),
    ],
)
async def test_post_bulk_observations_malformed_body_422(
    api: Api, body: Any, status: int, field: str
) -> None:
    response = await api.client.post("/v1/observations", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


async def test_post_bulk_observations_over_max_batch_413(settings: Settings) -> None:
    async with running(settings.model_copy(update={"max_batch": 3})) as api:
        await api.create("a")
        items = [{"stream_id": "a", **row} for row in series(4)]
        response = await api.client.post("/v1/observations", json={"observations": items})
        assert response.status_code == 413
        assert (await api.record("a")).version == 1


@pytest.fixture(scope="module")
def small(checkpoint_root: Path):  # noqa: ANN201
    return load_registry(checkpoint_root).get("small")


@pytest.mark.parametrize("mode", [UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL, UpdateMode.NONE])
def test_compute_many_equals_compute_per_stream(small, mode: UpdateMode) -> None:  # noqa: ANN001
    blobs: list[bytes | None] = [
        compute(small, None, [r["values"] for r in series(SEQ_LEN + k, scale=1 + k)], mode, mode).state
        for k in range(3)
    ]
    blobs += [None, compute(small, None, [[1.0, 2.0]], mode, mode).state]
    rows = [[r["values"] for r in series(n, start=50, scale=0.3 * n)] for n in (1, 5, 3, SEQ_LEN + 2, 2)]
    many = compute_many(small, blobs, rows, mode, mode)
    for blob, r, got in zip(blobs, rows, many, strict=True):
        alone = compute(small, blob, r, mode, mode)
        assert not isinstance(got, Exception)
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


async def test_bulk_scores_reach_the_error_histograms_once(api: Api) -> None:
    """The errors a bulk request scores are counted in the aggregate histograms once each, per
    model and mode (one pass for all the request's streams)."""
    data = {f"s{k}": series(SEQ_LEN + 6, scale=1 + k) for k in range(3)}
    for sid, rows in data.items():
        await api.create(sid, rows[:SEQ_LEN])
    for t in range(SEQ_LEN, SEQ_LEN + 6):
        items = [{"stream_id": sid, **rows[t]} for sid, rows in data.items()]
        response = await api.client.post("/v1/observations", json={"observations": items})
        assert response.status_code == 200 and response.json()["applied"] == 3
    counts = [
        (await api.client.get(f"/v1/streams/{sid}/accuracy")).json()["since_creation"]["count"]
        for sid in data
    ]
    text = (await api.client.get("/metrics")).text
    assert min(counts) > 0
    for name in ("memcast_forecast_abs_error_count", "memcast_last_value_abs_error_count"):
        assert _sample(text, f'{name}{{mode="memory_only",model="small"}}') == sum(counts)
