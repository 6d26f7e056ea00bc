"""Data sets for pretraining and online evaluation: CSV -> columns, splits, scaler, windows.

A CSV has a date column and numeric columns (the ETT format). ``features`` picks the channels:
``S`` the target only, ``M`` every numeric column (all forecast), ``MS`` every column in, the
target out. As in the Informer/FSNet loaders, the target is moved to the last channel.

Splits, in rows of the file (``[start, end)``):

- hourly ETT files (name ``ETTh*``): the FSNet/OneNet borders: train ``[0, 2880)``,
  validation ``[2880 - seq_len, 3600)``, online test ``[3600 - seq_len, 14400)``; ``ETTm*``
  files use the same borders times four (15-minute rows);
- any other CSV: ``train / val / test`` fractions (default 20% / 5% / 75%); the validation and
  test splits start ``seq_len`` rows before their borders, so their first window ends at the
  border and every test row gets forecast.

The standard scaler is fitted on the train rows only (population std; a constant column gets
std 1).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from models.checkpoint import DataSchema

log = logging.getLogger(__name__)

FEATURES = ("S", "M", "MS")
DEFAULT_TARGET = "OT"
_ETT_HOURS = 30 * 24  # the ETT loaders count a month as 30 days


class DataError(ValueError):
    """A CSV or a split request that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Splits:
    """Row ranges ``[start, end)`` of each split, in rows of the file."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]

    def to_dict(self) -> dict[str, list[int]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


@dataclass(frozen=True)
class LoadedData:
    """A data set ready for training and evaluation.

    ``raw`` holds the selected columns in the schema's channel order (float64, file units),
    ``scaled`` the same rows on the model's scale (float32).
    """

    schema: DataSchema
    raw: np.ndarray  # [n, c]
    scaled: np.ndarray  # [n, c]
    dates: pd.DatetimeIndex
    splits: Splits
    path: Path

    def split(self, name: str, scaled: bool = True) -> np.ndarray:
        start, end = getattr(self.splits, name)
        return (self.scaled if scaled else self.raw)[start:end]


def read_frame(path: str | Path, date_column: str = "date") -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    frame = pd.read_csv(path)
    if date_column not in frame.columns:
        raise DataError(f"{path}: no {date_column!r} column (found {list(frame.columns)[:8]})")
    frame[date_column] = pd.to_datetime(frame[date_column])
    return frame


def select_columns(
    frame: pd.DataFrame, features: str, target: str | None, date_column: str = "date"
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(columns, targets)`` for ``features``: the target is the last column."""
    if features not in FEATURES:
        raise DataError(f"features={features!r} is not one of {', '.join(FEATURES)}")
    numeric = [c for c in frame.columns if c != date_column and pd.api.types.is_numeric_dtype(frame[c])]
    if not numeric:
        raise DataError("the CSV has no numeric columns")
    if target is None:
        target = DEFAULT_TARGET if DEFAULT_TARGET in numeric else numeric[-1]
    if target not in numeric:
        raise DataError(f"target {target!r} is not a numeric column (numeric: {numeric})")
    if features == "S":
        return (target,), (target,)
    columns = tuple([c for c in numeric if c != target] + [target])
    return columns, columns if features == "M" else (target,)


def split_borders(
    n_rows: int,
    seq_len: int,
    name: str = "",
    val_fraction: float = 0.05,
    test_fraction: float = 0.75,
) -> Splits:
    """Split borders: the FSNet/OneNet ones for ETT files, else fractions (train = the rest)."""
    ett = re.match(r"ETT([hm])", Path(name).name)
    if ett:
        unit = _ETT_HOURS * (4 if ett.group(1) == "m" else 1)
        train_end, val_end, test_end = 4 * unit, 5 * unit, 20 * unit
        if n_rows < test_end:
            raise DataError(f"{name}: an ETT file needs {test_end} rows for its splits, found {n_rows}")
    else:
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataError("val and test fractions must be in (0, 1) and sum to less than 1")
        train_end = int(round(n_rows * (1 - val_fraction - test_fraction)))
        val_end = int(round(n_rows * (1 - test_fraction)))
        test_end = n_rows
    splits = Splits((0, train_end), (train_end - seq_len, val_end), (val_end - seq_len, test_end))
    if min(train_end, splits.val[0], splits.test[0]) < 0 or train_end <= seq_len:
        raise DataError(f"{n_rows} rows are too few for seq_len {seq_len}: the train split has {train_end}")
    return splits


def fit_scaler(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def infer_frequency(dates: pd.DatetimeIndex) -> str | None:
    """The pandas offset alias of the dates ("h", "15min"), or the most common step if irregular."""
    if len(dates) < 3:
        return None
    try:
        # pandas 3 returns an offset under this option (and warns without it); older pandas lack it
        with pd.option_context("future.infer_freq_returns_offset", True):
            freq = pd.infer_freq(dates)
    except (TypeError, ValueError, KeyError, pd.errors.OptionError):
        freq = _legacy_infer_freq(dates)
    if freq is not None:
        return freq if isinstance(freq, str) else freq.freqstr
    steps = pd.Series(dates).diff().dropna()
    steps = steps[steps > pd.Timedelta(0)]
    if steps.empty:
        return None
    return pd.tseries.frequencies.to_offset(steps.mode().iloc[0]).freqstr


def _legacy_infer_freq(dates: pd.DatetimeIndex) -> str | None:
    try:
        return pd.infer_freq(dates)
    except (TypeError, ValueError):
        return None


def load_dataset(
    path: str | Path,
    features: str = "M",
    target: str | None = None,
    seq_len: int = 48,
    pred_len: int = 12,
    val_fraction: float = 0.05,
    test_fraction: float = 0.75,
    date_column: str = "date",
) -> LoadedData:
    path = Path(path)
    frame = read_frame(path, date_column)
    columns, targets = select_columns(frame, features, target, date_column)
    raw = frame[list(columns)].to_numpy(dtype=np.float64, copy=True)  # writable (pandas 3 views are not)
    if not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).sum())
        log.warning("%s: %d missing or non-finite values, filled forward then backward", path, bad)
        raw = pd.DataFrame(raw).replace([np.inf, -np.inf], np.nan).ffill().bfill().to_numpy()
    splits = split_borders(len(raw), seq_len, path.name, val_fraction, test_fraction)
    mean, std = fit_scaler(raw[splits.train[0] : splits.train[1]])
    dates = pd.DatetimeIndex(frame[date_column])
    schema = DataSchema(
        columns=columns,
        targets=targets,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        seq_len=seq_len,
        pred_len=pred_len,
        freq=infer_frequency(dates),
        features=features,
        date_column=date_column,
    )
    scaled = ((raw - mean) / std).astype(np.float32)
    return LoadedData(schema=schema, raw=raw, scaled=scaled, dates=dates, splits=splits, path=path)


class WindowSet:
    """Every ``(input, target)`` pair of a series, gathered by start index without copying the
    series: ``x [b, seq_len, c]``, ``y [b, pred_len, c_out]``."""

    def __init__(
        self, series: np.ndarray | Tensor, seq_len: int, pred_len: int, out_indices: tuple[int, ...]
    ):
        data = torch.as_tensor(series, dtype=torch.float32)
        self.seq_len, self.pred_len = seq_len, pred_len
        self.out_indices = list(out_indices)
        n = data.shape[0] - seq_len - pred_len + 1
        if n < 1:
            raise DataError(f"a split of {data.shape[0]} rows holds no window of {seq_len} + {pred_len}")
        self.windows = data.unfold(0, seq_len + pred_len, 1)  # [n, c, seq_len + pred_len], a view

    def __len__(self) -> int:
        return self.windows.shape[0]

    def batch(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        w = self.windows[starts].transpose(1, 2)  # [b, seq_len + pred_len, c]
        return w[:, : self.seq_len].contiguous(), w[:, self.seq_len :, self.out_indices].contiguous()

    def subset(self, limit: int | None) -> Tensor:
        """Start indices of at most ``limit`` windows, evenly spaced over the series."""
        n = len(self)
        if limit is None or limit >= n:
            return torch.arange(n)
        return torch.linspace(0, n - 1, limit).round().long().unique()
