"""Prediction intervals learned online from a stream's own matured errors (pure, batched, no I/O).

For every horizon step, target channel and level the state keeps a running mean ``s`` of the
cell's matured absolute errors and a ratio ``r``; the interval served with a forecast ``f`` is
``[f - r s, f + r s]``. Each matured absolute error ``|e|`` moves its cell's ratio by adaptive
conformal inference (Gibbs & Candes, NeurIPS 2021) on the normalised score ``|e| / s`` (the
scale-normalised nonconformity score of Lei et al. 2018), written as online quantile tracking:

    r <- r + lr * (1[|e| > r s] - (1 - level))          # eq (1), s before |e| is added

A miss raises the ratio by ``lr * level``, a hit lowers it by ``lr * (1 - level)``, so it settles
where misses happen a fraction ``1 - level`` of the time and follows that point as the errors'
shape drifts; over ``T`` updates the miss rate differs from ``1 - level`` by at most
(ratio range) / (lr * T), the ACI guarantee, whatever the errors do. The scale ``s`` (cumulative
mean over a cell's first ``window`` errors, then exponential over about ``window``) follows
their size, so a ratio carries over when the errors grow, and one ``lr`` works in any units.

Departures from ACI as published, and why:

- Warm-up: ratios start at ``z(level)``, the ratio that covers ``level`` of a normal error, and
  a cell's first ``warmup`` errors only feed its scale (one error is no scale to judge a miss
  by); before its first error a cell has no interval (NaN).
- The indicator compares with the cell's current radius, not the one served with the forecast
  whose error matured (up to ``pred_len`` updates older): the state then needs nothing per
  pending forecast.

Axis legend: ``b`` streams, ``p`` horizon steps, ``c`` target channels, ``l`` levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

DEFAULT_LEVELS = (0.8, 0.95)
DEFAULT_LR = 0.05
DEFAULT_WARMUP = 10
DEFAULT_WINDOW = 100


@dataclass(frozen=True)
class IntervalConfig:
    lr: float = DEFAULT_LR  # eq (1) step, in units of the running mean |e|
    warmup: int = DEFAULT_WARMUP  # errors per cell that feed only its scale
    window: int = DEFAULT_WINDOW  # errors the running mean |e| averages over, about


@dataclass(frozen=True)
class IntervalState:
    ratio: Tensor  # [b, p, c, l] radius / scale
    scale: Tensor  # [b, p, c] running mean |e|; NaN: no error matured yet
    count: Tensor  # [b, p, c] errors learned from (float64: exact to 2**53)

    @property
    def radius(self) -> Tensor:
        return self.ratio * self.scale[..., None]  # [b, p, c, l]


def init_state(batch: int, pred_len: int, levels: Tensor, channels: int) -> IntervalState:
    """``levels``: ``[l]`` shared by the batch, or ``[b, l]`` per stream."""
    lv = levels.to(torch.float64)
    lv = lv.expand(batch, -1) if lv.dim() == 1 else lv
    return IntervalState(
        ratio=normal_factor(lv)[:, None, None, :].expand(batch, pred_len, channels, -1).clone(),
        scale=torch.full((batch, pred_len, channels), math.nan, dtype=torch.float64),
        count=torch.zeros(batch, pred_len, channels, dtype=torch.float64),
    )


def check_levels(levels: Tensor | list[float] | tuple[float, ...]) -> Tensor:
    """Levels as a float64 tensor; ``ValueError`` unless every one is in (0, 1)."""
    t = torch.as_tensor(levels, dtype=torch.float64)
    if t.numel() == 0 or not bool(((t > 0) & (t < 1)).all()):
        raise ValueError(f"interval levels must be in (0, 1), got {t.tolist()}")
    return t


def normal_factor(levels: Tensor) -> Tensor:
    """``z(level)``: the ``level`` quantile of ``|N(0, 1)|`` over its mean ``sqrt(2 / pi)``."""
    dist = NormalDist()
    z = [dist.inv_cdf((1.0 + float(v)) / 2.0) for v in levels.reshape(-1)]
    return torch.tensor(z, dtype=torch.float64).reshape(levels.shape) * math.sqrt(math.pi / 2.0)


def update(
    state: IntervalState, abs_errors: Tensor, levels: Tensor, cfg: IntervalConfig = IntervalConfig()
) -> IntervalState:
    """Learn from one matured ``|e|`` per cell, ``abs_errors [b, p, c]`` (NaN: none matured).

    ``levels``: ``[l]`` shared by the batch, or ``[b, l]`` per stream."""
    e = abs_errors.to(torch.float64)
    seen = ~torch.isnan(e)  # [b, p, c]
    e0 = torch.where(seen, e, torch.zeros_like(e))
    count = state.count + seen.to(torch.float64)
    rate = 1.0 / count.clamp(min=1.0, max=cfg.window)
    before = torch.nan_to_num(state.scale, nan=0.0)
    scale = torch.where(seen, before + (e0 - before) * rate, state.scale)
    lv = levels.to(torch.float64)
    lv = lv.reshape(1, 1, 1, -1) if lv.dim() == 1 else lv[:, None, None, :]  # [b or 1, 1, 1, l]
    miss = (e0[..., None] > state.ratio * before[..., None]).to(torch.float64)
    learns = (seen & (state.count >= cfg.warmup))[..., None]  # past the warm-up before this error
    ratio = torch.where(learns, state.ratio + cfg.lr * (miss - (1.0 - lv)), state.ratio)  # eq (1)
    return IntervalState(ratio=ratio.clamp(min=0.0), scale=scale, count=count)


def bounds(forecast: Tensor, state: IntervalState) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` ``[b, p, c, l]`` of ``forecast [b, p, c]``; NaN where a cell has no
    interval yet."""
    f = forecast.to(torch.float64)[..., None]
    return f - state.radius, f + state.radius


def matured_errors(forecasts: Tensor, truths: Tensor) -> Tensor:
    """The absolute errors that mature as each forecast is made, ``[T, p, c]``: row ``k`` holds
    forecast ``k - h``'s step ``h`` for ``h = 1 .. p`` (NaN where ``k - h < 0``).

    ``forecasts``, ``truths``: ``[T, p, c]``, forecast ``k``'s step ``h`` observed as forecast
    ``k + h`` is made (the delayed order in which the service meets them)."""
    t, p, c = forecasts.shape
    errors = (forecasts.double() - truths.double()).abs()
    padded = torch.cat([torch.full((p, p, c), math.nan, dtype=torch.float64), errors])  # [p + T, p, c]
    steps = torch.arange(1, p + 1)
    origin = torch.arange(t)[:, None] - steps[None, :] + p  # [T, p] row of forecast k - h in padded
    return padded[origin, steps - 1]  # [T, p, c]


def replay(
    forecasts: Tensor, truths: Tensor, levels: Tensor, cfg: IntervalConfig = IntervalConfig()
) -> tuple[Tensor, Tensor]:
    """The intervals served with each of ``forecasts [T, p, c]`` when the errors are learned in
    the order they mature (delayed feedback): ``(lower, upper)`` ``[T, p, c, l]``."""
    t, p, c = forecasts.shape
    state = init_state(1, p, levels, c)
    matured = matured_errors(forecasts, truths)
    lower, upper = [], []
    for k in range(t):
        state = update(state, matured[k][None], levels, cfg)
        lo, hi = bounds(forecasts[k][None], state)
        lower.append(lo[0])
        upper.append(hi[0])
    return torch.stack(lower), torch.stack(upper)


def coverage(lower: Tensor, upper: Tensor, truths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per level ``[l]``: the fraction of ``truths [T, p, c]`` inside their interval, the mean
    width, and the number of values that had an interval (NaN bounds are left out)."""
    y = truths.to(lower.dtype)[..., None]
    has = ~torch.isnan(lower)  # [T, p, c, l]
    inside = ((y >= lower) & (y <= upper) & has).to(lower.dtype)
    n = has.to(lower.dtype).sum(dim=(0, 1, 2))
    width = torch.where(has, upper - lower, torch.zeros_like(lower)).sum(dim=(0, 1, 2))
    return inside.sum(dim=(0, 1, 2)) / n, width / n, n
