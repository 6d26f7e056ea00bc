"""Stateless sequence backbones: ``[b, n, d] -> [b, n, d]``.

They keep nothing per stream (each forecast re-reads the window), so their state is empty.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import Backbone, StorePolicy
from models.config import ModelConfig


def _under_vmap(*tensors: Tensor) -> bool:
    """True inside ``torch.func.vmap`` (inputs or weights carry a batch dimension of its own)."""
    return any(torch._C._functorch.is_batchedtensor(t) for t in tensors)


class LSTMBackbone(Backbone):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            config.d_model,
            config.d_model,
            num_layers=config.n_layers,
            batch_first=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )
        # nn.LSTM's own order of its weights (the layout aten::lstm reads)
        self._weight_names = tuple(
            f"{kind}_l{layer}"
            for layer in range(config.n_layers)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        lstm = self.lstm
        if _under_vmap(x, cast(Tensor, lstm.weight_ih_l0)):
            return self._recurrence(x), state
        if x.device.type != "cpu":  # (nn.LSTM keeps cuDNN's weights in one flat buffer)
            return lstm(x)[0], state  # [b, n, d]
        # what nn.LSTM's forward calls for a batch-first [b, n, d] input and zero initial state,
        # without its checks and bookkeeping, which cost a quarter of the kernel's time on the
        # online step's two windows; the weights are looked up by name, as the module's own
        # check does, so weights swapped in (torch.func.functional_call) are the ones used
        zeros = x.new_zeros(lstm.num_layers, x.shape[0], lstm.hidden_size)
        params = lstm._parameters  # (nn.Module's own table, without a __getattr__ call per weight)
        weights = [cast(Tensor, params[name]) for name in self._weight_names]
        features, _, _ = torch.lstm(
            x, (zeros, zeros), weights, True, lstm.num_layers, lstm.dropout, lstm.training, False, True
        )
        return features, state

    def _recurrence(self, x: Tensor) -> Tensor:
        """``nn.LSTM``'s recurrence written with matmuls: the same numbers, but it runs under
        ``torch.func.vmap`` with per-stream weights, where ``aten::lstm`` has no batching rule
        (``models.online`` learns full_model streams that way)."""
        lstm = self.lstm
        for layer in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
            b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
            if layer and lstm.dropout:
                x = F.dropout(x, lstm.dropout, self.training)
            pre = x @ w_ih.T + b  # [b, n, 4d]: input gates of every step at once
            h = x.new_zeros(x.shape[0], lstm.hidden_size)
            c = torch.zeros_like(h)
            outputs = []
            for t in range(x.shape[1]):
                gates = pre[:, t] + h @ w_hh.T  # [b, 4d], PyTorch's order: input, forget, cell, output
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)  # [b, n, d]
        return x


class TransformerBackbone(Backbone):
    """Causal transformer encoder with a learned positional embedding."""

    # scaled_dot_product_attention has no batching rule on CPU (vmap's slow fallback warns)
    vmaps_stream_weights = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(config.seq_len, config.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.d_model,
            config.n_heads,
            dim_feedforward=2 * config.d_model,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        n = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device, dtype=x.dtype)
        features = self.encoder(x + self.position[-n:], mask=mask, is_causal=True)
        return features, state
