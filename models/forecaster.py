"""The backbone-plus-memory forecaster: a window ``[b, seq_len, c]`` -> ``[b, pred_len, c_out]``.

Pipeline: reversible instance normalisation of the window -> linear embedding -> backbone P
-> fusion with memory M -> head on the last token, plus a channel-independent linear map of
the window; the sum is a change from the last observed value (``predict_delta``) and is
de-normalised back to the window's units. Head and linear map start at zero, so an
untrained model forecasts the last value, the baseline every method must beat.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models.base import (
    Backbone,
    MemoryUnit,
    StatefulModule,
    StatePath,
    StorePolicy,
    empty_state,
    nested_outcome_paths,
    nested_outcome_step,
    replaced,
)
from models.config import ModelConfig
from models.neural_memory import NeuralMemory
from models.registry import build_backbone, build_memory

_EPS = 1e-5


class Fusion(nn.Module):
    """Combines backbone features and memory output (both ``[b, n, d]``)."""

    def __init__(self, kind: str, d: int) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("concat", "gated"):
            self.proj = nn.Linear(2 * d, d)

    def forward(self, features: Tensor, memory: Tensor) -> Tensor:
        if self.kind == "add":
            return features + memory
        if self.kind == "layer":
            return memory
        both = torch.cat([features, memory], dim=-1)  # [b, n, 2d]
        if self.kind == "concat":
            return self.proj(both)
        gate = torch.sigmoid(self.proj(both))
        return gate * features + (1 - gate) * memory


@dataclass(frozen=True)
class Encoded:
    """A window as the memory and the head read it: its normalised values ``x [b, n, c]``, their
    ``mean`` and ``std [b, 1, c]``, and the backbone's ``features [b, n, d]`` (a backbone that
    keeps no per-stream state: see :meth:`ContinualForecaster.encode_together`)."""

    x: Tensor
    mean: Tensor
    std: Tensor
    features: Tensor


def _under(named: dict[str, Tensor], child: str) -> dict[str, Tensor]:
    """The entries of ``named`` (keyed by parameter name) under module ``child``, keyed relative to it."""
    prefix = child + "."
    return {k[len(prefix) :]: v for k, v in named.items() if k.startswith(prefix)}


class ContinualForecaster(nn.Module):
    """Shared, pretrained parameters only; per-stream state is passed in and returned."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self._all_channels = config.out_indices == tuple(range(config.channels))
        d = config.d_model
        self.embed = nn.Linear(config.channels, d)
        self.backbone: Backbone = build_backbone(config)
        self.memory: MemoryUnit | None = build_memory(config)
        self.fusion = Fusion(config.fusion, d) if self.memory is not None else None
        self.head = nn.Linear(d, config.pred_len * config.out_channels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip: nn.Linear | None = None
        if config.linear_skip:
            self.skip = nn.Linear(config.seq_len, config.pred_len)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        # fixed by the structure built above, and asked on every online step
        children = self.stateful_children().values()
        self._outcome_paths = nested_outcome_paths(self.stateful_children())
        self._stores_tokens = any(c.stores_tokens for c in children)
        self._learns_from_gradients = any(c.learns_from_gradients for c in children)
        self._adapted_from = tuple(
            f"{name}.{p}" for name, c in self.stateful_children().items() for p in c.adapted_from()
        )
        self._stateless_backbone = not self.backbone.init_state(1).keys()  # the LSTM, the transformer
        memory = self.memory
        # the memory weights reach the forecast only through an add fusion of the MLP memory's read
        self._writes_outcome_gradient = (
            isinstance(memory, NeuralMemory)
            and memory.writes_read_gradient
            and self.fusion is not None
            and self.fusion.kind == "add"
            and self._outcome_paths == tuple(("memory", *p) for p in memory.outcome_paths())
        )

    @property
    def writes_outcome_gradient(self) -> bool:
        """:meth:`outcome_gradient` writes the chain rule out for this configuration (the
        outcome step then needs no autograd)."""
        return self._writes_outcome_gradient

    def stateful_children(self) -> dict[str, StatefulModule]:
        children: dict[str, StatefulModule] = {"backbone": self.backbone}
        if self.memory is not None:
            children["memory"] = self.memory
        return children

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        """Fresh component state for ``batch`` streams: ``{"backbone": ..., "memory": ...}``."""
        state = empty_state(batch, device)
        for name, child in self.stateful_children().items():
            state[name] = child.init_state(batch, device=device, dtype=dtype)
        return state

    @property
    def stores_tokens(self) -> bool:
        """A component is a memory that learns from the tokens it is shown."""
        return self._stores_tokens

    @property
    def vmaps_stream_weights(self) -> bool:
        """Every stateful component runs under ``vmap`` with per-stream weights."""
        return all(c.vmaps_stream_weights for c in self.stateful_children().values())

    @property
    def learns_from_gradients(self) -> bool:
        return self._learns_from_gradients

    def adapted_from(self) -> tuple[str, ...]:
        """The parameters whose loss gradients :meth:`adapt` reads (FSNet's conv weights)."""
        return self._adapted_from

    def outcome_paths(self) -> tuple[StatePath, ...]:
        """Paths into the component state of the per-stream memory weights that ``memory_only``
        streams step from realised errors (:meth:`StatefulModule.outcome_paths`)."""
        return self._outcome_paths

    def outcome_step(self, state: TensorDict, changes: Mapping[StatePath, Tensor]) -> TensorDict:
        return nested_outcome_step(self.stateful_children(), state, changes)

    def forward(  # type: ignore[override]
        self,
        window: Tensor,
        state: TensorDict,
        store: StorePolicy = StorePolicy.NONE,
        encoded: Encoded | None = None,
    ) -> tuple[Tensor, TensorDict]:
        """The forecast of ``window [b, n, c]`` and the next component state; ``encoded``: the
        window's :meth:`encode_together`, when the caller has it."""
        (x, mean, std, features), backbone_state = self._encode(window, state, store, encoded)
        changed = {"backbone": backbone_state}
        last, memory_state = self._fused_last(features, state, store)
        if memory_state is not None:
            changed["memory"] = memory_state
        return self._output(last, x, mean, std), replaced(state, changed)

    def encode_together(self, windows: list[Tensor], state: TensorDict) -> list[Encoded] | None:
        """Each of ``windows`` (each ``[b, n, c]``) encoded by one backbone pass over all of them;
        None unless the backbone keeps no per-stream state (then nothing it reads differs).

        Why: an online step forecasts two windows (the matured pair's, to learn from, and the
        newest), and one LSTM pass over both costs little more than one over either."""
        if not self._stateless_backbone:
            return None
        x, mean, std = self._normalise(torch.cat(windows))
        embedded = F.linear(x, self.embed.weight, self.embed.bias)  # (self.embed's function, no module call)
        encode = self.backbone.forward_last if self._reads_last_only(None) else self.backbone
        features, _ = encode(embedded, state["backbone"], StorePolicy.NONE)
        # views, no copies (chunk: split's equal parts without its Python wrapper)
        parts = zip(*(t.chunk(len(windows)) for t in (x, mean, std, features)), strict=True)
        return [Encoded(*part) for part in parts]

    def _encode(
        self, window: Tensor, state: TensorDict, store: StorePolicy, encoded: Encoded | None
    ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], TensorDict]:
        """(normalised window, mean, std, backbone features) and the backbone's next state."""
        if encoded is not None:  # from encode_together: a backbone without state keeps it
            return (encoded.x, encoded.mean, encoded.std, encoded.features), state["backbone"]
        x, mean, std = self._normalise(window)  # [b, n, c]
        encode = self.backbone.forward_last if self._reads_last_only(store) else self.backbone
        features, backbone_state = encode(self.embed(x), state["backbone"], store)
        return (x, mean, std, features), backbone_state

    def _reads_last_only(self, store: StorePolicy | None) -> bool:
        """Whether the forecast reads the backbone's last position only (:meth:`_fused_last`):
        always without a memory unit, and with one unless it stores the whole window (``store``
        None: whatever the caller's policy)."""
        return self.memory is None or self.fusion is None or store not in (None, StorePolicy.WINDOW)

    def forward_and_frozen(
        self, window: Tensor, state: TensorDict, store: StorePolicy, encoded: Encoded | None = None
    ) -> tuple[Tensor, TensorDict, Tensor]:
        """:meth:`forward`, and the frozen checkpoint's forecast of the same window (from the
        fresh component state: the combination's ``frozen`` expert, ``models/combination.py``).

        Why together: a backbone that keeps no per-stream state gives both the same features,
        so the backbone (the LSTM: most of a forward pass) runs once for the two forecasts."""
        if not self._stateless_backbone:
            forecast, next_state = self(window, state, store)
            fresh = self.init_state(window.shape[0], device=window.device, dtype=window.dtype)
            return forecast, next_state, self(window, fresh, StorePolicy.NONE)[0]
        (x, mean, std, features), backbone_state = self._encode(window, state, store, encoded)
        changed = {"backbone": backbone_state}
        memory, fusion = self.memory, self.fusion
        if memory is not None and fusion is not None and store is not StorePolicy.WINDOW:
            # both reads see the last token only (as _fused_last): the memory reads it twice
            # from one set of queries
            shown = features[:, -1:]
            retrieved, stored, fresh_read = memory.forward_and_fresh(shown, state["memory"], store)
            changed["memory"] = stored
            adapted_last, fresh_last = fusion(shown, retrieved)[:, -1], fusion(shown, fresh_read)[:, -1]
            forecast, frozen = (
                self._output(adapted_last, x, mean, std),
                self._output(fresh_last, x, mean, std),
            )
            return forecast, replaced(state, changed), frozen
        last, memory_state = self._fused_last(features, state, store)
        if memory_state is None or memory is None or fusion is None:
            frozen_last = last  # no memory: the frozen forecast is the same
        else:
            changed["memory"] = memory_state
            shown = features[:, -1:]  # as _fused_last without storing: the last token only
            frozen_last = fusion(shown, memory.read_fresh(shown))[:, -1]
        forecast, frozen = self._output(last, x, mean, std), self._output(frozen_last, x, mean, std)
        return forecast, replaced(state, changed), frozen

    def _fused_last(
        self, features: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict | None]:
        """The last token's features ``[b, d]`` fused with the memory's read of ``state["memory"]``
        (the backbone's own without a memory), and the memory's next state (None without one)."""
        if self.memory is None or self.fusion is None:
            return features[:, -1], None
        # the fusion works token by token and the head reads the last token, so a memory that
        # stores only the newest token (or none) needs to see only that one: the same forecast
        # and state at a fraction of the retrieval cost
        shown = features if store is StorePolicy.WINDOW else features[:, -1:]  # [b, n | 1, d]
        retrieved, memory_state = self.memory(shown, state["memory"], store)
        return self.fusion(shown, retrieved)[:, -1], memory_state

    def _output(self, last: Tensor, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """The forecast ``[b, pred_len, c_out]`` from the last token's fused features ``last
        [b, d]`` and the normalised window ``x`` with its statistics."""
        cfg = self.config
        # (the layers' functions without their module calls: this runs twice per online step)
        y = F.linear(last, self.head.weight, self.head.bias).view(x.shape[0], cfg.pred_len, cfg.out_channels)
        x_out = self.forecast_channels(x)  # [b, n, c_out]
        if self.skip is not None:
            y = y + F.linear(x_out.transpose(1, 2), self.skip.weight, self.skip.bias).transpose(1, 2)
        if cfg.predict_delta:
            y = y + x_out[:, -1:, :]
        return y * self.forecast_channels(std) + self.forecast_channels(mean)

    def outcome_gradient(
        self,
        window: Tensor,
        state: TensorDict,
        targets: Tensor,
        mask: Tensor | None,
        encoded: Encoded | None = None,
    ) -> tuple[Tensor, dict[StatePath, Tensor]] | None:
        """The forecast of ``window`` (what ``forward`` returns without storing) and, per stream,
        the gradient of its ``F.mse_loss`` to ``targets [b, pred_len, c_out]`` w.r.t. the
        :meth:`outcome_paths` (zero where ``mask [b]`` is false), by the chain rule written out;
        None where that is not written for this configuration (the caller uses autograd).

        Why: the memory weights reach the forecast only through the memory's read of the last
        token, then the fusion ("add") and the linear head; the rest of the forecast does not
        depend on them. Autograd's bookkeeping for that short chain cost more than the whole
        rest of an online step."""
        memory = self.memory
        if not self._writes_outcome_gradient or not isinstance(memory, NeuralMemory):
            return None
        (x, mean, std, features), _ = self._encode(window, state, StorePolicy.NONE, encoded)
        shown = features[:, -1:]  # [b, 1, d]: as forward, the memory reads the last token only
        retrieved, vjp = memory.read_with_vjp(shown, state["memory"]["weights"])
        forecast = self._output((shown + retrieved)[:, -1], x, mean, std)
        # d mean((forecast - targets)^2) / d forecast, for each stream's own loss
        grad = (forecast - targets) * (2.0 / math.prod(forecast.shape[1:]))
        if mask is not None:
            grad = torch.where(mask[:, None, None], grad, torch.zeros_like(grad))
        grad_head = (grad * self.forecast_channels(std)).flatten(1)  # [b, pred_len * c_out]
        grad_retrieved = (grad_head @ self.head.weight)[:, None]  # [b, 1, d]: through the add
        return forecast, {("memory", "weights", k): g for k, g in vjp(grad_retrieved).items()}

    def forecast_channels(self, x: Tensor) -> Tensor:
        """The forecast channels (``out_indices``) of ``x [..., c]``: ``x`` itself when every
        channel is forecast in order, which spares a copy by advanced indexing (several per
        online step)."""
        if self._all_channels:
            return x
        return x[..., list(self.config.out_indices)]

    def _normalise(self, window: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.config.revin:
            ones = torch.ones_like(window[:, :1])
            return window, torch.zeros_like(ones), ones
        mean = window.mean(dim=1, keepdim=True)  # [b, 1, c]
        std = (window.var(dim=1, keepdim=True, unbiased=False) + _EPS).sqrt()
        return (window - mean) / std, mean, std

    def adapt(
        self, state: TensorDict, grads: dict[str, Tensor], weights: dict[str, Tensor] | None = None
    ) -> TensorDict:
        """Gradient-driven state updates (FSNet) of one stream; ``grads`` (and the stream's own
        ``weights``, when it has them) keyed by parameter name."""
        adapted = {}
        for name, child in self.stateful_children().items():
            if child.learns_from_gradients:
                own = None if weights is None else _under(weights, name)
                adapted[name] = child.adapt(state[name], _under(grads, name), own)
        return replaced(state, adapted)
