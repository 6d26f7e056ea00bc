"""POST /v1/streams:batchCreate: many warm streams in one request, on both stores.

The reference is POST /v1/streams: a stream created in a batch must be the stream the same
specification creates alone (state, forecast, accuracy, settings).
"""

from __future__ import annotations

from typing import Any

import pytest

from service.settings import Settings
from tests.service.conftest import SEQ_LEN, Api, running, series
from tests.service.test_bulk import assert_close_json, assert_same_stream

URL = "/v1/streams:batchCreate"


def specs() -> list[dict[str, Any]]:
    """Streams of different models, modes and history lengths (none, short, warm)."""
    return [
        {"id": "warm", "history": series(SEQ_LEN + 5)},
        {"id": "short", "history": series(3, scale=2.0)},
        {"id": "empty"},
        {"id": "full", "mode": "full_model", "history": series(SEQ_LEN + 2, scale=0.7)},
        {"id": "plain", "model": "plain", "freq": "2h", "history": series(SEQ_LEN + 1, start=5)},
        {"id": "levels", "interval_levels": [0.5, 0.9], "history": series(SEQ_LEN + 3, scale=1.5)},
        {"id": "solo", "combine": False, "history": series(SEQ_LEN + 2, scale=1.2)},
        {"id": "solo-empty", "combine": False},
    ]


async def test_batch_create_equals_one_by_one(api: Api) -> None:
    response = await api.client.post(URL, json={"streams": specs()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["created"], body["errors"]) == (len(specs()), 0)
    assert [s["code"] for s in body["streams"]] == [201] * len(specs())
    for spec, out in zip(specs(), body["streams"], strict=True):
        alone = {**spec, "id": f"alone-{spec['id']}"}
        reference = (await api.client.post("/v1/streams", json=alone)).json()
        assert out["stream"]["steps"] == reference["steps"] == len(spec.get("history", []))
        for key in ("model", "mode", "freq", "ready", "needs", "last_timestamp", "version", "combine"):
            assert out["stream"][key] == reference[key], key
        batched, single = await api.record(spec["id"]), await api.record(alone["id"])
        assert_same_stream(api, batched, single)
        assert_close_json(batched.intervals, single.intervals)
        assert_close_json(batched.accuracy, single.accuracy)
        assert (await api.client.get(f"/v1/streams/{spec['id']}")).json()["version"] == 1


async def test_batch_create_bad_specification_fails_alone(api: Api) -> None:
    await api.create("taken")
    bad = [
        {"id": "ok", "history": series(SEQ_LEN)},
        {"id": "taken"},  # exists: 409
        {"id": "ok"},  # twice in the request: 409 for the second
        {"id": "m", "model": "nope"},  # 404
        {"id": "x", "mode": "sometimes"},  # 422 naming the field
        {"id": "late", "history": [series(2)[1], series(2)[0]]},  # out of order
        {"id": "inf", "history": [{"timestamp": 0, "values": [1e39, 1.0]}]},  # not a float32
        {"id": "f", "freq": "0h"},
    ]
    response = await api.client.post(URL, json={"streams": bad})
    assert response.status_code == 200, response.text
    out = response.json()["streams"]
    assert [s["code"] for s in out] == [201, 409, 409, 404, 422, 422, 422, 422]
    assert out[4]["error"]["field"] == "streams.4.mode"
    assert out[5]["error"]["field"] == "streams.5.history.1.timestamp"
    assert out[6]["error"]["field"].startswith("streams.6.history")
    assert out[7]["error"]["field"] == "streams.7.freq"
    listed = (await api.client.get("/v1/streams")).json()
    assert sorted(listed["streams"]) == ["ok", "taken"]  # nothing written for the bad ones
    assert (await api.record("taken")).version == 1


async def test_batch_create_generates_ids(api: Api) -> None:
    response = await api.client.post(URL, json={"streams": [{}, {"history": series(2)}]})
    ids = [s["id"] for s in response.json()["streams"]]
    assert len(set(ids)) == 2
    for sid in ids:
        assert (await api.client.get(f"/v1/streams/{sid}")).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"streams": []}, "streams"),
        ({}, "streams"),
        ({"streams": {}}, "streams"),
        ({"streams": [1]}, "streams.0"),
        ({"streams": [], "x": 1}, ""),
    ],
)
async def test_batch_create_malformed_body_422(api: Api, body: Any, field: str) -> None:
    response = await api.client.post(URL, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"].startswith(field)


async def test_batch_create_over_max_batch_413(settings: Settings) -> None:
    async with running(settings.model_copy(update={"max_batch": 2})) as api:
        response = await api.client.post(URL, json={"streams": [{"id": "a"}, {"id": "b"}, {"id": "c"}]})
        assert response.status_code == 413
        assert (await api.client.get("/v1/streams")).json()["streams"] == []
