"""The online test: replay a series one observation at a time through ``models.online``.

One stream (batch 1), time order, the same ``observe`` / ``learn`` functions the service calls.
For a test series ``s`` of ``seq_len + T + pred_len - 1`` rows (the test split, which starts
``seq_len`` rows before its border), step ``k`` forecasts rows ``[t, t + pred_len)`` from the
window ``[t - seq_len, t)``, ``t = seq_len + k``:

- ``Feedback.DELAYED``: ``observe`` learns from a pair only once its whole horizon has been
  observed; nothing else is revealed.
- ``Feedback.IMMEDIATE`` (the FSNet/OneNet protocol): right after the forecast the true
  horizon is revealed and ``learn`` is called on that pair before the next observation.

Experience replay (``er``) calls ``learn`` again on pairs sampled (reservoir, seeded) from the
pairs already learned from; a pair is kept as its forecast origin ``t``, not as tensors.

Metrics (on the values the caller passes, the scaled ones in the literature's convention):
MSE, MAE, RMSE and MAPE = mean(|forecast - truth| / max(|truth|, 1e-5)), a fraction, averaged
over every value of every forecast.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models import combination
from models.combination import CombinationConfig
from models.forecaster import ContinualForecaster
from models.online import (
    COMBINATION,
    Feedback,
    UpdateMode,
    init_stream_state,
    learn,
    learns_from_targets,
    observe,
    observe_many,
)

MAPE_EPS = 1e-5


@dataclass(frozen=True)
class ReplayConfig:
    buffer_size: int = 500
    samples: int = 2  # extra learn calls per learned pair
    seed: int = 0


@dataclass
class StreamResult:
    forecasts: np.ndarray  # [T, pred_len, c_out]
    truths: np.ndarray  # [T, pred_len, c_out]
    wall_s: float
    learn_calls: int  # pairs passed to learn (incl. replayed ones); 0 when nothing can learn

    @property
    def steps(self) -> int:
        return len(self.forecasts)


def count_steps(n_rows: int, seq_len: int, pred_len: int, max_steps: int | None = None) -> int:
    steps = n_rows - seq_len - pred_len + 1
    if steps < 1:
        raise ValueError(f"a test series of {n_rows} rows holds no window of {seq_len} + {pred_len}")
    return steps if max_steps is None else min(steps, max_steps)


def truths_of(
    series: Tensor, seq_len: int, pred_len: int, out_indices: tuple[int, ...], steps: int
) -> np.ndarray:
    """The true horizon of every step, ``[T, pred_len, c_out]``."""
    targets = series[:, list(out_indices)]
    horizons = targets.unfold(0, pred_len, 1)[seq_len : seq_len + steps]  # [T, c_out, pred_len]
    return horizons.transpose(1, 2).cpu().numpy()


def naive_forecasts(
    series: Tensor, seq_len: int, pred_len: int, out_indices: tuple[int, ...], steps: int
) -> StreamResult:
    """The last observed value repeated over the horizon."""
    started = time.perf_counter()
    last = series[seq_len - 1 : seq_len - 1 + steps, list(out_indices)]  # [T, c_out]
    forecasts = last[:, None, :].expand(steps, pred_len, last.shape[1]).cpu().numpy()
    truths = truths_of(series, seq_len, pred_len, out_indices, steps)
    return StreamResult(forecasts, truths, time.perf_counter() - started, 0)


@torch.no_grad()
def replay_stream(
    model: ContinualForecaster,
    series: Tensor,
    mode: UpdateMode,
    feedback: Feedback,
    max_steps: int | None = None,
    replay: ReplayConfig | None = None,
    progress: bool = False,
    desc: str = "online",
    combine: bool = False,
) -> StreamResult:
    """Run the online test of ``model`` on ``series [n, c]`` (model scale, model's device);
    ``combine``: the stream state combines, as the service's streams do by default."""
    cfg = model.config
    seq, pred, out_idx = cfg.seq_len, cfg.pred_len, list(cfg.out_indices)
    steps = count_steps(series.shape[0], seq, pred, max_steps)
    targets = series[:, out_idx]
    can_learn = learns_from_targets(model, mode)
    buffer = _Reservoir(replay) if replay is not None and can_learn else None
    delayed = feedback is Feedback.DELAYED
    forecasts: list[Tensor] = []
    learn_calls = 0
    started = time.perf_counter()
    state = init_stream_state(model, 1, mode, device=series.device, combine=combine)
    state, forecast = observe_many(model, state, series[None, :seq], mode, feedback)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False, mininterval=0.5) as bar:
        for k in range(steps):
            t = seq + k
            forecasts.append(forecast[0])
            learned: int | None = None  # forecast origin of the pair learned from at this step
            if not delayed:
                window, horizon = series[None, t - seq : t], targets[None, t : t + pred]
                state = learn(model, state, window, horizon, mode, ahead=True)
                learned = t
            if k + 1 < steps:
                state, next_forecast = observe(model, state, series[None, t], mode, feedback)
                assert next_forecast is not None  # need_forecast defaults to True
                forecast = next_forecast
                if delayed and t + 1 >= seq + pred:
                    learned = t + 1 - pred  # observe learned from the pair whose horizon just completed
            if learned is not None and can_learn:
                learn_calls += 1
                if buffer is not None:
                    for origin in buffer.sample():
                        x, y = series[None, origin - seq : origin], targets[None, origin : origin + pred]
                        state = learn(model, state, x, y, mode)
                        learn_calls += 1
                    buffer.add(learned)
            bar.update()
    wall = time.perf_counter() - started
    result = torch.stack(forecasts).cpu().numpy()
    return StreamResult(result, truths_of(series, seq, pred, tuple(out_idx), steps), wall, learn_calls)


@torch.no_grad()
def combine_stream(
    experts: list[StreamResult],
    feedback: Feedback = Feedback.DELAYED,
    cfg: CombinationConfig | None = None,
) -> StreamResult:
    """Replay the per-stream combination (``models.combination``) of experts' forecasts of one
    test series. Delayed feedback: at step ``k`` it first learns from the value observed last
    (row ``t - 1``, the first horizon value of step ``k - 1``), whose matured forecasts are
    horizon step ``h`` of step ``k - 1 - h``, then combines step ``k``'s forecasts; nothing
    later is used. Immediate feedback: after combining step ``k`` it learns from that step's
    whole revealed horizon (the literature's protocol). The delayed replay is what a stream
    state made with ``combine=True`` serves through ``models.online.observe`` (the same
    :func:`models.combination.step`, the default config ``models.online.COMBINATION``)."""
    cfg = cfg or COMBINATION
    first = experts[0]
    started = time.perf_counter()
    forecasts = torch.as_tensor(np.stack([r.forecasts for r in experts], axis=1), dtype=torch.float64)
    truths = torch.as_tensor(first.truths, dtype=torch.float64)  # [T, h, c]
    steps, pred_len, channels = truths.shape
    state = combination.init_state(1, pred_len, len(experts), channels, dtype=torch.float64)
    out = []
    for k in range(steps):
        if k > 0 and feedback is Feedback.DELAYED:  # what the service's observe runs (models.online)
            combined, state = combination.step(state, truths[None, k - 1, 0], forecasts[None, k], cfg)
        else:
            combined, state = combination.combine(state, forecasts[None, k])
        out.append(combined[0])
        if feedback is Feedback.IMMEDIATE:
            losses = (forecasts[k] - truths[k]).pow(2).mean(dim=-1).T  # [h, e]
            state = combination.update(state, losses[None], cfg)
    own = time.perf_counter() - started
    return StreamResult(
        torch.stack(out).numpy().astype(first.forecasts.dtype),
        first.truths,
        own + sum(r.wall_s for r in experts),
        sum(r.learn_calls for r in experts),
    )


class _Reservoir:
    """Reservoir sample of forecast origins (Vitter's algorithm R), seeded."""

    def __init__(self, cfg: ReplayConfig) -> None:
        self.cfg = cfg
        self.items: list[int] = []
        self.seen = 0
        self.rng = random.Random(cfg.seed)

    def add(self, origin: int) -> None:
        self.seen += 1
        if len(self.items) < self.cfg.buffer_size:
            self.items.append(origin)
            return
        j = self.rng.randrange(self.seen)
        if j < self.cfg.buffer_size:
            self.items[j] = origin

    def sample(self) -> list[int]:
        if not self.items:
            return []
        return self.rng.sample(self.items, min(self.cfg.samples, len(self.items)))


def metrics(forecasts: np.ndarray, truths: np.ndarray) -> dict[str, float]:
    err = forecasts.astype(np.float64) - truths.astype(np.float64)
    mse = float(np.mean(err**2))
    return {
        "mse": mse,
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(mse)),
        "mape": float(np.mean(np.abs(err) / np.maximum(np.abs(truths), MAPE_EPS))),
    }


def step_mse(forecasts: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """MSE of each step's forecast, ``[T]``."""
    err = forecasts.astype(np.float64) - truths.astype(np.float64)
    return (err**2).reshape(len(err), -1).mean(axis=1)
