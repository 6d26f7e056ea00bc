"""``TrainConfig``: everything a pretraining run depends on.

It holds the :class:`~models.config.ModelConfig` it trains (one source of truth for the
model's fields); the CLI generates its flags from both dataclasses (``trainer/flags.py``), and
the checkpoint's ``train_report.json`` stores it, so evaluation can pretrain the other methods'
models with the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.checkpoint import DataSchema
from models.config import ModelConfig

# ModelConfig fields the data decides (set from the data schema, never by a flag)
DATA_DERIVED_MODEL_FIELDS = ("channels", "targets")
# what only online updates use: it does not change the pretrained weights
ONLINE_ONLY_MODEL_FIELDS = (
    "online_lr",
    "online_weight_decay",
    "online_betas",
    "online_clip",
    "online_anchor",
    "outcome_lr",
    "corrector_lr",
    "known_lr",
    "analog_rows",
)
# how carried pretraining lays out a batch (part of the digest: checkpoints cached when it was
# batch_size streams of tbptt windows, before issue 9's fix, are not reused)
CARRIED_LAYOUT = "streams = batch_size // tbptt"
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "features": ("S", "M", "MS"),
    "memory_pretraining": ("carried", "fresh"),
}


class TrainConfigError(ValueError):
    """Training settings that cannot work together; the message names the setting."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pretraining run depends on (stored in ``train_report.json``)."""

    data: str  # CSV with a date column and numeric columns
    model: ModelConfig = field(default_factory=ModelConfig)
    features: str = "M"  # S (target only), M (all columns) or MS (all in, target out)
    target: str | None = None  # target column (default OT if present, else the last column)
    # optimisation
    epochs: int = 10
    batch_size: int = 32  # windows per optimizer step (carried: batch_size // tbptt streams)
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
    memory_pretraining: str = "carried"  # a token-storing memory: "carried" as served, or "fresh"
    tbptt: int = 4  # carried: windows per truncated-backpropagation segment
    # data splits (non-ETT files)
    val_fraction: float = 0.05  # validation share of a non-ETT file
    test_fraction: float = 0.75  # online test share of a non-ETT file
    # output and runtime
    out: str = "checkpoints/memcast"
    name: str | None = None
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    amp: bool = True  # mixed precision, used only on a CUDA device
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainConfigError("epochs and batch_size must be >= 1 and lr > 0")
        if not 0 <= self.warmup < 1 or self.two_phase_epochs < 0 or self.patience < 1:
            raise TrainConfigError("warmup must be in [0, 1), two_phase_epochs >= 0 and patience >= 1")
        for name, choices in TRAIN_CHOICES.items():
            if getattr(self, name) not in choices:
                raise TrainConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.tbptt < 1:
            raise TrainConfigError("tbptt must be >= 1")

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    @property
    def pred_len(self) -> int:
        return self.model.pred_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`. Also reads the flat layout of older reports (model
        fields beside the training ones); unknown keys from other versions are ignored."""
        data = dict(data)
        model = data.pop("model", None)
        flat = {k: v for k, v in data.items() if k in _model_field_names() or "." in k}
        for key, value in data.pop("model_options", ()) or ():
            flat[key] = value
        known = {f.name for f in dataclasses.fields(cls)} - {"model"}
        values = {k: v for k, v in data.items() if k in known}
        base = ModelConfig.from_dict(model) if isinstance(model, dict) else ModelConfig()
        return cls(**values, model=with_model_fields(base, flat))

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """A config from flat keyword arguments: training fields and model fields side by side
        (``seq_len=60, backbone="tcn", epochs=3``), nested model fields dotted
        (``"neural_memory.chunk_size"``), as the CLI and tests write them."""
        return cls(data=values.pop("data")).replace(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """``dataclasses.replace`` that routes model field names into :attr:`model`."""
        model_changes = {k: changes.pop(k) for k in list(changes) if k in _model_field_names() or "." in k}
        model = with_model_fields(changes.pop("model", self.model), model_changes)
        return dataclasses.replace(self, model=model, **changes)

    def model_config(self, schema: DataSchema) -> ModelConfig:
        """The model for this data schema: channels from its columns, targets for ``MS``."""
        targets = None if schema.targets == schema.columns else schema.target_indices
        return self.model.replace(channels=len(schema.columns), targets=targets)

    def digest(self, data_identity: str = "") -> str:
        """Hash of what determines the trained weights (not the output path, device, UI, nor
        the online update's settings, which only online updates use)."""
        keep = {k: v for k, v in self.to_dict().items() if k not in ("out", "name", "device", "progress")}
        keep["model"] = {k: v for k, v in keep["model"].items() if k not in ONLINE_ONLY_MODEL_FIELDS}
        blob = json.dumps(keep, sort_keys=True, default=str) + data_identity
        if self.memory_pretraining == "carried":  # a cache of batch_size streams is not this run
            blob += CARRIED_LAYOUT
        return hashlib.sha256(blob.encode()).hexdigest()


def with_model_fields(config: ModelConfig, changes: dict[str, Any]) -> ModelConfig:
    """``config`` with top-level (``d_model``) and nested (``neural_memory.chunk_size``) fields
    changed; the result is validated by ``ModelConfig`` itself."""
    if not changes:
        return config
    data = config.to_dict()
    for key, value in changes.items():
        group, dot, sub = key.partition(".")
        if dot:
            if not isinstance(data.get(group), dict):
                raise TrainConfigError(f"{key!r}: the model config has no group {group!r}")
            data[group] = {**data[group], sub: value}
        else:
            data[key] = value
    return ModelConfig.from_dict(data)


def _model_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)}


def file_identity(path: str | Path) -> str:
    """Content hash of a data file (so a cache key changes when the data does)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
