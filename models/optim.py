"""A functional AdamW step, so a stream's optimizer moments can live in its state."""

from __future__ import annotations

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
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
    """One AdamW update (Loshchilov & Hutter), returning new tensors; nothing is modified.

    ``step`` is the number of steps already taken: a scalar tensor, or ``[b]`` for ``b``
    streams whose tensors are stacked along a leading dimension (each its own bias correction).
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
        new_params[name] = p * (1 - lr * weight_decay) - lr * update
        new_avg[name], new_avg_sq[name] = m, v
    return new_params, new_avg, new_avg_sq, step
