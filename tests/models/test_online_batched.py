"""full_model learning batched over streams (per-stream weights under vmap, one backward pass)
equals learning stream by stream, in float64, for every registered model that batches."""

from __future__ import annotations

import pytest
import torch

from models import (
    ContinualForecaster,
    ModelConfig,
    NeuralMemoryConfig,
    UpdateMode,
    init_stream_state,
    observe,
    observe_many,
)
from models.base import StorePolicy
from models.online import _NO_VMAP, _learn_batched, _learn_one
from tests.models.test_forecaster import COMBOS, PRED, SEQ, assert_states_close, make_model, series

BATCHING = [
    c for c in COMBOS if make_model(*c).vmaps_stream_weights and not make_model(*c).learns_from_gradients
]
LOOPING = [c for c in COMBOS if c not in BATCHING]


def test_the_registry_has_models_of_both_kinds() -> None:
    """Guards the test below: it must cover the default lstm models, and the others loop."""
    assert ("lstm", "titans", "add") in BATCHING and ("transformer", "titans", "add") in LOOPING


@pytest.mark.parametrize("combo", BATCHING, ids=lambda c: "-".join(c))
def test_full_model_batched_learning_equals_looped(combo: tuple[str, str, str]) -> None:
    model = make_model(*combo)
    mode = UpdateMode.FULL_MODEL
    b = 4
    state = init_stream_state(model, b, mode)
    values = series(b, SEQ + PRED + 3)
    for t in range(values.shape[1]):  # different histories, weights and AdamW steps per stream
        state, _ = observe(model, state, values[:, t] * (1 + torch.arange(b)[:, None] / 4), mode)
    inputs, targets = series(b, SEQ, seed=5), series(b, PRED, seed=6)
    mask = torch.tensor([True, False, True, True])
    batched = _learn_batched(model, state, inputs, targets, mask)
    for i in range(b):
        row = state[i : i + 1]
        looped = _learn_one(model, row, inputs[i : i + 1], targets[i : i + 1], mode) if mask[i] else row
        assert_states_close(batched[i : i + 1], looped, atol=1e-10)
    assert not torch.equal(
        batched["params"]["head-weight"][0], state["params"]["head-weight"][0]
    )  # it learned


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_full_model_batched_observe_equals_single_streams(chunk_size: int) -> None:
    """The whole step (learning, storing the newest token, forecasting) with per-stream weights
    under vmap where the memory allows it (chunk_size 1), else stream by stream."""
    torch.manual_seed(0)
    config = ModelConfig(
        seq_len=SEQ,
        pred_len=PRED,
        channels=2,
        d_model=8,
        n_layers=1,
        neural_memory=NeuralMemoryConfig(heads=2, dim_head=4, chunk_size=chunk_size, max_lr=0.5),
        online_lr=1e-2,
    )
    model = ContinualForecaster(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mode = UpdateMode.FULL_MODEL
    values = series(3, SEQ + PRED + 4)
    state, forecast = observe_many(model, init_stream_state(model, 3, mode), values, mode)
    for i in range(3):
        single, f_i = observe_many(model, init_stream_state(model, 1, mode), values[i : i + 1], mode)
        torch.testing.assert_close(forecast[i : i + 1], f_i, atol=1e-10, rtol=0)
        assert_states_close(state[i : i + 1], single, atol=1e-10)
    vmapped = StorePolicy.LAST not in _NO_VMAP.get(model, set())
    assert vmapped == (chunk_size == 1)  # guards the test: both paths were taken
