"""Titans backbone: a causal transformer with a NeuralMemory inside every layer.

Behrouz, Zhong, Mirrokni (2025), section 4. Axis legend: ``b`` streams, ``n`` time,
``d`` features. How each layer combines attention and memory (``config.fusion``):

* ``"layer"`` (MAL): ``x += memory(x)``, then attention reads the result.
* ``"context"`` (MAC): the memory's outputs for the window are prepended to the keys and
  values of attention; token ``i`` sees memory tokens ``<= i`` and window tokens ``<= i``.
  Only the ``n`` window positions come out.
* ``"gated"`` (MAG): attention and memory read the same input; a sigmoid gate of it mixes them.
* ``"add"`` and ``"concat"`` are refused (the class's ``fusions``): the memory lives inside
  each layer, so only these three ways of combining it exist.

Each layer stores before it retrieves (the NeuralMemory contract), from its own input. The
state holds one NeuralMemory state per layer, keyed by the layer's name (``"layer0"`` ...);
with ``config.memory == "none"`` the model is a plain causal transformer with an empty state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import (
    Backbone,
    ModelCapabilityError,
    StatefulModule,
    StatePath,
    StorePolicy,
    empty_state,
    nested_outcome_paths,
    nested_outcome_step,
)
from models.config import ModelConfig
from models.neural_memory import NeuralMemory


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention whose keys/values may be preceded by extra context tokens."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ModelCapabilityError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x [b, n, d]``, optional ``context [b, n, d]`` aligned with ``x`` -> ``[b, n, d]``."""
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # [n, n]
        source = x
        if context is not None:
            source = torch.cat([context, x], dim=1)  # [b, 2n, d]
            causal = torch.cat([causal, causal], dim=1)  # [n, 2n]
        q = self._heads(self.to_q(x))  # [b, heads, n, d/heads]
        k, v = (self._heads(t) for t in self.to_kv(source).chunk(2, dim=-1))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=p)
        return self.to_out(y.transpose(1, 2).flatten(2))

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)


class TitansBlock(nn.Module):
    """Pre-norm transformer block with an optional NeuralMemory fused per ``fusion``."""

    def __init__(self, config: ModelConfig, fusion: str) -> None:
        super().__init__()
        d = config.d_model
        self.fusion = fusion
        self.attn_norm = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, config.n_heads, config.dropout)
        self.ff_norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(
            nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(config.dropout)
        )
        self.memory = NeuralMemory(config) if config.memory == "titans" else None
        self.memory_norm = nn.LayerNorm(d) if self.memory is not None else None
        self.gate = nn.Linear(d, d) if self.memory is not None and fusion == "gated" else None

    def forward(
        self, x: Tensor, state: TensorDict | None, store: StorePolicy
    ) -> tuple[Tensor, TensorDict | None]:
        """``x [b, n, d] -> [b, n, d]`` and this layer's next memory state."""
        if self.memory is None or self.memory_norm is None or state is None:
            x = x + self.attn(self.attn_norm(x))
            return x + self.ff(self.ff_norm(x)), None
        memory, state = self.memory(self.memory_norm(x), state, store)  # [b, n, d]
        if self.fusion == "layer":
            x = x + memory
            x = x + self.attn(self.attn_norm(x))
        elif self.fusion == "context":
            x = x + self.attn(self.attn_norm(x), context=memory)
        else:
            h = self.attn_norm(x)
            gate = torch.sigmoid(self.gate(h)) if self.gate is not None else 0.5
            x = x + gate * self.attn(h) + (1 - gate) * memory
        return x + self.ff(self.ff_norm(x)), state


class TitansBackbone(Backbone):
    """``config.n_layers`` Titans blocks over a learned positional embedding."""

    integrated_memories = ("titans",)
    fuses_integrated_memory = True
    takes_side_memory = False
    fusions = ("layer", "context", "gated")  # MAL, MAC, MAG
    # scaled_dot_product_attention has no batching rule on CPU (vmap's slow fallback warns)
    vmaps_stream_weights = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # with no memory the fusion is moot: every block is plain attention
        fusion = config.fusion if config.memory == "titans" else "gated"
        if fusion not in self.fusions:
            raise ModelCapabilityError(f"titans backbone has no fusion {config.fusion!r}")
        self.has_memory = config.memory == "titans"
        self.seq_len = config.seq_len
        self.position = nn.Parameter(torch.randn(config.seq_len, config.d_model) * 0.02)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleDict(
            {f"layer{i}": TitansBlock(config, fusion) for i in range(config.n_layers)}
        )
        self.norm = nn.LayerNorm(config.d_model)

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        """One NeuralMemory state per layer that has a memory, keyed by layer name."""
        state = empty_state(batch, device)
        for name, block in self.layers.items():
            memory = cast(TitansBlock, block).memory
            if memory is not None:
                state[name] = memory.init_state(batch, device, dtype)
        return state

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        """``x [b, n, d]`` (``n <= seq_len``; positions align to the window's end)."""
        n = x.shape[1]
        if n > self.seq_len:
            raise ModelCapabilityError(f"titans backbone got {n} steps, more than seq_len={self.seq_len}")
        x = self.drop(x + self.position[-n:])
        next_state = empty_state(state.batch_size[0], state.device)
        for name, block in self.layers.items():
            x, layer_state = block(x, state.get(name) if block.memory is not None else None, store)
            if layer_state is not None:
                next_state[name] = layer_state
        return self.norm(x), next_state

    @property
    def stores_tokens(self) -> bool:
        return self.has_memory

    def outcome_paths(self) -> tuple[StatePath, ...]:
        return nested_outcome_paths(self._memories())

    def outcome_step(self, state: TensorDict, changes: Mapping[StatePath, Tensor]) -> TensorDict:
        return nested_outcome_step(self._memories(), state, changes)

    def _memories(self) -> dict[str, StatefulModule]:
        """Each layer's memory, keyed as its state is."""
        layers = {name: cast(TitansBlock, block).memory for name, block in self.layers.items()}
        return {name: memory for name, memory in layers.items() if memory is not None}
