"""Properties of the forecaster and the online step functions, for every registered model.

All in float64 with weights randomised away from the zero-initialised head, so that every
component influences the forecast and a leak between streams or observations shows.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from models import (
    ConfigError,
    ContinualForecaster,
    FingerprintMismatchError,
    ModelConfig,
    NeuralMemoryConfig,
    UpdateMode,
    init_stream_state,
    model_fingerprint,
    observe,
    observe_many,
    predict,
    state_from_bytes,
    state_to_bytes,
)
from models.base import StorePolicy
from models.registry import supported_combinations

COMBOS = list(supported_combinations())
MODES = list(UpdateMode)
SEQ, PRED, CH = 8, 3, 2


def make_model(backbone: str, memory: str, fusion: str, seed: int = 0, **overrides) -> ContinualForecaster:
    torch.manual_seed(seed)
    config = ModelConfig(
        seq_len=SEQ,
        pred_len=PRED,
        channels=CH,
        backbone=backbone,
        memory=memory,
        fusion=fusion,
        d_model=8,
        n_layers=1,
        n_heads=2,
        neural_memory=NeuralMemoryConfig(heads=2, dim_head=4, chunk_size=2, max_lr=0.5),
        online_lr=1e-2,
        **overrides,
    )
    model = ContinualForecaster(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def series(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(t, dtype=torch.float64)
    seasonal = torch.sin(steps / 3.0)[None, :, None]
    return seasonal + 0.3 * torch.randn(b, t, CH, generator=g, dtype=torch.float64)


def forecasts_one_by_one(
    model: ContinualForecaster, values: torch.Tensor, mode: UpdateMode = UpdateMode.MEMORY_ONLY
) -> torch.Tensor:
    """Every forecast ``[t, b, p, c]`` of fresh streams fed ``values [b, t, c]`` one observation
    at a time."""
    state = init_stream_state(model, values.shape[0], mode)
    out = []
    for t in range(values.shape[1]):
        state, forecast = observe(model, state, values[:, t], mode)
        assert forecast is not None
        out.append(forecast)
    return torch.stack(out)


def assert_ignores_later_values(model: ContinualForecaster, values: torch.Tensor, cut: int) -> None:
    """Changing the values from step ``cut`` on leaves every forecast made before it unchanged
    (delayed feedback never uses a value not yet observed); the control shows the change
    reaches the next one."""
    changed = values.clone()
    changed[:, cut:] += 5.0
    a, b = forecasts_one_by_one(model, values), forecasts_one_by_one(model, changed)
    torch.testing.assert_close(a[:cut], b[:cut], rtol=0, atol=0)
    assert not torch.allclose(a[cut], b[cut])


def flat(state: TensorDict) -> dict[str, torch.Tensor]:
    return dict(state.flatten_keys(".").items())


def assert_states_close(a: TensorDict, b: TensorDict, atol: float = 1e-6) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        torch.testing.assert_close(fa[key], fb[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


T = SEQ + PRED + 5  # long enough to fill the window, learn from matured pairs and store tokens


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_batched_streams_equal_single_stream_calls(combo, mode):
    model = make_model(*combo)
    values = series(3, T)
    state, forecast = observe_many(model, init_stream_state(model, 3, mode), values, mode)
    for i in range(3):
        single, f_i = observe_many(model, init_stream_state(model, 1, mode), values[i : i + 1], mode)
        torch.testing.assert_close(forecast[i : i + 1], f_i, atol=1e-6, rtol=0)
        assert_states_close(state[i : i + 1], single)


@pytest.mark.parametrize("mode", [UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL], ids=lambda m: m.value)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_grouping_of_observations_does_not_change_state(combo, mode):
    """Each observation is learned from exactly once, however requests group them; the
    state survives a bytes round trip between requests."""
    model = make_model(*combo)
    fp = model_fingerprint(model, model.config.digest())
    values = series(1, T)
    whole, f_whole = observe_many(model, init_stream_state(model, 1, mode), values, mode)
    state = init_stream_state(model, 1, mode)
    for chunk in torch.split(values, [1, 6, 4, T - 11], dim=1):
        state, f_split = observe_many(model, state, chunk, mode)
        state, _ = state_from_bytes(state_to_bytes(state, fp), fp)
    torch.testing.assert_close(f_split, f_whole, atol=1e-6, rtol=0)
    assert_states_close(state, whole)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_modules_hold_only_shared_parameters(combo):
    model = make_model(*combo)
    before_dict = {name: dict(vars(m)) for name, m in model.named_modules()}
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in MODES:
        state, _ = observe_many(model, init_stream_state(model, 2, mode), series(2, T), mode)
        assert state.batch_size == torch.Size([2])
        for key, value in flat(state).items():
            assert value.shape[0] == 2, f"{key} has no leading stream dimension"
    for name, m in model.named_modules():
        assert vars(m).keys() == before_dict[name].keys(), f"attributes added to {name or 'model'}"
        for attr in ("_parameters", "_buffers"):
            assert vars(m)[attr].keys() == before_dict[name][attr].keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_weights[key]), f"shared weight {key} changed"


@pytest.mark.parametrize("mode", [UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL], ids=lambda m: m.value)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_updating_one_stream_leaves_another_unchanged(combo, mode):
    model = make_model(*combo)
    values = series(2, T)
    state, _ = observe_many(model, init_stream_state(model, 2, mode), values, mode)
    b_before = predict(model, state)[1:2]
    a = state[0:1]
    for k in range(PRED + 2):
        a, _ = observe(model, a, values[0, k % T][None] * 3.0, mode)
    state = torch.cat([a, state[1:2]])
    assert torch.equal(predict(model, state)[1:2], b_before)
    assert not torch.equal(flat(state[0:1])["history"], flat(state[1:2])["history"])


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_learning_modes_change_the_forecast_and_none_does_not_learn(combo):
    """Without the output corrector (``corrector_lr=0``, no analog mix either) memory_only learns
    only where there is a memory; with it (the default) every memory_only stream learns from
    matured pairs."""
    values = series(1, T)
    for corrector_lr in (0.0, 0.5):
        model = make_model(*combo, corrector_lr=corrector_lr, analog_rows=0)
        forecasts = {}
        for mode in MODES:
            _, forecasts[mode] = observe_many(model, init_stream_state(model, 1, mode), values, mode)
        assert torch.isfinite(forecasts[UpdateMode.NONE]).all()
        learns = corrector_lr > 0 or combo[1] != "none" or combo[0] == "titans" and combo[1] == "titans"
        assert not torch.allclose(forecasts[UpdateMode.FULL_MODEL], forecasts[UpdateMode.NONE])
        if learns:
            assert not torch.allclose(forecasts[UpdateMode.MEMORY_ONLY], forecasts[UpdateMode.NONE])
        else:
            assert torch.equal(forecasts[UpdateMode.MEMORY_ONLY], forecasts[UpdateMode.NONE])


def test_state_round_trip_is_bit_exact_and_pickle_free():
    model = make_model("lstm", "titans", "gated")
    fp = model_fingerprint(model, model.config.digest())
    state, _ = observe_many(
        model, init_stream_state(model, 2, UpdateMode.FULL_MODEL), series(2, T), UpdateMode.FULL_MODEL
    )
    blob = state_to_bytes(state, fp, {"stream": "a"})
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])  # safetensors: a JSON header, then raw tensor bytes
    assert header["__metadata__"]["memcast.schema"] == "2"
    assert header["__metadata__"]["memcast.fingerprint"] == fp
    restored, meta = state_from_bytes(blob, fp)
    assert meta == {"stream": "a"}
    fa, fb = flat(state), flat(restored)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and torch.equal(fa[key], fb[key]), key
    assert torch.equal(predict(model, state), predict(model, restored))


def test_state_from_another_model_is_refused():
    model, other = make_model("lstm", "titans", "add", seed=0), make_model("lstm", "titans", "add", seed=1)
    fp, other_fp = (model_fingerprint(m, m.config.digest()) for m in (model, other))
    assert fp != other_fp
    blob = state_to_bytes(init_stream_state(model, 1), fp)
    with pytest.raises(FingerprintMismatchError, match="reset the stream"):
        state_from_bytes(blob, other_fp)


def test_untrained_forecaster_forecasts_the_last_value():
    """Zero-initialised head and skip: a fresh model is the last-value baseline."""
    model = ContinualForecaster(ModelConfig(seq_len=SEQ, pred_len=PRED, channels=CH)).double()
    state, forecast = observe_many(
        model, init_stream_state(model, 1, UpdateMode.NONE), series(1, SEQ), UpdateMode.NONE
    )
    torch.testing.assert_close(forecast, state["history"][:, -1:].expand(1, PRED, CH))


def test_no_cuda_calls_or_debuggers_in_the_code():
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path)
        for package in ("models", "trainer", "service", "memcast")
        for path in (root / package).rglob("*.py")
        if any(bad in path.read_text() for bad in (".cuda(", "pdb.set_trace", "breakpoint()"))
    ]
    assert offenders == []


def test_combinations_follow_what_components_declare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which memory and fusion a backbone takes is read from its class, not from its name: a
    backbone declared like the titans one is treated like it."""
    from models import registry
    from models.backbones import LSTMBackbone

    class SelfContained(LSTMBackbone):
        integrated_memories = ("titans",)
        fuses_integrated_memory = True
        takes_side_memory = False
        fusions = ("gated",)

    monkeypatch.setitem(registry.BACKBONE_CLASSES, "lstm", SelfContained)
    with pytest.raises(ConfigError, match="memory 'cms' does not work with backbone 'lstm'"):
        ModelConfig(backbone="lstm", memory="cms")
    with pytest.raises(ConfigError, match="fusion 'add' does not work"):
        ModelConfig(backbone="lstm", memory="titans", fusion="add")
    config = ModelConfig(backbone="lstm", memory="titans", fusion="gated")
    assert registry.build_memory(config) is None  # built inside the backbone, not beside it


@pytest.mark.parametrize("store", [StorePolicy.LAST, StorePolicy.NONE])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_forward_and_frozen_equals_two_forward_passes(
    combo: tuple[str, str, str], store: StorePolicy
) -> None:
    """The combination's frozen expert computed beside the adapted forecast (the backbone run
    once when it keeps no state) is the forward pass from a fresh state, and the adapted forecast
    and next state are ``forward``'s."""
    model = make_model(*combo)
    x = series(3, 3 * SEQ)
    state = model.init_state(3, dtype=torch.float64)
    with torch.no_grad():
        for j in range(2 * SEQ):  # a stream state that has learned something
            _, state = model(x[:, j : j + SEQ], state, StorePolicy.LAST)
        window = x[:, 2 * SEQ : 3 * SEQ]
        forecast, next_state, frozen = model.forward_and_frozen(window, state, store)
        expected, expected_state = model(window, state, store)
        expected_frozen, _ = model(window, model.init_state(3, dtype=torch.float64), StorePolicy.NONE)
    torch.testing.assert_close(forecast, expected, rtol=0, atol=0)
    torch.testing.assert_close(frozen, expected_frozen, rtol=0, atol=0)
    assert_states_close(next_state, expected_state)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_windows_encoded_together_forecast_as_each_alone(combo: tuple[str, str, str]) -> None:
    """``encode_together`` (one backbone pass over the matured pair's window and the newest,
    ``models.online.observe``) gives each window's forecast and next state, up to float rounding;
    a backbone with per-stream state declines (None)."""
    model = make_model(*combo)
    x = series(3, 2 * SEQ)
    state = model.init_state(3, dtype=torch.float64)
    with torch.no_grad():
        for j in range(SEQ):
            _, state = model(x[:, j : j + SEQ], state, StorePolicy.LAST)
        windows = [x[:, 1 : 1 + SEQ], x[:, SEQ:]]
        encoded = model.encode_together(windows, state)
        if encoded is None:
            assert model.init_state(1).get("backbone").keys(), "a backbone without state shares its pass"
            return
        for window, enc in zip(windows, encoded, strict=True):
            for store in (StorePolicy.NONE, StorePolicy.LAST):
                forecast, next_state = model(window, state, store, enc)
                expected, expected_state = model(window, state, store)
                torch.testing.assert_close(forecast, expected, rtol=0, atol=1e-9)
                assert_states_close(next_state, expected_state, atol=1e-9)
