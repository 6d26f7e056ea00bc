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

from typing import cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import Backbone, StorePolicy, empty_state
from models.config import ModelConfig
from models.fsnet import FSNetConv, causal_conv1d, init_conv_, stacked_adapt, stacked_current_calibrations

ADAPTIVE_MEMORIES = ("fsnet", "fsnet_nomem")


class CausalConv1d(nn.Module):
    """A plain causal dilated conv with the same parameter names as :class:`FSNetConv`."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        init_conv_(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [b, d, n] -> [b, d, n]``."""
        return causal_conv1d(x, self.weight, self.bias, self.dilation)

    def calibrated(self, x: Tensor, u: Tensor | None) -> Tensor:
        """The same interface as :meth:`FSNetConv.calibrated`; a plain conv has no calibration."""
        return self(x)


class ResidualBlock(nn.Module):
    """Two causal convs with GELU before each, plus the identity shortcut."""

    def __init__(self, config: ModelConfig, dilation: int) -> None:
        super().__init__()
        self.conv1 = _make_conv(config, dilation)
        self.conv2 = _make_conv(config, dilation)

    def forward(self, x: Tensor, u1: Tensor | None, u2: Tensor | None) -> Tensor:
        """``x [b, d, n] -> [b, d, n]``; ``u1``, ``u2``: the two convs' FSNet calibrations (None when plain)."""
        h = cast(CausalConv1d | FSNetConv, self.conv1).calibrated(F.gelu(x), u1)
        h = cast(CausalConv1d | FSNetConv, self.conv2).calibrated(F.gelu(h), u2)
        return h + x


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
        if self.adaptive and state.batch_size[0] != x.shape[0]:
            raise ValueError(f"state holds {state.batch_size[0]} stream(s) but x holds {x.shape[0]}")
        h = x.transpose(1, 2)  # [b, d, n]
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
            h = block(h, u.get(f"block{i}_conv1"), u.get(f"block{i}_conv2"))
        return self.dropout(h.transpose(1, 2)), state  # [b, n, d]

    def adapt(self, state: TensorDict, grads: dict[str, Tensor]) -> TensorDict:
        """Next state of each FSNet conv from its weight gradient (contract in the module doc).

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
        adapted = stacked_adapt(list(layers.values()), [state[n] for n in layers], weight_grads)
        next_state = empty_state(state.batch_size[0], state.device)
        for name, layer_state in zip(layers, adapted, strict=True):
            next_state[name] = layer_state
        return next_state
