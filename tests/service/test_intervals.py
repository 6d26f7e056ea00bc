"""Prediction intervals per stream: the bounds a forecast response carries equal the ones
``memcast evaluate`` replays (``models.intervals.replay``) on the same series, on either store;
levels are set per stream, validated (422, nothing written), kept by a reset, and the learned
state survives the store and an export."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from models.checkpoint import Checkpoint, load_checkpoint
from models.intervals import DEFAULT_LEVELS, IntervalState, init_state, replay, update
from service import intervals, schemas
from service.settings import Settings
from service.store import StreamRecord
from tests.service.conftest import PRED_LEN, SEQ_LEN, Api, running, series
from tests.service.test_accuracy import K, N, evaluated

TARGETS = ("load_a", "OT")


@pytest.fixture(scope="module")
def ckpt(checkpoint_root: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_root / "small")


async def served_forecasts(api: Api, stream_id: str, rows: list[dict[str, Any]], **create: Any) -> list[dict]:
    """The forecast of every response: the creation's (forecast 0), then one per posted row."""
    out = [(await api.create(stream_id, rows[:SEQ_LEN], **create)).json()]
    for row in rows[SEQ_LEN:N]:
        response = await api.post(stream_id, [row])
        assert response.status_code == 200, response.text
        out.append(response.json()["forecast"])
    return out


async def test_forecast_intervals_equal_online_evaluation(settings: Settings, ckpt: Checkpoint) -> None:
    rows = series(N + PRED_LEN - 1)
    levels = [0.5, 0.9]
    async with running(settings) as api:
        created = await api.create("s", rows[:SEQ_LEN], interval_levels=[0.9, 0.5])
        assert created.status_code == 201
        forecasts = [(await api.client.get("/v1/streams/s/forecast")).json()["forecast"]]
        for row in rows[SEQ_LEN:N]:
            response = await api.post("s", [row])
            assert response.status_code == 200, response.text
            forecasts.append(response.json()["forecast"])
    served, _, truth = evaluated(ckpt, rows)
    lower, upper = replay(
        torch.from_numpy(served), torch.from_numpy(truth), torch.tensor(levels, dtype=torch.float64)
    )
    assert len(forecasts) == K + 1 and all(f["levels"] == levels for f in forecasts)
    with_bounds = 0
    for k in range(K):  # the evaluator's forecasts 0 .. K - 1
        for h, row in enumerate(forecasts[k]["rows"]):
            for c, name in enumerate(TARGETS):
                assert row["values"][name] == pytest.approx(float(served[k, h, c]), rel=1e-6)
            if math.isnan(lower[k, h, 0, 0]):  # no error of step h + 1 matured yet
                assert row["intervals"] == [] and row["lower"] is None and row["upper"] is None
                continue
            with_bounds += 1
            assert [i["level"] for i in row["intervals"]] == levels
            for j, interval in enumerate(row["intervals"]):
                for c, name in enumerate(TARGETS):
                    assert interval["lower"][name] == pytest.approx(float(lower[k, h, c, j]), rel=1e-6)
                    assert interval["upper"][name] == pytest.approx(float(upper[k, h, c, j]), rel=1e-6)
            assert (
                row["lower"] == row["intervals"][-1]["lower"]
                and row["upper"] == row["intervals"][-1]["upper"]
            )
    assert with_bounds > K * PRED_LEN // 2  # the comparison covered most values, not only the gaps


async def test_intervals_widen_with_level_and_contain_the_forecast(api: Api) -> None:
    forecasts = await served_forecasts(api, "s", series(N))
    last = forecasts[-1]["rows"]
    assert all(len(r["intervals"]) == 2 for r in last)  # every step has matured errors by now
    for r in last:
        narrow, wide = r["intervals"]
        for name in TARGETS:
            assert wide["lower"][name] <= narrow["lower"][name] <= r["values"][name]
            assert r["values"][name] <= narrow["upper"][name] <= wide["upper"][name]


@pytest.mark.parametrize("levels", [[0.0], [1.0], [0.5, 1.2], [-0.1], [], [0.8, 0.8], ["x"], [0.1] * 9])
async def test_create_stream_bad_interval_levels_422(api: Api, levels: list[Any]) -> None:
    response = await api.client.post("/v1/streams", json={"id": "s", "interval_levels": levels})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"].startswith("interval_levels")
    assert (await api.client.get("/v1/streams/s")).status_code == 404  # nothing written


async def test_interval_state_round_trips_the_store_and_reset_keeps_levels(api: Api) -> None:
    await served_forecasts(api, "s", series(N), interval_levels=[0.7])
    record = await api.record("s")
    assert record.intervals is not None and record.intervals["levels"] == [0.7]
    assert record.intervals["count"][0] == [float(N - SEQ_LEN)] * 2  # step 1 learned once per row
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in record.to_fields().items()}
    assert StreamRecord.from_fields(fields) == record
    before = (await api.client.get("/v1/streams/s/forecast")).json()["forecast"]
    assert before["rows"][0]["intervals"][0]["level"] == 0.7
    assert (await api.client.post("/v1/streams/s/reset")).status_code == 200
    reset = await api.record("s")
    assert reset.intervals == {"levels": [0.7], "ratio": None, "scale": None, "count": None}


async def test_exported_stream_imports_with_its_intervals(api: Api) -> None:
    await served_forecasts(api, "s", series(N))
    export = await api.client.get("/v1/streams/s/export")
    assert export.status_code == 200, export.text
    imported = await api.client.post("/v1/streams/t/import", content=export.content)
    assert imported.status_code == 200, imported.text
    assert (await api.record("t")).intervals == (await api.record("s")).intervals
    a = (await api.client.get("/v1/streams/s/forecast")).json()["forecast"]
    b = (await api.client.get("/v1/streams/t/forecast")).json()["forecast"]
    assert a == b and a["rows"][0]["intervals"]


async def test_forecast_body_is_the_forecast_schema(api: Api) -> None:
    """Responses build the forecast as dicts (``intervals.forecast_body``): valid
    ``schemas.Forecast`` JSON that dumps back to itself, before and after bounds are learned,
    with a step still without bounds (none listed for it)."""
    await served_forecasts(api, "s", series(N), interval_levels=[0.9, 0.5])
    record = await api.record("s")
    engine = api.app.state.engine
    step_one_unseen = {**record.intervals, "count": [[0.0, 0.0], *record.intervals["count"][1:]]}
    for data, first_levels in ((None, []), (record.intervals, [0.5, 0.9]), (step_one_unseen, [])):
        body = engine.forecast_body(record.replace(intervals=data))
        assert body is not None
        assert schemas.Forecast.model_validate(body).model_dump(mode="json") == body
        assert [i["level"] for i in body["rows"][0]["intervals"]] == first_levels
        assert (body["rows"][0]["lower"] is None) == (not first_levels)
        assert [i["level"] for i in body["rows"][1]["intervals"]] == ([0.5, 0.9] if data else [])


def _learn_alone(
    data: dict[str, Any] | None, pred_len: int, columns: int, abs_errors: list[list[list[float]]]
) -> dict[str, Any]:
    """The radii learned for one stream alone, row by row: the oracle of ``learn_many``."""
    levels = list(data["levels"]) if data else [float(v) for v in DEFAULT_LEVELS]
    if not any(not math.isnan(e) for row in abs_errors for step in row for e in step):
        return data if data is not None else intervals.initial(levels)
    lv = torch.tensor(levels, dtype=torch.float64)
    if data is None or data.get("ratio") is None:
        state = init_state(1, pred_len, lv, columns)
    else:
        count = torch.tensor(data["count"], dtype=torch.float64)[None]
        scale = torch.tensor(data["scale"], dtype=torch.float64)[None]
        state = IntervalState(
            ratio=torch.tensor(data["ratio"], dtype=torch.float64)[None],
            scale=torch.where(count > 0, scale, torch.full_like(scale, math.nan)),
            count=count,
        )
    for row in abs_errors:
        state = update(state, torch.tensor(row, dtype=torch.float64)[None], lv)
    seen = state.count[0] > 0
    return {
        "levels": levels,
        "ratio": state.ratio[0].tolist(),
        "scale": torch.where(seen, state.scale[0], torch.zeros_like(state.scale[0])).tolist(),
        "count": state.count[0].tolist(),
    }


def test_learn_many_equals_learn_one_by_one() -> None:
    """A bulk request learns every stream's radii in one batched update per row position: the
    same numbers, to the bit, as learning each stream alone (fresh and learned states, other
    levels, fewer rows, rows with no matured error, a stream with none at all)."""
    rng = random.Random(0)
    p, c = PRED_LEN, len(TARGETS)

    def rows(n: int, matured: float) -> list[list[list[float]]]:
        return [
            [
                [rng.expovariate(1.0) if rng.random() < matured else math.nan for _ in range(c)]
                for _ in range(p)
            ]
            for _ in range(n)
        ]

    learned = intervals.initial([0.8, 0.95])
    for _ in range(30):
        learned = _learn_alone(learned, p, c, rows(1, 0.8))
    datas = [None, intervals.initial([0.5]), learned, learned, intervals.initial([0.8, 0.95]), learned]
    errors = [rows(3, 0.7), rows(1, 0.9), rows(2, 0.5), rows(1, 0.0), rows(4, 1.0), rows(0, 1.0)]
    expected = [_learn_alone(d, p, c, e) for d, e in zip(datas, errors, strict=True)]
    first = intervals.learn_many(datas, p, c, errors)
    assert first == expected
    # learned again from its own output (arrays kept in process) or from the output's JSON (a
    # record read back from Redis): the same radii and the same served bounds
    again = intervals.learn_many(first, p, c, errors)
    as_json = [orjson.loads(orjson.dumps(d)) for d in first]
    assert any(type(d) is not dict for d in first) and all(type(d) is dict for d in as_json)
    assert again == intervals.learn_many(as_json, p, c, errors)
    forecast = [[rng.gauss(0, 5) for _ in range(c)] for _ in range(p)]
    for learned_i, read in zip(again, (orjson.loads(orjson.dumps(d)) for d in again), strict=True):
        body = intervals.forecast_body(TARGETS, forecast, [None] * p, learned_i)
        assert orjson.dumps(body) == orjson.dumps(
            intervals.forecast_body(TARGETS, forecast, [None] * p, read)
        )
