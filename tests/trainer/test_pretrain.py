from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.base import StorePolicy
from models.checkpoint import REPORT_FILE, WEIGHTS_FILE, load_checkpoint
from models.online import Feedback, UpdateMode, init_stream_state, observe, observe_many
from tests.trainer.conftest import SEQ, tiny_config
from trainer.data import WindowSet, load_dataset
from trainer.pretrain import carried_segments, pretrain

ROOT = Path(__file__).resolve().parents[2]
# the module, not the function that trainer/__init__.py re-exports under the same name
pretrain_module = importlib.import_module("trainer.pretrain")


def _forecasts(directory: Path, steps: int = 12) -> np.ndarray:
    """Forecasts of a fresh full_model stream fed the first rows of the test split."""
    ckpt = load_checkpoint(directory)
    cfg = ckpt.config
    data = load_dataset(ckpt_data(directory), ckpt.schema.features, None, cfg.seq_len, cfg.pred_len)
    series = torch.as_tensor(data.split("test")[: cfg.seq_len + steps])
    model, mode = ckpt.model, UpdateMode.FULL_MODEL
    with torch.no_grad():
        state = init_stream_state(model, 1, mode)
        state, first = observe_many(model, state, series[None, : cfg.seq_len], mode)
        out = [first]
        for t in range(cfg.seq_len, len(series)):
            state, forecast = observe(model, state, series[None, t], mode, Feedback.DELAYED)
            out.append(forecast)
    return torch.cat(out).numpy()


def ckpt_data(directory: Path) -> str:
    return json.loads((directory / REPORT_FILE).read_text())["config"]["data"]


def test_checkpoint_loaded_in_a_fresh_process_gives_identical_forecasts(
    tiny_csv: Path, tmp_path: Path
) -> None:
    out = pretrain(tiny_config(tiny_csv, tmp_path / "ckpt", epochs=1))
    here = _forecasts(out)
    code = (
        "import sys, numpy as np\n"
        "from tests.trainer.test_pretrain import _forecasts\n"
        "np.save(sys.argv[2], _forecasts(__import__('pathlib').Path(sys.argv[1])))\n"
    )
    target = tmp_path / "there.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process (conftest): same kernels
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(target)], check=True, cwd=ROOT, env=env, timeout=120
    )
    there = np.load(target)
    assert here.shape == (13, 4, 1)
    assert np.isfinite(here).all()
    np.testing.assert_array_equal(here, there)


def test_checkpoint_directory_holds_weights_config_and_report(tiny_csv: Path, tmp_path: Path) -> None:
    out = pretrain(tiny_config(tiny_csv, tmp_path / "ckpt", epochs=2))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "train_report.json"]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["finished"] and not report["interrupted"]
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert all(np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in report["epochs"])
    assert report["best_val_loss"] <= report["initial_val_loss"]
    assert report["config"]["model"]["seq_len"] == SEQ and report["wall_time_s"] > 0
    ckpt = load_checkpoint(out)
    assert ckpt.schema.columns == ("load_a", "load_b", "OT") and ckpt.config.targets == (2,)
    assert not list(tmp_path.glob(".ckpt*")), "temporary directories were left behind"


def test_pretraining_interrupted_mid_epoch_leaves_a_loadable_checkpoint(
    tiny_csv: Path, tmp_path: Path
) -> None:
    def interrupt(epoch: int, batch: int, loss: float) -> None:
        if epoch == 2 and batch == 2:
            raise KeyboardInterrupt

    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tiny_csv, out, epochs=3), on_batch=interrupt)
    ckpt = load_checkpoint(out)  # raises if files are missing or do not match their fingerprint
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["interrupted"] and not report["finished"]
    assert report["best_epoch"] == 1 and len(report["epochs"]) == 1
    # the kept weights are epoch 1's: an uninterrupted run with one epoch gives the same ones
    full = load_checkpoint(pretrain(tiny_config(tiny_csv, tmp_path / "one", epochs=1)))
    assert ckpt.fingerprint == full.fingerprint


def test_pretraining_interrupted_in_the_first_epoch_keeps_the_initial_model(
    tiny_csv: Path, tmp_path: Path
) -> None:
    def interrupt(epoch: int, batch: int, loss: float) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tiny_csv, out), on_batch=interrupt)
    ckpt = load_checkpoint(out)
    assert json.loads((out / REPORT_FILE).read_text())["best_epoch"] == 0
    assert torch.count_nonzero(ckpt.model.head.weight) == 0  # untrained: forecasts the last value


def test_pretraining_is_deterministic_for_a_seed(tiny_csv: Path, tmp_path: Path) -> None:
    a = pretrain(tiny_config(tiny_csv, tmp_path / "a", dropout=0.0))
    b = pretrain(tiny_config(tiny_csv, tmp_path / "b", dropout=0.0))
    c = pretrain(tiny_config(tiny_csv, tmp_path / "c", seed=1))
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    assert load_checkpoint(a).fingerprint != load_checkpoint(c).fingerprint
    loss_a = [e["train_loss"] for e in json.loads((a / REPORT_FILE).read_text())["epochs"]]
    loss_b = [e["train_loss"] for e in json.loads((b / REPORT_FILE).read_text())["epochs"]]
    assert loss_a == loss_b


def test_non_finite_batches_are_skipped_and_counted(
    tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pretrain_module.F.mse_loss
    calls = {"n": 0}

    def sometimes_nan(forecast: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(forecast, target)
        return loss * float("nan") if calls["n"] in (2, 5) else loss

    monkeypatch.setattr(pretrain_module.F, "mse_loss", sometimes_nan)
    out = pretrain(tiny_config(tiny_csv, tmp_path / "ckpt", epochs=1))
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["skipped_batches"] == 2
    assert report["epochs"][0]["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in load_checkpoint(out).model.parameters())


def test_two_phase_first_phase_freezes_the_backbone(tiny_csv: Path, tmp_path: Path) -> None:
    frozen = load_checkpoint(pretrain(tiny_config(tiny_csv, tmp_path / "p1", epochs=1, two_phase_epochs=1)))
    torch.manual_seed(0)  # the initial weights: the same seed builds the same model
    from models.forecaster import ContinualForecaster

    initial = ContinualForecaster(frozen.config)
    for name, p in frozen.model.named_parameters():
        changed = not torch.equal(p, dict(initial.named_parameters())[name])
        assert changed != name.startswith(("backbone.", "embed.")), name


def test_interrupt_before_any_improvement_keeps_an_existing_checkpoint(
    tiny_csv: Path, tmp_path: Path
) -> None:
    out = pretrain(tiny_config(tiny_csv, tmp_path / "ckpt", epochs=1))
    before = (out / WEIGHTS_FILE).read_bytes(), (out / REPORT_FILE).read_bytes()

    def interrupt(epoch: int, batch: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tiny_csv, out, epochs=2, seed=5), on_batch=interrupt)
    assert ((out / WEIGHTS_FILE).read_bytes(), (out / REPORT_FILE).read_bytes()) == before


@pytest.fixture(scope="module")
def carried_checkpoint(tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Titans memory pretrained as served (the default for a memory that stores tokens)."""
    out = tmp_path_factory.mktemp("carried") / "ckpt"
    return pretrain(tiny_config(tiny_csv, out, memory="titans", epochs=1, batch_size=4, tbptt=3))


def test_memory_pretrained_as_served_forecasts_like_the_online_stream(carried_checkpoint: Path) -> None:
    """Train/serve parity (issue 9, M3): the forecasts the pretraining code computes for runs of
    consecutive windows equal those of streams fed one observation at a time online."""
    report = json.loads((carried_checkpoint / REPORT_FILE).read_text())
    assert report["memory_pretraining"] == "carried"
    ckpt = load_checkpoint(carried_checkpoint)
    model, cfg = ckpt.model, ckpt.config
    data = load_dataset(ckpt_data(carried_checkpoint), ckpt.schema.features, None, cfg.seq_len, cfg.pred_len)
    test = data.split("test")
    windows = WindowSet(test, cfg.seq_len, cfg.pred_len, cfg.out_indices)
    starts, length = torch.tensor([0, 5, 11]), 7
    with torch.no_grad():
        trained = torch.cat([f for f, _ in carried_segments(model, windows, starts, length, 3)], dim=1)
        x, _ = windows.batch((starts[:, None] + torch.arange(length)).flatten())
        fresh, _ = model(x, model.init_state(len(x)), StorePolicy.WINDOW)  # the old pretraining
    mode = UpdateMode.MEMORY_ONLY
    series = torch.as_tensor(test)
    # the parity is the memory's: the tokens it stores and reads. Outcome learning (a step on
    # matured targets, issue 10), the output corrector and the analog mix are serving-time
    # additions the pretraining does not replay.
    model.config = dataclasses.replace(model.config, outcome_lr=0.0, corrector_lr=0.0, analog_rows=0)
    for i, s in enumerate(starts.tolist()):
        state = init_stream_state(model, 1, mode)
        state, forecast = observe_many(model, state, series[None, s : s + cfg.seq_len], mode)
        online = [forecast]
        for t in range(s + cfg.seq_len, s + cfg.seq_len + length - 1):
            state, forecast = observe(model, state, series[None, t], mode, Feedback.DELAYED)
            online.append(forecast)
        torch.testing.assert_close(torch.cat(online), trained[i], atol=1e-5, rtol=1e-5)
    # control: a fresh memory per window (what pretraining computed before) is not what is served
    assert (fresh.view_as(trained) - trained).abs().amax() > 1e-3


def test_carried_pretraining_takes_as_many_steps_per_epoch_as_fresh(tiny_csv: Path, tmp_path: Path) -> None:
    """``batch_size`` counts the windows of an optimizer step in both modes: carried runs
    ``batch_size // tbptt`` streams of ``tbptt`` windows. With ``batch_size`` streams it took
    ``tbptt`` times fewer steps per epoch, and 3 epochs left ETTh1-M undertrained (issue 9)."""
    changes = dict(memory="titans", epochs=1, batch_size=12, tbptt=3)
    reports = {
        mode: json.loads(
            (
                pretrain(tiny_config(tiny_csv, tmp_path / mode, memory_pretraining=mode, **changes))
                / REPORT_FILE
            ).read_text()
        )
        for mode in ("carried", "fresh")
    }
    carried, fresh = reports["carried"], reports["fresh"]
    (c_epoch,), (f_epoch,) = carried["epochs"], fresh["epochs"]
    # 101 train windows: fresh 9 steps; carried 4 runs of 19-25 windows (the random shift of
    # the runs' borders leaves up to one run out), 7-9 steps of 3 windows (12 streams: 3 steps)
    assert f_epoch["batches"] == 9
    assert 7 <= c_epoch["batches"] <= f_epoch["batches"], c_epoch
    assert carried["streams"] == 12 // 3 and fresh["streams"] is None


def test_fresh_memory_per_window_stays_an_option(tiny_csv: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_csv, tmp_path / "fresh", memory="titans", epochs=1, memory_pretraining="fresh")
    report = json.loads((pretrain(cfg) / REPORT_FILE).read_text())
    assert report["memory_pretraining"] == "fresh" and report["finished"]
