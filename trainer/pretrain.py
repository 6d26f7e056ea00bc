"""Offline pretraining: CSV -> checkpoint directory (``memcast pretrain``).

AdamW on the MSE of each window's forecast, each window starting from a fresh per-stream state
(``StorePolicy.WINDOW``), early stopping on the validation loss with the best weights kept.
The best checkpoint is written (atomically) after every improving epoch, and once before the
first epoch (the untrained model forecasts the last value), so an interrupted run always
leaves a loadable checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.base import StorePolicy
from models.checkpoint import REPORT_FILE, is_checkpoint, save_checkpoint
from models.forecaster import ContinualForecaster
from trainer.data import LoadedData, WindowSet, load_dataset
from trainer.train_config import TrainConfig, file_identity

__all__ = ["BatchHook", "TrainConfig", "file_identity", "pretrain"]

log = logging.getLogger(__name__)

BatchHook = Callable[[int, int, float], None]  # (epoch, batch, loss) after each optimizer step
_EVAL_BATCH = 256


def pretrain(cfg: TrainConfig, on_batch: BatchHook | None = None) -> Path:
    """Train a model as ``cfg`` says and write its checkpoint directory to ``cfg.out``.

    Ctrl-C (``KeyboardInterrupt``) stops training: the best checkpoint written so far stays,
    its report is marked ``interrupted``, and the interrupt is raised again.
    """
    started = time.perf_counter()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_dataset(
        cfg.data, cfg.features, cfg.target, cfg.seq_len, cfg.pred_len, cfg.val_fraction, cfg.test_fraction
    )
    model_cfg = cfg.model_config(data.schema)
    model = ContinualForecaster(model_cfg).to(device)
    run = _Run(cfg, data, model, device, on_batch)
    out = Path(cfg.out)
    log.info(
        "pretraining %s/%s/%s (%d parameters) on %s: %d train windows, %d validation windows",
        model_cfg.backbone,
        model_cfg.memory,
        model_cfg.fusion,
        sum(p.numel() for p in model.parameters()),
        data.path.name,
        len(run.train_starts),
        len(run.val_set),
    )
    try:
        run.fit(out)
    except KeyboardInterrupt:
        run.report.update(interrupted=True, wall_time_s=time.perf_counter() - started)
        if run.saved:
            _write_report(out, run.report)
            log.warning("pretraining interrupted; the best checkpoint so far is kept at %s", out)
        else:
            log.warning("pretraining interrupted; %s was left as it was", out)
        raise
    run.report.update(wall_time_s=time.perf_counter() - started, finished=True)
    model.load_state_dict(run.best_weights)
    save_checkpoint(out, model, data.schema, run.report, name=cfg.name)
    log.info(
        "best validation loss %.5f (epoch %d) in %.1f s -> %s",
        run.report["best_val_loss"],
        run.report["best_epoch"],
        run.report["wall_time_s"],
        out,
    )
    return out


class _Run:
    """The state of one training run: model, windows, optimiser, report."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: LoadedData,
        model: ContinualForecaster,
        device: torch.device,
        hook: BatchHook | None,
    ) -> None:
        self.cfg, self.data, self.model, self.device, self.hook = cfg, data, model, device, hook
        out_idx = model.config.out_indices
        self.train_set = WindowSet(data.split("train"), cfg.seq_len, cfg.pred_len, out_idx)
        self.val_set = WindowSet(data.split("val"), cfg.seq_len, cfg.pred_len, out_idx)
        self.train_starts = self.train_set.subset(cfg.max_train_windows)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.amp_dtype = _amp_dtype(device) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.steps_per_epoch = math.ceil(len(self.train_starts) / cfg.batch_size)
        self.best_weights = copy.deepcopy(model.state_dict())
        self.saved = False  # whether this run has written the checkpoint directory
        self.report: dict[str, Any] = {
            "config": cfg.to_dict(),
            "model": model.config.to_dict(),
            "splits": data.splits.to_dict(),
            "train_windows": len(self.train_starts),
            "val_windows": len(self.val_set),
            "device": str(device),
            "amp": None if self.amp_dtype is None else str(self.amp_dtype),
            "torch": torch.__version__,
            "epochs": [],
            "skipped_batches": 0,
            "interrupted": False,
            "finished": False,
        }

    def fit(self, out: Path) -> None:
        cfg = self.cfg
        best = self.validate()
        self.report.update(initial_val_loss=best, best_val_loss=best, best_epoch=0)
        log.info("initial validation loss %.5f (the untrained model)", best)
        if not is_checkpoint(out):  # an interrupted run leaves a checkpoint, never replaces one with this
            self._save(out)
        since_best = 0
        phases = (
            [(1, cfg.two_phase_epochs), (2, cfg.epochs - cfg.two_phase_epochs)]
            if cfg.two_phase_epochs
            else [(0, cfg.epochs)]
        )
        epoch = 0
        for phase, n_epochs in phases:
            if n_epochs <= 0:
                continue
            optimizer, schedule = self._optimizer(phase, n_epochs)
            since_best = 0
            for _ in range(n_epochs):
                epoch += 1
                row = self._epoch(epoch, phase, optimizer, schedule)
                row["val_loss"] = self.validate()
                self.report["epochs"].append(row)
                log.info("epoch %d: train %.5f, validation %.5f", epoch, row["train_loss"], row["val_loss"])
                if row["val_loss"] < best:
                    best, since_best = row["val_loss"], 0
                    self.best_weights = copy.deepcopy(self.model.state_dict())
                    self.report.update(best_val_loss=best, best_epoch=epoch)
                    self._save(out)
                else:
                    since_best += 1
                    if since_best >= cfg.patience:
                        log.info("no improvement for %d epochs: stopping early", since_best)
                        break

    def _save(self, out: Path) -> None:
        save_checkpoint(out, self.model, self.data.schema, self.report, name=self.cfg.name)
        self.saved = True

    def _optimizer(
        self, phase: int, n_epochs: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        frozen = phase == 1
        for name, p in self.model.named_parameters():
            p.requires_grad_(not (frozen and _is_backbone(name)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = max(1, n_epochs * self.steps_per_epoch)
        warmup = int(self.cfg.warmup * total)
        cosine = self.cfg.cosine

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _epoch(
        self,
        epoch: int,
        phase: int,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LambdaLR,
    ) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.train()
        started = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        total, used, skipped = 0.0, 0, 0
        order = self.train_starts[torch.randperm(len(self.train_starts), generator=self.generator)]
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        with bar:
            for i, starts in enumerate(order.split(cfg.batch_size)):
                x, y = (t.to(self.device, non_blocking=True) for t in self.train_set.batch(starts))
                with self._autocast():
                    forecast, _ = model(
                        x, model.init_state(x.shape[0], device=self.device), StorePolicy.WINDOW
                    )
                loss = F.mse_loss(forecast.float(), y)
                if not self._step(loss, params, optimizer):
                    skipped += 1
                else:
                    schedule.step()
                    total, used = total + loss.item(), used + 1
                    if self.hook is not None:
                        self.hook(epoch, i, loss.item())
                bar.update()
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{total / max(used, 1):.4f}", skipped=skipped)
        if skipped:
            log.warning("epoch %d: %d batches skipped for a non-finite loss or gradient", epoch, skipped)
        self.report["skipped_batches"] += skipped
        return {
            "epoch": epoch,
            "phase": phase,
            "train_loss": total / used if used else float("nan"),
            "batches": used,
            "skipped": skipped,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }

    def _step(self, loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
        """One optimizer step; False (and no change) for a non-finite loss or gradient."""
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return False
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        norm = nn.utils.clip_grad_norm_(params, self.cfg.clip if self.cfg.clip > 0 else float("inf"))
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lets the scaler lower its scale after an overflow
            return False
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return True

    @torch.no_grad()
    def validate(self) -> float:
        """Mean squared error over every validation window (the training objective)."""
        model = self.model
        model.eval()
        total, count = 0.0, 0
        for starts in torch.arange(len(self.val_set)).split(_EVAL_BATCH):
            x, y = (t.to(self.device) for t in self.val_set.batch(starts))
            with self._autocast():
                forecast, _ = model(x, model.init_state(x.shape[0], device=self.device), StorePolicy.WINDOW)
            err = (forecast.float() - y).pow(2).mean(dim=(1, 2))
            total += float(torch.nan_to_num(err, nan=1e6, posinf=1e6).sum())
            count += len(err)
        return total / count

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _is_backbone(name: str) -> bool:
    """Parameters frozen in the first phase of a two-phase run: the embedding and the
    backbone, except memory modules that live inside it (the titans backbone's)."""
    return name.startswith(("embed.", "backbone.")) and "memory" not in name


def _write_report(directory: Path, report: dict[str, Any]) -> None:
    """Replace ``train_report.json`` of an existing checkpoint atomically."""
    fd, tmp = tempfile.mkstemp(prefix=".report.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, directory / REPORT_FILE)
