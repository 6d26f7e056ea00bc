"""memory_only learning from outcomes (``models.online.learn_outcome``): it steps only the
stream's own memory weights, batched equals looped, each matured pair is learned from once, it
lowers the loss it learned from, and the seed's pure memory_only (``outcome_lr=0``) stays."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import ContinualForecaster, UpdateMode, init_stream_state, observe, observe_many, online
from models.base import StorePolicy
from models.online import Feedback, _forward, learn, learn_outcome, window
from tests.models.test_forecaster import COMBOS, PRED, SEQ, T, assert_states_close, flat, make_model, series

LEARNING = [c for c in COMBOS if make_model(*c).outcome_paths()]


def _warm(model: ContinualForecaster, b: int) -> object:
    """``b`` streams with different histories and memories (scaled copies of one series)."""
    state = init_stream_state(model, b, UpdateMode.MEMORY_ONLY)
    values = series(b, T) * (1 + torch.arange(b, dtype=torch.float64)[:, None, None] / 4)
    state, _ = observe_many(model, state, values, UpdateMode.MEMORY_ONLY)
    return state


def _outcome_keys(model: ContinualForecaster) -> set[str]:
    """Flattened state keys learning from an outcome may change: the memory weights and their
    pending copy, and the output corrector (``models/corrector.py``)."""
    keys = {".".join(("model", *path)) for path in model.outcome_paths()}
    return keys | {k.replace(".weights.", ".pending.") for k in keys} | {"corrector.weights"}


def test_the_registry_has_memories_that_learn_from_outcomes() -> None:
    """Guards the parametrised tests: the default lstm + titans, the titans backbone and CMS learn."""
    assert ("lstm", "titans", "add") in LEARNING
    assert any(c[0] == "titans" for c in LEARNING) and any(c[1] == "cms" for c in LEARNING)
    assert ("tcn", "fsnet", "add") not in LEARNING  # FSNet adapts from gradients its own way


@pytest.mark.parametrize("combo", LEARNING, ids=lambda c: "-".join(c))
def test_outcome_learning_changes_only_the_memory_weights(combo: tuple[str, str, str]) -> None:
    model = make_model(*combo)
    shared = {k: v.clone() for k, v in model.state_dict().items()}
    state = _warm(model, 1)
    inputs, targets = series(1, SEQ, seed=5), series(1, PRED, seed=6)[..., list(model.config.out_indices)]
    after = learn(model, state, inputs, targets, UpdateMode.MEMORY_ONLY)
    before_leaves, after_leaves = flat(state), flat(after)
    changed = {k for k in before_leaves if not torch.equal(before_leaves[k], after_leaves[k])}
    assert changed, "it learned nothing"
    assert changed <= _outcome_keys(model), changed - _outcome_keys(model)
    for k, v in model.state_dict().items():  # the backbone and every shared weight untouched
        assert torch.equal(v, shared[k]), k


def test_outcome_learning_lowers_the_loss_of_the_pair_it_learned_from() -> None:
    model = make_model("lstm", "titans", "add")
    state = _warm(model, 1)
    inputs, targets = series(1, SEQ, seed=5), series(1, PRED, seed=6) + 1.0  # a clear error to correct

    @torch.no_grad()
    def loss(s: object) -> float:
        forecast, _ = _forward(model, s, inputs, StorePolicy.NONE)  # type: ignore[arg-type]
        return float((forecast - targets).pow(2).mean())

    after = learn_outcome(model, state, inputs, targets)  # type: ignore[arg-type]
    assert loss(after) < loss(state) - 1e-4


@pytest.mark.parametrize("combo", LEARNING, ids=lambda c: "-".join(c))
def test_outcome_learning_batched_equals_looped(combo: tuple[str, str, str]) -> None:
    model = make_model(*combo)
    b = 4
    state = _warm(model, b)
    inputs = series(b, SEQ, seed=5)
    targets = series(b, PRED, seed=6)[..., list(model.config.out_indices)]
    mask = torch.tensor([True, False, True, True])
    batched = learn_outcome(model, state, inputs, targets, mask)  # type: ignore[arg-type]
    for i in range(b):
        row = state[i : i + 1]  # type: ignore[index]
        looped = learn_outcome(model, row, inputs[i : i + 1], targets[i : i + 1]) if mask[i] else row
        assert_states_close(batched[i : i + 1], looped, atol=1e-10)
    key = sorted(_outcome_keys(model) - {"corrector.weights"})[0]
    assert not torch.equal(flat(batched)[key], flat(state)[key])  # type: ignore[arg-type]  # it learned


def test_memory_only_observe_batched_equals_single_streams() -> None:
    """The whole delayed-feedback step with outcome learning, three streams in one call."""
    model = make_model("lstm", "titans", "add")
    mode = UpdateMode.MEMORY_ONLY
    values = series(3, T + 4) * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)[:, None, None]
    state, forecast = observe_many(model, init_stream_state(model, 3, mode), values, mode)
    for i in range(3):
        single, f_i = observe_many(model, init_stream_state(model, 1, mode), values[i : i + 1], mode)
        torch.testing.assert_close(forecast[i : i + 1], f_i, atol=1e-10, rtol=0)
        assert_states_close(state[i : i + 1], single, atol=1e-10)


def test_each_matured_pair_is_learned_from_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delayed feedback: stream i learns once per completed horizon, from the pair whose last
    value just arrived, never before it arrived and never again."""
    model = make_model("lstm", "titans", "add")
    learned: list[tuple[int, torch.Tensor]] = []  # (observations seen, targets learned from)
    real = online._outcome_step

    def spy(model_, state, inputs, targets, mask=None, encoded=None):  # type: ignore[no-untyped-def]
        learned.append((int(state["count"][0]), targets.clone()))
        assert mask is None or bool(mask.all())  # None: every stream learns (observe's all-matured case)
        return real(model_, state, inputs, targets, mask, encoded)

    monkeypatch.setattr(online, "_outcome_step", spy)
    values = series(1, T)
    state = init_stream_state(model, 1, UpdateMode.MEMORY_ONLY)
    for t in range(T):
        state, _ = observe(model, state, values[:, t], UpdateMode.MEMORY_ONLY)
    assert [count for count, _ in learned] == list(range(SEQ + PRED, T + 1))
    for count, targets in learned:  # the horizon that ended with the value just observed
        torch.testing.assert_close(targets, values[:, count - PRED : count], rtol=0, atol=0)


def test_pure_memory_only_never_uses_a_target() -> None:
    """``outcome_lr=0``, ``corrector_lr=0`` and ``analog_rows=0`` is the seed's memory_only: immediate and delayed
    feedback give the same forecasts (no target is ever learned from); with outcome learning
    they differ."""

    def forecasts(outcome_lr: float, feedback: Feedback) -> torch.Tensor:
        model = make_model("lstm", "titans", "add", outcome_lr=outcome_lr, corrector_lr=0.0, analog_rows=0)
        values = series(1, T + 6)
        state = init_stream_state(model, 1, UpdateMode.MEMORY_ONLY)
        out = []
        for t in range(values.shape[1]):
            state, forecast = observe(model, state, values[:, t], UpdateMode.MEMORY_ONLY, feedback)
            if feedback is Feedback.IMMEDIATE and t + 1 >= SEQ and t + 1 + PRED <= values.shape[1]:
                target = values[:, t + 1 : t + 1 + PRED]
                state = learn(model, state, window(model, state), target, UpdateMode.MEMORY_ONLY)
            assert forecast is not None
            out.append(forecast)
        return torch.stack(out)

    pure_delayed, pure_immediate = forecasts(0.0, Feedback.DELAYED), forecasts(0.0, Feedback.IMMEDIATE)
    torch.testing.assert_close(pure_delayed, pure_immediate, rtol=0, atol=0)
    learning_delayed = forecasts(0.5, Feedback.DELAYED)
    assert not torch.allclose(learning_delayed, pure_delayed)  # the control: targets now count
    assert not torch.allclose(learning_delayed, forecasts(0.5, Feedback.IMMEDIATE))


WRITTEN = [c for c in LEARNING if c[1] == "titans" and c[2] == "add" and c[0] != "titans"]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("targets", [None, (1,)])
@pytest.mark.parametrize("combo", WRITTEN, ids=lambda c: "-".join(c))
def test_written_out_outcome_gradient_equals_autograd(
    combo: tuple[str, str, str], targets: tuple[int, ...] | None, depth: int
) -> None:
    """The chain rule the outcome step uses (``ContinualForecaster.outcome_gradient``) gives
    autograd's forecast and per-stream gradients (masked streams: zero), up to float rounding."""
    model = make_model(*combo)
    config = model.config.replace(
        targets=targets, neural_memory=dataclasses.replace(model.config.neural_memory, depth=depth)
    )
    torch.manual_seed(1)
    model = ContinualForecaster(config).double().eval()
    for p in model.parameters():  # a trained-looking model: head and skip away from zero
        p.requires_grad_(False).add_(0.3 * torch.randn_like(p))
    b = 3
    state = _warm(model, b)
    inputs = series(b, SEQ, seed=5)
    target = series(b, PRED, seed=6)[..., list(model.config.out_indices)] + 0.5
    mask = torch.tensor([True, False, True])
    written = model.outcome_gradient(inputs, state["model"], target, mask)  # type: ignore[index]
    assert written is not None, "the default memory's gradient is written out"
    reference = online._outcome_gradient(model, state, inputs, target, mask)  # type: ignore[arg-type]
    torch.testing.assert_close(written[0], reference[0])
    assert written[1].keys() == reference[1].keys()
    for path, grad in reference[1].items():
        assert grad.abs().sum() > 0, path
        torch.testing.assert_close(written[1][path], grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(written[1][path][1], torch.zeros_like(grad[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [0.01, 10.0], ids=["within", "clipped"])
def test_one_stream_clipped_steps_equal_the_batched_ones(dtype: torch.dtype, size: float) -> None:
    """One stream's outcome step is scaled with Python floats (``_clipped_steps``), batches of
    streams with tensors: the same numbers bit for bit, whether the clip binds or not."""
    torch.manual_seed(2)
    grads = {("a",): size * torch.randn(2, 3, 4, dtype=dtype), ("b",): size * torch.randn(2, 5, dtype=dtype)}
    batched = online._clipped_steps(grads, 1.0, -0.03)  # two streams: the tensor path
    for i in range(2):
        alone = online._clipped_steps({k: g[i : i + 1] for k, g in grads.items()}, 1.0, -0.03)
        for k, g in batched.items():
            assert torch.equal(alone[k], g[i : i + 1]), (k, i)
    norms = torch.linalg.vector_norm(torch.cat([g.flatten(1) for g in grads.values()], 1), dim=1)
    assert bool((norms > 1.0).all()) == (size > 1.0)  # the clip binds in the "clipped" case only
