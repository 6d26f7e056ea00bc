from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trainer.data import DataError, WindowSet, infer_frequency, load_dataset, split_borders
from trainer.synthetic import synthetic_frame, write_synthetic_csv


def test_split_borders_ett_hourly_file_uses_fsnet_borders() -> None:
    splits = split_borders(17420, seq_len=48, name="/any/where/ETTh1.csv")
    assert splits.train == (0, 2880)
    assert splits.val == (2880 - 48, 3600)
    assert splits.test == (3600 - 48, 14400)


def test_split_borders_ett_minute_file_scales_by_four() -> None:
    splits = split_borders(69680, seq_len=96, name="ETTm2.csv")
    assert splits.train == (0, 4 * 2880)
    assert splits.test == (4 * 3600 - 96, 4 * 14400)


def test_split_borders_other_csv_20_5_75() -> None:
    splits = split_borders(1000, seq_len=10, name="sales.csv")
    assert splits.train == (0, 200)
    assert splits.val == (190, 250)
    assert splits.test == (240, 1000)


def test_split_borders_fractions_overridable() -> None:
    splits = split_borders(1000, seq_len=10, name="x.csv", val_fraction=0.1, test_fraction=0.5)
    assert splits.train == (0, 400)
    assert splits.val == (390, 500)
    assert splits.test == (490, 1000)


def test_split_borders_reject_a_short_ett_file() -> None:
    with pytest.raises(DataError, match="14400 rows"):
        split_borders(5000, seq_len=48, name="ETTh2.csv")


def test_load_dataset_ett_named_file_splits_and_target_last(tmp_path: Path) -> None:
    path = write_synthetic_csv(tmp_path / "ETTh1.csv", rows=14400, channels=3, seed=0)
    data = load_dataset(path, features="MS", target="load_a", seq_len=48, pred_len=12)
    assert data.splits.test == (3552, 14400)
    assert data.schema.columns == ("load_b", "OT", "load_a")
    assert data.schema.targets == ("load_a",)
    assert data.schema.freq is not None and data.schema.freq.lower() == "h"
    assert len(data.split("test")) == 14400 - 3552


def test_scaler_is_fitted_on_train_rows_only(tiny_csv: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(tiny_csv)
    data = load_dataset(tiny_csv, features="M", seq_len=16, pred_len=4)
    train_end = data.splits.train[1]
    # changing every row after the train split must not change the scaler
    poisoned = frame.copy()
    numeric = poisoned.columns[1:]
    poisoned.loc[train_end:, numeric] = poisoned.loc[train_end:, numeric] * 1000 + 1e6
    poisoned_path = tmp_path / "poisoned.csv"
    poisoned.to_csv(poisoned_path, index=False)
    other = load_dataset(poisoned_path, features="M", seq_len=16, pred_len=4)
    assert other.schema.mean == data.schema.mean
    assert other.schema.std == data.schema.std
    train = frame[list(data.schema.columns)].to_numpy()[:train_end]
    np.testing.assert_allclose(data.schema.mean, train.mean(axis=0))
    np.testing.assert_allclose(data.schema.std, train.std(axis=0))
    np.testing.assert_allclose(data.split("train").mean(axis=0), 0.0, atol=1e-5)


def test_features_select_columns(tiny_csv: Path) -> None:
    s = load_dataset(tiny_csv, features="S", seq_len=16, pred_len=4)
    m = load_dataset(tiny_csv, features="M", seq_len=16, pred_len=4)
    assert s.schema.columns == s.schema.targets == ("OT",)
    assert s.raw.flags.writeable and s.scaled.flags.writeable  # torch.as_tensor warns on read-only arrays
    assert m.schema.columns == m.schema.targets == ("load_a", "load_b", "OT")
    with pytest.raises(DataError, match="not a numeric column"):
        load_dataset(tiny_csv, features="S", target="nope", seq_len=16, pred_len=4)


def test_window_set_gathers_pairs() -> None:
    series = torch.arange(30, dtype=torch.float32).reshape(15, 2)
    windows = WindowSet(series, seq_len=4, pred_len=2, out_indices=(1,))
    assert len(windows) == 15 - 6 + 1
    x, y = windows.batch(torch.tensor([0, 3]))
    assert torch.equal(x[1], series[3:7])
    assert torch.equal(y[1], series[7:9, 1:])
    assert len(windows.subset(4)) == 4


def test_synthetic_data_is_seeded_and_hourly(tmp_path: Path) -> None:
    a = write_synthetic_csv(tmp_path / "a.csv", rows=500, seed=3).read_bytes()
    b = write_synthetic_csv(tmp_path / "b.csv", rows=500, seed=3).read_bytes()
    c = write_synthetic_csv(tmp_path / "c.csv", rows=500, seed=4).read_bytes()
    assert a == b != c
    frame = synthetic_frame(rows=24 * 7 * 4, channels=4, seed=0)
    assert list(frame.columns) == ["date", "load_a", "load_b", "load_c", "OT"]
    assert infer_frequency(pd.DatetimeIndex(frame["date"])) == "h"
    # the daily cycle is there: values a day apart correlate better than half a day apart
    ot = frame["OT"].to_numpy()
    day = np.corrcoef(ot[24:], ot[:-24])[0, 1]
    half = np.corrcoef(ot[12:], ot[:-12])[0, 1]
    assert day > half


def test_make_data_regimes_switch_abruptly_among_recurring_regimes(tmp_path: Path) -> None:
    from memcast.cli import main
    from trainer.synthetic import regime_schedule

    labels = regime_schedule(np.random.default_rng(0), 4000, 3)
    starts = np.flatnonzero(np.diff(labels)) + 1
    segments = np.split(labels, starts)
    assert all(100 <= len(s) <= 400 for s in segments[:-1])
    assert all(a[0] != b[0] for a, b in zip(segments, segments[1:], strict=False))  # every switch changes
    assert all(sum(s[0] == r for s in segments) >= 3 for r in range(3))  # every regime recurs
    csv = tmp_path / "regimes.csv"
    assert main(["make-data", "--out", str(csv), "--rows", "1200", "--regimes", "3", "--seed", "4"]) == 0
    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["date", "load_a", "load_b", "load_c", "OT"]
    pd.testing.assert_frame_equal(
        frame.drop(columns="date"),
        synthetic_frame(1200, 4, seed=4, regimes=3).drop(columns="date"),
        atol=1e-9,
    )
    assert not synthetic_frame(1200, 4, seed=4).equals(synthetic_frame(1200, 4, seed=4, regimes=3))
