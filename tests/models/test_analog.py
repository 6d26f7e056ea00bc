"""The memory_only analog mix (``models/analog.py``): the analog forecast is the mean
continuation of the nearest past windows whose future had been observed; it lives in the
stream state and survives a bytes round trip; B streams in one call equal B single calls; each
matured pair is learned from once, with the analog forecast it was served with; delayed
feedback never uses a value not yet observed; ``analog_rows=0`` is memory_only without it."""

from __future__ import annotations

import pytest
import torch

from models import UpdateMode, analog, init_stream_state, observe, observe_many, online
from models.online import ensure_mode
from models.state_io import model_fingerprint, state_from_bytes, state_to_bytes
from tests.models.test_forecaster import (
    CH,
    PRED,
    SEQ,
    assert_ignores_later_values,
    assert_states_close,
    forecasts_one_by_one,
    make_model,
    series,
)

MEMORY_ONLY = UpdateMode.MEMORY_ONLY
ROWS = 64  # a short archive: the oldest rows drop out during the tests
LONG = SEQ + ROWS + 20  # long enough for analog forecasts, learned pairs and a full archive


def test_memory_only_states_carry_an_archive_and_other_modes_do_not() -> None:
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    state = init_stream_state(model, 2, MEMORY_ONLY)
    assert state["analog"]["archive"].shape == (2, CH, ROWS)
    assert state["analog"]["pending"].shape == (2, PRED, PRED, CH)
    assert not bool(analog.beta(state["analog"]).any())  # no evidence: the forecast is unchanged
    assert "analog" not in init_stream_state(model, 2, UpdateMode.NONE).keys()
    off = make_model("lstm", "titans", "add", analog_rows=0)
    assert "analog" not in init_stream_state(off, 2, MEMORY_ONLY).keys()


def test_a_state_saved_without_an_archive_gets_one() -> None:
    """A stream made before the analog mix (here: its state without ``analog``) starts an
    empty archive and serves finite forecasts."""
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    old = init_stream_state(model, 1, MEMORY_ONLY).exclude("analog")
    state = ensure_mode(model, old, MEMORY_ONLY)
    assert "analog" in state.keys() and "analog" not in old.keys()
    state, forecast = observe_many(model, state, series(1, LONG), MEMORY_ONLY)
    assert int(state["analog"]["filled"][0]) == ROWS
    assert torch.isfinite(forecast).all()


def test_analog_forecast_is_the_mean_continuation_of_the_nearest_observed_windows() -> None:
    """Against a loop over every candidate: windows of the archive whose next ``p`` rows are in
    it (the current window's own recent past, whose future is not observed, is no candidate)."""
    torch.manual_seed(0)
    rows, p, c, n = 70, 4, 2, 30
    state = analog.init_state(1, rows, p, c, dtype=torch.float64)
    values = torch.randn(rows, c, dtype=torch.float64).cumsum(0)
    for v in values:
        state = analog.append(state, v[None])
    window = values[-n:][None]
    got, has = analog.forecast(state, window, p)
    key_len = min(analog.KEY_LEN, n)
    key = values[-key_len:]
    candidates = []
    for end in range(key_len - 1, rows - p):  # the future end + 1 .. end + p is observed
        distance = float((values[end - key_len + 1 : end + 1] - key).pow(2).sum())
        candidates.append((distance, end))
    nearest = [end for _, end in sorted(candidates)[: analog.NEIGHBOURS]]
    expected = values[-1] + torch.stack([values[e + 1 : e + p + 1] - values[e] for e in nearest]).mean(0)
    assert bool(has[0])
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-9)


def test_no_analog_forecast_before_enough_rows() -> None:
    state = analog.init_state(1, 200, PRED, CH)
    needed = analog.KEY_LEN + PRED + analog.NEIGHBOURS - 1
    for t in range(needed):
        _, has = analog.forecast(state, torch.zeros(1, 30, CH), PRED)
        assert not bool(has[0]), t
        state = analog.append(state, torch.randn(1, CH))
    assert bool(analog.forecast(state, torch.zeros(1, 30, CH), PRED)[1][0])


def test_analog_rows_zero_is_memory_only_without_it() -> None:
    """With ``analog_rows=0`` the forecasts are the corrected ones alone; with it, they change
    once the stream has analog forecasts and matured evidence."""
    values = series(1, LONG)

    def run(rows: int) -> torch.Tensor:
        return forecasts_one_by_one(
            make_model("lstm", "titans", "add", corrector_lr=0.5, analog_rows=rows), values
        )

    without, with_analog = run(0), run(ROWS)
    first = min(analog.KEY_LEN, SEQ) + PRED + analog.NEIGHBOURS - 1  # the first analog forecast
    same = first + PRED - 1  # its pair matures PRED observations later: beta moves then
    torch.testing.assert_close(with_analog[:same], without[:same], rtol=0, atol=0)
    assert not torch.allclose(with_analog, without)


@pytest.mark.parametrize("outcome_lr", [0.0, 0.03])
def test_batched_streams_equal_single_streams(outcome_lr: float) -> None:
    """Analog mix, corrector and memory together, streams on different scales, a full archive."""
    model = make_model("lstm", "titans", "add", corrector_lr=0.5, outcome_lr=outcome_lr, analog_rows=ROWS)
    values = series(3, LONG) * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)[:, None, None]
    state, forecast = observe_many(model, init_stream_state(model, 3, MEMORY_ONLY), values, MEMORY_ONLY)
    assert bool(state["analog"]["den"].any())  # evidence was learned
    for i in range(3):
        single, f_i = observe_many(
            model, init_stream_state(model, 1, MEMORY_ONLY), values[i : i + 1], MEMORY_ONLY
        )
        torch.testing.assert_close(forecast[i : i + 1], f_i, atol=1e-10, rtol=0)
        assert_states_close(state[i : i + 1], single, atol=1e-10)


def test_streams_with_and_without_an_analog_forecast_in_one_call() -> None:
    """A stream whose archive is still short next to one whose is not: each as alone."""
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    values = series(2, LONG)
    long_state, _ = observe_many(model, init_stream_state(model, 1, MEMORY_ONLY), values[:1], MEMORY_ONLY)
    short_state, _ = observe_many(
        model, init_stream_state(model, 1, MEMORY_ONLY), values[1:, :SEQ], MEMORY_ONLY
    )
    both = torch.cat([long_state, short_state])
    step = series(2, 1, seed=9)
    together, f = observe(model, both, step[:, 0], MEMORY_ONLY)
    for i, alone in enumerate((long_state, short_state)):
        single, f_i = observe(model, alone, step[i : i + 1, 0], MEMORY_ONLY)
        assert f is not None and f_i is not None
        torch.testing.assert_close(f[i : i + 1], f_i, atol=1e-10, rtol=0)
        assert_states_close(together[i : i + 1], single, atol=1e-10)


def test_each_matured_pair_is_learned_from_once_with_its_served_analog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Delayed feedback: one update per completed horizon, with the window that forecast it and
    the analog forecast made then (not one searched again after its target was observed)."""
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    learned: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    made: dict[int, torch.Tensor] = {}
    counts: list[int] = []
    real_update, real_forecast = analog.update, analog.forecast

    def spy_update(state, window, forecast, found, has, target, mask=None):  # type: ignore[no-untyped-def]
        learned.append((counts[-1], window.clone(), found.clone(), target.clone()))
        return real_update(state, window, forecast, found, has, target, mask)

    def spy_forecast(state, window, pred_len):  # type: ignore[no-untyped-def]
        out = real_forecast(state, window, pred_len)
        made[counts[-1]] = out[0].clone()
        return out

    monkeypatch.setattr(analog, "update", spy_update)
    monkeypatch.setattr(analog, "forecast", spy_forecast)
    values = series(1, LONG)
    state = init_stream_state(model, 1, MEMORY_ONLY)
    for t in range(LONG):
        counts.append(t + 1)
        state, _ = observe(model, state, values[:, t], MEMORY_ONLY)
    assert [count for count, *_ in learned] == list(range(SEQ + PRED, LONG + 1))
    for count, window, found, target in learned:
        torch.testing.assert_close(target, values[:, count - PRED : count], rtol=0, atol=0)
        torch.testing.assert_close(window, values[:, count - PRED - SEQ : count - PRED], rtol=0, atol=0)
        torch.testing.assert_close(found, made[count - PRED], rtol=0, atol=0)
    assert len(made) == LONG  # one search per observation: none when a pair is learned


def test_delayed_feedback_never_uses_a_value_not_yet_observed() -> None:
    """Changing the values from step ``t`` on leaves every forecast made before step ``t``
    unchanged, analog mix included; the control shows the change reaches the next one."""
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    assert_ignores_later_values(model, series(1, LONG), cut=LONG - 10)


def test_the_mix_learns_a_useful_analog() -> None:
    """Matured pairs whose analog forecast is exact raise beta toward 1, and the mixed forecast
    of such a pair is closer to its target than the forecast alone; a useless one keeps 0."""
    torch.manual_seed(0)
    state = analog.init_state(1, 50, PRED, CH, dtype=torch.float64)
    window = torch.randn(1, SEQ, CH, dtype=torch.float64)
    forecast = torch.randn(1, PRED, CH, dtype=torch.float64)
    target = forecast + 1.0
    has = torch.tensor([True])
    useless = state
    for _ in range(200):
        state = analog.update(state, window, forecast, target, has, target)
        useless = analog.update(useless, window, forecast, forecast - 1.0, has, target)
    mixed = analog.mix(state, forecast, target, has)
    assert float((mixed - target).pow(2).mean()) < 0.25 * float((forecast - target).pow(2).mean())
    assert not bool(analog.beta(useless).any())
    assert torch.equal(analog.mix(state, forecast, target, torch.tensor([False])), forecast)


def test_state_round_trip_keeps_the_archive() -> None:
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    fp = model_fingerprint(model, model.config.digest())
    values = series(1, LONG + 4)
    state, _ = observe_many(model, init_stream_state(model, 1, MEMORY_ONLY), values[:, :LONG], MEMORY_ONLY)
    loaded, _ = state_from_bytes(state_to_bytes(state, fp), fp)
    assert_states_close(loaded, state, atol=0)
    _, direct = observe_many(model, state, values[:, LONG:], MEMORY_ONLY)
    _, resumed = observe_many(model, loaded, values[:, LONG:], MEMORY_ONLY)
    torch.testing.assert_close(direct, resumed, rtol=0, atol=0)


def test_immediate_feedback_searches_the_pair_again() -> None:
    """``learn`` right after the forecast (immediate feedback) makes the pair's analog forecast
    from the archive as it is: the same as the one served with the forecast."""
    model = make_model("lstm", "titans", "add", analog_rows=ROWS)
    state, _ = observe_many(model, init_stream_state(model, 1, MEMORY_ONLY), series(1, LONG), MEMORY_ONLY)
    inputs = online.window(model, state)
    served = analog.forecast(state["analog"], inputs, PRED)
    target = series(1, PRED, seed=4)
    after = online.learn(model, state, inputs, target, MEMORY_ONLY)
    assert bool(served[1][0])
    assert not torch.equal(after["analog"]["num"], state["analog"]["num"])
