"""Interfaces every model component implements.

Axis legend used across ``models/``: ``b`` streams (batch), ``n`` time, ``c`` channels,
``d`` features, ``h`` heads.

Components hold only shared, pretrained parameters. Everything that changes for one stream
lives in a ``TensorDict`` whose leading batch dimension is the stream dimension; it is passed
in and the next one is returned. Nothing is assigned to ``self`` after ``__init__``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar

import torch
from tensordict import TensorDict
from torch import Tensor, nn


class StorePolicy(StrEnum):
    """Which tokens of an input window a memory learns from during one forward pass.

    ``window``: every token (pretraining: each window starts from a fresh memory).
    ``last``: only the newest token (online: the older tokens were stored when they arrived,
    so each observation is learned from exactly once).
    ``none``: retrieve only (forecasting without learning, or re-scoring a past window).
    """

    WINDOW = "window"
    LAST = "last"
    NONE = "none"


StatePath = tuple[str, ...]  # keys from a state down to one of its tensors


class ModelCapabilityError(ValueError):
    """A configuration asks a component for something it cannot do."""


def replaced(td: TensorDict, entries: Mapping[str, Tensor | TensorDict]) -> TensorDict:
    """A new ``TensorDict`` holding ``td``'s entries with ``entries`` put in their place: the
    functional update every step makes (states are never changed in place).

    Why not ``td.clone(recurse=False)`` and setting: that copies the whole nested tree of
    ``TensorDict`` nodes and validates every entry set, which cost more than the arithmetic of
    an online step of a small model. Here the untouched entries, nested ``TensorDict`` nodes
    included, are shared with ``td`` (safe: no code changes a state in place), and the new
    entries are trusted to have ``td``'s batch size.
    """
    source: dict[Any, Any] = dict(td.items())  # tensordict's stubs name no mapping of str keys
    source.update(entries)
    return TensorDict._new_unsafe(source=source, batch_size=td.batch_size, device=td.device, nested=False)


def where_rows(rows: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per stream: ``new`` where ``rows [b]`` is true, else ``old`` (``[b, *]``, the same shape)."""
    return torch.where(rows.view(-1, *([1] * (new.dim() - 1))), new, old)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` has that dtype already (the usual case: the
    online step converts some twenty tensors to the state's dtype, each call a dispatch that
    returns ``t`` itself)."""
    return t if t.dtype == dtype else t.to(dtype)


def tree(entries: Mapping[str, object], batch_size: torch.Size, device: torch.device | None) -> TensorDict:
    """A ``TensorDict`` of ``entries`` (nested dicts become nested ``TensorDict`` nodes) whose
    tensors are trusted to have the leading ``batch_size``: built without the per-entry checks
    of ``TensorDict(...)``, which cost more than a small model's online step computes."""
    source: dict[Any, Any] = dict(entries)  # tensordict's stubs name no mapping of str keys
    return TensorDict._new_unsafe(source=source, batch_size=batch_size, device=device)


def empty_state(batch: int, device: torch.device | str | None = None) -> TensorDict:
    """A state with no entries, for components that keep nothing per stream."""
    return TensorDict({}, batch_size=[batch], device=device)


class StatefulModule(nn.Module, metaclass=ABCMeta):
    """A component with per-stream state.

    Subclasses implement :meth:`init_state` and a forward pass
    ``forward(x, state, store) -> (y, next_state)``. Components whose state changes from
    gradients of the forecasting loss (FSNet) also override :meth:`adapt`.
    """

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        return empty_state(batch, device)

    @property
    def learns_from_gradients(self) -> bool:
        """True when :meth:`adapt` must be given the gradients of the forecasting loss."""
        return False

    @property
    def stores_tokens(self) -> bool:
        """True when this component learns from the tokens it is shown (a memory), so the online
        step must let it store each new observation once."""
        return False

    #: The forward pass runs under ``torch.func.vmap`` with per-stream weights (every op it
    #: calls has a batching rule), so ``full_model`` streams learn in one batched call.
    vmaps_stream_weights: bool = True

    def adapted_from(self) -> tuple[str, ...]:
        """The parameter names (relative to this module) whose gradients :meth:`adapt` reads:
        in ``memory_only`` the online step takes the gradient of these only."""
        return ()

    def adapt(
        self, state: TensorDict, grads: dict[str, Tensor], weights: dict[str, Tensor] | None = None
    ) -> TensorDict:
        """Update the state of ONE stream (batch 1) from the gradients of its forecast loss.

        ``grads`` maps this module's own parameter names (relative to this module) to the
        gradients of that stream's loss; ``weights``, keyed alike, the stream's own weights
        where it has them (``full_model``), which then replace the shared ones. The default
        keeps the state unchanged.
        """
        return state

    def outcome_paths(self) -> tuple[StatePath, ...]:
        """Paths into this module's state of the per-stream weights that learning from
        outcomes (``memory_only`` with a realised target, ``models/online.py``) may step.

        Only a stream's own state reads them, so the gradient of a sum of the streams' forecast
        losses w.r.t. them is each stream's own gradient: B streams learn in one backward pass.
        Empty (the default): the component learns nothing from outcomes.
        """
        return ()

    def outcome_step(self, state: TensorDict, changes: Mapping[StatePath, Tensor]) -> TensorDict:
        """The state with ``changes`` (``[b, *w]``, keyed by :meth:`outcome_paths`) added to
        those weights, and to whatever else must move with them."""
        return state


def nested_outcome_paths(children: Mapping[str, StatefulModule]) -> tuple[StatePath, ...]:
    """The outcome paths of a container whose state holds each child's under its name."""
    return tuple((name, *path) for name, child in children.items() for path in child.outcome_paths())


def nested_outcome_step(
    children: Mapping[str, StatefulModule], state: TensorDict, changes: Mapping[StatePath, Tensor]
) -> TensorDict:
    """:meth:`StatefulModule.outcome_step` of such a container: each child steps its own part."""
    stepped = {}
    for name, child in children.items():
        own = {path[1:]: change for path, change in changes.items() if path[0] == name}
        if own:
            stepped[name] = child.outcome_step(state[name], own)
    return replaced(state, stepped)


class Backbone(StatefulModule):
    """Maps embedded inputs ``[b, n, d]`` to features ``[b, n, d]``.

    Its class declares which memories it can work with (checked for every configuration by
    ``models.registry.check_combination``, so no rule is written as a name comparison):
    """

    # memories this backbone builds inside itself (the forecaster adds no memory unit for them)
    integrated_memories: ClassVar[tuple[str, ...]] = ()
    # whether an integrated memory's output is fused into its features (the fusion applies)
    fuses_integrated_memory: ClassVar[bool] = False
    # whether a memory unit may sit beside it, read by the forecaster and fused into its features
    takes_side_memory: ClassVar[bool] = True
    # how a memory's output may be combined with it (the forecaster's fusion, or its own)
    fusions: ClassVar[tuple[str, ...]] = ("add", "concat", "gated", "layer")

    @abstractmethod
    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]: ...

    def forward_last(self, x: Tensor, state: TensorDict, store: StorePolicy) -> tuple[Tensor, TensorDict]:
        """The last position's features ``[b, 1, d]`` and the next state, for a caller that
        reads no other position (a backbone may skip the work the others take)."""
        features, next_state = self(x, state, store)
        return features[:, -1:], next_state


class MemoryUnit(StatefulModule):
    """A memory read beside the backbone: features ``[b, n, d]`` -> memory output ``[b, n, d]``.

    With ``store`` other than ``none`` it first learns from the chosen tokens of ``x`` (in time
    order), then retrieves with queries made from every token of ``x``.
    """

    @property
    def stores_tokens(self) -> bool:
        return True

    def read_fresh(self, x: Tensor) -> Tensor:
        """The memory output ``[b, n, d]`` for ``x`` from a fresh state, storing nothing (what
        the frozen checkpoint retrieves, the combination's ``frozen`` expert)."""
        fresh = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        return self(x, fresh, StorePolicy.NONE)[0]

    def forward_and_fresh(
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict, Tensor]:
        """The forward pass's output and next state, and :meth:`read_fresh` of the same ``x``
        (a combining stream's adapted and frozen reads of its newest token)."""
        out, next_state = self(x, state, store)
        return out, next_state, self.read_fresh(x)

    @abstractmethod
    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]: ...
