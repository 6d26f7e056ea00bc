"""Per-stream combination of forecasters: exponentiated weights (Hedge) with fixed share.

Each stream weighs ``e`` experts' forecasts (e.g. the frozen checkpoint, its adapted copy and
the last value) separately at each horizon step, with weights learned from the errors of
forecasts whose value has been observed (matured), never before.

Axes: ``b`` streams, ``h`` horizon step (``pred_len``), ``j`` forecast age (observations
since it was made, minus one), ``e`` experts, ``c`` output channels.

State (a ``TensorDict`` with leading stream dimension, as every per-stream state):

- ``log_weights [b, h, e]``: normalised (``logsumexp`` over ``e`` is 0);
- ``scale [b, h]``: running mean of the experts' mean loss at each horizon step (the loss
  normaliser; 0 until a loss has been seen);
- ``past [b, j=h, e, h, c]``: the experts' last ``pred_len`` forecasts, newest first;
- ``made [b]``: forecasts pushed into ``past``.

One round per observed value (:func:`observe`): horizon step ``h`` of the forecast made
``h + 1`` observations ago is for this value; its squared error (mean over ``c``) is the loss
``l [b, h, e]`` passed to :func:`update`:

    l~ = min(l / s, clip)                                    (s = scale, or 1 unnormalised)
    w  <- w * exp(-eta * l~) / Z                             # Hedge (Freund & Schapire 1997)
    w  <- (1 - alpha) * w + alpha / e                        # fixed share (Herbster & Warmuth 1998)

Regret bound (:func:`regret_bound`). With ``normalise=False`` and losses in ``[0, B]``
(``clip = B``), the combined forecast's cumulative squared loss at horizon step ``h`` over
``T`` rounds exceeds that of any single expert by at most

    ln(e) / eta + T ln(1 / (1 - alpha)) / eta + eta T B^2 / 8 + T d B (eta B + alpha)

with delay ``d = h`` (rounds between a forecast and the round its loss is learned from, beyond
the next). The first three terms are fixed-share Hedge's bound against a fixed expert; the
combined forecast is never worse than the weights' mixture of losses (squared loss is convex,
Jensen); the last term bounds the delay: each round moves the weights by at most
``eta B + alpha`` in total variation, and the delayed learner's weights are ``d`` rounds old.
With ``normalise=True`` (the default) the same holds for the normalised losses ``l / s``
while the scale is steady; it makes ``eta`` unit-free across data sets and horizons.

Where it runs: a stream state made with ``init_stream_state(..., combine=True)``
(``models/online.py``) holds this state under ``"combo"`` (same leading stream dimension, so it
is saved with the rest), and every :func:`models.online.observe` ends with :func:`step`: learn
from the newly observed value, then combine the forecasts made after it, ``EXPERTS`` in that
order: the frozen checkpoint (the shared weights and the initial component state on the
stream's window, what ``titans_none`` serves), the stream's adapted forecast (its update mode)
and the last value. The service serves the combination; the evaluator's ``combo_<mode>``
replays the same :func:`step` on the experts' saved forecasts (``trainer/online_eval.py``,
``combine_stream``), and a test checks that both give the same forecasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import Tensor

from models.base import as_dtype, replaced

EXPERTS = ("frozen", "adapted", "last_value")  # the experts a stream state's combination weighs


@dataclass(frozen=True)
class CombinationConfig:
    eta: float = 0.15  # weights' learning rate per unit of normalised loss (docs/investigations.md)
    share: float = 1e-3  # fixed share alpha: the least weight an expert keeps is ~ alpha / e
    normalise: bool = True  # divide losses by their running mean (a unit-free eta)
    scale_decay: float = 0.99  # running mean of the loss scale: s <- decay s + (1 - decay) l
    clip: float = 4.0  # largest (normalised) loss one round can charge

    def __post_init__(self) -> None:
        if self.eta <= 0 or not 0 <= self.share < 1 or not 0 <= self.scale_decay < 1 or self.clip <= 0:
            raise ValueError("eta and clip must be > 0, share and scale_decay in [0, 1)")


def init_state(
    batch: int,
    pred_len: int,
    experts: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TensorDict:
    """Uniform weights, no loss seen, no forecast made."""
    return TensorDict(
        {
            "log_weights": torch.full((batch, pred_len, experts), -math.log(experts), dtype=dtype),
            "scale": torch.zeros(batch, pred_len, dtype=dtype),
            "past": torch.zeros(batch, pred_len, experts, pred_len, channels, dtype=dtype),
            "made": torch.zeros(batch, dtype=torch.int64),
        },
        batch_size=[batch],
        device=device,
    )


def weights(state: TensorDict) -> Tensor:
    """The experts' weights ``[b, h, e]``."""
    return state["log_weights"].exp()


def mix(log_weights: Tensor, forecasts: Tensor) -> Tensor:
    """``forecasts [b, e, h, c]`` weighted at each horizon step -> ``[b, h, c]``."""
    w = log_weights.exp().transpose(1, 2)  # [b, e, h]
    return (w[..., None] * forecasts).sum(dim=1)


def update(
    state: TensorDict, losses: Tensor, cfg: CombinationConfig, mask: Tensor | None = None
) -> TensorDict:
    """One round of exponentiated weights with fixed share on ``losses [b, h, e]``; entries
    where ``mask [b, h]`` is false leave that stream's horizon step unchanged."""
    lw, scale = state["log_weights"], state["scale"]
    mask = torch.ones_like(scale, dtype=torch.bool) if mask is None else mask
    losses = as_dtype(losses, lw.dtype)
    if cfg.normalise:
        mean = losses.mean(dim=-1)  # [b, h]
        scale = torch.where(scale > 0, cfg.scale_decay * scale + (1 - cfg.scale_decay) * mean, mean)
        unit = losses / scale.clamp_min(torch.finfo(lw.dtype).tiny)[..., None]
    else:
        unit = losses
    unit = unit.clamp(0.0, cfg.clip)
    new = lw - cfg.eta * unit  # Hedge
    new = new - new.logsumexp(dim=-1, keepdim=True)
    if cfg.share > 0:  # fixed share, in log space: log((1 - a) w + a / e)
        floor = math.log(cfg.share / lw.shape[-1])
        new = torch.logaddexp(new + math.log1p(-cfg.share), torch.full_like(new, floor))
    return replaced(
        state,
        {
            "log_weights": torch.where(mask[..., None], new, lw),
            "scale": torch.where(mask, scale, state["scale"]),
        },
    )


def matured_losses(state: TensorDict, value: Tensor) -> tuple[Tensor, Tensor]:
    """Losses ``[b, h, e]`` of the forecasts for ``value [b, c]`` (horizon step ``h`` of the
    forecast made ``h + 1`` observations ago) and the mask ``[b, h]`` of those that exist."""
    past = state["past"]  # [b, j, e, h, c]
    pred_len = past.shape[1]
    due = past.diagonal(dim1=1, dim2=3)  # [b, e, c, h]: age j = h
    err = due - as_dtype(value, past.dtype)[:, None, :, None]
    losses = err.pow(2).mean(dim=2).transpose(1, 2)  # [b, h, e]
    exists = torch.arange(pred_len, device=past.device)[None] < state["made"][:, None]  # [b, h]
    return losses, exists


def observe(state: TensorDict, value: Tensor, cfg: CombinationConfig) -> TensorDict:
    """Learn from the newest observed value ``[b, c]`` (call once per observation, before
    :func:`combine` of the forecast made after it)."""
    losses, exists = matured_losses(state, value)
    return update(state, losses, cfg, exists)


def combine(state: TensorDict, forecasts: Tensor) -> tuple[Tensor, TensorDict]:
    """The combined forecast ``[b, h, c]`` of ``forecasts [b, e, h, c]``; the next state keeps
    them so their errors can be learned from once observed."""
    past = torch.cat([as_dtype(forecasts, state["past"].dtype)[:, None], state["past"][:, :-1]], dim=1)
    return mix(state["log_weights"], forecasts), replaced(state, {"past": past, "made": state["made"] + 1})


def step(
    state: TensorDict,
    value: Tensor,
    forecasts: Tensor,
    cfg: CombinationConfig,
    ready: Tensor | None = None,
) -> tuple[Tensor, TensorDict]:
    """One observation: learn from ``value [b, c]`` (the losses of the forecasts made for it),
    then combine ``forecasts [b, e, h, c]``, made after it. Streams where ``ready [b]`` is false
    keep their state (their forecasts are not pushed: a window not yet full forecasts nothing
    worth scoring). Returns the combined forecast ``[b, h, c]`` and the next state."""
    learned = observe(state, value, cfg)
    combined, pushed = combine(learned, forecasts)
    if ready is None or bool(ready.all()):
        return combined, pushed
    keep = ready.view(-1, *([1] * 4))
    kept = {
        "past": torch.where(keep, pushed["past"], state["past"]),
        "made": torch.where(ready, pushed["made"], state["made"]),
    }
    return combined, replaced(pushed, kept)


def regret_bound(steps: int, experts: int, cfg: CombinationConfig, loss_bound: float, delay: int) -> float:
    """The bound of the module docstring on (combined - best expert) cumulative loss."""
    eta, alpha, b = cfg.eta, cfg.share, loss_bound
    return (
        math.log(experts) / eta
        + steps * math.log(1 / (1 - alpha)) / eta
        + eta * steps * b**2 / 8
        + steps * delay * b * (eta * b + alpha)
    )
