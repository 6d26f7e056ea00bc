"""HOPE's Continuum Memory System: a chain of memory levels updated at different frequencies.

Behrouz, Razaviyayn, Zhong, Mirrokni (2025), "Nested Learning: The Illusion of Deep Learning
Architectures", section on the Continuum Memory System (CMS): ``y = MLP^(f_k)(... MLP^(f_1)(x))``
where the weights of level ``l`` are updated once every ``f_l`` steps, from what accumulated
since its last update. Fast levels follow the present; slow levels keep what recurs.

Axis legend: ``b`` streams, ``n`` time, ``d`` features.

Each level is a :class:`~models.neural_memory.NeuralMemory` whose ``chunk_size`` is the level's
frequency: a chunk's tokens share one gradient step, taken when a stream's ``f``-th, ``2f``-th,
... token is stored (buffered tokens wait in the level's state), so a level updates exactly at
its frequency, counted per stream from its first stored token. Levels are chained residually:
level ``l`` stores and reads ``h_{l-1}`` and ``h_l = h_{l-1} + level_l(h_{l-1})``; the unit's
output is ``h_k - x``, what the levels added. The state holds one NeuralMemory state per level,
keyed ``"level0"``, ``"level1"``, ... (fastest first).

Departure from HOPE: its levels are plain MLP blocks trained by the outer optimiser at their
frequencies; here each level is a Titans memory learned at test time (its own keys, values and
gates), the form whose per-stream state memcast serves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import cast

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import (
    MemoryUnit,
    StatefulModule,
    StatePath,
    StorePolicy,
    empty_state,
    nested_outcome_paths,
    nested_outcome_step,
)
from models.config import ModelConfig
from models.neural_memory import NeuralMemory


def level_config(config: ModelConfig, frequency: int) -> ModelConfig:
    """The model configuration of one level: the shared memory settings, chunks of ``frequency``."""
    memory = dataclasses.replace(config.neural_memory, chunk_size=frequency, batch_size=None)
    return config.replace(neural_memory=memory)


class ContinuumMemory(MemoryUnit):
    """Memory ``cms``: ``config.cms.frequencies`` NeuralMemory levels, fastest first."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.frequencies = config.cms.frequencies
        self.levels = nn.ModuleDict(
            {f"level{i}": NeuralMemory(level_config(config, f)) for i, f in enumerate(self.frequencies)}
        )

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        state = empty_state(batch, device)
        for name, level in self.levels.items():
            state[name] = cast(NeuralMemory, level).init_state(batch, device, dtype)
        return state

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        """``x [b, n, d]`` -> what the levels add ``[b, n, d]``, and the next state."""
        h = x
        next_state = empty_state(state.batch_size[0], state.device)
        for name, level in self.levels.items():
            out, next_state[name] = level(h, state[name], store)
            h = h + out  # [b, n, d]
        return h - x, next_state

    def outcome_paths(self) -> tuple[StatePath, ...]:
        return nested_outcome_paths(self._levels())

    def outcome_step(self, state: TensorDict, changes: Mapping[StatePath, Tensor]) -> TensorDict:
        return nested_outcome_step(self._levels(), state, changes)

    def _levels(self) -> dict[str, StatefulModule]:
        return {name: cast(NeuralMemory, level) for name, level in self.levels.items()}
