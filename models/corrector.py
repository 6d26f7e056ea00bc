"""Per-stream output corrector: a linear map, learned online from matured errors, that adds a
correction to the forecaster's output without touching its shared weights.

Why: under delayed feedback the frozen checkpoint's errors on a long stream are systematic
(level and amplitude drift of the test split against the training rows), but the stream's
memory learns them badly (its associative loss never sees a target; a forecast-loss step on
its weights drifts). A linear map in the window's normalised units, fitted to the residuals of
the forecasts whose horizon has been observed, learns "this stream's forecasts overshoot by
this much" directly, at the cost of one small matrix product per observation.

Features of one channel ``c`` of a window (the RevIN units the forecaster works in: the window
minus its mean, over its standard deviation):

    phi_c = [x_c (seq_len values), 1, f_c (pred_len values)]

with ``x_c`` the normalised window and ``f_c`` the forecaster's own forecast of that channel in
the same units. The correction of horizon step ``h`` is ``std_c * (phi_c . W[:, h])``: one
weight matrix ``W [seq_len + 1 + pred_len, pred_len]`` per stream, shared by its output
channels (channel-independent, as the forecaster's linear skip), starting at zero (no
correction).

Learning (normalised LMS, Widrow-Hoff; one step per matured pair, all channels at once): with
``e_c = clamp((y_c - forecast_c) / std_c - phi_c W, +-clip)`` the residual left in normalised
units,

    W <- W + lr * sum_c phi_c e_c^T / (sum_c |phi_c|^2 + eps)

normalising by the features' energy makes ``lr`` unit-free and the step stable for any
``lr`` in ``(0, 2)``; the clamp bounds a pair whose window is nearly constant (tiny std).

State (``TensorDict`` with leading stream dimension, under the stream state's
``"corrector"``): ``weights [b, seq_len + 1 + pred_len, pred_len]``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor

from models.base import as_dtype, replaced

EPS = 1e-5  # the forecaster's RevIN epsilon: the same normalised units
ERROR_CLIP = 10.0  # largest residual (in window standard deviations) one pair can teach


def init_state(
    batch: int,
    seq_len: int,
    pred_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TensorDict:
    """No correction yet: zero weights."""
    weights = torch.zeros(batch, seq_len + 1 + pred_len, pred_len, dtype=dtype, device=device)
    return TensorDict({"weights": weights}, batch_size=[batch], device=device)


def features(window: Tensor, forecast: Tensor) -> tuple[Tensor, Tensor]:
    """``window [b, n, c]`` (the forecast channels) and ``forecast [b, p, c]`` -> the features
    ``phi [b, c, n + 1 + p]`` and each channel's window standard deviation ``std [b, c]``."""
    var, mean = torch.var_mean(window, dim=1, keepdim=True, correction=0)  # [b, 1, c]
    std = (var + EPS).sqrt()
    x = ((window - mean) / std).transpose(1, 2)  # [b, c, n]
    f = ((forecast - mean) / std).transpose(1, 2)  # [b, c, p]
    ones = x.new_ones(x.shape[0], x.shape[1], 1)
    return torch.cat([x, ones, f], dim=-1), std[:, 0]


def correct(state: TensorDict, window: Tensor, forecast: Tensor) -> Tensor:
    """The corrected forecast ``[b, p, c]`` of ``forecast`` made from ``window [b, n, c]``."""
    weights = state["weights"]
    dtype = weights.dtype
    phi, std = features(as_dtype(window, dtype), as_dtype(forecast, dtype))
    correction = torch.bmm(phi, weights) * std[..., None]  # [b, c, p]
    return forecast + as_dtype(correction.transpose(1, 2), forecast.dtype)


def update(
    state: TensorDict,
    window: Tensor,
    forecast: Tensor,
    target: Tensor,
    lr: float,
    mask: Tensor | None = None,
) -> TensorDict:
    """One normalised LMS step per stream on a matured pair: the forecaster's (uncorrected)
    ``forecast [b, p, c]`` from ``window [b, n, c]``, and the observed ``target [b, p, c]``.
    Streams where ``mask [b]`` is false are unchanged."""
    weights = state["weights"]
    dtype = weights.dtype
    phi, std = features(as_dtype(window, dtype), as_dtype(forecast, dtype))  # [b, c, f], [b, c]
    residual = (as_dtype(target, dtype) - as_dtype(forecast, dtype)).transpose(1, 2) / std[..., None]
    error = (residual - torch.bmm(phi, weights)).clamp(-ERROR_CLIP, ERROR_CLIP)  # [b, c, p]
    energy = phi.pow(2).sum(dim=(1, 2)) + EPS  # [b]
    step = lr * torch.bmm(phi.transpose(1, 2), error) / energy[:, None, None]  # [b, f, p]
    return replaced(
        state,
        {
            "weights": weights + step
            if mask is None
            else torch.where(mask[:, None, None], weights + step, weights)
        },
    )
