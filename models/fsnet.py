"""FSNet adaptive convolution (Pham et al., "Learning Fast and Slow for Online Time Series
Forecasting", ICLR 2023), with every per-stream quantity kept in a state the caller owns.

Axis legend: ``b`` streams, ``n`` time, ``i`` input channels, ``o`` output channels, ``k``
kernel taps, ``e`` controller input per output channel (``i * k``), ``s`` memory slots, ``c``
calibration entries (``o * (k + 2)``), ``t`` retrieved (top-k) slots.

State of one adaptive layer (a ``TensorDict`` with batch ``[b]``):

==============  ============  ====================================================
``grad_long``   [b, o, e]     slow EMA of the normalised conv-weight gradient
``grad_short``  [b, o, e]     fast EMA of the same gradient
``trigger``     [b] bool      the fast EMA points against the slow one: drift
``q_ema``       [b, c]        EMA of the calibration: the memory's query
``memory``      [b, s, c]     associative memory of past calibrations
==============  ============  ====================================================

``q_ema`` and ``memory`` exist only with the memory enabled (``fsnet``, not ``fsnet_nomem``).

One online step: ``forward`` reads the state (never changes it) -> the caller computes the
loss and the gradient of the shared conv weight -> ``adapt`` returns the next state. A
triggered ``adapt`` reads the memory, writes the blend into the slots it read, and leaves the
trigger set; every ``forward`` until the next ``adapt`` then reads the updated memory.

Where this departs from the reference code (github.com/salesforce/fsnet, ``fsnet_.py``):

- Retrieval weights the top-k slots by their attention values; the reference multiplied
  them by the slot indices (``ww @ idx``), a bug.
- The gradient is chunked per output channel and chunk ``o`` calibrates output channel ``o``;
  the reference chunked by output channel but applied the weight calibration along the input
  axis, which lines up only because ``i == o``.
- The controller predicts offsets around identity (``1 + u``) from a zero-initialised head,
  so an untrained controller, or a zero gradient EMA, leaves the pretrained conv unchanged.
- The memory write stores the blended calibration (what the layer uses after the read), the
  value the paper intends to remember; the reference wrote back the retrieved mix itself.
- The trigger is part of the state and is recomputed by every ``adapt``; the reference set
  it as a module attribute and reset it inside the next forward.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from models.config import ConfigError, FSNetConfig

CONTROLLER_HIDDEN = 64  # the reference controller's width
# the controller's weights by name, in the order FSNetConv.calibration takes them
CONTROLLER_PARTS = ("controller.0.weight", "controller.0.bias", "head.weight", "head.bias")
_COS_EPS = 1e-6
_NORM_EPS = 1e-12  # F.normalize's


# ---------------------------------------------------------------- pure state-update functions


def ema(average: Tensor, value: Tensor, gamma: float) -> Tensor:
    """One exponential moving average step: ``gamma * average + (1 - gamma) * value``, as one
    ``lerp`` (one pass over the stacked layers' EMAs instead of three)."""
    return torch.lerp(average, value, 1.0 - gamma)


def normalise_gradient(grad: Tensor) -> Tensor:
    """``[b, o, i, k] -> [b, o, e]``: unit norm over input channels, as the reference does.

    Gradient magnitudes drift by orders of magnitude during online learning; the controller
    and the drift test should see directions only. (``F.normalize``'s norm over a middle
    dimension took twice as long as this sum of squares on the stacked layers.)
    """
    norm = grad.square().sum(dim=2, keepdim=True).sqrt().clamp_min(_NORM_EPS)
    return (grad / norm).flatten(2)


def drift_trigger(short: Tensor, long: Tensor, tau: float) -> Tensor:
    """``[b, ...] x 2 -> [b]`` bool: ``cos(short, long) < -tau``, the gradient reversed.

    A zero EMA (a fresh stream) has cosine 0 and never triggers.
    """
    short, long = short.flatten(1), long.flatten(1)
    norms = torch.linalg.vector_norm(short, dim=1) * torch.linalg.vector_norm(long, dim=1)
    cos = torch.linalg.vecdot(short, long) / norms.clamp_min(_COS_EPS)
    return cos < -tau


def read_memory(
    memory: Tensor, query: Tensor, temperature: float, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Associative read: ``memory [b, s, c]``, ``query [b, c]`` -> retrieved ``[b, c]``.

    ``attention = softmax(memory @ query / temperature)``; the retrieved calibration is the sum
    over the ``top_k`` best slots of ``attention[slot] * memory[slot]`` (the softmax values
    over all slots, not renormalised over the top-k). Also returns those attention values and
    slot indices (``[b, t]`` each) so a write can target the same slots.
    """
    scores = torch.einsum("bsc,bc->bs", memory, query) / temperature  # [b, s]
    attention = scores.softmax(dim=-1)
    weights, slots = attention.topk(top_k, dim=-1)  # [b, t]
    chosen = torch.take_along_dim(memory, slots[..., None], dim=1)  # [b, t, c]
    retrieved = (weights[..., None] * chosen).sum(dim=1)  # [b, c]
    return retrieved, weights, slots


def write_memory(memory: Tensor, value: Tensor, weights: Tensor, slots: Tensor, tau: float) -> Tensor:
    """Consolidate ``value [b, c]`` into the read slots; returns a new ``[b, s, c]`` memory.

    ``memory[slot] = tau * memory[slot] + (1 - tau) * attention[slot] * value`` for the
    selected slots only (the others are kept), then :func:`normalise_memory`.
    """
    slot_weight = torch.zeros_like(memory[..., 0]).scatter(1, slots, weights)  # [b, s]
    selected = torch.zeros_like(slot_weight, dtype=torch.bool).scatter(1, slots, True)
    written = tau * memory + (1.0 - tau) * slot_weight[..., None] * value[:, None, :]
    return normalise_memory(torch.where(selected[..., None], written, memory))


def normalise_memory(memory: Tensor) -> Tensor:
    """``M / max(1, ||M||_F)`` per stream: keeps repeated writes from growing the memory."""
    norm = torch.linalg.vector_norm(memory.flatten(1), dim=1).clamp(min=1.0)  # [b]
    return memory / norm[:, None, None]


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor, dilation: int, gather: Tensor | None = None
) -> Tensor:
    """Causal dilated conv of ``x [b, i, n]`` -> ``[b, o, n]``: output ``t`` sees inputs ``<= t``.

    ``weight [o, i, k]`` and ``bias [o]`` are shared; ``weight [b, o, i, k]`` and ``bias
    [b, o]`` are per stream, one product per stream with no Python loop.

    Written as one matrix product over the window's shifted copies (``[b, taps * i, n]``)
    rather than with ``conv1d``: for a single stream torch runs a dilated conv through its
    slow reference kernel (about 10x a plain product at d_model 64). Taps that reach further
    back than the window only ever meet the zero padding, so they are left out (their
    gradient is zero either way): a block whose dilation is at least the window's length is a
    1x1 conv, not a conv over a mostly zero input many times the window's length (the
    reference size's dilation 1024 on a 48-step window).

    ``gather [taps, m]``: only ``m`` outputs, of inputs ``x`` at some of the window's
    positions; entry ``[j, t]`` is the column of ``x`` that tap ``j`` of output ``t`` reads, or
    ``x``'s column count for the zero padding (:class:`models.tcn.LastPlan` makes them).
    """
    k, n = weight.shape[-1], x.shape[-1]
    if gather is not None:
        taps = gather.shape[0]
        cols = F.pad(x, (0, 1))[..., gather].flatten(-3, -2)  # [b, i * taps, m]; the last column: 0
        kernel = weight[..., k - taps :].flatten(-2)
        if weight.dim() == 3:
            return torch.matmul(kernel, cols) + bias[:, None]
        return torch.baddbmm(bias[..., None], kernel, cols)
    taps = min(k, (n - 1) // dilation + 1)  # tap j looks back (k - 1 - j) * dilation steps
    padded = F.pad(x, ((taps - 1) * dilation, 0))  # left pad only: no look-ahead
    if weight.dim() == 3 and dilation == 1:  # torch's own undilated conv is the faster one
        return F.conv1d(padded, weight[..., k - taps :], bias)
    if taps == 1:
        cols = x[..., None, :]
    else:  # [b, i, taps, n]: input channel-major, as the weight's [o, i, k] is laid out
        cols = torch.stack([padded[..., j * dilation : j * dilation + n] for j in range(taps)], dim=-2)
    cols = cols.flatten(-3, -2)  # [b, i * taps, n]
    kernel = weight[..., k - taps :].flatten(-2)  # [(b,) o, i * taps]
    if weight.dim() == 3:
        return torch.matmul(kernel, cols) + bias[:, None]
    return torch.baddbmm(bias[..., None], kernel, cols)


def init_conv_(weight: Tensor, bias: Tensor) -> None:
    """The initialisation of ``nn.Conv1d``, so plain and adaptive convs start alike."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight[0].numel())
    nn.init.uniform_(bias, -bound, bound)


# ---------------------------------------------------------------- the adaptive layer


class FSNetConv(nn.Module):
    """A causal Conv1d whose weight, bias and output are calibrated per stream (FSNet's adapter).

    Shared parameters: ``weight [o, i, k]``, ``bias [o]``, the controller (``controller``,
    ``head``) and, with the memory on, the buffer ``memory_init [s, c]`` from which each
    stream's memory starts.
    Per-stream quantities live only in the state (see the module docstring).

    ``forward(x, state) -> y`` reads the state; only :meth:`adapt` makes a new one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        fsnet: FSNetConfig,
        use_memory: bool,
    ) -> None:
        super().__init__()
        if not 1 <= fsnet.top_k <= fsnet.slots:
            raise ConfigError(f"fsnet.top_k={fsnet.top_k} must lie in 1..fsnet.slots={fsnet.slots}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.fsnet = fsnet
        self.use_memory = use_memory
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        init_conv_(self.weight, self.bias)
        # the adapter: one small network per layer, shared across the output-channel chunks
        self.controller = nn.Sequential(nn.Linear(in_channels * kernel_size, CONTROLLER_HIDDEN), nn.SiLU())
        self.head = nn.Linear(CONTROLLER_HIDDEN, kernel_size + 2)  # per chunk: k taps, bias, feature
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if use_memory:
            memory = torch.empty(fsnet.slots, self.calibration_size)
            nn.init.xavier_uniform_(memory)
            # a buffer, not a parameter: no gradient reaches it, but checkpoints carry it
            self.register_buffer("memory_init", normalise_memory(memory[None])[0])

    @property
    def calibration_size(self) -> int:
        return self.weight.shape[0] * (self.kernel_size + 2)

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        """A fresh stream: zero EMAs, no trigger, the shared initial memory."""
        device = self.weight.device if device is None else device
        dtype = self.weight.dtype if dtype is None else dtype
        o, i, k = self.weight.shape
        entries = {
            "grad_long": torch.zeros(batch, o, i * k, device=device, dtype=dtype),
            "grad_short": torch.zeros(batch, o, i * k, device=device, dtype=dtype),
            "trigger": torch.zeros(batch, device=device, dtype=torch.bool),
        }
        if self.use_memory:
            entries["q_ema"] = torch.zeros(batch, self.calibration_size, device=device, dtype=dtype)
            memory = cast(Tensor, self.memory_init).to(device=device, dtype=dtype)  # a buffer
            entries["memory"] = memory.expand(batch, -1, -1).clone()  # [b, s, c], own storage
        return TensorDict(entries, batch_size=[batch], device=device)

    def calibration(self, grad_long: Tensor, controller: Sequence[Tensor] | None = None) -> Tensor:
        """``[b, o, e] -> [b, c]``: the controller's calibration, laid out ``[o, (taps, b, f)]``;
        ``controller``: other weights for it (:data:`CONTROLLER_PARTS`), a stream's own."""
        if controller is None:
            return self.head(self.controller(grad_long)).flatten(1)
        w1, b1, w2, b2 = controller
        return F.linear(F.silu(F.linear(grad_long, w1, b1)), w2, b2).flatten(1)

    def forward(self, x: Tensor, state: TensorDict) -> Tensor:  # type: ignore[override]
        """``x [b, i, n] -> [b, o, n]`` with each stream's calibration; ``state`` is only read."""
        return self.calibrated(x, self.current_calibration(state))

    def calibrated(self, x: Tensor, u: Tensor | None, gather: Tensor | None = None) -> Tensor:
        """``x [b, i, n] -> [b, o, n]`` with the calibration ``u [b, c]`` already computed
        (:func:`stacked_current_calibrations` computes every layer's together); ``gather``: only
        some outputs (:func:`causal_conv1d`)."""
        if u is None:
            raise ValueError("an FSNet conv needs its calibration")
        b, (o, _, k) = x.shape[0], self.weight.shape
        scales = u.view(b, o, k + 2) + 1.0  # offsets around identity
        scale_w, scale_b, scale_f = scales[..., :k], scales[..., k], scales[..., k + 1]
        weight = self.weight[None] * scale_w[:, :, None, :]  # [b, o, i, k]
        y = causal_conv1d(x, weight, self.bias[None] * scale_b, self.dilation, gather)  # [b, o, n]
        return scale_f[..., None] * y

    def current_calibration(self, state: TensorDict) -> Tensor:
        """The calibration the forward uses: the controller's, blended with memory on a trigger.

        The read runs for every stream and is kept where the trigger is set: no
        data-dependent branch, so a batch of streams is one computation.
        """
        return stacked_current_calibrations([self], [state])[0]

    def adapt(self, state: TensorDict, grads: dict[str, Tensor]) -> TensorDict:
        """Next state from the gradient of the loss w.r.t. this layer's ``weight``.

        ``grads["weight"]`` is ``[o, i, k]`` for a one-stream state, or ``[b, o, i, k]`` with
        one gradient per stream. Other keys are ignored. Order follows the reference: fast
        EMA, trigger (fast vs the previous slow EMA), slow EMA, query EMA, and on a trigger a
        memory read at the new query with the blend written back into the slots read.
        """
        if "weight" not in grads:
            raise KeyError("FSNet adapt needs the gradient of the conv weight under key 'weight'")
        return stacked_adapt([self], [state], [grads["weight"]])[0]


# ---------------------------------------------------------------- every layer at once


def stacked_calibrations(
    layers: Sequence[FSNetConv],
    grad_long: Sequence[Tensor],
    remember: bool = False,
    controllers: Sequence[Sequence[Tensor]] | None = None,
) -> Tensor:
    """Each layer's controller on its own slow EMA (``[b, o, e]`` each), stacked ``[L, b, c]``.

    The products stay one per layer: stacking the layers' controller weights (and EMAs) for
    batched products copied more memory per step than the batching saved. ``remember``: keep
    the result for the forwards that read these EMAs with these weights (:class:`_Known`).
    ``controllers``: each layer's controller weights where they are not its own (a stream's).
    """
    if controllers is None:
        known = _known(layers, grad_long)
        if known is not None:
            return known
    weights = [None] * len(layers) if controllers is None else controllers
    u = torch.stack([layer.calibration(g, w) for layer, g, w in zip(layers, grad_long, weights, strict=True)])
    if remember:
        _remember(layers, grad_long, u, controllers)
    return u


class _Known(NamedTuple):
    """Calibrations :func:`stacked_adapt` computed, for the forwards that follow it.

    ``adapt`` evaluates every controller on the new slow EMAs for the memory's query; the
    forecast that follows (and, in ``memory_only``, the next step's output corrector forward
    and learning forward, whose controllers need no gradient there) evaluates the same
    controllers on the same EMAs again. Kept per EMA tensor (the
    layers' EMAs are views of one tensor, the key) while it lives, and used only where every
    input is provably the same: each layer's EMA at the same address of the key's storage, no
    in-place change since (tensor versions), and the same controller weights: the same
    addresses (the entry keeps those tensors alive, so no other tensor can take their
    addresses) at the same versions. Never where the controllers' weights need a gradient: the
    entry holds no autograd graph.
    """

    calibrations: Tensor  # [L, b, c]
    addresses: tuple[int, ...]  # each layer's EMA's
    version: int  # the EMAs' (views share their base's counter)
    weights: tuple[Tensor, ...]  # the controllers' weights, kept alive
    signature: tuple[tuple[int, int], ...]  # their (address, version)


# by id of the key, which the entry follows weakly (tensors compare elementwise: no WeakKeyDictionary)
_KNOWN: dict[int, tuple[weakref.ref[Tensor], _Known]] = {}


def _controller_weights(layers: Sequence[FSNetConv]) -> list[Tensor]:
    """What a calibration depends on besides the EMA (under ``functional_call``, a stream's own),
    in the order of :data:`CONTROLLER_PARTS`."""
    weights: list[Tensor] = []
    for layer in layers:
        linear = cast(nn.Linear, layer.controller[0])
        weights += [linear.weight, linear.bias, layer.head.weight, layer.head.bias]
    return weights


def _signature(weights: Sequence[Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple((w.data_ptr(), w._version) for w in weights)


def _base(grad_long: Sequence[Tensor]) -> Tensor | None:
    """The tensor every layer's EMA is a view of, where there is one (a state from adapt)."""
    first = grad_long[0]
    if torch._C._functorch.is_batchedtensor(first) or torch._C._functorch.is_gradtrackingtensor(first):
        return None
    base = first._base
    if base is None or any(g._base is not base for g in grad_long):
        return None
    return base


def _known(layers: Sequence[FSNetConv], grad_long: Sequence[Tensor]) -> Tensor | None:
    base = _base(grad_long)
    if base is None:
        return None
    held = _KNOWN.get(id(base))
    if held is None or held[0]() is not base:
        return None
    entry = held[1]
    if base._version != entry.version or tuple(g.data_ptr() for g in grad_long) != entry.addresses:
        return None
    weights = _controller_weights(layers)
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return None
    return entry.calibrations if _signature(weights) == entry.signature else None


def _remember(
    layers: Sequence[FSNetConv],
    grad_long: Sequence[Tensor],
    u: Tensor,
    controllers: Sequence[Sequence[Tensor]] | None,
) -> None:
    base = _base(grad_long)
    if base is None or u.requires_grad:
        return
    weights = tuple(
        _controller_weights(layers) if controllers is None else (w for c in controllers for w in c)
    )
    key = id(base)
    _KNOWN[key] = (
        weakref.ref(base, lambda _: _KNOWN.pop(key, None)),
        _Known(u, tuple(g.data_ptr() for g in grad_long), base._version, weights, _signature(weights)),
    )


def stacked_current_calibrations(layers: Sequence[FSNetConv], states: Sequence[TensorDict]) -> list[Tensor]:
    """:meth:`FSNetConv.current_calibration` of every layer (each ``[b, c]``), computed together.

    The layers must be alike (one weight shape, one FSNet configuration, all with or all
    without memory), as a TCN's are."""
    _check_alike(layers)
    u = stacked_calibrations(layers, [s["grad_long"] for s in states])  # [L, b, c]
    first = layers[0]
    if not first.use_memory:
        return list(u.unbind(0))
    cfg = first.fsnet
    trigger = torch.stack([s["trigger"] for s in states])  # [L, b]
    if not may_be_set(trigger):  # a read no stream keeps: the where below would return u
        return list(u.unbind(0))
    memory = torch.stack([s["memory"] for s in states]).flatten(0, 1)  # [L * b, s, c]
    query = torch.stack([s["q_ema"] for s in states]).flatten(0, 1)  # [L * b, c]
    retrieved, _, _ = read_memory(memory, query, cfg.temperature, cfg.top_k)
    blended = cfg.tau * u + (1.0 - cfg.tau) * retrieved.view(u.shape)
    return list(torch.where(trigger[..., None], blended, u).unbind(0))


def may_be_set(flags: Tensor) -> bool:
    """Whether any of ``flags`` is set, so that work kept only where one is can be skipped when
    none is (drift triggers are rare); always true under ``vmap``, where values cannot steer."""
    return torch._C._functorch.is_batchedtensor(flags) or bool(flags.any())


def stacked_adapt(
    layers: Sequence[FSNetConv],
    states: Sequence[TensorDict],
    weight_grads: Sequence[Tensor],
    controllers: Sequence[Sequence[Tensor]] | None = None,
) -> list[TensorDict]:
    """:meth:`FSNetConv.adapt` of every layer from its conv weight's gradient, computed
    together (the same steps, in the same order, on the layers stacked along a new leading
    dimension); returns each layer's next state. ``controllers``: each layer's controller
    weights (:data:`CONTROLLER_PARTS`) where the stream has its own (``full_model``)."""
    _check_alike(layers)
    first, n_layers, batch = layers[0], len(layers), states[0].batch_size[0]
    cfg = first.fsnet
    dtype = states[0]["grad_long"].dtype
    with torch.no_grad():
        grad = torch.stack([_stream_gradients(g, batch, first.weight.shape) for g in weight_grads]).to(
            dtype
        )  # [L, b, o, i, k]
        g = normalise_gradient(grad.flatten(0, 1))  # [L * b, o, e]
        before_short = torch.stack([s["grad_short"] for s in states]).flatten(0, 1)
        before_long = torch.stack([s["grad_long"] for s in states]).flatten(0, 1)
        short = ema(before_short, g, cfg.gamma_short)
        trigger = drift_trigger(short, before_long, cfg.tau)  # [L * b]
        long = ema(before_long, g, cfg.gamma_long)
        entries: dict[str, Tensor] = {"grad_long": long, "grad_short": short, "trigger": trigger}
        if first.use_memory:
            per_layer_long = long.view(n_layers, batch, *long.shape[1:]).unbind(0)
            u = stacked_calibrations(layers, per_layer_long, remember=True, controllers=controllers).flatten(
                0, 1
            )
            query = ema(torch.stack([s["q_ema"] for s in states]).flatten(0, 1), u, cfg.gamma_short)
            entries["q_ema"] = query
            if may_be_set(trigger):  # else every memory stays as it is
                memory = torch.stack([s["memory"] for s in states]).flatten(0, 1)
                retrieved, weights, slots = read_memory(memory, query, cfg.temperature, cfg.top_k)
                blended = cfg.tau * u + (1.0 - cfg.tau) * retrieved
                written = write_memory(memory, blended, weights, slots, cfg.tau)
                entries["memory"] = torch.where(trigger[:, None, None], written, memory)
    per_layer = {k: v.view(n_layers, batch, *v.shape[1:]).unbind(0) for k, v in entries.items()}
    if first.use_memory and "memory" not in per_layer:
        per_layer["memory"] = tuple(s["memory"] for s in states)
    return [
        TensorDict({k: v[j] for k, v in per_layer.items()}, batch_size=[batch], device=states[j].device)
        for j in range(n_layers)
    ]


def _check_alike(layers: Sequence[FSNetConv]) -> None:
    first = layers[0]
    for layer in layers[1:]:
        if (layer.weight.shape, layer.fsnet, layer.use_memory) != (
            first.weight.shape,
            first.fsnet,
            first.use_memory,
        ):
            raise ValueError(
                "stacked FSNet layers need one weight shape, one configuration and one memory setting"
            )


def _stream_gradients(grad: Tensor, batch: int, shape: torch.Size) -> Tensor:
    """A conv weight's gradient as ``[b, o, i, k]``; a clear error for a misshapen one."""
    grad = grad.detach()
    if grad.shape == shape:
        grad = grad[None]
    if grad.shape != (batch, *shape):
        raise ValueError(
            f"conv weight gradient of shape {tuple(grad.shape)} does not fit a state of {batch} "
            f"stream(s) and a weight of shape {tuple(shape)}"
        )
    return grad
