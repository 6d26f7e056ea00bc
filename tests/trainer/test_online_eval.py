from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.config import ModelConfig
from models.forecaster import ContinualForecaster
from models.online import Feedback, UpdateMode
from tests.trainer.conftest import PRED, SEQ, tiny_config
from trainer import online_eval
from trainer.evaluate import EvalConfig, evaluate, with_online_lr
from trainer.online_eval import ReplayConfig, StreamResult, metrics, naive_forecasts, replay_stream
from trainer.pretrain import pretrain
from trainer.report import FORECASTS_NPZ


def _trained_looking_model(seed: int = 0) -> ContinualForecaster:
    """A small lstm whose head is not zero, so every weight update changes its forecasts."""
    torch.manual_seed(seed)
    config = ModelConfig(
        seq_len=SEQ,
        pred_len=PRED,
        channels=2,
        backbone="lstm",
        memory="none",
        d_model=8,
        n_layers=1,
        online_lr=1e-2,
    )
    model = ContinualForecaster(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    return model


def _series(n: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)
    return torch.stack([torch.sin(t / 3), torch.cos(t / 5)], dim=1) + 0.1 * torch.randn(n, 2, generator=g)


def test_delayed_feedback_never_uses_an_unobserved_value() -> None:
    """The forecast at step k (origin t = SEQ + k) may depend on rows < t only: poisoning every
    row from t on must not change it. With immediate feedback it does (the control below)."""
    model, series = _trained_looking_model(), _series(SEQ + 24 + PRED - 1)
    clean = replay_stream(model, series, UpdateMode.FULL_MODEL, Feedback.DELAYED)
    assert clean.steps == 24
    assert clean.learn_calls == clean.steps - PRED  # one pair per completed horizon
    for cut in (0, 3, PRED + 2, 15):
        poisoned = series.clone()
        poisoned[SEQ + cut :] = 1e6
        dirty = replay_stream(model, poisoned, UpdateMode.FULL_MODEL, Feedback.DELAYED, max_steps=cut + 1)
        np.testing.assert_array_equal(dirty.forecasts, clean.forecasts[: cut + 1], err_msg=f"cut {cut}")


def test_immediate_feedback_reveals_the_horizon_so_poison_reaches_the_next_forecast() -> None:
    """The control for the test above: the same check fails under the literature's protocol."""
    model, series = _trained_looking_model(), _series(SEQ + 12)
    cut = PRED + 2
    clean = replay_stream(model, series, UpdateMode.FULL_MODEL, Feedback.IMMEDIATE)
    poisoned = series.clone()
    poisoned[SEQ + cut :] = 1e6
    dirty = replay_stream(model, poisoned, UpdateMode.FULL_MODEL, Feedback.IMMEDIATE, max_steps=cut + 1)
    assert not np.array_equal(dirty.forecasts[-1], clean.forecasts[cut])
    np.testing.assert_array_equal(dirty.forecasts[: cut - PRED + 1], clean.forecasts[: cut - PRED + 1])


def test_immediate_feedback_learns_each_pair_after_its_forecast() -> None:
    model, series = _trained_looking_model(), _series(SEQ + 2 * PRED + 4)
    frozen = replay_stream(model, series, UpdateMode.NONE, Feedback.IMMEDIATE)
    online = replay_stream(model, series, UpdateMode.FULL_MODEL, Feedback.IMMEDIATE)
    delayed = replay_stream(model, series, UpdateMode.FULL_MODEL, Feedback.DELAYED)
    # a stream's own copy of the weights (functional_call) may round differently from the shared
    # module by an ulp: "the same" is up to that, "learned" is far beyond it
    same = {"rtol": 1e-6, "atol": 1e-7}
    np.testing.assert_allclose(online.forecasts[0], frozen.forecasts[0], **same)  # nothing learned yet
    assert np.abs(online.forecasts[1] - frozen.forecasts[1]).max() > 1e-5  # pair 0 learned before step 1
    # delayed feedback learns pair 0 only once its horizon is observed: before step PRED
    np.testing.assert_allclose(delayed.forecasts[:PRED], frozen.forecasts[:PRED], **same)
    assert np.abs(delayed.forecasts[PRED] - frozen.forecasts[PRED]).max() > 1e-5
    assert online.learn_calls == online.steps
    np.testing.assert_array_equal(online.truths, frozen.truths)


def test_experience_replay_calls_learn_again_on_past_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    model, series = _trained_looking_model(), _series(SEQ + 16)
    calls: list[int] = []
    real_learn = online_eval.learn

    def counting_learn(model, state, inputs, targets, mode, mask=None, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(int(inputs.shape[1]))
        return real_learn(model, state, inputs, targets, mode, mask, **kwargs)

    monkeypatch.setattr(online_eval, "learn", counting_learn)
    plain = replay_stream(model, series, UpdateMode.FULL_MODEL, Feedback.IMMEDIATE)
    n_plain = len(calls)
    replayed = replay_stream(
        model, series, UpdateMode.FULL_MODEL, Feedback.IMMEDIATE, replay=ReplayConfig(50, 2, 0)
    )
    steps = plain.steps
    assert n_plain == steps
    assert (
        len(calls) - n_plain == replayed.learn_calls == steps + 1 + 2 * (steps - 2)
    )  # 0, 1, then 2 per step
    assert not np.array_equal(replayed.forecasts, plain.forecasts)


def test_naive_forecast_repeats_the_last_observed_value() -> None:
    series = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    result = naive_forecasts(series, seq_len=5, pred_len=3, out_indices=(1,), steps=4)
    assert result.forecasts.shape == (4, 3, 1)
    np.testing.assert_array_equal(result.forecasts[2, :, 0], [series[6, 1]] * 3)
    np.testing.assert_array_equal(result.truths[2, :, 0], series[7:10, 1])


def test_metrics_values_and_mape_guard() -> None:
    f = np.array([[[1.0], [3.0]]])
    y = np.array([[[2.0], [0.0]]])
    m = metrics(f, y)
    assert m["mse"] == pytest.approx(5.0)
    assert m["mae"] == pytest.approx(2.0)
    assert m["rmse"] == pytest.approx(5.0**0.5)
    assert m["mape"] == pytest.approx((0.5 + 3.0 / online_eval.MAPE_EPS) / 2)
    assert np.isfinite(m["mape"])


def test_online_lr_override_keeps_the_weights() -> None:
    model = _trained_looking_model()
    faster = with_online_lr(model, 0.05)  # lr * online_anchor must stay < 1
    assert faster.config.online_lr == 0.05 and model.config.online_lr == 1e-2
    for (name, a), (_, b) in zip(model.state_dict().items(), faster.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert with_online_lr(model, None) is model


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(tiny_config(tiny_csv, tmp_path_factory.mktemp("ck") / "lstm", epochs=1))


@pytest.mark.parametrize("feedback", ["delayed", "immediate"])
def test_evaluate_uses_no_value_after_the_forecast_origin_with_delayed_feedback(
    feedback: str, tiny_csv: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    """End to end through ``evaluate``: poisoning the CSV from the row after step ``k``'s
    window changes nothing up to step ``k`` with delayed feedback, and does with immediate."""
    k = 10
    frame = pd.read_csv(tiny_csv)
    test_start = 150 - SEQ  # 20/5/75 of 600 rows; the test split starts SEQ rows early
    poisoned = frame.copy()
    poisoned.loc[test_start + SEQ + k :, frame.columns[1:]] = 1e6
    dirty_csv = tmp_path / "tiny.csv"  # same name: the same splits
    poisoned.to_csv(dirty_csv, index=False)
    runs = {}
    for label, csv in (("clean", tiny_csv), ("dirty", dirty_csv)):
        cfg = EvalConfig(
            train=tiny_config(csv, tmp_path / "unused"),
            methods=("memcast",),
            checkpoint=str(tiny_ckpt),
            mode="full_model",
            feedback=feedback,
            online_lr=1e-2,
            max_steps=k + 1,
            out=str(tmp_path / label),
            plots=False,
            save_forecasts=True,
        )
        evaluate(cfg)
        runs[label] = np.load(tmp_path / label / FORECASTS_NPZ)["forecast/memcast"]
    same = np.array_equal(runs["clean"], runs["dirty"])
    assert same == (feedback == "delayed")


def _expert_results(steps: int = 30, seed: int = 0) -> list[StreamResult]:
    g = np.random.default_rng(seed)
    truths = g.normal(size=(steps, PRED, 1))
    return [
        StreamResult(truths + g.normal(0.0, s, size=truths.shape), truths, 0.0, 0) for s in (0.1, 0.5, 1.0)
    ]


@pytest.mark.parametrize("feedback", [Feedback.DELAYED, Feedback.IMMEDIATE])
def test_combination_uses_no_value_after_the_forecast_origin(feedback: Feedback) -> None:
    """Step k (origin t) may learn from rows < t only: poisoning every truth of a row >= t
    (truth [j, i] is row t_j + i) leaves steps <= k unchanged with delayed feedback. The
    control: immediate feedback reveals step k - 1's whole horizon, and the check catches it."""
    k = 12
    clean = _expert_results()
    poisoned = [dataclasses.replace(r, truths=r.truths.copy()) for r in clean]
    for r in poisoned:
        for j in range(len(r.truths)):
            for i in range(PRED):
                if j + i >= k:
                    r.truths[j, i] = 1e6
    a = online_eval.combine_stream(clean, feedback).forecasts[: k + 1]
    b = online_eval.combine_stream(poisoned, feedback).forecasts[: k + 1]
    assert np.array_equal(a, b) == (feedback is Feedback.DELAYED)


def test_evaluate_reports_a_combination_beside_its_experts(tiny_csv: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(
        train=tiny_config(tiny_csv, tmp_path / "unused", epochs=1),
        methods=("combo_full_model",),
        max_steps=40,
        out=str(tmp_path / "eval"),
        runs_dir=str(tmp_path / "runs"),
        plots=False,
    )
    methods = evaluate(cfg)["methods"]
    assert list(methods) == ["titans_none", "titans_full_model", "naive", "combo_full_model"]
    assert methods["combo_full_model"]["experts"] == ["titans_none", "titans_full_model", "naive"]
    assert methods["combo_full_model"]["mse"] <= 1.5 * min(m["mse"] for m in methods.values())
