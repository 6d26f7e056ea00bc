"""``TrainConfig``: everything a pretraining run depends on (the CLI builds it from flags; the
checkpoint's ``train_report.json`` stores it, so evaluation can pretrain the other methods'
models with the same settings)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.checkpoint import DataSchema
from models.config import ModelConfig

MEMORY_PRETRAINING = ("carried", "fresh")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pretraining run depends on (stored in ``train_report.json``)."""

    data: str
    features: str = "M"
    target: str | None = None  # default: OT if present, else the last column
    seq_len: int = 48
    pred_len: int = 12
    # model
    backbone: str = "lstm"
    memory: str = "titans"
    fusion: str = "add"
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0
    online_lr: float = 1e-3
    model_options: tuple[tuple[str, Any], ...] = ()  # further ModelConfig fields, dotted for nested
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0
    patience: int = 3  # epochs without validation improvement before stopping
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    cosine: bool = False  # cosine decay of the learning rate to 0 over the run
    warmup: float = 0.0  # fraction of the steps with a linear warmup
    two_phase_epochs: int = 0  # first epochs train memory + head with the backbone frozen
    max_train_windows: int | None = None  # evenly spaced subset of the train windows
    # how a memory that stores tokens is trained (see trainer/pretrain.py): "carried" as it is
    # served (state carried across consecutive windows, backprop truncated every `tbptt`
    # windows), or "fresh" (every window from a fresh memory that stores the whole window)
    memory_pretraining: str = "carried"
    tbptt: int = 4
    # data splits (non-ETT files)
    val_fraction: float = 0.05
    test_fraction: float = 0.75
    # output and runtime
    out: str = "checkpoints/memcast"
    name: str | None = None
    device: str = "cpu"
    amp: bool = True  # mixed precision, used only on a CUDA device
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if not 0 <= self.warmup < 1 or self.two_phase_epochs < 0 or self.patience < 1:
            raise ValueError("warmup must be in [0, 1), two_phase_epochs >= 0 and patience >= 1")
        if self.memory_pretraining not in MEMORY_PRETRAINING or self.tbptt < 1:
            raise ValueError(f"memory_pretraining must be one of {MEMORY_PRETRAINING} and tbptt >= 1")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_options"] = [list(kv) for kv in self.model_options]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from other versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["model_options"] = tuple(tuple(kv) for kv in values.get("model_options", ()))
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def model_config(self, schema: DataSchema) -> ModelConfig:
        """The model for this data schema: channels from its columns, targets for ``MS``."""
        targets = None if schema.targets == schema.columns else schema.target_indices
        fields: dict[str, Any] = {
            "seq_len": self.seq_len,
            "pred_len": self.pred_len,
            "channels": len(schema.columns),
            "targets": targets,
            "backbone": self.backbone,
            "memory": self.memory,
            "fusion": self.fusion,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "dropout": self.dropout,
            "online_lr": self.online_lr,
        }
        nested: dict[str, dict[str, Any]] = {}
        for key, value in self.model_options:
            if "." in key:
                group, sub = key.split(".", 1)
                nested.setdefault(group, {})[sub] = value
            else:
                fields[key] = value
        config = ModelConfig.from_dict(fields)
        for group, values in nested.items():
            config = config.replace(**{group: dataclasses.replace(getattr(config, group), **values)})
        return config

    def digest(self, data_identity: str = "") -> str:
        """Hash of what determines the trained weights (not the output path, device, UI, nor
        the online learning rate, which only online updates use)."""
        skip = ("out", "name", "device", "progress", "online_lr")
        keep = {k: v for k, v in self.to_dict().items() if k not in skip}
        blob = json.dumps(keep, sort_keys=True, default=str) + data_identity
        return hashlib.sha256(blob.encode()).hexdigest()


def file_identity(path: str | Path) -> str:
    """Content hash of a data file (so a cache key changes when the data does)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
