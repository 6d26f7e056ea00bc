"""The per-stream combination as the served default, on both stores: the weights GET shows,
what is served with and without it, its state saved with the stream's, and its weights moving
toward the expert that is clearly best on a stream."""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from models.combination import EXPERTS
from tests.service.conftest import PRED_LEN, SEQ_LEN, Api, series
from tests.service.test_streams import expected_forecast, forecast_matrix


def random_walk(n: int, step: float = 3.0, seed: int = 0) -> list[dict[str, Any]]:
    """A random walk with large steps: the last value is the best forecast there is, and a
    model pretrained on smooth seasonal data is far from it."""
    rng = random.Random(seed)
    level = [10.0, 10.0]
    out = []
    for t in range(n):
        level = [v + rng.gauss(0.0, step) for v in level]
        out.append({"timestamp": t, "values": [round(v, 6) for v in level]})
    return out


async def test_get_stream_shows_combination_weights_summing_to_one(api: Api) -> None:
    await api.create("c1", series(SEQ_LEN + PRED_LEN + 6))
    body = (await api.client.get("/v1/streams/c1")).json()
    assert body["combine"] is True
    combination = body["combination"]
    assert combination["experts"] == list(EXPERTS) == ["frozen", "adapted", "last_value"]
    assert math.isclose(sum(combination["weights"].values()), 1.0, abs_tol=1e-5)
    assert [s["step"] for s in combination["steps"]] == list(range(1, PRED_LEN + 1))
    for step in combination["steps"]:
        assert set(step["weights"]) == set(EXPERTS)
        assert math.isclose(sum(step["weights"].values()), 1.0, abs_tol=1e-5)
    assert max(abs(w - 1 / 3) for w in combination["weights"].values()) > 1e-4  # it learned


async def test_create_stream_combine_false_serves_the_adapted_model(api: Api, checkpoint_root: Any) -> None:
    history = series(SEQ_LEN + PRED_LEN + 4)
    rows = [o["values"] for o in history]
    combined = (await api.create("on", history)).json()
    alone = (await api.create("off", history, combine=False)).json()
    assert (combined["combine"], alone["combine"], alone["combination"]) == (True, False, None)
    served_on = forecast_matrix((await api.client.get("/v1/streams/on/forecast")).json())
    served_off = forecast_matrix((await api.client.get("/v1/streams/off/forecast")).json())
    _, want_on = expected_forecast(checkpoint_root / "small", rows, "memory_only", combine=True)
    _, want_off = expected_forecast(checkpoint_root / "small", rows, "memory_only", combine=False)
    torch.testing.assert_close(served_on, want_on, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(served_off, want_off, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(served_on, served_off)  # the control: the setting matters


async def test_combination_state_survives_the_store_and_a_reset_keeps_the_setting(api: Api) -> None:
    """Weights are read back from the stored state (embedded or Redis) after more observations,
    and a reset starts them again uniform without switching the combination off."""
    data = series(SEQ_LEN + PRED_LEN + 10)
    await api.create("c2", data[:SEQ_LEN])
    first = (await api.client.get("/v1/streams/c2")).json()["combination"]["weights"]
    for row in data[SEQ_LEN:]:
        assert (await api.post("c2", [row])).status_code == 200
    later = (await api.client.get("/v1/streams/c2")).json()["combination"]["weights"]
    assert all(math.isclose(w, 1 / 3, abs_tol=1e-6) for w in first.values())
    assert max(abs(later[e] - first[e]) for e in EXPERTS) > 1e-4
    reset = (await api.client.post("/v1/streams/c2/reset")).json()
    assert reset["combine"] is True
    assert all(math.isclose(w, 1 / 3, abs_tol=1e-6) for w in reset["combination"]["weights"].values())
    off = (await api.client.post("/v1/streams/c2/reset", json={"combine": False})).json()
    assert (off["combine"], off["combination"]) == (False, None)


async def test_combination_weights_move_toward_the_best_expert(api: Api) -> None:
    """On a random walk the last value is clearly best: its weight grows at every horizon step
    and, one step ahead, it outweighs the other two together."""
    data = random_walk(SEQ_LEN + 240)  # enough rounds for the default eta to move the weights
    await api.create("walk", data[:SEQ_LEN])
    for row in data[SEQ_LEN:]:
        response = await api.post("walk", [row])
        assert response.status_code == 200
    body = (await api.client.get("/v1/streams/walk")).json()["combination"]
    accuracy = (await api.client.get("/v1/streams/walk/accuracy")).json()["since_creation"]
    assert accuracy["skill"] is not None and accuracy["skill"] < 0.05  # the guard: nothing served beats it
    steps = {s["step"]: s["weights"] for s in body["steps"]}
    assert steps[1]["last_value"] > 0.5, steps[1]
    assert all(w["last_value"] > 1 / 3 for w in steps.values()), steps
    assert body["weights"]["last_value"] == max(body["weights"].values())
