"""Online steps run under ``torch.inference_mode`` where they take no gradient by autograd
(``models.online.needs_autograd``): the forecasts and states are those of ``torch.no_grad``,
and a state made that way still learns by autograd later in the same process (a stream that
changes to full_model without a bytes round trip)."""

from __future__ import annotations

import pytest
import torch

from models import UpdateMode, init_stream_state, observe_many, online
from models.online import needs_autograd
from models.state_io import model_fingerprint, state_from_bytes, state_to_bytes
from tests.models.test_forecaster import T, assert_states_close, make_model, series

MEMORY_ONLY, FULL_MODEL, NONE = UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL, UpdateMode.NONE


def test_which_steps_need_autograd() -> None:
    titans = make_model("lstm", "titans", "add")
    state = init_stream_state(titans, 1, MEMORY_ONLY)
    assert not needs_autograd(titans, state, NONE)
    assert not needs_autograd(titans, state, MEMORY_ONLY)  # its outcome gradient is written out
    assert needs_autograd(titans, state, FULL_MODEL)
    assert needs_autograd(titans, init_stream_state(titans, 1, FULL_MODEL), NONE)  # its own weights
    concat = make_model("lstm", "titans", "concat")  # the outcome gradient goes through autograd
    assert needs_autograd(concat, init_stream_state(concat, 1, MEMORY_ONLY), MEMORY_ONLY)
    fsnet = make_model("tcn", "fsnet", "add")
    assert needs_autograd(fsnet, init_stream_state(fsnet, 1, MEMORY_ONLY), MEMORY_ONLY)


@pytest.mark.parametrize("mode", [NONE, MEMORY_ONLY], ids=lambda m: m.value)
def test_inference_mode_steps_equal_no_grad_steps(mode: UpdateMode, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("lstm", "titans", "add")
    values = series(2, T + 4)
    fast_state, fast = observe_many(model, init_stream_state(model, 2, mode, combine=True), values, mode)
    assert fast_state["history"].is_inference()
    monkeypatch.setattr(online, "needs_autograd", lambda *_: True)  # every step under no_grad
    slow_state, slow = observe_many(model, init_stream_state(model, 2, mode, combine=True), values, mode)
    assert not slow_state["history"].is_inference()
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    assert_states_close(fast_state, slow_state, atol=0)


def test_a_state_made_under_inference_mode_learns_full_model_in_process() -> None:
    """A memory_only stream switched to full_model in the same process learns as it does after
    a bytes round trip (which makes ordinary tensors)."""
    model = make_model("lstm", "titans", "add")
    fp = model_fingerprint(model, model.config.digest())
    values = series(1, T + 6)
    state, _ = observe_many(model, init_stream_state(model, 1, MEMORY_ONLY), values[:, :T], MEMORY_ONLY)
    assert state["model"]["memory"]["weights"]["w0"].is_inference()
    reloaded, _ = state_from_bytes(state_to_bytes(state, fp), fp)
    direct, direct_forecast = observe_many(model, state, values[:, T:], FULL_MODEL)
    loaded, loaded_forecast = observe_many(model, reloaded, values[:, T:], FULL_MODEL)
    torch.testing.assert_close(direct_forecast, loaded_forecast, rtol=0, atol=0)
    assert_states_close(direct, loaded, atol=0)
    assert int(direct["opt"]["step"][0]) > 0  # it took AdamW steps on its own weights


def test_step_functions_take_their_arguments_by_keyword_too() -> None:
    model = make_model("lstm", "titans", "add")
    state = init_stream_state(model, 1, MEMORY_ONLY)
    values = series(1, 1)[:, 0]
    by_position, forecast = online.observe(model, state, values, MEMORY_ONLY)
    by_keyword, same = online.observe(model=model, state=state, values=values, mode=MEMORY_ONLY)
    assert forecast is not None and same is not None
    torch.testing.assert_close(forecast, same, rtol=0, atol=0)
    assert by_keyword["history"].is_inference()
