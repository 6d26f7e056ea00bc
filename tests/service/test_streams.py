"""The HTTP contract, run against both state stores (embedded and a real redis-server)."""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from models import UpdateMode, init_stream_state, observe_many, state_from_bytes
from models.checkpoint import load_checkpoint
from service import schemas
from service.settings import Settings
from tests.conftest import with_cluster
from tests.service.conftest import (
    COLUMNS,
    PRED_LEN,
    SEQ_LEN,
    Api,
    make_checkpoint,
    running,
    series,
    state_content,
)


def expected_forecast(checkpoint_dir: Path, rows: list[list[float]], mode: str, combine: bool = True):
    """Call models.online directly on the scaled values and unscale: what the service must serve
    (by default the per-stream combination, as streams are created)."""
    ckpt = load_checkpoint(checkpoint_dir)
    raw = torch.tensor(rows, dtype=torch.float64)
    with torch.no_grad():
        state = init_stream_state(ckpt.model, 1, UpdateMode(mode), combine=combine)
        state, forecast = observe_many(ckpt.model, state, ckpt.schema.scale(raw)[None], UpdateMode(mode))
    return state, ckpt.schema.unscale_targets(forecast[0].double())


def forecast_matrix(body: dict) -> torch.Tensor:
    rows = body["forecast"]["rows"]
    return torch.tensor(
        [[row["values"][c] for c in body["forecast"]["columns"]] for row in rows], dtype=torch.float64
    )


def share_store(target: Api, source: Api, store_kind: str) -> None:
    """Let a second app instance use the first one's store (Redis apps share the server already)."""
    if store_kind == "embedded":
        target.app.state.store = target.app.state.engine.store = source.app.state.store


# -- streams -----------------------------------------------------------------------------------


@with_cluster
async def test_create_stream_returns_summary(api: Api) -> None:
    response = await api.client.post(
        "/v1/streams", json={"id": "s1", "mode": "full_model", "history": series(3)}
    )
    assert response.status_code == 201
    assert response.headers["location"] == "/v1/streams/s1"
    body = response.json()
    assert body["stream_id"] == "s1" and body["model"] == "small" and body["mode"] == "full_model"
    assert body["steps"] == 3 and body["last_timestamp"] == 2
    assert body["ready"] is False and body["needs"] == SEQ_LEN - 3
    assert body["version"] == 1 and body["compatible"] is True and body["state_bytes"] > 0
    assert (await api.client.get("/v1/streams/s1")).json() == body


async def test_create_stream_generates_id(api: Api) -> None:
    first = (await api.client.post("/v1/streams", json={})).json()["stream_id"]
    second = (await api.client.post("/v1/streams", json={"model": "plain"})).json()["stream_id"]
    assert first != second
    assert (await api.client.get(f"/v1/streams/{second}")).json()["model"] == "plain"


async def test_create_stream_existing_id_409(api: Api) -> None:
    await api.create("s1", series(SEQ_LEN))
    before = await api.record("s1")
    response = await api.client.post("/v1/streams", json={"id": "s1", "history": series(2)})
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "stream_exists"
    assert await api.record("s1") == before


async def test_create_stream_unknown_model_404(api: Api) -> None:
    response = await api.client.post("/v1/streams", json={"id": "s1", "model": "nope"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "model_not_found" and error["field"] == "model"
    assert sorted(error["details"]["available"]) == ["plain", "small"]
    assert (await api.client.get("/v1/streams/s1")).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "a{b}"}, "id"),
        ({"id": ""}, "id"),
        ({"mode": "turbo"}, "mode"),
        ({"freq": "fortnightly"}, "freq"),
        ({"history": [{"timestamp": 1, "values": [1.0]}]}, "history.0.values"),
        (
            {"history": [{"timestamp": 2, "values": [1.0, 2.0]}, {"timestamp": 1, "values": [1.0, 2.0]}]},
            "history.1.timestamp",
        ),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_create_stream_invalid_422(api: Api, body: dict, field: str) -> None:
    response = await api.client.post("/v1/streams", json={"id": "s1", **body} if "id" not in body else body)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field
    assert (await api.client.get("/v1/streams/s1")).status_code == 404


@with_cluster
async def test_delete_stream(api: Api) -> None:
    await api.create("s1", series(2))
    assert (await api.client.delete("/v1/streams/s1")).status_code == 204
    assert (await api.client.get("/v1/streams/s1")).status_code == 404
    assert (await api.client.delete("/v1/streams/s1")).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/streams/ghost", None),
        ("DELETE", "/v1/streams/ghost", None),
        ("POST", "/v1/streams/ghost/reset", None),
        ("GET", "/v1/streams/ghost/forecast", None),
        ("POST", "/v1/streams/ghost/observations", {"timestamp": 1, "values": [1.0, 2.0]}),
    ],
)
async def test_unknown_stream_404(api: Api, method: str, path: str, body: dict | None) -> None:
    response = await api.client.request(method, path, json=body)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "type": "stream_not_found",
        "message": "stream 'ghost' does not exist",
        "field": "stream_id",
    }


@with_cluster
async def test_reset_stream(api: Api) -> None:
    await api.create("s1", series(SEQ_LEN + 4))
    response = await api.client.post("/v1/streams/s1/reset", json={"mode": "none"})
    assert response.status_code == 200
    body = response.json()
    assert body["steps"] == 0 and body["last_timestamp"] is None and body["mode"] == "none"
    assert body["version"] == 2 and body["ready"] is False
    assert (await api.client.get("/v1/streams/s1/forecast")).json()["forecast"] is None
    # timestamps start again, and the stream equals a new one
    await api.post("s1", series(SEQ_LEN))
    await api.create("fresh", series(SEQ_LEN), mode="none")
    assert state_content((await api.record("s1")).state) == state_content((await api.record("fresh")).state)


# -- observations -> forecast ------------------------------------------------------------------


@with_cluster
@pytest.mark.parametrize("mode", ["memory_only", "full_model", "none"])
async def test_post_observations_forecast_matches_models_online(
    api: Api, checkpoint_root: Path, mode: str
) -> None:
    history, rest = series(SEQ_LEN + PRED_LEN + 2), series(4, start=SEQ_LEN + PRED_LEN + 2)
    await api.create("s1", history, mode=mode)
    response = await api.post("s1", rest)
    assert response.status_code == 200
    body = response.json()
    assert body["applied"] == 4 and body["steps"] == len(history) + 4 and body["mode"] == mode
    assert [o["status"] for o in body["observations"]] == ["applied"] * 4
    assert body["forecast"]["columns"] == list(COLUMNS) and len(body["forecast"]["rows"]) == PRED_LEN

    state, forecast = expected_forecast(
        checkpoint_root / "small", [o["values"] for o in history + rest], mode
    )
    torch.testing.assert_close(forecast_matrix(body), forecast, rtol=1e-6, atol=1e-9)
    served, _ = state_from_bytes((await api.record("s1")).state)
    leaves = sorted(map(str, state.keys(include_nested=True, leaves_only=True)))
    assert sorted(map(str, served.keys(include_nested=True, leaves_only=True))) == leaves
    for key, value in state.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(served[key], value, rtol=1e-6, atol=1e-9)
    # the forecast is in the stream's units, not the model's scale
    assert abs(forecast_matrix(body)[0, 0].item() - rest[-1]["values"][0]) < 5.0


async def test_post_observations_values_by_name_equal_list(api: Api) -> None:
    rows = series(SEQ_LEN + 2)
    named = [
        {"timestamp": o["timestamp"], "values": dict(zip(COLUMNS, o["values"], strict=True))} for o in rows
    ]
    await api.create("by_list")
    await api.create("by_name")
    a = (await api.post("by_list", rows)).json()
    b = (await api.post("by_name", list(reversed(named[::-1])))).json()
    assert a["forecast"] == b["forecast"]
    assert state_content((await api.record("by_list")).state) == state_content(
        (await api.record("by_name")).state
    )


async def test_post_observations_batching_invariance(api: Api) -> None:
    rows = series(100)
    await api.create("batched")
    await api.create("single")
    batched = (await api.post("batched", rows)).json()
    for row in rows:
        single = await api.client.post("/v1/streams/single/observations", json=row)
        assert single.status_code == 200
    single_body = single.json()
    assert batched["steps"] == single_body["steps"] == 100
    # the forecast values; its intervals, like live accuracy, learn from served forecasts only,
    # and a request of 100 rows serves one (tests/service/test_intervals.py)
    assert [(r["step"], r["values"]) for r in batched["forecast"]["rows"]] == [
        (r["step"], r["values"]) for r in single_body["forecast"]["rows"]
    ]
    assert state_content((await api.record("batched")).state) == state_content(
        (await api.record("single")).state
    )
    assert (await api.client.get("/v1/streams/batched/forecast")).json()["forecast"] == batched["forecast"]


async def test_post_observations_duplicates_acknowledged_not_learned(api: Api) -> None:
    rows = series(SEQ_LEN + 6)
    await api.create("s1")
    first = (await api.post("s1", rows[:10])).json()
    before = await api.record("s1")
    # the last observation again, then the whole batch again (a client retry)
    again = (await api.post("s1", rows[9:10])).json()
    assert again["observations"] == [{"timestamp": 9, "status": "duplicate"}]
    assert again["applied"] == 0 and again["duplicates"] == 1 and again["steps"] == 10
    assert again["forecast"] == first["forecast"]
    retry = (await api.post("s1", rows[:10])).json()
    assert retry["duplicates"] == 10 and retry["steps"] == 10
    assert await api.record("s1") == before  # not even rewritten
    # overlapping batch: the known part is acknowledged, the rest learned once
    overlap = (await api.post("s1", rows[8:])).json()
    assert [o["status"] for o in overlap["observations"]] == ["duplicate"] * 2 + ["applied"] * (
        len(rows) - 10
    )
    await api.create("once", rows)
    assert state_content((await api.record("s1")).state) == state_content((await api.record("once")).state)


async def test_post_observations_out_of_order_409(api: Api) -> None:
    rows = series(6)
    await api.create("s1", rows)
    before = await api.record("s1")
    older = {"timestamp": 3, "values": [0.0, 0.0]}
    same_time = {"timestamp": 5, "values": [0.0, 0.0]}
    for batch in ([older], [same_time], [{"timestamp": 6, "values": [1.0, 1.0]}, older]):
        response = await api.post("s1", batch)
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["type"] == "out_of_order"
        assert error["details"]["last_timestamp"] == (6 if len(batch) == 2 else 5)
        assert error["field"] == f"observations.{len(batch) - 1}.timestamp"
        assert await api.record("s1") == before  # nothing written, not even the valid first one


INVALID_BODIES = [
    (b'{"timestamp": 10, "values": [NaN, 1.0]}', "values.0"),
    (b'{"timestamp": 10, "values": [1.0, Infinity]}', "values.1"),
    (
        b'{"observations": [{"timestamp": 10, "values": {"load_a": -Infinity, "OT": 1.0}}]}',
        "observations.0.values.load_a",
    ),
    (b'{"timestamp": 10, "values": [1.0, 2.0, 3.0]}', "observations.0.values"),
    (b'{"timestamp": 10, "values": [1.0]}', "observations.0.values"),
    (b'{"timestamp": 10, "values": {"load_a": 1.0, "OT": 2.0, "extra": 3.0}}', "observations.0.values"),
    (b'{"timestamp": 10, "values": {"load_a": 1.0}}', "observations.0.values"),
    (b'{"timestamp": 10, "values": [1.0, "x"]}', "values.1"),
    (b'{"observations": []}', "body"),
    (b"{}", "body"),
    (b'{"timestamp": 10.5, "values": [1.0, 2.0]}', "timestamp"),
    (b'{"timestamp": "2020-01-01T00:00:00", "values": [1.0, 2.0]}', "observations.0.timestamp"),
    (b'{"timestamp": 10, "values": [1.0, 2.0], "mode": "turbo"}', "mode"),
    (b'{"timestamp": 10, "values": [1.0, 2.0], "extra": 1}', "extra"),
    (b'{"timestamp": 10, "values": [1.0, 2.0]', "body"),
    (b"[1, 2", "body"),
]


@pytest.mark.parametrize(("content", "field"), INVALID_BODIES)
async def test_post_observations_invalid_422(api: Api, content: bytes, field: str) -> None:
    await api.create("s1", series(SEQ_LEN))
    before = await api.record("s1")
    response = await api.client.post(
        "/v1/streams/s1/observations", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == field and error["message"]
    assert await api.record("s1") == before


async def test_post_observations_not_ready_until_seq_len(api: Api) -> None:
    await api.create("s1")
    rows = series(SEQ_LEN)
    for i, row in enumerate(rows[:-1]):
        body = (await api.client.post("/v1/streams/s1/observations", json=row)).json()
        assert body["ready"] is False and body["needs"] == SEQ_LEN - i - 1 and body["forecast"] is None
    body = (await api.client.post("/v1/streams/s1/observations", json=rows[-1])).json()
    assert body["ready"] is True and body["needs"] == 0 and len(body["forecast"]["rows"]) == PRED_LEN


async def test_post_observations_body_is_the_documented_schema(api: Api) -> None:
    """The body is built as dicts (``Engine.observe``): it must be what ``ObservationsOut``
    dumps to, before the stream is ready, with intervals learned, and for a duplicate."""
    await api.create("s1")
    rows = series(SEQ_LEN + PRED_LEN + 3)
    bodies = [(await api.client.post("/v1/streams/s1/observations", json=row)).json() for row in rows]
    bodies.append((await api.client.post("/v1/streams/s1/observations", json=rows[-1])).json())
    assert bodies[0]["forecast"] is None and bodies[-1]["observations"][0]["status"] == "duplicate"
    assert bodies[-2]["forecast"]["rows"][0]["intervals"], "no interval learned: the case is not covered"
    for body in bodies:
        assert schemas.ObservationsOut.model_validate(body).model_dump(mode="json") == body


async def test_post_observations_mode_override(api: Api) -> None:
    await api.create("s1", series(SEQ_LEN), mode="none")
    small = (await api.record("s1")).state
    body = (await api.post("s1", series(1, start=SEQ_LEN), mode="full_model")).json()
    assert body["mode"] == "full_model"
    state, _ = state_from_bytes((await api.record("s1")).state)
    assert "params" in state.keys() and len((await api.record("s1")).state) > len(small)
    assert (await api.client.get("/v1/streams/s1")).json()["mode"] == "none"


async def test_get_forecast_does_not_learn(api: Api) -> None:
    await api.create("s1", series(SEQ_LEN + 3))
    before = await api.record("s1")
    response = await api.client.get("/v1/streams/s1/forecast")
    assert response.status_code == 200
    body = response.json()
    assert (
        body["ready"] is True and body["steps"] == SEQ_LEN + 3 and len(body["forecast"]["rows"]) == PRED_LEN
    )
    assert await api.record("s1") == before


async def test_forecast_timestamps_follow_frequency(api: Api) -> None:
    hourly = [
        {"timestamp": f"2024-03-01T{h:02d}:00:00", "values": o["values"]}
        for h, o in enumerate(series(SEQ_LEN))
    ]
    await api.create("hourly", hourly)  # freq from the checkpoint ("h")
    rows = (await api.client.get("/v1/streams/hourly/forecast")).json()["forecast"]["rows"]
    assert [r["timestamp"] for r in rows] == [
        "2024-03-01T08:00:00",
        "2024-03-01T09:00:00",
        "2024-03-01T10:00:00",
    ]
    await api.create("stepped", series(SEQ_LEN), freq="5")
    rows = (await api.client.get("/v1/streams/stepped/forecast")).json()["forecast"]["rows"]
    assert [r["timestamp"] for r in rows] == [SEQ_LEN - 1 + 5, SEQ_LEN - 1 + 10, SEQ_LEN - 1 + 15]
    await api.create("unknown", series(SEQ_LEN))  # integer steps, frequency "h": no timestamps
    rows = (await api.client.get("/v1/streams/unknown/forecast")).json()["forecast"]["rows"]
    assert [r["timestamp"] for r in rows] == [None] * PRED_LEN and [r["step"] for r in rows] == [1, 2, 3]


# -- limits and authentication -------------------------------------------------------------------


async def test_post_observations_over_limits_413(settings: Settings) -> None:
    async with running(
        settings.model_copy(update={"max_batch": 5, "max_body_bytes": 2000, "max_history": 4})
    ) as api:
        await api.create("s1", series(3))
        before = await api.record("s1")
        too_many = await api.post("s1", series(6, start=3))
        assert too_many.status_code == 413
        assert too_many.json()["error"]["type"] == "payload_too_large"
        too_big = await api.client.post(
            "/v1/streams/s1/observations",
            content=b'{"observations": [' + b" " * 3000 + b"]}",
            headers={"content-type": "application/json"},
        )
        assert too_big.status_code == 413 and too_big.json()["error"]["field"] == "body"
        assert await api.record("s1") == before
        history = await api.client.post("/v1/streams", json={"id": "s2", "history": series(5)})
        assert history.status_code == 413
        assert (await api.client.get("/v1/streams/s2")).status_code == 404
        assert (await api.post("s1", series(5, start=3))).status_code == 200


async def test_api_key_required_401(settings: Settings) -> None:
    async with running(settings.model_copy(update={"api_keys": "key-one, key-two"})) as api:
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"X-API-Key": "key-one-"},
            {"Authorization": "key-one"},
        ):
            response = await api.client.post("/v1/streams", json={"id": "s1"}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await api.client.get("/v1/models")).status_code == 401
        ok = await api.client.post(
            "/v1/streams", json={"id": "s1"}, headers={"Authorization": "Bearer key-two"}
        )
        assert ok.status_code == 201
        before = await api.record("s1")
        denied = await api.client.post(
            "/v1/streams/s1/observations", json=series(1)[0], headers={"X-API-Key": "bad"}
        )
        assert denied.status_code == 401
        assert await api.record("s1") == before
        allowed = await api.client.post(
            "/v1/streams/s1/observations", json=series(1)[0], headers={"X-API-Key": "key-one"}
        )
        assert allowed.status_code == 200
        assert (await api.client.get("/healthz")).status_code == 200


# -- concurrency ---------------------------------------------------------------------------------


@with_cluster
async def test_concurrent_posts_never_lose_an_update(settings: Settings, store_kind: str) -> None:
    """Two app instances (so the compare-and-set, not only the in-process lock, decides) and
    many tasks posting to one stream: every "applied" is in the step count, exactly once."""
    async with running(settings) as a, running(settings) as b:
        share_store(b, a, store_kind)
        await a.create("s1", series(SEQ_LEN))
        rows = series(40, start=SEQ_LEN)
        responses = await asyncio.gather(
            *(
                (a if i % 2 else b).client.post("/v1/streams/s1/observations", json=row)
                for i, row in enumerate(rows)
            )
        )
        assert {r.status_code for r in responses} <= {200, 409}
        applied = sum(r.json()["applied"] for r in responses if r.status_code == 200)
        steps = (await a.client.get("/v1/streams/s1")).json()["steps"]
        assert steps == SEQ_LEN + applied and applied >= 1
        # a retry storm: the same new observation 20 times at once is learned from once
        storm = {"timestamp": 10_000, "values": [1.0, 2.0]}
        responses = await asyncio.gather(
            *((a if i % 2 else b).client.post("/v1/streams/s1/observations", json=storm) for i in range(20))
        )
        assert [r.status_code for r in responses] == [200] * 20
        assert (
            sorted(r.json()["observations"][0]["status"] for r in responses)
            == ["applied"] + ["duplicate"] * 19
        )
        assert (await b.client.get("/v1/streams/s1")).json()["steps"] == steps + 1


async def test_concurrent_streams_are_isolated(api: Api, checkpoint_root: Path) -> None:
    """Streams updated at once in the model threads (full_model swaps weights in a module)
    each end exactly where a sequential run of models.online ends."""
    data = {f"s{i}": series(SEQ_LEN + PRED_LEN + 3, scale=1.0 + i) for i in range(6)}
    await asyncio.gather(*(api.create(sid, mode="full_model") for sid in data))

    async def feed(sid: str) -> None:
        for row in data[sid]:
            assert (await api.client.post(f"/v1/streams/{sid}/observations", json=row)).status_code == 200

    await asyncio.gather(*(feed(sid) for sid in data))
    for sid, rows in data.items():
        state, forecast = expected_forecast(
            checkpoint_root / "small", [r["values"] for r in rows], "full_model"
        )
        body = (await api.client.get(f"/v1/streams/{sid}/forecast")).json()
        torch.testing.assert_close(forecast_matrix(body), forecast, rtol=1e-5, atol=1e-7)


# -- model changes, models, health, metrics ------------------------------------------------------


async def test_fingerprint_mismatch_409_then_reset(
    settings: Settings, isolated_checkpoints: Path, store_kind: str
) -> None:
    settings = settings.model_copy(update={"checkpoint_dir": isolated_checkpoints})
    async with running(settings) as old:
        await old.create("s1", series(SEQ_LEN + 2))
        make_checkpoint(isolated_checkpoints / "small", seed=7)  # same name, new weights
        async with running(settings) as new:
            share_store(new, old, store_kind)
            before = await new.record("s1")
            response = await new.post("s1", series(1, start=SEQ_LEN + 2))
            assert response.status_code == 409
            error = response.json()["error"]
            assert error["type"] == "state_incompatible" and "reset" in error["message"]
            assert error["details"]["found"] == before.fingerprint
            assert (await new.client.get("/v1/streams/s1/forecast")).status_code == 409
            assert (await new.client.get("/v1/streams/s1")).json()["compatible"] is False
            assert await new.record("s1") == before
            reset = await new.client.post("/v1/streams/s1/reset")
            assert reset.status_code == 200 and reset.json()["compatible"] is True
            assert (await new.post("s1", series(SEQ_LEN))).status_code == 200


async def test_list_models(api: Api) -> None:
    body = (await api.client.get("/v1/models")).json()
    assert body["default"] == "small"
    small = next(m for m in body["models"] if m["name"] == "small")
    assert (
        small["default"] is True and small["columns"] == list(COLUMNS) and small["targets"] == list(COLUMNS)
    )
    assert small["mean"] == [10.0, 5.0] and small["std"] == [2.0, 3.0]
    assert small["seq_len"] == SEQ_LEN and small["pred_len"] == PRED_LEN and len(small["fingerprint"]) == 64


@with_cluster
async def test_health_and_readiness(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"models": True, "store": True}
    assert (await api.client.get("/docs")).status_code == 200
    assert "/v1/streams/{stream_id}/observations" in (await api.client.get("/openapi.json")).json()["paths"]


async def test_readiness_without_models_503(settings: Settings, tmp_path: Path) -> None:
    async with running(
        settings.model_copy(update={"checkpoint_dir": tmp_path, "default_model": None})
    ) as api:
        response = await api.client.get("/readyz")
        assert response.status_code == 503 and response.json()["checks"]["models"] is False
        assert (await api.client.get("/healthz")).status_code == 200


async def test_metrics_exposes_named_metrics(api: Api) -> None:
    await api.create("s1", series(SEQ_LEN))
    await api.post("s1", series(2, start=SEQ_LEN))
    await api.post("s1", series(1, start=SEQ_LEN + 1))  # a duplicate
    await api.client.get("/v1/streams/ghost")
    text = (await api.client.get("/metrics")).text
    for needle in (
        'memcast_request_duration_seconds_count{method="POST",route="/v1/streams/{stream_id}/observations",status="200"} 2.0',
        'memcast_updates_total{mode="memory_only"} 10.0',
        "memcast_duplicates_total 1.0",
        "memcast_state_bytes_count 2.0",
        "memcast_store_conflicts_total",
        "memcast_store_retries_total",
        'memcast_errors_total{kind="stream_not_found"} 1.0',
        "memcast_models_loaded 2.0",
    ):
        assert needle in text, needle


@with_cluster
async def test_restart_serves_state_identically(settings: Settings, store_kind: str) -> None:
    if store_kind == "embedded":
        pytest.skip("the embedded store lives and dies with its process")
    async with running(settings) as first:
        await first.create("s1", series(SEQ_LEN + 4))
        await first.create("twin", series(SEQ_LEN + 4))
        summary = (await first.client.get("/v1/streams/s1")).json()
        forecast = (await first.client.get("/v1/streams/s1/forecast")).json()
    async with running(settings) as second:
        assert (await second.client.get("/v1/streams/s1")).json() == summary
        assert (await second.client.get("/v1/streams/s1/forecast")).json() == forecast
        after_restart = (await second.post("s1", series(1, start=SEQ_LEN + 4))).json()
    async with running(settings) as third:
        assert (await third.post("twin", series(1, start=SEQ_LEN + 4))).json()["forecast"] == after_restart[
            "forecast"
        ]
        assert state_content((await third.record("twin")).state) == state_content(
            (await third.record("s1")).state
        )
    assert not math.isnan(after_restart["forecast"]["rows"][0]["values"]["OT"])


# -- issue 14: found by exercising the service from outside --------------------------------------


@pytest.mark.parametrize(
    "freq", ["999999999999999999999h", "9999999999D", "100000YE", "-2h", "0h", "0", "-3", "h ", "2 h"]
)
async def test_create_stream_unusable_freq_422(api: Api, freq: str) -> None:
    hourly = [
        {"timestamp": f"2024-03-0{1 + h // 24}T{h % 24:02d}:00:00", "values": o["values"]}
        for h, o in enumerate(series(48))
    ]
    for history in ([], hourly):
        response = await api.client.post("/v1/streams", json={"id": "s1", "freq": freq, "history": history})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (
            error["type"] == "invalid_request"
            and error["field"] == "freq"
            and freq.strip() in error["message"]
        )
        assert (await api.client.get("/v1/streams/s1")).status_code == 404


async def test_post_observations_forecast_timestamps_past_year_9999_422(api: Api) -> None:
    """A horizon that cannot be dated is refused before anything is written, not a 500 after."""
    yearly = [
        {"timestamp": f"{9980 + y}-01-01T00:00:00", "values": o["values"]}
        for y, o in enumerate(series(SEQ_LEN))
    ]
    await api.create("s1", yearly, freq="2YS")
    before = await api.record("s1")
    late = {"timestamp": "9996-01-01T00:00:00", "values": [1.0, 2.0]}  # + 3 * 2 years > 9999
    response = await api.post("s1", [late])
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "observations.0.timestamp"
    assert await api.record("s1") == before
    assert (await api.client.get("/v1/streams/s1/forecast")).status_code == 200
    ok = await api.post("s1", [{"timestamp": "9990-01-01T00:00:00", "values": [1.0, 2.0]}])
    assert ok.status_code == 200, ok.text
    stamps = [r["timestamp"] for r in ok.json()["forecast"]["rows"]]
    assert stamps == ["9992-01-01T00:00:00", "9994-01-01T00:00:00", "9996-01-01T00:00:00"]


@pytest.mark.parametrize(
    ("freq", "last", "expected"),
    [
        (
            "15min",
            "2024-03-01T23:30:00",
            ["2024-03-01T23:45:00", "2024-03-02T00:00:00", "2024-03-02T00:15:00"],
        ),
        ("ME", "2024-01-31T00:00:00", ["2024-02-29T00:00:00", "2024-03-31T00:00:00", "2024-04-30T00:00:00"]),
        ("MS", "2024-01-15T06:00:00", ["2024-02-01T06:00:00", "2024-03-01T06:00:00", "2024-04-01T06:00:00"]),
        ("QE", "2024-02-10T00:00:00", ["2024-03-31T00:00:00", "2024-06-30T00:00:00", "2024-09-30T00:00:00"]),
        ("YS", "2024-01-01T00:00:00", ["2025-01-01T00:00:00", "2026-01-01T00:00:00", "2027-01-01T00:00:00"]),
        (
            "2h",
            "2024-03-01T12:00:00+02:00",
            ["2024-03-01T12:00:00+00:00", "2024-03-01T14:00:00+00:00", "2024-03-01T16:00:00+00:00"],
        ),
    ],
)
async def test_get_forecast_timestamps_fixed_and_calendar_freq(
    api: Api, freq: str, last: str, expected: list[str]
) -> None:
    # SEQ_LEN observations a minute apart ending at `last`: only the last one dates the forecast
    end = datetime.fromisoformat(last)
    rows = [
        {"timestamp": (end - timedelta(minutes=SEQ_LEN - 1 - k)).isoformat(), "values": o["values"]}
        for k, o in enumerate(series(SEQ_LEN))
    ]
    await api.create("s1", mode="none", freq=freq)
    assert (await api.post("s1", rows)).status_code == 200
    body = (await api.client.get("/v1/streams/s1/forecast")).json()
    assert [r["timestamp"] for r in body["forecast"]["rows"]] == expected


@pytest.mark.parametrize("huge", [1e39, 1e308, -1e39])
async def test_post_observations_value_overflowing_float32_422(api: Api, huge: float) -> None:
    await api.create("s1", series(SEQ_LEN + 2))
    before = await api.record("s1")
    for values, field in (
        ([huge, 2.0], "observations.0.values.0"),
        ({"OT": 1.0, "load_a": huge}, "observations.0.values.load_a"),
    ):
        response = await api.post("s1", [{"timestamp": SEQ_LEN + 2, "values": values}])
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request" and error["field"] == field
        assert await api.record("s1") == before
    response = await api.client.post(
        "/v1/streams", json={"id": "s2", "history": [{"timestamp": 0, "values": [huge, 1.0]}]}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "history.0.values.0"
    # the stream still forecasts after ordinary observations
    body = (await api.post("s1", series(3, start=SEQ_LEN + 2))).json()
    assert all(math.isfinite(v) for row in body["forecast"]["rows"] for v in row["values"].values())


async def test_post_observations_non_finite_state_422_nothing_written(api: Api) -> None:
    """Values float32 can hold that still overflow inside the model: the state is not committed."""
    await api.create("s1", series(SEQ_LEN + 2))
    before = await api.record("s1")
    huge = [1e38, -1e38]  # scaled: 5e37 and -3.3e37, squared inside the model: inf
    for batch in (
        [{"timestamp": SEQ_LEN + 2, "values": huge}],  # one observation: the cross-stream batch path
        [*series(2, start=SEQ_LEN + 2), {"timestamp": SEQ_LEN + 4, "values": huge}],
    ):
        response = await api.post("s1", batch)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "non_finite_state" and error["field"] == "observations"
        assert await api.record("s1") == before
    response = await api.client.post(
        "/v1/streams", json={"id": "s2", "history": [*series(3), {"timestamp": 3, "values": huge}]}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "history"
    assert (await api.client.get("/v1/streams/s2")).status_code == 404
    body = (await api.post("s1", series(3, start=SEQ_LEN + 2))).json()
    assert all(math.isfinite(v) for row in body["forecast"]["rows"] for v in row["values"].values())


@with_cluster
async def test_post_observations_whole_batch_retry_is_duplicate(api: Api) -> None:
    await api.create("s1")
    rows = series(100)
    assert (await api.post("s1", rows)).json()["applied"] == 100
    before = await api.record("s1")
    retry = await api.post("s1", rows)  # a client retrying a timed-out bulk request
    assert retry.status_code == 200, retry.text
    assert retry.json()["duplicates"] == 100 and retry.json()["applied"] == 0
    single = await api.post("s1", rows[:1])  # 100 back: beyond the old 64-observation window
    assert single.status_code == 200 and single.json()["observations"][0]["status"] == "duplicate"
    conflict = await api.post("s1", [{"timestamp": 0, "values": [0.0, 0.0]}])
    assert conflict.status_code == 409
    assert await api.record("s1") == before


async def test_post_observations_same_instant_other_offset_is_duplicate(api: Api) -> None:
    await api.create("s1")
    rows = [
        {"timestamp": f"2024-03-01T{h:02d}:00:00+00:00", "values": o["values"]}
        for h, o in enumerate(series(4))
    ]
    assert (await api.post("s1", rows)).status_code == 200
    before = await api.record("s1")
    shifted = [{"timestamp": "2024-03-01T05:00:00+02:00", "values": rows[3]["values"]}]  # 03:00 UTC
    response = await api.post("s1", shifted)
    assert response.status_code == 200, response.text
    assert response.json()["observations"][0]["status"] == "duplicate"
    earlier = [{"timestamp": "2024-03-01T04:00:00+02:00", "values": rows[2]["values"]}]  # 02:00 UTC
    assert (await api.post("s1", earlier)).json()["observations"][0]["status"] == "duplicate"
    later = [{"timestamp": "2024-03-01T03:30:00+00:00", "values": [1.0, 2.0]}]
    response = await api.post("s1", later)
    assert response.json()["applied"] == 1 and await api.record("s1") != before


async def test_create_and_reset_stream_empty_model_422(api: Api) -> None:
    await api.create("s1", series(SEQ_LEN))
    before = await api.record("s1")
    for path, body in (("/v1/streams", {"id": "s2", "model": ""}), ("/v1/streams/s1/reset", {"model": ""})):
        response = await api.client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "model"
    assert await api.record("s1") == before
    assert (await api.client.get("/v1/streams/s2")).status_code == 404


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"timestamp": 1, "values": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"\xff\xfe{}",
    ],
)
async def test_post_observations_unparseable_body_422(api: Api, content: bytes) -> None:
    await api.create("s1", series(SEQ_LEN))
    before = await api.record("s1")
    response = await api.client.post(
        "/v1/streams/s1/observations", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == "body" and error["message"]
    assert await api.record("s1") == before


async def test_create_stream_trailing_slash_no_redirect(api: Api) -> None:
    response = await api.client.post("/v1/streams/", json={"id": "s1"})
    assert response.status_code == 201, response.text
    assert (await api.client.get("/v1/streams/s1")).status_code == 200
    models = await api.client.get("/v1/models/")
    assert models.status_code == 200 and models.json()["default"] == "small"
