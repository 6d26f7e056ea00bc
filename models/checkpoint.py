"""Checkpoint directories: ``model.safetensors`` + ``config.json`` (+ ``train_report.json``).

Everything a separate process needs to rebuild the model and to map a stream's values to the
model's scale is in these files; nothing is unpickled.

``config.json``::

    {"format_version": 1, "name": ..., "fingerprint": ..., "model": {ModelConfig},
     "data": {DataSchema}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.forecaster import ContinualForecaster
from models.state_io import model_fingerprint

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REPORT_FILE = "train_report.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not match this version."""


@dataclass(frozen=True)
class DataSchema:
    """How a stream's raw values map to the model's inputs and outputs."""

    columns: tuple[str, ...]  # input columns, in the model's channel order
    targets: tuple[str, ...]  # forecast columns (a subset of columns, in order)
    mean: tuple[float, ...]  # standard scaler fitted on the train split, per input column
    std: tuple[float, ...]
    seq_len: int
    pred_len: int
    freq: str | None = None  # pandas offset alias ("h", "15min") when the data set had one
    features: str = "M"  # "S", "M" or "MS"
    date_column: str = "date"

    def __post_init__(self) -> None:
        if not (len(self.columns) == len(self.mean) == len(self.std)):
            raise CheckpointError("columns, mean and std must have the same length")
        missing = set(self.targets) - set(self.columns)
        if missing:
            raise CheckpointError(f"targets {sorted(missing)} are not among the columns")

    @property
    def target_indices(self) -> tuple[int, ...]:
        return tuple(self.columns.index(t) for t in self.targets)

    def scale(self, values: torch.Tensor) -> torch.Tensor:
        """Raw ``[..., c]`` -> model scale."""
        mean = torch.tensor(self.mean, dtype=values.dtype)
        std = torch.tensor(self.std, dtype=values.dtype)
        return (values - mean) / std

    def unscale_targets(self, values: torch.Tensor) -> torch.Tensor:
        """Model scale ``[..., c_out]`` of the target columns -> raw units."""
        idx = list(self.target_indices)
        mean = torch.tensor(self.mean, dtype=values.dtype)[idx]
        std = torch.tensor(self.std, dtype=values.dtype)[idx]
        return values * std + mean

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSchema:
        data = dict(data)
        for key in ("columns", "targets", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class Checkpoint:
    name: str
    path: Path
    model: ContinualForecaster
    schema: DataSchema
    fingerprint: str

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(
    directory: str | Path,
    model: ContinualForecaster,
    schema: DataSchema,
    report: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write a checkpoint atomically: files go to a temporary directory that is then renamed,
    so an interrupted run leaves the previous checkpoint intact."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    weights = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS_FILE))
    cpu_model = _build(model.config, weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name or directory.name,
        "fingerprint": model_fingerprint(cpu_model, model.config.digest()),
        "model": model.config.to_dict(),
        "data": schema.to_dict(),
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if report is not None:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = json.loads(config_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {meta.get('format_version')!r}, this memcast reads {FORMAT_VERSION}"
        )
    config = ModelConfig.from_dict(meta["model"])
    model = _build(config, load_file(str(weights_path)))
    fingerprint = model_fingerprint(model, config.digest())
    if fingerprint != meta["fingerprint"]:
        raise CheckpointError(f"{directory}: weights do not match the fingerprint in {CONFIG_FILE}")
    return Checkpoint(
        name=meta["name"],
        path=directory,
        model=model.to(device),
        schema=DataSchema.from_dict(meta["data"]),
        fingerprint=fingerprint,
    )


def is_checkpoint(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def _build(config: ModelConfig, weights: dict[str, torch.Tensor]) -> ContinualForecaster:
    model = ContinualForecaster(config)
    model.load_state_dict(weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
