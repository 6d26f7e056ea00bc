"""memcast's own generated data set: a seeded, hourly, multivariate series that needs no network.

Each load channel is a daily and a weekly cycle with its own phase and amplitude, a piecewise
linear trend and AR(1) noise. The target ``OT`` follows a lagged, smoothed mix of the loads
plus its own daily cycle (so the loads help to forecast it). Two or three regime changes shift
levels and scale the amplitudes of every channel at once, the kind of drift online learning
is for.

With ``regimes=K`` (``memcast make-data --regimes K``) the series instead switches abruptly
among ``K`` recurring regimes, each with its own levels, daily/weekly seasonality and
cross-channel mixing (which loads drive ``OT``, and with which sign): segments of 100-400
rows, each regime different from the one before, so every regime comes back.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd

TARGET = "OT"


def synthetic_frame(
    rows: int = 4000, channels: int = 4, seed: int = 0, start: str = "2020-01-01", regimes: int = 0
) -> pd.DataFrame:
    """The data set as a frame: ``date``, ``load_a ... load_<k>``, ``OT`` (``channels`` columns
    besides date); ``regimes > 0``: recurring regimes with abrupt switches."""
    if rows < 2 or not 1 <= channels <= 27 or regimes < 0:
        raise ValueError("rows must be >= 2, channels in 1..27 and regimes >= 0")
    rng = np.random.default_rng(seed)
    t = np.arange(rows, dtype=np.float64)
    if regimes:
        loads, target = _recurring_regimes(rng, t, channels, regimes)
    else:
        profile = _regime_profile(rng, rows)  # [rows, 2]: level shift, amplitude factor
        loads = [_load(rng, t, profile) for _ in range(channels - 1)]
        target = _target(rng, t, profile, loads)
    frame = pd.DataFrame({"date": pd.date_range(start, periods=rows, freq="h")})
    for name, values in zip(string.ascii_lowercase, loads, strict=False):
        frame[f"load_{name}"] = np.round(values, 4)
    frame[TARGET] = np.round(target, 4)
    return frame


def write_synthetic_csv(
    path: str | Path, rows: int = 4000, channels: int = 4, seed: int = 0, regimes: int = 0
) -> Path:
    """Write the data set to ``path`` (parents created); the same seed gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = synthetic_frame(rows, channels, seed, regimes=regimes)
    frame.to_csv(path, index=False, date_format="%Y-%m-%d %H:%M:%S")
    return path


def regime_schedule(rng: np.random.Generator, rows: int, regimes: int) -> np.ndarray:
    """The regime of each row: segments of 100-400 rows, each unlike the one before."""
    labels = np.empty(rows, dtype=np.int64)
    start, current = 0, int(rng.integers(regimes))
    while start < rows:
        length = int(rng.integers(100, 401))
        labels[start : start + length] = current
        start += length
        if regimes > 1:
            current = int((current + rng.integers(1, regimes)) % regimes)
    return labels


def _recurring_regimes(
    rng: np.random.Generator, t: np.ndarray, channels: int, regimes: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Loads and OT under recurring regimes: per regime, each channel's level, seasonal
    amplitude and phase, and the mixing of the loads' drivers (and of the loads into OT)."""
    labels = regime_schedule(rng, len(t), regimes)
    drivers = np.stack([_ar1(rng, len(t), phi=0.95, sigma=0.3) for _ in range(channels)])  # [c, n]
    level = rng.normal(0.0, 3.0, size=(regimes, channels))
    amplitude = rng.uniform(0.3, 2.5, size=(regimes, channels))
    phase = rng.uniform(0, 2 * np.pi, size=(regimes, channels))
    mixing = rng.normal(0.0, 0.6, size=(regimes, channels, channels)) + np.eye(channels)
    out = np.empty((channels, len(t)))
    for r in range(regimes):
        rows = labels == r
        season = amplitude[r][:, None] * np.sin(2 * np.pi * t[rows] / 24 + phase[r][:, None])
        weekly = 0.3 * amplitude[r][:, None] * np.sin(2 * np.pi * t[rows] / 168 + phase[r][:, None])
        out[:, rows] = level[r][:, None] + season + weekly + mixing[r] @ drivers[:, rows]
    noise = np.stack([_ar1(rng, len(t), phi=0.5, sigma=0.1) for _ in range(channels)])
    out = out + noise
    return [out[i] for i in range(channels - 1)], 20.0 + out[-1]


def _regime_profile(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Per row: an additive level and an amplitude factor, constant between 2-3 change points."""
    n_changes = int(rng.integers(2, 4))
    points = np.sort(rng.choice(np.arange(rows // 10, rows - rows // 10), size=n_changes, replace=False))
    level = np.zeros(rows)
    amplitude = np.ones(rows)
    for p in points:
        level[p:] += rng.normal(0.0, 2.0)
        amplitude[p:] *= rng.uniform(0.6, 1.6)
    return np.stack([level, amplitude], axis=1)


def _trend(rng: np.random.Generator, t: np.ndarray, pieces: int = 4) -> np.ndarray:
    """A continuous piecewise linear trend: ``pieces`` segments with their own slopes."""
    piece = np.minimum((t * pieces / len(t)).astype(int), pieces - 1)
    slopes = rng.normal(0.0, 1.5 * pieces / len(t), size=pieces)
    return np.cumsum(slopes[piece])


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    eps = rng.normal(0.0, sigma, size=n)
    out = np.empty(n)
    acc = 0.0
    for i in range(n):
        acc = phi * acc + eps[i]
        out[i] = acc
    return out


def _seasonal(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    daily = rng.uniform(0.8, 2.0) * np.sin(2 * np.pi * t / 24 + rng.uniform(0, 2 * np.pi))
    harmonic = rng.uniform(0.1, 0.5) * np.sin(4 * np.pi * t / 24 + rng.uniform(0, 2 * np.pi))
    weekly = rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * t / 168 + rng.uniform(0, 2 * np.pi))
    return daily + harmonic + weekly


def _load(rng: np.random.Generator, t: np.ndarray, regimes: np.ndarray) -> np.ndarray:
    base = rng.uniform(2.0, 10.0)
    season = _seasonal(rng, t) * regimes[:, 1]
    noise = _ar1(rng, len(t), phi=0.7, sigma=0.15)
    return base + regimes[:, 0] + _trend(rng, t) + season + noise


def _target(
    rng: np.random.Generator, t: np.ndarray, regimes: np.ndarray, loads: list[np.ndarray]
) -> np.ndarray:
    own = 20.0 + 0.5 * regimes[:, 0] + _trend(rng, t) + 1.5 * _seasonal(rng, t) * regimes[:, 1]
    if loads:
        mix = np.mean(
            [w * x for w, x in zip(rng.uniform(0.5, 1.5, size=len(loads)), loads, strict=True)], axis=0
        )
        lagged = np.convolve(np.roll(mix - mix.mean(), 3), np.ones(6) / 6, mode="same")
        own = own + 0.8 * lagged
    return own + _ar1(rng, len(t), phi=0.9, sigma=0.2)
