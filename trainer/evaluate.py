"""Online evaluation (``memcast evaluate``): every method replays the test split through
``models.online`` and is scored on the same forecasts' values.

Scale: metrics are on the data set's scaled values (the scaler fitted on its train split), the
literature's convention. A checkpoint trained with another scaler sees the test rows on its
own scale and its forecasts are mapped back, so every method is scored on one scale.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import Checkpoint, DataSchema
from models.forecaster import ContinualForecaster
from models.intervals import DEFAULT_LEVELS, check_levels, coverage, replay
from models.online import Feedback, UpdateMode
from trainer.data import LoadedData, load_dataset
from trainer.methods import MethodSpec, checkpoint_for, parse_methods, with_experts
from trainer.online_eval import (
    ReplayConfig,
    StreamResult,
    combine_stream,
    count_steps,
    metrics,
    naive_forecasts,
    replay_stream,
    truths_of,
)
from trainer.report import write_outputs
from trainer.train_config import ONLINE_ONLY_MODEL_FIELDS, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """An evaluation run. ``train`` names the data (path, features, target, seq_len, pred_len)
    and is the pretraining config of every method whose checkpoint is missing."""

    train: TrainConfig
    methods: tuple[str, ...] = ("naive", "memcast")
    checkpoint: str | None = None  # the ``memcast`` method's checkpoint
    mode: str = UpdateMode.MEMORY_ONLY.value
    feedback: str = Feedback.DELAYED.value
    online_lr: float | None = None  # overrides every model's online learning rate
    max_steps: int | None = None
    out: str = "runs/eval"
    runs_dir: str = "runs"
    er_buffer: int = 500
    er_samples: int = 2
    plots: bool = True
    save_forecasts: bool = False  # forecasts.npz: every method's forecasts and the truths
    interval_levels: tuple[float, ...] = DEFAULT_LEVELS  # prediction intervals scored per method

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"] = self.train.to_dict()
        return data


@dataclass
class MethodRun:
    spec: MethodSpec
    result: StreamResult
    checkpoint: Checkpoint | None


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every method, write ``report.json`` (+ plots) to ``cfg.out`` and return the report."""
    started = time.perf_counter()
    train = cfg.train
    feedback = Feedback(cfg.feedback)
    check_levels(cfg.interval_levels)
    specs = parse_methods(cfg.methods, UpdateMode(cfg.mode), Path(cfg.checkpoint) if cfg.checkpoint else None)
    specs = with_experts(specs, UpdateMode(cfg.mode))
    data = load_dataset(
        train.data,
        train.features,
        train.target,
        train.seq_len,
        train.pred_len,
        train.val_fraction,
        train.test_fraction,
    )
    raw_test = torch.as_tensor(data.split("test", scaled=False), dtype=torch.float64)
    steps = count_steps(len(raw_test), train.seq_len, train.pred_len, cfg.max_steps)
    log.info(
        "online test of %s: %d steps (%s feedback), methods %s",
        data.path.name,
        steps,
        feedback.value,
        ", ".join(s.name for s in specs),
    )
    runs: list[MethodRun] = []
    for spec in specs:
        if spec.experts:
            by_name = {r.spec.name: r.result for r in runs}
            result = combine_stream([by_name[e] for e in spec.experts], feedback)
            log.info("%s: MSE %.4f", spec.name, metrics(result.forecasts, result.truths)["mse"])
            runs.append(MethodRun(spec, result, None))
        else:
            runs.append(_run_method(spec, cfg, data, raw_test, feedback))
    report = {
        "config": cfg.to_dict(),
        "data": {
            "path": str(data.path),
            "features": data.schema.features,
            "columns": list(data.schema.columns),
            "targets": list(data.schema.targets),
            "splits": data.splits.to_dict(),
            "test_steps": steps,
            "seq_len": train.seq_len,
            "pred_len": train.pred_len,
        },
        "feedback": feedback.value,
        "metric_scale": "scaled (standard scaler fitted on the train split)",
        "methods": {run.spec.name: _summary(run, cfg.interval_levels) for run in runs},
        "wall_time_s": time.perf_counter() - started,
    }
    write_outputs(Path(cfg.out), report, {r.spec.name: r.result for r in runs}, cfg.plots, cfg.save_forecasts)
    return report


def _run_method(
    spec: MethodSpec, cfg: EvalConfig, data: LoadedData, raw_test: torch.Tensor, feedback: Feedback
) -> MethodRun:
    train, schema = cfg.train, data.schema
    scaled = torch.as_tensor(schema.scale(raw_test), dtype=torch.float32)
    if not spec.needs_model:
        out_idx = schema.target_indices
        result = naive_forecasts(scaled, train.seq_len, train.pred_len, out_idx, _steps(cfg, scaled))
        log.info("%s: MSE %.4f", spec.name, metrics(result.forecasts, result.truths)["mse"])
        return MethodRun(spec, result, None)
    ckpt = checkpoint_for(spec, train, Path(cfg.runs_dir), train.device)
    _check_compatible(spec, ckpt.schema, schema)
    # the flags' online settings apply to the models they describe (a cached checkpoint keeps
    # the ones of its pretraining run); --online-lr applies to every model
    online = {f: getattr(train.model, f) for f in ONLINE_ONLY_MODEL_FIELDS} if spec.checkpoint is None else {}
    if cfg.online_lr is not None:
        online["online_lr"] = cfg.online_lr
    model = with_online_settings(ckpt.model, online)
    series = torch.as_tensor(ckpt.schema.scale(raw_test), dtype=torch.float32).to(train.device)
    replay = ReplayConfig(cfg.er_buffer, cfg.er_samples, train.seed) if spec.replay else None
    result = replay_stream(
        model, series, spec.mode, feedback, cfg.max_steps, replay, progress=train.progress, desc=spec.name
    )
    truths = truths_of(scaled, train.seq_len, train.pred_len, schema.target_indices, result.steps)
    result = dataclasses.replace(
        result, forecasts=_rescale(result.forecasts, ckpt.schema, schema), truths=truths
    )
    log.info(
        "%s: MSE %.4f, %.1f steps/s",
        spec.name,
        metrics(result.forecasts, result.truths)["mse"],
        result.steps / max(result.wall_s, 1e-9),
    )
    return MethodRun(spec, result, ckpt)


def with_online_lr(model: ContinualForecaster, online_lr: float | None) -> ContinualForecaster:
    """The same weights under a config with another online learning rate (a new fingerprint)."""
    return with_online_settings(model, {} if online_lr is None else {"online_lr": online_lr})


def with_online_settings(model: ContinualForecaster, online: dict[str, Any]) -> ContinualForecaster:
    """The same weights under a config with other online-only settings (a new fingerprint)."""
    changes = {k: v for k, v in online.items() if getattr(model.config, k) != v}
    if not changes:
        return model
    rebuilt = ContinualForecaster(model.config.replace(**changes))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.to(next(model.parameters()).device).eval()
    for p in rebuilt.parameters():
        p.requires_grad_(False)
    return rebuilt


def _steps(cfg: EvalConfig, series: torch.Tensor) -> int:
    return count_steps(len(series), cfg.train.seq_len, cfg.train.pred_len, cfg.max_steps)


def _check_compatible(spec: MethodSpec, ckpt: DataSchema, data: DataSchema) -> None:
    same = ckpt.columns == data.columns and ckpt.targets == data.targets
    if not same or (ckpt.seq_len, ckpt.pred_len) != (data.seq_len, data.pred_len):
        raise ValueError(
            f"{spec.name}: the checkpoint reads {list(ckpt.columns)} -> {list(ckpt.targets)} with "
            f"seq_len {ckpt.seq_len}, pred_len {ckpt.pred_len}; the evaluation uses {list(data.columns)} -> "
            f"{list(data.targets)} with {data.seq_len}, {data.pred_len}"
        )


def _rescale(forecasts: np.ndarray, ckpt: DataSchema, data: DataSchema) -> np.ndarray:
    """Map a checkpoint's forecasts to the data set's scale (a no-op when the scalers agree)."""
    if (ckpt.mean, ckpt.std) == (data.mean, data.std):
        return forecasts
    raw = ckpt.unscale_targets(torch.as_tensor(forecasts, dtype=torch.float64))
    idx = list(data.target_indices)
    mean = torch.tensor(data.mean, dtype=torch.float64)[idx]
    std = torch.tensor(data.std, dtype=torch.float64)[idx]
    return ((raw - mean) / std).numpy()


def interval_scores(result: StreamResult, levels: tuple[float, ...]) -> dict[str, dict[str, float]]:
    """Coverage and mean width per level of the intervals the service would have served with
    these forecasts: ``models.intervals`` learning from the errors in the order they mature
    (delayed, whatever the feedback the models learned with). Keyed by level, e.g. ``"0.8"``."""
    forecasts, truths = torch.from_numpy(result.forecasts), torch.from_numpy(result.truths)
    lower, upper = replay(forecasts, truths, check_levels(levels))
    cov, width, count = coverage(lower, upper, truths)
    return {
        str(level): {"coverage": float(cov[i]), "mean_width": float(width[i]), "count": int(count[i])}
        for i, level in enumerate(levels)
    }


def _summary(run: MethodRun, levels: tuple[float, ...]) -> dict[str, Any]:
    r = run.result
    row: dict[str, Any] = metrics(r.forecasts, r.truths)
    row["intervals"] = interval_scores(r, levels)
    row.update(
        mode=run.spec.mode.value,
        steps=r.steps,
        wall_s=r.wall_s,
        steps_per_s=r.steps / max(r.wall_s, 1e-9),
        learn_calls=r.learn_calls,
        updates_per_s=r.learn_calls / max(r.wall_s, 1e-9),
    )
    if run.spec.experts:
        row.update(experts=list(run.spec.experts))
    if run.checkpoint is not None:
        cfg = run.checkpoint.config
        row.update(
            checkpoint=str(run.checkpoint.path),
            fingerprint=run.checkpoint.fingerprint,
            backbone=cfg.backbone,
            memory=cfg.memory,
            fusion=cfg.fusion,
            replay=run.spec.replay,
        )
    return row
