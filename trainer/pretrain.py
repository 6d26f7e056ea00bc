"""Offline pretraining: CSV -> checkpoint directory (``memcast pretrain``).

AdamW on the MSE of each window's forecast, early stopping on the validation loss with the
best weights kept. How a model whose memory stores tokens sees the windows
(``TrainConfig.memory_pretraining``):

* ``carried`` (default), pretraining as served: the batch rows are streams, each a run of
  consecutive train windows (contiguous pieces of the split, their borders shifted at random
  every epoch). The per-stream memory state is carried from window to window and each window
  stores its newest token only, through :func:`models.online.rollout`, the same computation
  :func:`models.online.observe` makes online. Backpropagation is truncated every ``tbptt``
  windows (one optimizer step per segment, the state detached between segments). An optimizer
  step sees ``batch_size`` windows as in ``fresh``: ``batch_size // tbptt`` streams of ``tbptt``
  windows (:func:`carried_streams`), so an epoch takes as many steps in both modes (with
  ``batch_size`` streams it took ``tbptt`` times fewer, and 3 epochs left the model undertrained:
  docs/investigations.md, issue 9). Validation replays the validation windows the same way.
* ``fresh``: every window starts from a fresh memory that stores the whole window
  (``StorePolicy.WINDOW``), in shuffled batches. Models without such a memory always train so.

The best checkpoint is written (atomically) after every improving epoch, and once before the
first epoch (the untrained model forecasts the last value), so an interrupted run always
leaves a loadable checkpoint.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (:mod:`trainer.distributed`):
each rank takes its share of every global batch's rows (``fresh``: windows; ``carried``:
streams) and of the validation windows, gradients and sums are reduced across ranks, and rank
0 alone writes the checkpoint and its report. ``batch_size`` stays the global batch.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.base import StorePolicy
from models.checkpoint import REPORT_FILE, is_checkpoint, save_checkpoint
from models.forecaster import ContinualForecaster
from models.online import rollout, stores_tokens
from trainer.data import LoadedData, WindowSet, load_dataset
from trainer.distributed import Group, join
from trainer.train_config import TrainConfig, TrainConfigError, file_identity

__all__ = [
    "BatchHook",
    "TrainConfig",
    "carried_segments",
    "carried_streams",
    "file_identity",
    "pretrain",
    "stream_starts",
]

log = logging.getLogger(__name__)

BatchHook = Callable[[int, int, float], None]  # (epoch, batch, loss) after each optimizer step
_EVAL_BATCH = 256
_EVAL_SEGMENT = 32  # windows per rollout call when validating a carried memory
AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


def pretrain(cfg: TrainConfig, on_batch: BatchHook | None = None) -> Path:
    """Train a model as ``cfg`` says and write its checkpoint directory to ``cfg.out``.

    Ctrl-C (``KeyboardInterrupt``) stops training: the best checkpoint written so far stays,
    its report is marked ``interrupted``, and the interrupt is raised again.
    """
    group = join(cfg.device)
    try:
        return _pretrain(cfg, group, on_batch)
    finally:
        group.leave()


def _pretrain(cfg: TrainConfig, group: Group, on_batch: BatchHook | None) -> Path:
    started = time.perf_counter()
    device = group.device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_dataset(
        cfg.data, cfg.features, cfg.target, cfg.seq_len, cfg.pred_len, cfg.val_fraction, cfg.test_fraction
    )
    model_cfg = cfg.model_config(data.schema)
    model = ContinualForecaster(model_cfg).to(device)
    group.broadcast_weights(model)
    run = _Run(cfg, data, model, device, on_batch, group)
    out = Path(cfg.out)
    run.info(
        "pretraining %s/%s/%s (%d parameters) on %s: %d train windows, %d validation windows, %d process(es)",
        model_cfg.backbone,
        model_cfg.memory,
        model_cfg.fusion,
        sum(p.numel() for p in model.parameters()),
        data.path.name,
        run.report["train_windows"],
        len(run.val_set),
        group.world,
    )
    try:
        run.fit(out)
    except KeyboardInterrupt:
        run.report.update(interrupted=True, wall_time_s=time.perf_counter() - started)
        if not group.main:
            raise
        if run.saved:
            _write_report(out, run.report)
            log.warning("pretraining interrupted; the best checkpoint so far is kept at %s", out)
        else:
            log.warning("pretraining interrupted; %s was left as it was", out)
        raise
    run.report.update(wall_time_s=time.perf_counter() - started, finished=True)
    model.load_state_dict(run.best_weights)
    if group.main:
        save_checkpoint(out, model, data.schema, run.report, name=cfg.name)
    group.barrier()  # every rank returns once the checkpoint is there
    run.info(
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
        group: Group | None = None,
    ) -> None:
        self.cfg, self.data, self.model, self.device, self.hook = cfg, data, model, device, hook
        self.group = group or Group()
        out_idx = model.config.out_indices
        self.train_set = WindowSet(data.split("train"), cfg.seq_len, cfg.pred_len, out_idx)
        self.val_set = WindowSet(data.split("val"), cfg.seq_len, cfg.pred_len, out_idx)
        self.train_starts = self.train_set.subset(cfg.max_train_windows)
        self.carried = cfg.memory_pretraining == "carried" and stores_tokens(model)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.amp_dtype = _amp_dtype(device) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.steps_per_epoch = math.ceil(len(self.train_starts) / cfg.batch_size)
        train_windows, streams = len(self.train_starts), None
        if self.carried:
            starts, run = stream_starts(
                len(self.train_set), carried_streams(cfg.batch_size, cfg.tbptt), 0, cfg.max_train_windows
            )
            streams = len(starts)
            self.steps_per_epoch, train_windows = math.ceil(run / cfg.tbptt), run * streams
            if len(starts) < self.group.world:
                raise TrainConfigError(
                    f"carried pretraining on {self.group.world} processes needs at least as many streams "
                    f"(batch_size {cfg.batch_size} // tbptt {cfg.tbptt}, {len(self.train_set)} train "
                    f"windows): {len(starts)}"
                )
        self.best_weights = copy.deepcopy(model.state_dict())
        self.saved = False  # whether this run has written the checkpoint directory
        self.report: dict[str, Any] = {
            "config": cfg.to_dict(),
            "model": model.config.to_dict(),
            "splits": data.splits.to_dict(),
            "train_windows": train_windows,
            "memory_pretraining": "carried" if self.carried else "fresh",
            "streams": streams,  # carried: batch rows
            "val_windows": len(self.val_set),
            "device": str(device),
            "processes": self.group.world,
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
        self.info("initial validation loss %.5f (the untrained model)", best)
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
                self.info("epoch %d: train %.5f, validation %.5f", epoch, row["train_loss"], row["val_loss"])
                if row["val_loss"] < best:
                    best, since_best = row["val_loss"], 0
                    self.best_weights = copy.deepcopy(self.model.state_dict())
                    self.report.update(best_val_loss=best, best_epoch=epoch)
                    self._save(out)
                else:
                    since_best += 1
                    if since_best >= cfg.patience:
                        self.info("no improvement for %d epochs: stopping early", since_best)
                        break

    def info(self, message: str, *args: object) -> None:
        if self.group.main:
            log.info(message, *args)

    def _save(self, out: Path) -> None:
        if self.group.main:
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
        total, used, skipped, windows = 0.0, 0, 0, 0
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not (cfg.progress and self.group.main),
            leave=False,
        )
        with bar:
            for i, (forecast, y, share) in enumerate(self._train_forecasts()):
                # the mean over this rank's rows, weighed by its share of the global batch's
                loss = (
                    F.mse_loss(forecast.float(), y) * share if share else torch.zeros((), device=self.device)
                )
                windows += y.shape[:-2].numel()  # fresh: [b, pred, c]; carried: [b, k, pred, c]
                done, value = self._step(loss, params, optimizer)
                if not done:
                    skipped += 1
                else:
                    schedule.step()
                    total, used = total + value, used + 1
                    if self.hook is not None:
                        self.hook(epoch, i, value)
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
            "windows_by_process": self.group.each(windows, self.device),
        }

    def _train_forecasts(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """One epoch of ``(forecast, target, share)`` per optimizer step: this rank's rows and
        their share of the global batch's (0: none, forecast and target empty)."""
        cfg, model = self.cfg, self.model
        if self.carried:
            n, streams = len(self.train_set), carried_streams(cfg.batch_size, cfg.tbptt)
            _, run = stream_starts(n, streams, 0, cfg.max_train_windows)
            # the runs' borders move every epoch, by less than one run
            offset = int(torch.randint(0, run, (1,), generator=self.generator))
            starts, run = stream_starts(n, streams, offset, cfg.max_train_windows)
            mine = self.group.shard(starts)  # never empty (checked in __init__)
            for forecast, y in carried_segments(
                model, self.train_set, mine, run, cfg.tbptt, self.device, self._autocast
            ):
                yield forecast, y, len(mine) / len(starts)
            return
        order = self.train_starts[torch.randperm(len(self.train_starts), generator=self.generator)]
        for starts in order.split(cfg.batch_size):
            mine = self.group.shard(starts)
            if not len(mine):  # a last batch smaller than the number of processes
                yield torch.empty(0, 0, 0), torch.empty(0, 0, 0), 0.0
                continue
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_set.batch(mine))
            with self._autocast():
                forecast, _ = model(x, model.init_state(x.shape[0], device=self.device), StorePolicy.WINDOW)
            yield forecast, y, len(mine) / len(starts)

    def _step(
        self, loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> tuple[bool, float]:
        """One optimizer step and the global batch's loss; False (and no change) for a
        non-finite loss or gradient. Several ranks decide together: every rank backpropagates
        its loss and the summed gradients and loss decide."""
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not self.group.active and not math.isfinite(value):
            return False, value
        if loss.requires_grad:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        value = self.group.sum_gradients(params, value)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_(params, self.cfg.clip if self.cfg.clip > 0 else float("inf"))
        if not (torch.isfinite(norm) and math.isfinite(value)):
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lets the scaler lower its scale after an overflow
            return False, value
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return True, value

    @torch.no_grad()
    def validate(self) -> float:
        """Mean squared error over every validation window (the training objective); each rank
        sums the error of its share of the windows (carried: of the streams)."""
        model = self.model
        model.eval()
        total, count = 0.0, 0.0
        if self.carried:  # the validation windows as streams, each replayed as served
            starts, run = stream_starts(len(self.val_set), self.cfg.batch_size, 0)
            mine = self.group.shard(starts)
            segments = carried_segments(
                model, self.val_set, mine, run, _EVAL_SEGMENT, self.device, self._autocast
            )
            for forecast, y in segments if len(mine) else ():
                err = (forecast.float() - y).pow(2).mean(dim=(2, 3)).flatten()
                total += float(torch.nan_to_num(err, nan=1e6, posinf=1e6).sum())
                count += len(err)
            total, count = self.group.sum([total, count], self.device)
            return total / count
        for starts in self.group.shard(torch.arange(len(self.val_set))).split(_EVAL_BATCH):
            x, y = (t.to(self.device) for t in self.val_set.batch(starts))
            with self._autocast():
                forecast, _ = model(x, model.init_state(x.shape[0], device=self.device), StorePolicy.WINDOW)
            err = (forecast.float() - y).pow(2).mean(dim=(1, 2))
            total += float(torch.nan_to_num(err, nan=1e6, posinf=1e6).sum())
            count += len(err)
        total, count = self.group.sum([total, count], self.device)
        return total / count

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def carried_streams(batch_size: int, tbptt: int) -> int:
    """Streams of carried pretraining: ``batch_size`` windows per optimizer step, ``tbptt`` of
    them consecutive in each stream (at least one stream)."""
    return max(1, batch_size // tbptt)


def stream_starts(
    n_windows: int, streams: int, offset: int = 0, limit: int | None = None
) -> tuple[torch.Tensor, int]:
    """First windows ``[b]`` of ``b = min(streams, n_windows)`` contiguous runs of equal length
    that tile windows ``[offset, n_windows)`` (the remainder is left out), and that length;
    ``limit`` caps the windows of all runs together."""
    b = min(streams, n_windows)
    run = max(1, (n_windows - offset) // b)
    if limit is not None:
        run = max(1, min(run, limit // b))
    return offset + run * torch.arange(b), run


def carried_segments(
    model: ContinualForecaster,
    windows: WindowSet,
    starts: torch.Tensor,
    length: int,
    segment: int,
    device: torch.device | str = "cpu",
    autocast: AutocastFactory = contextlib.nullcontext,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pretraining as served: forecasts ``[b, k, pred_len, c_out]`` and targets of ``length``
    consecutive windows per stream (stream ``i`` starts at window ``starts[i]``), ``segment``
    windows per item. Each stream starts from a fresh memory; its state is carried from window
    to window by :func:`models.online.rollout` and detached between items, so a caller that
    backpropagates each item's loss truncates backpropagation there."""
    b = len(starts)
    state = model.init_state(b, device=device)
    for j in range(0, length, segment):
        k = min(segment, length - j)
        index = (starts[:, None] + j + torch.arange(k)).flatten()  # [b * k], stream-major
        x, y = (t.to(device, non_blocking=True) for t in windows.batch(index))
        with autocast():
            forecast, state = rollout(model, state, x.unflatten(0, (b, k)))
        yield forecast, y.unflatten(0, (b, k))
        state = state.detach()


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
