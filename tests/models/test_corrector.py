"""The memory_only output corrector (``models/corrector.py``): it lives in the stream state and
survives a bytes round trip, B streams in one call equal B single calls, each matured pair is
learned from once, delayed feedback never uses a value not yet observed, it lowers the error it
learns from, and ``corrector_lr=0`` is memory_only without it. Its known-value term reads a
revealed horizon at the right target times, only under immediate feedback."""

from __future__ import annotations

import pytest
import torch

from models import UpdateMode, corrector, init_stream_state, observe, observe_many, online
from models.online import ensure_mode, learns_from_targets
from models.state_io import model_fingerprint, state_from_bytes, state_to_bytes
from tests.models.test_forecaster import (
    PRED,
    SEQ,
    T,
    assert_ignores_later_values,
    assert_states_close,
    forecasts_one_by_one,
    make_model,
    series,
)

MEMORY_ONLY = UpdateMode.MEMORY_ONLY


def test_memory_only_states_carry_a_corrector_and_other_modes_do_not() -> None:
    model = make_model("lstm", "titans", "add")
    state = init_stream_state(model, 2, MEMORY_ONLY)
    assert state["corrector"]["weights"].shape == (2, SEQ + 1 + PRED, PRED)
    assert not bool(state["corrector"]["weights"].any())  # no correction until a pair matured
    assert "corrector" not in init_stream_state(model, 2, UpdateMode.NONE).keys()
    off = make_model("lstm", "titans", "add", corrector_lr=0.0)
    assert "corrector" not in init_stream_state(off, 2, MEMORY_ONLY).keys()


def test_a_state_saved_without_a_corrector_gets_one() -> None:
    """A stream made before the corrector (or in mode none) starts one with no correction."""
    model = make_model("lstm", "titans", "add")
    old = init_stream_state(model, 1, UpdateMode.NONE)
    state = ensure_mode(model, old, MEMORY_ONLY)
    assert "corrector" in state.keys() and "corrector" not in old.keys()
    state, forecast = observe_many(model, state, series(1, T), MEMORY_ONLY)
    assert torch.isfinite(forecast).all()


def test_corrector_lr_zero_is_memory_only_without_it() -> None:
    """With ``corrector_lr=0`` the forecasts are those of the forecaster's memory alone; with
    it, the corrector changes them once pairs have matured."""
    values = series(1, T + 6)

    without = forecasts_one_by_one(make_model("lstm", "titans", "add", corrector_lr=0.0), values)
    with_corrector = forecasts_one_by_one(make_model("lstm", "titans", "add", corrector_lr=0.5), values)
    matured = SEQ + PRED  # the first forecast after the first matured pair
    torch.testing.assert_close(with_corrector[: matured - 1], without[: matured - 1], rtol=0, atol=0)
    assert not torch.allclose(with_corrector[matured:], without[matured:])
    assert not learns_from_targets(
        make_model("lstm", "titans", "add", corrector_lr=0.0, outcome_lr=0.0, analog_rows=0), MEMORY_ONLY
    )
    assert learns_from_targets(make_model("lstm", "titans", "add", outcome_lr=0.0), MEMORY_ONLY)


@pytest.mark.parametrize("outcome_lr", [0.0, 0.03])
def test_batched_streams_equal_single_streams(outcome_lr: float) -> None:
    """Corrector and memory together (``outcome_lr`` 0: the corrector computes its own forecast
    of the matured window; 0.03: it reuses the outcome step's), streams of different lengths."""
    model = make_model("lstm", "titans", "add", corrector_lr=0.5, outcome_lr=outcome_lr)
    values = series(3, T + 4) * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)[:, None, None]
    state, forecast = observe_many(model, init_stream_state(model, 3, MEMORY_ONLY), values, MEMORY_ONLY)
    assert bool(state["corrector"]["weights"].any())
    for i in range(3):
        single, f_i = observe_many(
            model, init_stream_state(model, 1, MEMORY_ONLY), values[i : i + 1], MEMORY_ONLY
        )
        torch.testing.assert_close(forecast[i : i + 1], f_i, atol=1e-10, rtol=0)
        assert_states_close(state[i : i + 1], single, atol=1e-10)


def test_masked_streams_keep_their_corrector() -> None:
    model = make_model("lstm", "titans", "add", corrector_lr=0.5)
    state = init_stream_state(model, 2, MEMORY_ONLY)
    state, _ = observe_many(model, state, series(2, T), MEMORY_ONLY)
    inputs, targets = series(2, SEQ, seed=5), series(2, PRED, seed=6) + 1.0
    mask = torch.tensor([True, False])
    after = online.learn(model, state, inputs, targets, MEMORY_ONLY, mask=mask)
    w0, w1 = state["corrector"]["weights"], after["corrector"]["weights"]
    assert not torch.equal(w1[0], w0[0])
    assert torch.equal(w1[1], w0[1])


def test_each_matured_pair_is_learned_from_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delayed feedback: the corrector learns once per completed horizon, from the pair whose
    last value just arrived, with the window that forecast it; never before, never again."""
    model = make_model("lstm", "titans", "add")
    learned: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    real = corrector.update
    counts: list[int] = []

    def spy(state, window, forecast, target, lr, mask=None, *rest):  # type: ignore[no-untyped-def]
        learned.append((counts[-1], window.clone(), target.clone()))
        return real(state, window, forecast, target, lr, mask, *rest)

    monkeypatch.setattr(corrector, "update", spy)
    values = series(1, T)
    state = init_stream_state(model, 1, MEMORY_ONLY)
    for t in range(T):
        counts.append(t + 1)
        state, _ = observe(model, state, values[:, t], MEMORY_ONLY)
    assert [count for count, _, _ in learned] == list(range(SEQ + PRED, T + 1))
    for count, window, target in learned:
        torch.testing.assert_close(target, values[:, count - PRED : count], rtol=0, atol=0)
        torch.testing.assert_close(window, values[:, count - PRED - SEQ : count - PRED], rtol=0, atol=0)


def test_delayed_feedback_never_uses_a_value_not_yet_observed() -> None:
    """Changing the values from step ``t`` on leaves every forecast made before step ``t``
    unchanged, corrector included (a forecast made after value ``t - 1`` cannot depend on ``t``)."""
    model = make_model("lstm", "titans", "add", corrector_lr=0.5)
    assert_ignores_later_values(model, series(1, T + 8), cut=SEQ + PRED + 3)


def test_corrector_lowers_the_error_it_learns_from() -> None:
    """A stream whose forecasts are off by a steady offset: after some matured pairs the
    corrected forecast of a pair is closer to its target than the forecaster's own."""
    torch.manual_seed(0)
    state = corrector.init_state(1, SEQ, PRED, dtype=torch.float64)
    window = torch.randn(1, SEQ, 2, dtype=torch.float64)
    forecast = torch.randn(1, PRED, 2, dtype=torch.float64)
    target = forecast + 0.7
    before = (corrector.correct(state, window, forecast) - target).pow(2).mean()
    for _ in range(20):
        state = corrector.update(state, window, forecast, target, lr=0.5)
    after = (corrector.correct(state, window, forecast) - target).pow(2).mean()
    assert float(after) < 0.01 * float(before)


def test_state_round_trip_keeps_the_corrector() -> None:
    model = make_model("lstm", "titans", "add", corrector_lr=0.5)
    fp = model_fingerprint(model, model.config.digest())
    values = series(1, T + 4)
    state, _ = observe_many(model, init_stream_state(model, 1, MEMORY_ONLY), values[:, :T], MEMORY_ONLY)
    loaded, _ = state_from_bytes(state_to_bytes(state, fp), fp)
    assert torch.equal(loaded["corrector"]["weights"], state["corrector"]["weights"])
    _, direct = observe_many(model, state, values[:, T:], MEMORY_ONLY)
    _, resumed = observe_many(model, loaded, values[:, T:], MEMORY_ONLY)
    torch.testing.assert_close(direct, resumed, rtol=0, atol=0)


def immediate_forecasts(model: online.ContinualForecaster, values: torch.Tensor) -> torch.Tensor:
    """Every forecast ``[t, b, p, c]`` of fresh streams under immediate feedback: each full
    window's forecast is followed at once by learning its pair, the horizon revealed."""
    b, steps = values.shape[0], values.shape[1] - PRED
    state = init_stream_state(model, b, MEMORY_ONLY)
    state, forecast = observe_many(model, state, values[:, :SEQ], MEMORY_ONLY, online.Feedback.IMMEDIATE)
    out = [forecast]
    for t in range(SEQ, steps):
        horizon = values[:, t : t + PRED]
        state = online.learn(model, state, values[:, t - SEQ : t], horizon, MEMORY_ONLY, ahead=True)
        state, forecast = online.observe(model, state, values[:, t], MEMORY_ONLY, online.Feedback.IMMEDIATE)
        assert forecast is not None
        out.append(forecast)
    return torch.stack(out)


def test_known_values_are_read_at_the_forecasts_own_target_times() -> None:
    """A horizon revealed after a forecast made at count ``o`` holds the values at counts ``o + 1
    .. o + p``: a forecast made at ``o + d`` compares its first ``p - d`` steps with entries ``d
    ..`` (zero past the end); the forecast it came from, and every forecast from ``o + p`` on,
    know none."""
    torch.manual_seed(0)
    state = corrector.init_state(1, SEQ, PRED, dtype=torch.float64)
    window, forecast = (
        torch.randn(1, SEQ, 2, dtype=torch.float64),
        torch.randn(1, PRED, 2, dtype=torch.float64),
    )
    target = torch.randn(1, PRED, 2, dtype=torch.float64)
    origin = torch.tensor([10])
    state = corrector.update(state, window, forecast, target, 0.5, at=origin, ahead=True, known_lr=0.1)
    revealed = target.transpose(1, 2)  # [1, c, p]
    later = torch.randn(1, 2, PRED, dtype=torch.float64)  # a later forecast, [b, c, p]
    std = torch.full((1, 2), 2.0, dtype=torch.float64)
    for d in range(1, PRED):
        expected = torch.zeros(1, 2, PRED, dtype=torch.float64)
        expected[..., : PRED - d] = (revealed[..., d:] - later[..., : PRED - d]) / 2.0
        torch.testing.assert_close(
            corrector.known_gaps(state, origin + d, later, std), expected, rtol=0, atol=0
        )
    assert corrector.known_gaps(state, origin, later, std) is None
    assert corrector.known_gaps(state, origin + PRED, later, std) is None
    assert corrector.known_gaps(state, None, later, std) is None


def test_delayed_feedback_never_knows_a_value_in_advance() -> None:
    """The service's regime: no target time of a forecast is known before the stream observes
    it, so states carry no known-value parts and forecasts are those with ``known_lr=0`` bit
    for bit."""
    values = series(2, T + 6)
    on = make_model("lstm", "titans", "add", corrector_lr=0.5, known_lr=0.5)
    off = make_model("lstm", "titans", "add", corrector_lr=0.5, known_lr=0.0)
    torch.testing.assert_close(
        forecasts_one_by_one(on, values), forecasts_one_by_one(off, values), rtol=0, atol=0
    )
    state, _ = observe_many(on, init_stream_state(on, 2, MEMORY_ONLY), values, MEMORY_ONLY)
    assert set(state["corrector"].keys()) == {"weights"}


def test_immediate_feedback_learns_from_the_revealed_horizon() -> None:
    """Learned right after its forecast, a pair's horizon overlaps the next forecasts' target
    times: with the known-value term the forecasts come much closer to their targets than
    without it, and changing a value changes no forecast made before it was revealed."""
    values = series(1, 80)
    targets = torch.stack([values[:, t + 1 : t + 1 + PRED] for t in range(SEQ - 1, 80 - PRED)])
    on = make_model("lstm", "titans", "add", known_lr=0.5)
    off = make_model("lstm", "titans", "add", known_lr=0.0)
    with_known, without = immediate_forecasts(on, values), immediate_forecasts(off, values)
    late = slice(30, None)  # once the term has learned from a few dozen pairs
    error_on = (with_known[late] - targets[late]).pow(2).mean()
    error_off = (without[late] - targets[late]).pow(2).mean()
    assert float(error_on) < 0.5 * float(error_off)
    cut = 40
    changed = values.clone()
    changed[:, cut:] += 5.0
    # forecast i is made after value SEQ - 1 + i; value cut is revealed with the horizon of the
    # one made after value cut - PRED, so every forecast up to that one ignores it
    before = cut - PRED - SEQ + 2
    after_change = immediate_forecasts(on, changed)
    torch.testing.assert_close(after_change[:before], with_known[:before], rtol=0, atol=0)
    assert not torch.allclose(after_change[before], with_known[before])


def test_immediate_feedback_batched_streams_equal_single_streams() -> None:
    model = make_model("lstm", "titans", "add", known_lr=0.5)
    values = series(3, 40) * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)[:, None, None]
    together = immediate_forecasts(model, values)
    for i in range(3):
        alone = immediate_forecasts(model, values[i : i + 1])
        torch.testing.assert_close(together[:, i : i + 1], alone, atol=1e-10, rtol=0)


def test_state_round_trip_keeps_the_known_values() -> None:
    model = make_model("lstm", "titans", "add", known_lr=0.5)
    fp = model_fingerprint(model, model.config.digest())
    values = series(1, 30)
    state = init_stream_state(model, 1, MEMORY_ONLY)
    state, _ = observe_many(model, state, values[:, :SEQ], MEMORY_ONLY, online.Feedback.IMMEDIATE)
    state = online.learn(model, state, values[:, :SEQ], values[:, SEQ : SEQ + PRED], MEMORY_ONLY, ahead=True)
    loaded, _ = state_from_bytes(state_to_bytes(state, fp), fp)
    assert {"known", "revealed", "origin", "has_revealed"} <= set(loaded["corrector"].keys())
    assert_states_close(loaded, state, atol=0)
