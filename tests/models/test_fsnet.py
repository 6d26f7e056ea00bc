"""FSNet adaptive convolution and the TCN backbone: retrieval, trigger, EMAs, purity, causality.

Everything runs in float64 on tiny shapes (d_model 4) so tolerances can be tight.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models import ContinualForecaster, fsnet
from models.base import StorePolicy
from models.config import FSNetConfig, ModelConfig
from models.fsnet import FSNetConv, read_memory
from models.online import UpdateMode, init_stream_state, learn, observe, predict
from models.tcn import LastPlan, TCNBackbone

D, K, N = 4, 3, 16
CFG = FSNetConfig()


def _config(memory: str = "fsnet", **changes: object) -> ModelConfig:
    return ModelConfig(
        backbone="tcn", memory=memory, d_model=D, n_layers=2, kernel_size=K, seq_len=N, **changes
    )


def _randomise_controller(module: nn.Module, seed: int = 0) -> None:
    """The head starts at zero (identity calibration); give it weights so calibration varies."""
    gen = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, FSNetConv):
            with torch.no_grad():
                layer.head.weight.copy_(torch.randn(layer.head.weight.shape, generator=gen) * 0.3)
                layer.head.bias.copy_(torch.randn(layer.head.bias.shape, generator=gen) * 0.3)


def _backbone(memory: str = "fsnet", seed: int = 0) -> TCNBackbone:
    torch.manual_seed(seed)
    model = TCNBackbone(_config(memory)).double()
    _randomise_controller(model, seed)
    return model


def _random_state(model: TCNBackbone, batch: int, seed: int = 1) -> TensorDict:
    """A lived-in state: random EMAs, queries and memories; triggers alternate per stream."""
    gen = torch.Generator().manual_seed(seed)
    state = model.init_state(batch, dtype=torch.float64)
    for name in model.layer_paths:
        layer_state = state[name]
        for key in ("grad_long", "grad_short", "q_ema", "memory"):
            if key in layer_state.keys():
                layer_state[key] = torch.randn(layer_state[key].shape, generator=gen, dtype=torch.float64)
        layer_state["trigger"] = torch.arange(batch) % 2 == 0
    return state


def _clone_leaves(state: TensorDict) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in state.flatten_keys(".").items()}


def _assert_leaves_equal(state: TensorDict, expected: dict[str, Tensor]) -> None:
    leaves = state.flatten_keys(".")
    assert set(leaves.keys()) == set(expected)
    for key, value in expected.items():
        assert torch.equal(leaves[key], value), key


def _weight_grads(model: TCNBackbone, x: Tensor, state: TensorDict) -> dict[str, Tensor]:
    """Gradients of a toy loss, keyed by parameter name (the adapt contract)."""
    named = dict(model.named_parameters())
    features, _ = model(x, state, StorePolicy.NONE)
    grads = torch.autograd.grad(features.pow(2).mean(), list(named.values()))
    return dict(zip(named, grads, strict=True))


# ---------------------------------------------------------------- 1. corrected retrieval


def test_read_memory_weights_topk_slots_by_attention_values() -> None:
    memory = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
    query = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    # scores / temperature 0.5 = [1, 2, 5, 4]: the top-2 slots are 2 and 3
    total = sum(math.exp(s) for s in (1.0, 2.0, 5.0, 4.0))
    a2, a3 = math.exp(5.0) / total, math.exp(4.0) / total
    by_value = torch.tensor([[a2 * 2.0 + a3 * 1.0, a2 * 1.0 + a3 * 2.0]], dtype=torch.float64)
    by_index = torch.tensor([[2 * 2.0 + 3 * 1.0, 2 * 1.0 + 3 * 2.0]], dtype=torch.float64)

    retrieved, weights, slots = read_memory(memory, query, temperature=0.5, top_k=2)

    assert slots.tolist() == [[2, 3]]
    torch.testing.assert_close(weights, torch.tensor([[a2, a3]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(retrieved, by_value, rtol=0, atol=1e-12)
    assert not torch.allclose(retrieved, by_index)


def _hand_retrieval(memory: Tensor, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One stream's read written out: softmax by exp/sum, top-2 by sorting, value-weighted sum."""
    scores = memory @ query / CFG.temperature  # [s]
    attention = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
    top = torch.argsort(attention, descending=True)[: CFG.top_k]
    by_value = sum(attention[s] * memory[s] for s in top)
    by_index = sum(float(s) * memory[s] for s in top)
    return by_value, by_index, top


def _reference_conv(layer: FSNetConv, x: Tensor, u: Tensor) -> Tensor:
    """The calibrated conv for one stream from a calibration ``u [c]``, with torch's conv1d."""
    o, _, k = layer.weight.shape
    u = u.view(o, k + 2)
    weight = layer.weight * (1 + u[:, None, :k])
    padded = F.pad(x, ((k - 1) * layer.dilation, 0))
    y = F.conv1d(padded, weight, layer.bias * (1 + u[:, k]), dilation=layer.dilation)
    return (1 + u[:, k + 1])[None, :, None] * y


def test_triggered_forward_blends_value_weighted_retrieval() -> None:
    torch.manual_seed(0)
    layer = FSNetConv(D, D, K, dilation=2, fsnet=CFG, use_memory=True).double()
    _randomise_controller(layer)
    state = layer.init_state(1)
    gen = torch.Generator().manual_seed(3)
    state["grad_long"] = torch.randn(state["grad_long"].shape, generator=gen, dtype=torch.float64)
    state["q_ema"] = torch.randn(state["q_ema"].shape, generator=gen, dtype=torch.float64)
    state["memory"] = torch.randn(state["memory"].shape, generator=gen, dtype=torch.float64) * 0.2
    state["trigger"] = torch.tensor([True])
    x = torch.randn(1, D, N, generator=gen, dtype=torch.float64)

    by_value, by_index, top = _hand_retrieval(state["memory"][0], state["q_ema"][0])
    assert set(top.tolist()) != {0, 1}  # indices and values differ as weights
    own = layer.calibration(state["grad_long"])[0].detach()
    expected = _reference_conv(layer, x, CFG.tau * own + (1 - CFG.tau) * by_value)
    wrong = _reference_conv(layer, x, CFG.tau * own + (1 - CFG.tau) * by_index)

    y = layer(x, state)

    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    assert not torch.allclose(y, wrong)
    state["trigger"] = torch.tensor([False])  # untriggered: the controller's own calibration
    torch.testing.assert_close(layer(x, state), _reference_conv(layer, x, own), rtol=0, atol=1e-10)


def test_triggered_adapt_writes_blend_into_topk_slots_by_attention() -> None:
    cfg = FSNetConfig(slots=4)
    torch.manual_seed(0)
    layer = FSNetConv(2, 2, 2, dilation=1, fsnet=cfg, use_memory=True).double()
    _randomise_controller(layer)
    state = layer.init_state(1)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64)
    for _ in range(4):  # a steady direction, then its reversal fires the trigger
        state = layer.adapt(state, {"weight": g})
    memory = torch.randn(state["memory"].shape, generator=gen, dtype=torch.float64) * 0.1
    state["memory"] = memory
    before = state.clone()

    after = layer.adapt(state, {"weight": -g})

    assert bool(after["trigger"][0])
    u = layer.calibration(after["grad_long"])[0].detach()
    query = cfg.gamma_short * before["q_ema"][0] + (1 - cfg.gamma_short) * u
    torch.testing.assert_close(after["q_ema"][0], query, rtol=0, atol=1e-12)
    scores = memory[0] @ query / cfg.temperature
    attention = torch.exp(scores) / torch.exp(scores).sum()
    top = torch.argsort(attention, descending=True)[: cfg.top_k]
    blend = cfg.tau * u + (1 - cfg.tau) * sum(attention[s] * memory[0, s] for s in top)
    expected = memory[0].clone()
    for s in top:
        expected[s] = cfg.tau * memory[0, s] + (1 - cfg.tau) * attention[s] * blend
    expected = expected / max(1.0, float(expected.norm()))
    torch.testing.assert_close(after["memory"][0], expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- 2. drift trigger


def test_trigger_fires_on_gradient_sign_flip_only() -> None:
    model = _backbone()
    state = model.init_state(1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    steady = {
        f"{path}.weight": torch.randn(D, D, K, generator=gen, dtype=torch.float64)
        for path in model.layer_paths.values()
    }
    for _ in range(8):
        state = model.adapt(state, steady)
        for name in model.layer_paths:
            assert not bool(state[name]["trigger"][0]), name

    state = model.adapt(state, {k: -g for k, g in steady.items()})

    for name in model.layer_paths:
        assert bool(state[name]["trigger"][0]), name
    for _ in range(12):  # once the slow EMA has turned too, the reversal is the new normal
        state = model.adapt(state, {k: -g for k, g in steady.items()})
    assert not any(bool(state[name]["trigger"][0]) for name in model.layer_paths)


def test_adapt_rejects_missing_weight_gradient() -> None:
    model = _backbone()
    grads = {
        f"{path}.weight": torch.zeros(D, D, K, dtype=torch.float64) for path in model.layer_paths.values()
    }
    del grads["blocks.1.conv2.weight"]
    with pytest.raises(KeyError, match=re.escape("blocks.1.conv2.weight")):
        model.adapt(model.init_state(1, dtype=torch.float64), grads)


# ---------------------------------------------------------------- 3. EMA recurrences


@pytest.mark.parametrize("memory", ["fsnet", "fsnet_nomem"])
def test_emas_follow_their_recurrences(memory: str) -> None:
    torch.manual_seed(0)
    layer = FSNetConv(D, D, K, dilation=1, fsnet=CFG, use_memory=memory == "fsnet").double()
    _randomise_controller(layer)
    state = layer.init_state(1)
    long = torch.zeros(D, D * K, dtype=torch.float64)
    short = torch.zeros_like(long)
    query = torch.zeros(layer.calibration_size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        g = torch.randn(D, D, K, generator=gen, dtype=torch.float64) * 10
        unit = (g / g.norm(dim=1, keepdim=True)).reshape(D, D * K)  # unit norm over inputs
        long = 0.9 * long + 0.1 * unit
        short = 0.3 * short + 0.7 * unit
        query = 0.3 * query + 0.7 * layer.calibration(long[None])[0].detach()

        state = layer.adapt(state, {"weight": g})

        torch.testing.assert_close(state["grad_long"][0], long, rtol=0, atol=1e-12)
        torch.testing.assert_close(state["grad_short"][0], short, rtol=0, atol=1e-12)
        if memory == "fsnet":
            torch.testing.assert_close(state["q_ema"][0], query, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- 4. batching and purity


def _module_snapshot(model: nn.Module) -> dict[str, object]:
    """Every submodule's attribute names and identities, and every parameter/buffer value."""
    snap: dict[str, object] = {}
    for name, module in model.named_modules():
        snap[f"{name}:attrs"] = {k: id(v) for k, v in vars(module).items()}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        snap[name] = (id(tensor), tensor.detach().clone())
    return snap


def _assert_same_snapshot(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if isinstance(old, tuple):
            assert old[0] == new[0] and torch.equal(old[1], new[1]), key
        else:
            assert old == new, key


@pytest.mark.parametrize("memory", ["fsnet", "fsnet_nomem", "none"])
def test_forward_batched_equals_looped(memory: str) -> None:
    model = _backbone(memory)
    state = _random_state(model, batch=3)
    x = torch.randn(3, N, D, dtype=torch.float64)

    batched, _ = model(x, state, StorePolicy.LAST)
    looped = torch.cat([model(x[i : i + 1], state[i : i + 1], StorePolicy.LAST)[0] for i in range(3)])

    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-9)


def test_adapt_batched_equals_looped() -> None:
    model = _backbone()
    state = _random_state(model, batch=3)
    x = torch.randn(3, N, D, dtype=torch.float64)
    per_stream = [_weight_grads(model, x[i : i + 1], state[i : i + 1]) for i in range(3)]
    stacked = {k: torch.stack([g[k] for g in per_stream]) for k in per_stream[0]}

    batched = model.adapt(state, stacked)
    looped = torch.cat([model.adapt(state[i : i + 1], per_stream[i]) for i in range(3)])

    for key, value in looped.flatten_keys(".").items():
        torch.testing.assert_close(batched.flatten_keys(".")[key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory", ["fsnet", "fsnet_nomem"])
def test_forward_and_adapt_leave_state_and_module_untouched(memory: str) -> None:
    model = _backbone(memory)
    state = _random_state(model, batch=1)
    x = torch.randn(1, N, D, dtype=torch.float64)
    leaves = _clone_leaves(state)
    module_before = _module_snapshot(model)

    _, returned = model(x, state, StorePolicy.LAST)
    grads = _weight_grads(model, x, state)
    adapted = model.adapt(state, grads)

    assert returned is state
    _assert_leaves_equal(state, leaves)
    _assert_same_snapshot(module_before, _module_snapshot(model))
    assert not torch.equal(adapted["block0_conv1"]["grad_long"], state["block0_conv1"]["grad_long"])
    assert all(not v.requires_grad for v in adapted.flatten_keys(".").values())


# ---------------------------------------------------------------- 5. fsnet_nomem


def test_nomem_keeps_no_memory_and_never_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _backbone("fsnet_nomem")
    state = _random_state(model, batch=2)
    for name in model.layer_paths:
        assert set(state[name].keys()) == {"grad_long", "grad_short", "trigger"}
    assert not any("memory" in name for name, _ in model.named_buffers())

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("fsnet_nomem touched the associative memory")

    monkeypatch.setattr(fsnet, "read_memory", forbidden)
    monkeypatch.setattr(fsnet, "write_memory", forbidden)
    x = torch.randn(2, N, D, dtype=torch.float64)
    model(x, state, StorePolicy.LAST)  # stream 0 is triggered
    grads = _weight_grads(model, x[:1], state[0:1])
    model.adapt(model.adapt(state[0:1], grads), {k: -g for k, g in grads.items()})


def test_fsnet_reads_memory_through_the_patched_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: the same patch does catch a memory read."""
    model = _backbone("fsnet")
    calls: list[int] = []
    real = fsnet.read_memory

    def spy(*args: object, **kwargs: object) -> tuple[Tensor, Tensor, Tensor]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fsnet, "read_memory", spy)
    model(torch.randn(1, N, D, dtype=torch.float64), _random_state(model, batch=1), StorePolicy.LAST)
    assert calls


def test_no_trigger_skips_the_memory_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no stream triggered the forward and adapt never touch the memory, and give what
    the full computation (the read run and discarded by the trigger) gives."""
    model = _backbone("fsnet")
    state = _random_state(model, batch=1)
    for name in model.layer_paths:
        state[name]["trigger"] = torch.zeros(1, dtype=torch.bool)
    x = torch.randn(1, N, D, dtype=torch.float64)
    grads = {k: 1e-3 * g for k, g in _weight_grads(model, x, state).items()}
    reads: list[int] = []
    real = fsnet.read_memory
    monkeypatch.setattr(fsnet, "read_memory", lambda *a, **k: reads.append(1) or real(*a, **k))
    quick = model(x, state, StorePolicy.NONE)[0], model.adapt(state, grads)
    assert not reads
    assert not any(bool(quick[1][name]["trigger"].any()) for name in model.layer_paths)  # still none
    monkeypatch.setattr(fsnet, "may_be_set", lambda flags: True)
    full = model(x, state, StorePolicy.NONE)[0], model.adapt(state, grads)
    assert reads
    torch.testing.assert_close(quick[0], full[0], rtol=0, atol=0)
    for name in model.layer_paths:
        for key in ("grad_long", "grad_short", "q_ema", "memory", "trigger"):
            torch.testing.assert_close(quick[1][name][key], full[1][name][key], rtol=0, atol=0)


# ---------------------------------------------------------------- 6. causality


@pytest.mark.parametrize("memory", ["fsnet", "fsnet_nomem", "none"])
def test_tcn_is_causal(memory: str) -> None:
    model = _backbone(memory)
    state = _random_state(model, batch=2)
    x = torch.randn(2, N, D, dtype=torch.float64)
    t = 9
    changed = x.clone()
    changed[:, t] += 1.0

    y, _ = model(x, state, StorePolicy.NONE)
    y_changed, _ = model(changed, state, StorePolicy.NONE)

    assert torch.equal(y[:, :t], y_changed[:, :t])
    assert not torch.allclose(y[:, t], y_changed[:, t])


def test_plain_tcn_has_empty_state_and_no_gradient_learning() -> None:
    model = _backbone("none")
    state = model.init_state(2)
    assert list(state.keys()) == [] and state.batch_size == torch.Size([2])
    assert not model.learns_from_gradients
    assert model.adapt(state, {}) is state


@pytest.mark.parametrize("dilation", [1, 4, 7, 8, 15, 16, 1024])
def test_causal_conv_drops_only_taps_that_see_padding(dilation: int) -> None:
    """Taps reaching before the window are dropped: the output and the weight's gradient (zero
    on the dropped taps) equal torch's conv over the full left padding, shared or per stream."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, D, N, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, D, D, K, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, D, generator=gen, dtype=torch.float64)
    padded = F.pad(x, ((K - 1) * dilation, 0))
    want = torch.stack(
        [F.conv1d(padded[i : i + 1], weight[i], bias[i], dilation=dilation)[0] for i in range(2)]
    )
    (want_grad,) = torch.autograd.grad(want.square().sum(), weight)

    got = fsnet.causal_conv1d(x, weight, bias, dilation)
    (got_grad,) = torch.autograd.grad(got.square().sum(), weight)
    shared = fsnet.causal_conv1d(x[:1], weight[0], bias[0], dilation)

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared, want[:1], rtol=1e-12, atol=1e-12)
    seen = min(K, (N - 1) // dilation + 1)  # taps j >= K - seen look inside the window
    assert bool((got_grad[..., : K - seen] == 0).all()) and bool((got_grad[..., K - seen :] != 0).all())


# ---------------------------------------------------------------- 7. the last position only


@pytest.mark.parametrize("memory", ["fsnet", "none"])
@pytest.mark.parametrize(("n", "layers"), [(16, 2), (60, 11), (7, 4), (2, 3)])
def test_forward_last_equals_the_full_forward_at_the_last_position(memory: str, n: int, layers: int) -> None:
    """Computing only the positions that reach the last output gives its features and every
    weight's gradient as the full forward does (float64, rounding only), per-stream states too."""
    torch.manual_seed(0)
    model = TCNBackbone(
        ModelConfig(backbone="tcn", memory=memory, d_model=D, n_layers=layers, kernel_size=K, seq_len=n)
    ).double()
    _randomise_controller(model)
    state = _random_state(model, batch=2)
    x = torch.randn(2, n, D, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    full, _ = model(x, state, StorePolicy.NONE)
    want = full[:, -1:]
    want_grads = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    got, next_state = model.forward_last(x, state, StorePolicy.NONE)
    got_grads = torch.autograd.grad(got.square().sum(), params, allow_unused=True)

    assert got.shape == (2, 1, D) and next_state is state
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_last_plan_computes_only_the_positions_that_reach_the_last_output() -> None:
    """At 60 steps, kernel 3 and dilations 1..1024 (the FSNet reference's size): 189 conv
    outputs instead of 1,320; the blocks whose dilation reaches past the window one each."""
    plan = LastPlan.of(60, 3, [2**i for i in range(11)], torch.device("cpu"))
    sizes = [(60, 60) if b is None else (b.conv1.shape[1], b.conv2.shape[1]) for b in plan.blocks]
    assert sum(a + b for a, b in sizes) == 189
    assert sizes[0] == (60, 30) and sizes[5:] == [(2, 1)] + [(1, 1)] * 5
    assert plan.inputs is None  # the first block reads the whole window
    # every gathered column is a real input or the one zero column past them
    for block, width in zip(plan.blocks[1:], [30, 15, 8, 4, 2, 1, 1, 1, 1, 1], strict=True):
        assert block is not None and int(block.conv1.max()) <= width


def test_forecaster_reads_the_tcn_last_position_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forecast of a TCN forecaster goes through forward_last and equals the forecast
    from the full features (the head reads the last position)."""
    torch.manual_seed(0)
    model = ContinualForecaster(_config("fsnet", pred_len=3, channels=2)).double().eval()
    _randomise_controller(model)
    state = model.init_state(2, dtype=torch.float64)
    window = torch.randn(2, N, 2, dtype=torch.float64)
    calls: list[int] = []
    planned = model.backbone.forward_last

    def counted(x: Tensor, s: TensorDict, p: StorePolicy) -> tuple[Tensor, TensorDict]:
        calls.append(x.shape[1])
        return planned(x, s, p)

    monkeypatch.setattr(model.backbone, "forward_last", counted)
    got, _ = model(window, state)
    assert calls == [N]
    full = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward_last", lambda x, s, p: (full(x, s, p)[0][:, -1:], s))
    want, _ = model(window, state)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- 8. the online step's calibrations


def _online_model(memory: str = "fsnet") -> ContinualForecaster:
    torch.manual_seed(0)
    model = ContinualForecaster(_config(memory, pred_len=2, channels=2)).double().eval()
    _randomise_controller(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _replay(model: ContinualForecaster, mode: UpdateMode, steps: int = 30) -> tuple[TensorDict, Tensor]:
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(steps, 2, generator=gen, dtype=torch.float64).cumsum(0)
    state = init_stream_state(model, 1, mode)
    forecasts = []
    for value in values:
        state, forecast = observe(model, state, value[None], mode)
        assert forecast is not None
        forecasts.append(forecast)
    return state, torch.stack(forecasts)


def _no_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsnet, "_known", lambda layers, grad_long: None)


@pytest.mark.parametrize("mode", [UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL])
def test_calibrations_adapt_computed_serve_the_next_forwards_unchanged(
    mode: UpdateMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwards after an adapt read the calibrations it computed (never the learning
    forward of full_model, whose controllers need a gradient), and the stream's forecasts and
    state are the same bits as when every forward computes them again."""
    model = _online_model()
    known = fsnet._known
    used: list[bool] = []

    def counted(layers: list[FSNetConv], grad_long: list[Tensor]) -> Tensor | None:
        u = known(layers, grad_long)
        used.append(u is not None)
        return u

    monkeypatch.setattr(fsnet, "_known", counted)
    state, forecasts = _replay(model, mode)
    assert sum(used) >= 10  # one forecast per step (in memory_only, the next step's forwards too)
    _no_known(monkeypatch)
    again, recomputed = _replay(model, mode)
    assert torch.equal(forecasts, recomputed)
    _assert_leaves_equal(state, _clone_leaves(again))


def test_full_model_adapts_with_the_streams_stepped_weights() -> None:
    """full_model: the memory's query moves toward the calibration of the stream's own
    controller after its AdamW step (the one the next forward uses), not the shared one's."""
    model = _online_model()
    state, _ = _replay(model, UpdateMode.FULL_MODEL)
    history = state["history"]
    past = history[:, : model.config.seq_len]
    target = model.forecast_channels(history[:, model.config.seq_len :])
    after = learn(model, state, past, target, UpdateMode.FULL_MODEL)
    stepped = copy.deepcopy(model)
    stepped.load_state_dict({k.replace("-", "."): v[0] for k, v in after["params"].items()}, strict=False)
    gamma = model.config.fsnet.gamma_short
    moved = False
    for name, path in model.backbone.layer_paths.items():
        before_layer, after_layer = state["model"]["backbone"][name], after["model"]["backbone"][name]
        own = stepped.backbone.get_submodule(path).calibration(after_layer["grad_long"])
        shared = model.backbone.get_submodule(path).calibration(after_layer["grad_long"])
        torch.testing.assert_close(after_layer["q_ema"], fsnet.ema(before_layer["q_ema"], own, gamma))
        moved |= not torch.allclose(own, shared)
    assert moved  # the stream's controllers have left the shared ones: the test tells them apart


def test_calibrations_kept_are_not_used_for_other_weights_or_a_changed_ema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other controller weights with the same EMAs, or EMAs changed in place, compute afresh."""
    model = _online_model()
    state, _ = _replay(model, UpdateMode.FULL_MODEL)
    other = state.clone(recurse=False)
    other["params"] = TensorDict({k: v + 0.01 for k, v in state["params"].items()}, batch_size=[1])
    got = predict(model, other)
    with monkeypatch.context() as patched:
        _no_known(patched)
        assert torch.equal(got, predict(model, other))
    layer = next(iter(model.backbone.layer_paths))
    state["model"]["backbone"][layer]["grad_long"].mul_(1.5)  # a view of the adapt's EMAs
    got = predict(model, state)
    _no_known(monkeypatch)
    assert torch.equal(got, predict(model, state))


def test_memory_only_takes_the_gradient_of_the_conv_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory_only asks autograd for the weights adapt reads (FSNet's conv weights), not every
    weight: the same state and forecasts as taking every gradient."""
    model = _online_model()
    names = model.adapted_from()
    assert names and all(re.fullmatch(r"backbone\.blocks\.\d+\.conv[12]\.weight", n) for n in names)
    assert len(names) == 2 * model.config.n_layers
    state, forecasts = _replay(model, UpdateMode.MEMORY_ONLY)
    every = tuple(name for name, _ in model.named_parameters())
    monkeypatch.setattr(model, "adapted_from", lambda: every)
    again, recomputed = _replay(model, UpdateMode.MEMORY_ONLY)
    assert torch.equal(forecasts, recomputed)
    _assert_leaves_equal(state, _clone_leaves(again))
    plain = ContinualForecaster(_config("none"))
    assert plain.adapted_from() == ()
