"""A functional AdamW step, so a stream's optimizer moments can live in its state."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adamw_step(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    anchor: dict[str, Tensor] | None = None,
    anchor_strength: float = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
    """One AdamW update (Loshchilov & Hutter), returning new tensors; nothing is modified.

    ``step`` is the number of steps already taken: a scalar tensor, or ``[b]`` for ``b``
    streams whose tensors are stacked along a leading dimension (each its own bias correction).
    ``anchor`` (weights ``p0``, broadcast over the streams) adds a decoupled pull
    ``- lr * anchor_strength * (p - p0)``, weight decay toward ``p0`` instead of 0 (L2-SP, Li et
    al. 2018): with ``|update| <= U`` per coordinate the distance ``|p - p0|`` can never pass
    ``U / anchor_strength`` (when ``lr * anchor_strength < 1``), however many steps are taken.
    """
    beta1, beta2 = betas
    step = step + 1
    t = step.to(torch.float64)
    correction1: float | Tensor
    correction2: float | Tensor
    if step.dim() == 0:
        correction1, correction2 = float(1 - beta1**t), float(1 - beta2**t)
    else:
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t  # [b]
    new_params, new_avg, new_avg_sq = {}, {}, {}
    for name, p in params.items():
        c1: float | Tensor = correction1
        c2: float | Tensor = correction2
        if isinstance(correction1, Tensor) and isinstance(correction2, Tensor):  # [b] -> [b, 1, ...]
            shape = (-1, *([1] * (p.dim() - 1)))
            c1, c2 = correction1.to(p.dtype).view(shape), correction2.to(p.dtype).view(shape)
        g = grads[name]
        m = beta1 * exp_avg[name] + (1 - beta1) * g
        v = beta2 * exp_avg_sq[name] + (1 - beta2) * g * g
        denom = (v / c2).sqrt() + eps
        update = (m / c1) / denom
        new_p = p * (1 - lr * weight_decay) - lr * update
        if anchor is not None and anchor_strength > 0:
            new_p = new_p - lr * anchor_strength * (p - anchor[name])
        new_params[name] = new_p
        new_avg[name], new_avg_sq[name] = m, v
    return new_params, new_avg, new_avg_sq, step


def adam_direction_bound(betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The largest ``|m_hat / sqrt(v_hat)|`` of any coordinate at any step, whatever the gradients
    (Cauchy-Schwarz on the two moving averages; needs ``beta1**2 < beta2``): 7.27 for the
    default betas. With an anchor of strength ``a`` a weight stays within this ``/ a`` of ``p0``."""
    beta1, beta2 = betas
    return (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1**2 / beta2))
