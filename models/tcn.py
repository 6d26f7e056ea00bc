"""Dilated causal convolution encoder (TS2Vec's, the backbone FSNet adapts).

Axis legend: ``b`` streams, ``n`` time, ``d`` features (``d_model``).

``n_layers`` residual blocks; block ``i`` is ``x + conv2(gelu(conv1(gelu(x))))`` with two
causal convs of dilation ``2**i`` (TS2Vec's pre-activation order). TS2Vec pads both sides;
here the padding is on the left only, so features at time ``t`` never see inputs after ``t``.

With ``memory`` "fsnet" or "fsnet_nomem" every conv is an :class:`~models.fsnet.FSNetConv`
and the state holds one sub-state per conv, keyed by layer name (``block0_conv1``,
``block0_conv2``, ``block1_conv1``, ...); otherwise the convs are plain and the state is empty.

Gradient contract of :meth:`TCNBackbone.adapt`: ``grads`` is keyed like this module's
``named_parameters()``; layer ``block{i}_conv{j}`` reads ``grads["blocks.{i}.conv{j}.weight"]``
(the conv weight's gradient, ``[d, d, kernel_size]``) and ignores every other key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import Backbone, StorePolicy, empty_state
from models.config import ModelConfig
from models.fsnet import (
    CONTROLLER_PARTS,
    FSNetConv,
    causal_conv1d,
    init_conv_,
    stacked_adapt,
    stacked_current_calibrations,
)

ADAPTIVE_MEMORIES = ("fsnet", "fsnet_nomem")


class CausalConv1d(nn.Module):
    """A plain causal dilated conv with the same parameter names as :class:`FSNetConv`."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        init_conv_(self.weight, self.bias)

    def forward(self, x: Tensor, gather: Tensor | None = None) -> Tensor:
        """``x [b, d, n] -> [b, d, n]`` (``gather``: only some outputs, see :func:`causal_conv1d`)."""
        return causal_conv1d(x, self.weight, self.bias, self.dilation, gather)

    def calibrated(self, x: Tensor, u: Tensor | None, gather: Tensor | None = None) -> Tensor:
        """The same interface as :meth:`FSNetConv.calibrated`; a plain conv has no calibration."""
        return self(x, gather)


@dataclass(frozen=True)
class BlockPlan:
    """Which positions one block computes when only the window's last output is read: its
    input holds some positions, ``conv1``/``conv2`` gather the columns their outputs read
    (:func:`causal_conv1d`), ``keep`` picks the shortcut's (None: every one of them)."""

    conv1: Tensor
    conv2: Tensor
    keep: Tensor | None


@dataclass(frozen=True)
class LastPlan:
    """The positions of a window of ``n`` steps that reach its last output, block by block.

    Why: the forecast reads the encoder's last position only, and a dilated causal stack's
    last output depends on few positions of the upper blocks (at 60 steps, kernel 3 and 11
    blocks of dilation 1..1024: 189 conv outputs instead of 1,320). ``inputs``: the window
    positions the first block reads (None: all); ``blocks[i]``: None where block ``i``
    computes every position, as the full forward does."""

    inputs: Tensor | None
    blocks: tuple[BlockPlan | None, ...]

    @staticmethod
    def of(n: int, kernel_size: int, dilations: list[int], device: torch.device) -> LastPlan:
        wanted = [n - 1]  # the outputs of the block above, from the top down
        plans: list[BlockPlan | None] = []
        every = list(range(n))
        for dilation in reversed(dilations):
            taps = min(kernel_size, (n - 1) // dilation + 1)  # as causal_conv1d drops them
            back = [(taps - 1 - j) * dilation for j in range(taps)]
            mid = sorted({t - b for t in wanted for b in back if t >= b})
            inputs = sorted({t - b for t in mid for b in back if t >= b} | set(wanted))
            if inputs == every and mid == every and wanted == every:
                plans.append(None)
            else:
                plans.append(
                    BlockPlan(
                        _gather(mid, inputs, back, device),
                        _gather(wanted, mid, back, device),
                        None if wanted == inputs else _index([inputs.index(t) for t in wanted], device),
                    )
                )
            wanted = inputs
        first = None if wanted == every else _index(wanted, device)
        return LastPlan(first, tuple(reversed(plans)))


def _index(values: list[int] | list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _gather(outputs: list[int], inputs: list[int], back: list[int], device: torch.device) -> Tensor:
    """``[taps, len(outputs)]``: the column of ``inputs`` each tap of each output reads, or
    ``len(inputs)`` (the zero padding) where it looks before the window."""
    column = {t: i for i, t in enumerate(inputs)}
    return _index([[column[t - b] if t >= b else len(inputs) for t in outputs] for b in back], device)


class ResidualBlock(nn.Module):
    """Two causal convs with GELU before each, plus the identity shortcut."""

    def __init__(self, config: ModelConfig, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv1 = _make_conv(config, dilation)
        self.conv2 = _make_conv(config, dilation)

    def forward(
        self, x: Tensor, u1: Tensor | None, u2: Tensor | None, plan: BlockPlan | None = None
    ) -> Tensor:
        """``x [b, d, n] -> [b, d, n]``; ``u1``, ``u2``: the two convs' FSNet calibrations (None
        when plain); ``plan``: only the positions it names (:class:`LastPlan`)."""
        conv1, conv2 = (cast(CausalConv1d | FSNetConv, c) for c in (self.conv1, self.conv2))
        if plan is None:
            return conv2.calibrated(F.gelu(conv1.calibrated(F.gelu(x), u1)), u2) + x
        h = conv2.calibrated(F.gelu(conv1.calibrated(F.gelu(x), u1, plan.conv1)), u2, plan.conv2)
        return h + (x if plan.keep is None else x[..., plan.keep])


def _make_conv(config: ModelConfig, dilation: int) -> nn.Module:
    d, k = config.d_model, config.kernel_size
    if config.memory not in ADAPTIVE_MEMORIES:
        return CausalConv1d(d, k, dilation)
    return FSNetConv(d, d, k, dilation, config.fsnet, use_memory=config.memory == "fsnet")


class TCNBackbone(Backbone):
    """TS2Vec dilated causal conv encoder, ``[b, n, d] -> [b, n, d]``; FSNet-adaptive on request."""

    integrated_memories = ADAPTIVE_MEMORIES  # FSNet adapts this backbone's own convolutions

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.adaptive = config.memory in ADAPTIVE_MEMORIES
        self.blocks = nn.ModuleList(ResidualBlock(config, 2**i) for i in range(config.n_layers))
        self.kernel_size = config.kernel_size
        self._plans: dict[tuple[int, torch.device], LastPlan] = {}  # forward_last's, per window length
        self.dropout = nn.Dropout(config.dropout)  # TS2Vec's dropout on the representation
        # state key -> module path; the path is also the prefix of the layer's gradient keys
        self.layer_paths: dict[str, str] = {
            f"block{i}_conv{j}": f"blocks.{i}.conv{j}"
            for i in range(config.n_layers)
            for j in (1, 2)
            if self.adaptive
        }

    @property
    def learns_from_gradients(self) -> bool:
        return self.adaptive

    def adaptive_layers(self) -> dict[str, FSNetConv]:
        """The FSNet convs by state key (empty for a plain TCN)."""
        return {name: self.get_submodule(path) for name, path in self.layer_paths.items()}  # type: ignore[misc]

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        state = empty_state(batch, device)
        for name, layer in self.adaptive_layers().items():
            state[name] = layer.init_state(batch, device=device, dtype=dtype)
        return state

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        """``x [b, n, d] -> features [b, n, d]``; the state is read, never changed.

        ``store`` is ignored: FSNet learns from loss gradients through :meth:`adapt`, not
        from the tokens it sees.
        """
        return self._encode(x, state, None), state

    def forward_last(self, x: Tensor, state: TensorDict, store: StorePolicy) -> tuple[Tensor, TensorDict]:
        """The last position's features ``[b, 1, d]``, computing only the positions that reach
        it (:class:`LastPlan`): the same numbers as ``forward(...)[0][:, -1:]`` up to float
        rounding, a fraction of the convolutions."""
        key = (x.shape[1], x.device)
        plan = self._plans.get(key)
        if plan is None:
            dilations = [cast(ResidualBlock, b).dilation for b in self.blocks]
            with torch.inference_mode(False):  # kept for later calls, autograd's among them
                plan = self._plans[key] = LastPlan.of(x.shape[1], self.kernel_size, dilations, x.device)
        return self._encode(x, state, plan), state

    def _encode(self, x: Tensor, state: TensorDict, plan: LastPlan | None) -> Tensor:
        if self.adaptive and state.batch_size[0] != x.shape[0]:
            raise ValueError(f"state holds {state.batch_size[0]} stream(s) but x holds {x.shape[0]}")
        h = x.transpose(1, 2)  # [b, d, n]
        if plan is not None and plan.inputs is not None:
            h = h[..., plan.inputs]
        u: dict[str, Tensor | None] = dict.fromkeys(self.layer_paths)
        if self.adaptive:  # every conv's calibration at once: it depends on the state, not on h
            layers = self.adaptive_layers()
            u = dict(
                zip(
                    layers,
                    stacked_current_calibrations(list(layers.values()), [state[n] for n in layers]),
                    strict=True,
                )
            )
        for i, block in enumerate(self.blocks):
            step = None if plan is None else plan.blocks[i]
            h = block(h, u.get(f"block{i}_conv1"), u.get(f"block{i}_conv2"), step)
        return self.dropout(h.transpose(1, 2))  # [b, n | 1, d]

    def adapted_from(self) -> tuple[str, ...]:
        return tuple(path + ".weight" for path in self.layer_paths.values())

    def adapt(
        self, state: TensorDict, grads: dict[str, Tensor], weights: dict[str, Tensor] | None = None
    ) -> TensorDict:
        """Next state of each FSNet conv from its weight gradient (contract in the module doc),
        its calibrations from the stream's own controllers where ``weights`` has them.

        Written for one stream (batch 1, gradients shaped like the weights); a batch of
        ``b`` streams works too when each weight gradient has a leading ``[b]``.
        """
        if not self.adaptive:
            return state
        layers = self.adaptive_layers()
        weight_grads = []
        for name in layers:
            key = self.layer_paths[name] + ".weight"
            if key not in grads:
                raise KeyError(f"FSNet adapt needs grads[{key!r}] (layer {name})")
            weight_grads.append(grads[key])
        controllers = None
        if weights is not None:
            parts = CONTROLLER_PARTS
            controllers = [[weights[f"{self.layer_paths[n]}.{part}"] for part in parts] for n in layers]
        adapted = stacked_adapt(list(layers.values()), [state[n] for n in layers], weight_grads, controllers)
        next_state = empty_state(state.batch_size[0], state.device)
        for name, layer_state in zip(layers, adapted, strict=True):
            next_state[name] = layer_state
        return next_state
