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

Values already known at the forecast's own target times (immediate feedback only). When a pair
is learned right after its forecast (the literature's protocol: the horizon is revealed before
the stream observes it), the next forecasts' target times overlap that horizon, whose values
are then known although the window does not hold them yet. The gap between those values and
the forecast at those times, ``k_c [p]`` (normalised like ``e_c``, zero where no value is
known), adds ``k_c . V[:, h]`` to the correction, with ``V [pred_len, pred_len]`` learned by its
own normalised LMS step (``known_lr``). FSNet's fast adapters exploit that overlap implicitly
through their weights; here it is one explicit term, and the tables that use the protocol say
how much of a score it makes. Under delayed feedback (the service's: a pair is learned once the
stream observed its last value) no target time of a later forecast is ever known in advance,
so the term is never made, and forecasts and states are those without it, bit for bit.

State (``TensorDict`` with leading stream dimension, under the stream state's
``"corrector"``): ``weights [b, seq_len + 1 + pred_len, pred_len]``; once a pair was learned
ahead of the window, also ``known [b, pred_len, pred_len]`` (``V``), ``revealed [b, c,
pred_len]`` (the latest such pair's target, the forecaster's units), ``origin [b]`` (the
observation count its forecast was made at: ``revealed[..., k]`` is the value observed at count
``origin + 1 + k``) and ``has_revealed [b]``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor

from models.base import as_dtype, replaced, where_rows

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


def known_gaps(state: TensorDict, at: Tensor | None, forecast: Tensor, std: Tensor) -> Tensor | None:
    """Where values of the target times of ``forecast [b, c, p]``, made at observation count
    ``at [b]``, are already known: their gap to it in window standard deviations ``std [b, c]``,
    ``[b, c, p]``, zero where no value is known; None when no stream knows any (always under
    delayed feedback)."""
    if at is None or "has_revealed" not in state.keys():
        return None
    revealed = state["revealed"]  # [b, c, p]
    p = revealed.shape[-1]
    offset = at - state["origin"]  # [b]: >= 1 for a horizon revealed before this forecast
    usable = state["has_revealed"] & (offset >= 1) & (offset < p)
    if not bool(usable.any()):
        return None
    index = offset[:, None] + torch.arange(p, device=offset.device)  # [b, p] into the horizon
    inside = usable[:, None] & (index < p)
    gathered = revealed.gather(2, index.clamp(max=p - 1)[:, None, :].expand_as(revealed))
    return torch.where(inside[:, None, :], (gathered - forecast) / std[..., None], 0.0)


def correct(state: TensorDict, window: Tensor, forecast: Tensor, at: Tensor | None = None) -> Tensor:
    """The corrected forecast ``[b, p, c]`` of ``forecast`` made from ``window [b, n, c]`` at
    observation count ``at [b]`` (None: no known values are used)."""
    weights = state["weights"]
    dtype = weights.dtype
    phi, std = features(as_dtype(window, dtype), as_dtype(forecast, dtype))
    correction = torch.bmm(phi, weights)  # [b, c, p]
    gaps = known_gaps(state, at, as_dtype(forecast, dtype).transpose(1, 2), std)
    if gaps is not None:
        correction = correction + torch.bmm(gaps, state["known"])
    correction = correction * std[..., None]
    return forecast + as_dtype(correction.transpose(1, 2), forecast.dtype)


def update(
    state: TensorDict,
    window: Tensor,
    forecast: Tensor,
    target: Tensor,
    lr: float,
    mask: Tensor | None = None,
    at: Tensor | None = None,
    ahead: bool = False,
    known_lr: float = 0.0,
) -> TensorDict:
    """One normalised LMS step per stream on a matured pair: the forecaster's (uncorrected)
    ``forecast [b, p, c]`` from ``window [b, n, c]`` made at observation count ``at [b]``, and
    the observed ``target [b, p, c]``. ``ahead``: the pair's window is the stream's current one
    (immediate feedback), so its target is kept as values known at the next forecasts' target
    times (with ``known_lr > 0``). Streams where ``mask [b]`` is false are unchanged."""
    weights = state["weights"]
    dtype = weights.dtype
    phi, std = features(as_dtype(window, dtype), as_dtype(forecast, dtype))  # [b, c, f], [b, c]
    residual = (as_dtype(target, dtype) - as_dtype(forecast, dtype)).transpose(1, 2) / std[..., None]
    fitted = torch.bmm(phi, weights)
    gaps = known_gaps(state, at, as_dtype(forecast, dtype).transpose(1, 2), std)
    if gaps is not None:
        fitted = fitted + torch.bmm(gaps, state["known"])
    error = (residual - fitted).clamp(-ERROR_CLIP, ERROR_CLIP)  # [b, c, p]
    energy = phi.pow(2).sum(dim=(1, 2)) + EPS  # [b]
    step = lr * torch.bmm(phi.transpose(1, 2), error) / energy[:, None, None]  # [b, f, p]
    changed = {"weights": _masked(mask, weights + step, weights)}
    if gaps is not None and known_lr > 0:
        energy = gaps.pow(2).sum(dim=(1, 2)) + EPS
        known_step = known_lr * torch.bmm(gaps.transpose(1, 2), error) / energy[:, None, None]
        changed["known"] = _masked(mask, state["known"] + known_step, state["known"])
    if ahead and known_lr > 0 and at is not None:
        horizon = as_dtype(target, dtype).transpose(1, 2)  # [b, c, p]
        kept = state if "has_revealed" in state.keys() else _with_known(state, horizon.shape[1])
        has = torch.ones_like(kept["has_revealed"])
        changed.setdefault("known", kept["known"])
        changed["revealed"] = _masked(mask, horizon, kept["revealed"])
        changed["origin"] = _masked(mask, at, kept["origin"])
        changed["has_revealed"] = _masked(mask, has, kept["has_revealed"])
    return replaced(state, changed)


def _masked(mask: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``mask [b]`` is true (everywhere for None), ``old`` elsewhere."""
    return new if mask is None else where_rows(mask, new, old)


def _with_known(state: TensorDict, channels: int) -> TensorDict:
    """``state`` with the known-value term's parts, empty: made at the first pair learned ahead
    of the window, so streams that never learn one (every stream of the service) carry none."""
    weights = state["weights"]
    b, p = weights.shape[0], weights.shape[-1]
    return replaced(
        state,
        {
            "known": weights.new_zeros(b, p, p),
            "revealed": weights.new_zeros(b, channels, p),
            "origin": torch.zeros(b, dtype=torch.int64, device=weights.device),
            "has_revealed": torch.zeros(b, dtype=torch.bool, device=weights.device),
        },
    )
