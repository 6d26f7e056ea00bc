"""Stateless sequence backbones: ``[b, n, d] -> [b, n, d]``.

They keep nothing per stream (each forecast re-reads the window), so their state is empty.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import Backbone, StorePolicy
from models.config import ModelConfig


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

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        features, _ = self.lstm(x)  # [b, n, d]
        return features, state


class TransformerBackbone(Backbone):
    """Causal transformer encoder with a learned positional embedding."""

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
