"""The model registry: every checkpoint under ``MEMCAST_CHECKPOINT_DIR``, loaded at start-up.

``models.online`` calls ``torch.func.functional_call``, which swaps a module's parameters for
the duration of a call; a module shared by several threads would see another stream's
weights. Each worker thread therefore computes with its own replica of a model (same weights,
same fingerprint), made on first use.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import Checkpoint, DataSchema, is_checkpoint, load_checkpoint
from models.forecaster import ContinualForecaster
from service.errors import ModelNotFound

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _copy_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint

    @property
    def schema(self) -> DataSchema:
        return self.checkpoint.schema

    @property
    def seq_len(self) -> int:
        return self.checkpoint.config.seq_len

    @property
    def pred_len(self) -> int:
        return self.checkpoint.config.pred_len

    @property
    def columns(self) -> tuple[str, ...]:
        return self.schema.columns

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.schema.columns[i] for i in self.checkpoint.config.out_indices)

    def replica(self) -> ContinualForecaster:
        """This thread's own copy of the model."""
        model = getattr(self._local, "model", None)
        if model is None:
            with self._copy_lock:
                model = copy.deepcopy(self.checkpoint.model)
            self._local.model = model
        return model

    def describe(self) -> dict[str, Any]:
        s = self.schema
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "columns": list(s.columns),
            "targets": list(self.targets),
            "mean": list(s.mean),
            "std": list(s.std),
            "seq_len": self.seq_len,
            "pred_len": self.pred_len,
            "freq": s.freq,
            "features": s.features,
            "config": self.checkpoint.config.to_dict(),
        }


class ModelRegistry:
    def __init__(self, models: dict[str, LoadedModel], default: str | None = None) -> None:
        self.models = models
        if default is not None and default not in models:
            raise ModelNotFound(default, sorted(models))
        self.default = default if default is not None else (sorted(models)[0] if models else None)

    def get(self, name: str | None) -> LoadedModel:
        key = name if name is not None else self.default
        if key is None or key not in self.models:
            raise ModelNotFound(str(key), sorted(self.models))
        return self.models[key]

    def __len__(self) -> int:
        return len(self.models)


def checkpoint_dirs(root: Path) -> list[Path]:
    if is_checkpoint(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p))


def load_registry(
    root: Path, default: str | None = None, device: str | torch.device = "cpu"
) -> ModelRegistry:
    models: dict[str, LoadedModel] = {}
    for path in checkpoint_dirs(root):
        checkpoint = load_checkpoint(path, device=device)
        if checkpoint.name in models:
            raise ValueError(
                f"two checkpoints are named {checkpoint.name!r}: {models[checkpoint.name].checkpoint.path}, {path}"
            )
        models[checkpoint.name] = LoadedModel(checkpoint)
        log.info(
            "loaded model %s from %s (fingerprint %s)", checkpoint.name, path, checkpoint.fingerprint[:12]
        )
    if not models:
        log.warning("no checkpoint under %s: the service will not be ready", root)
    return ModelRegistry(models, default)
