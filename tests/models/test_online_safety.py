"""full_model under delayed targets: a step that cannot run away. The Adam direction bound,
the anchor's bound on the drift from the pretrained weights (with a control that breaks it),
the defaults against the old ones after a level shift, and older checkpoints' fingerprints."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from models.config import LATER_FIELDS, LATER_NESTED_FIELDS, ModelConfig, NeuralMemoryConfig
from models.forecaster import ContinualForecaster
from models.online import Feedback, UpdateMode, init_stream_state, observe_many
from models.optim import adam_direction_bound, adamw_step
from trainer.evaluate import with_online_settings
from trainer.online_eval import replay_stream

SEQ, PRED = 16, 4
OLD_DEFAULTS = {"online_lr": 1e-3, "online_clip": 0.0, "online_anchor": 0.0}


def _last_value_model() -> ContinualForecaster:
    """A fresh model: zero head and skip, so with delta forecasting it forecasts the last value,
    the best forecast of a random walk. Any learning can only chase noise."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        seq_len=SEQ, pred_len=PRED, channels=2, backbone="lstm", memory="none", d_model=8, n_layers=1
    )
    model = ContinualForecaster(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _random_walk_with_level_shift(n: int = 800) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    series = 0.3 * torch.randn(n, 2, generator=g).cumsum(0)
    series[n // 2 :] += torch.tensor([20.0, -10.0])
    return series


def test_adam_direction_never_passes_its_bound() -> None:
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.zeros(256, dtype=torch.float64)}
    avg, avg_sq = {"w": torch.zeros_like(p["w"])}, {"w": torch.zeros_like(p["w"])}
    step, worst = torch.tensor(0), 0.0
    for t in range(3000):  # heavy-tailed gradients with bursts, then long quiet runs of one sign
        scale = 1e3 if t % 500 == 0 else (1e-3 if t % 500 > 250 else 1.0)
        grad = {"w": scale * torch.randn(256, generator=g, dtype=torch.float64).pow(3)}
        new, avg, avg_sq, step = adamw_step(p, grad, avg, avg_sq, step, lr=1.0, eps=0.0)
        worst = max(worst, float((new["w"] - p["w"]).abs().max()))
        p = new
    assert 1.0 < worst <= adam_direction_bound()


Tensors = dict[str, torch.Tensor]


def _adamw_reference(
    params: Tensors,
    grads: Tensors,
    avg: Tensors,
    avg_sq: Tensors,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    wd: float,
    anchor: Tensors,
    strength: float,
) -> tuple[Tensors, Tensors, Tensors]:
    """AdamW written tensor by tensor, the textbook way: the oracle of the list-wise step."""
    (b1, b2), t = betas, (step + 1).to(torch.float64)
    out: tuple[Tensors, Tensors, Tensors] = ({}, {}, {})
    for name, p in params.items():
        shape = (-1, *([1] * (p.dim() - 1))) if step.dim() else ()
        c1, c2 = (1 - b1**t).view(shape), (1 - b2**t).view(shape)
        m = b1 * avg[name] + (1 - b1) * grads[name]
        v = b2 * avg_sq[name] + (1 - b2) * grads[name] ** 2
        new = p * (1 - lr * wd) - lr * (m / c1) / ((v / c2).sqrt() + 1e-8)
        out[0][name] = new - lr * strength * (p - anchor[name])
        out[1][name], out[2][name] = m, v
    return out


@pytest.mark.parametrize("streams", [0, 3])
def test_listwise_adamw_equals_the_textbook_step(streams: int) -> None:
    """One scalar step count, or one per stream ([b], each its own bias correction), with weight
    decay and the anchor broadcast over the streams."""
    g = torch.Generator().manual_seed(1)
    lead = (streams,) if streams else ()
    shapes = {"a": (4, 3), "b": (5,), "c": ()}
    rand = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    params = {k: rand(*lead, *s) for k, s in shapes.items()}
    anchor = {k: rand(*s) for k, s in shapes.items()}
    avg, avg_sq = (
        {k: rand(*lead, *s) for k, s in shapes.items()},
        {k: rand(*lead, *s).abs() for k, s in shapes.items()},
    )
    step = torch.tensor([0, 4, 17]) if streams else torch.tensor(6)
    for _ in range(3):
        grads = {k: rand(*lead, *s) for k, s in shapes.items()}
        want = _adamw_reference(params, grads, avg, avg_sq, step, 0.01, (0.9, 0.999), 0.1, anchor, 5.0)
        got = adamw_step(
            params, grads, avg, avg_sq, step, 0.01, (0.9, 0.999), 0.1, anchor=anchor, anchor_strength=5.0
        )
        for w, h in zip(want, got[:3], strict=True):
            for k in shapes:
                torch.testing.assert_close(h[k], w[k], rtol=1e-12, atol=1e-14)
        params, avg, avg_sq, step = got
    assert torch.equal(step, torch.tensor([3, 7, 20]) if streams else torch.tensor(9))


@pytest.mark.parametrize("anchor", [50.0, 0.0])
def test_anchored_weights_stay_within_the_bound_after_a_level_shift(anchor: float) -> None:
    """|p - p0| <= U / anchor per coordinate, however many steps; the control (no anchor,
    same learning rate) drifts past it, so the check can fail."""
    model = with_online_settings(_last_value_model(), {"online_lr": 1e-2, "online_anchor": anchor})
    pretrained = {k.replace(".", "-"): v for k, v in model.named_parameters()}
    state = init_stream_state(model, 1, UpdateMode.FULL_MODEL)
    state, _ = observe_many(model, state, _random_walk_with_level_shift()[None], UpdateMode.FULL_MODEL)
    drift = max(float((state["params"][k][0] - p0).abs().max()) for k, p0 in pretrained.items())
    bound = adam_direction_bound() / 50.0
    assert (drift <= bound) == (anchor > 0), (drift, bound)


def test_defaults_do_better_than_the_old_ones_after_a_level_shift() -> None:
    """On a random walk with a level shift (the frozen last value is optimal), the old default
    (lr 1e-3, no clipping, no anchor) chases noise after the shift; the defaults stay at the
    frozen model's error."""
    model, series = _last_value_model(), _random_walk_with_level_shift()

    def mse_after_shift(online: dict[str, float] | None) -> float:
        run = model if online is None else with_online_settings(model, online)
        mode = UpdateMode.NONE if online is None else UpdateMode.FULL_MODEL
        result = replay_stream(run, series, mode, Feedback.DELAYED)
        err = (result.forecasts - result.truths) ** 2
        return float(err[len(series) // 2 :].mean())

    frozen, old, new = mse_after_shift(None), mse_after_shift(OLD_DEFAULTS), mse_after_shift({})
    assert new <= 1.01 * frozen
    assert old > 1.05 * new


def test_older_checkpoints_keep_their_fingerprint() -> None:
    """Fields added later enter the digest only when changed from their default."""
    config = ModelConfig()
    old_layout = {k: v for k, v in config.to_dict().items() if k not in LATER_FIELDS}
    for name, later in LATER_NESTED_FIELDS.items():  # e.g. neural_memory.max_grad_norm
        old_layout[name] = {k: v for k, v in old_layout[name].items() if k not in later}
    old_digest = hashlib.sha256(json.dumps(old_layout, sort_keys=True).encode()).hexdigest()
    assert ModelConfig.from_dict(old_layout).digest() == old_digest
    assert config.replace(online_anchor=1.0).digest() != old_digest
    clipped = config.replace(neural_memory=NeuralMemoryConfig(max_grad_norm=5.0))
    assert clipped.digest() != old_digest


def test_adamw_step_takes_transposed_tensors() -> None:
    """The fused kernel walks memory in order: transposed (non-contiguous) weights, moments
    and gradients give the textbook step all the same."""
    g = torch.Generator().manual_seed(2)
    rand = lambda: torch.randn(3, 4, generator=g, dtype=torch.float64).t()  # noqa: E731
    params, grads, avg, anchor = {"w": rand()}, {"w": rand()}, {"w": rand()}, {"w": rand()}
    avg_sq = {"w": rand().abs()}
    step = torch.tensor(2)
    want = _adamw_reference(params, grads, avg, avg_sq, step, 0.1, (0.9, 0.999), 0.1, anchor, 5.0)
    got = adamw_step(
        params, grads, avg, avg_sq, step, 0.1, (0.9, 0.999), 0.1, anchor=anchor, anchor_strength=5.0
    )
    for w, h in zip(want, got[:3], strict=True):
        torch.testing.assert_close(h["w"], w["w"], rtol=1e-12, atol=1e-14)
