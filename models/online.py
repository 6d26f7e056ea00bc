"""Online learning step functions: the one code path the service, the evaluator and the
benchmarks share.

A stream state (``TensorDict`` with leading stream dimension ``b``) holds:

- ``history`` ``[b, seq_len + pred_len, c]``: the latest values, oldest first;
- ``count`` ``[b]``: observations seen;
- ``model``: the forecaster's component state (memory weights, FSNet EMAs, ...);
- ``params`` and ``opt`` (``full_model`` only): the stream's own copy of the weights and its
  AdamW moments;
- ``corrector`` (``memory_only`` streams, ``corrector_lr > 0``): the stream's output corrector
  (``models/corrector.py``), a linear map learned from matured errors that corrects the
  forecaster's output; the backbone and the memory's shared weights are untouched;
- ``analog`` (``memory_only`` streams, ``analog_rows > 0``): the stream's archive of its last
  values and the weight, learned from matured errors, with which the forecast of what followed
  its most similar past windows is mixed into the corrected forecast (``models/analog.py``);
- ``combo`` (streams made with ``combine=True``): the per-stream combination of the frozen
  checkpoint, the adapted forecast and the last value (``models/combination.py``); the
  forecast :func:`observe` returns is then the combination.

The history is long enough to hold, besides the input window, the ``pred_len`` values of the
oldest forecast whose horizon is now fully observed: with delayed feedback that pair is
learned from when its last value arrives, and never before.
"""

from __future__ import annotations

import functools
import struct
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar, cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn
from torch.func import functional_call

from models import analog, combination, corrector
from models.base import StatePath, StorePolicy, as_dtype, replaced, where_rows
from models.forecaster import ContinualForecaster, Encoded
from models.optim import adamw_step

K = TypeVar("K")
P = ParamSpec("P")
R = TypeVar("R")


class UpdateMode(StrEnum):
    NONE = "none"
    MEMORY_ONLY = "memory_only"
    FULL_MODEL = "full_model"


class Feedback(StrEnum):
    DELAYED = "delayed"  # a target is learned from once all its values were observed
    IMMEDIATE = "immediate"  # the literature's protocol: the caller reveals the horizon


def init_stream_state(
    model: ContinualForecaster,
    batch: int,
    mode: UpdateMode = UpdateMode.MEMORY_ONLY,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    combine: bool = False,
) -> TensorDict:
    """A fresh state for ``batch`` streams; ``combine`` adds the per-stream combination, whose
    forecast :func:`observe` then returns (the service's default, see ``models/combination.py``)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    leaves = {
        "history": torch.zeros(batch, cfg.seq_len + cfg.pred_len, cfg.channels, dtype=dtype),
        "count": torch.zeros(batch, dtype=torch.int64),
        "model": model.init_state(batch, device=device, dtype=dtype),
    }
    if combine:
        experts = len(combination.EXPERTS)
        leaves["combo"] = combination.init_state(batch, cfg.pred_len, experts, cfg.out_channels, dtype)
    state = TensorDict(leaves, batch_size=[batch], device=device)
    return ensure_mode(model, state, mode)


def combines(state: TensorDict) -> bool:
    """The state serves the per-stream combination (it was made with ``combine=True``)."""
    return "combo" in state.keys()


def ensure_mode(model: ContinualForecaster, state: TensorDict, mode: UpdateMode) -> TensorDict:
    """Give a state what ``mode`` needs: a ``memory_only`` stream its output corrector (no
    correction yet) and its analog archive (empty; for a state saved before either existed,
    too), a ``full_model`` stream its own copy of the shared weights."""
    cfg, history = model.config, state["history"]
    if mode is UpdateMode.MEMORY_ONLY and corrects(model) and "corrector" not in state.keys():
        state = state.clone(recurse=False)
        state["corrector"] = corrector.init_state(
            state.batch_size[0], cfg.seq_len, cfg.pred_len, history.dtype, history.device
        )
    if mode is UpdateMode.MEMORY_ONLY and analogs(model) and "analog" not in state.keys():
        state = state.clone(recurse=False)
        state["analog"] = analog.init_state(
            state.batch_size[0],
            cfg.analog_rows,
            cfg.pred_len,
            cfg.out_channels,
            history.dtype,
            history.device,
        )
    if mode is not UpdateMode.FULL_MODEL or "params" in state.keys():
        return state
    b = state.batch_size[0]
    shared = {k: v.detach() for k, v in model.named_parameters()}

    def per_stream(fill: float | None) -> TensorDict:
        leaves = {
            _key(k): (
                v.expand(b, *v.shape).clone()
                if fill is None
                else torch.full((b, *v.shape), fill, dtype=v.dtype)
            )
            for k, v in shared.items()
        }
        return TensorDict(leaves, batch_size=[b])

    state = state.clone(recurse=False)
    state["params"] = per_stream(None)
    state["opt"] = TensorDict(
        {
            "exp_avg": per_stream(0.0),
            "exp_avg_sq": per_stream(0.0),
            "step": torch.zeros(b, dtype=torch.int64),
        },
        batch_size=[b],
    )
    return state


def window(model: ContinualForecaster, state: TensorDict) -> Tensor:
    return state["history"][:, -model.config.seq_len :]


def is_ready(model: ContinualForecaster, state: TensorDict) -> Tensor:
    """Per stream: enough values seen to fill the input window."""
    return state["count"] >= model.config.seq_len


def corrects(model: ContinualForecaster) -> bool:
    """``memory_only`` streams of this model carry an output corrector (``corrector_lr > 0``)."""
    return model.config.corrector_lr > 0


def analogs(model: ContinualForecaster) -> bool:
    """``memory_only`` streams of this model mix in the analog forecast (``analog_rows > 0``)."""
    return model.config.analog_rows > 0


def _corrected(model: ContinualForecaster, state: TensorDict, inputs: Tensor, forecast: Tensor) -> Tensor:
    """``forecast`` from ``inputs [b, seq_len, c]`` (the stream's current window) through the
    stream's output corrector, then mixed with its analog forecast, for the parts its state
    has (unchanged without either)."""
    return _mixed(model, state, inputs, _by_corrector(model, state, inputs, forecast, state["count"]))[0]


def _by_corrector(
    model: ContinualForecaster, state: TensorDict, inputs: Tensor, forecast: Tensor, at: Tensor | None
) -> Tensor:
    """``forecast`` through the stream's output corrector; ``at [b]``: the observation count it
    was made at (the stream's current one for a new forecast; None: not known, no known values)."""
    if "corrector" not in state.keys():
        return forecast
    return corrector.correct(state["corrector"], model.forecast_channels(inputs), forecast, at)


def _mixed(
    model: ContinualForecaster, state: TensorDict, inputs: Tensor, forecast: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``forecast`` mixed with the analog forecast of ``inputs`` (the current window), and that
    analog forecast with the streams that have one (None for a state without an archive)."""
    if "analog" not in state.keys():
        return forecast, None
    window = inputs[:, :, list(model.config.out_indices)]
    found = analog.forecast(state["analog"], window, model.config.pred_len)
    return analog.mix(state["analog"], forecast, *found), found


def needs_autograd(model: ContinualForecaster, state: TensorDict, mode: UpdateMode) -> bool:
    """Whether an online step of ``mode`` on ``state`` takes a gradient by autograd: full_model
    (and any stream with its own weights), gradient-driven memories (FSNet), and an outcome
    step whose gradient the model does not write out."""
    if "params" in state.keys() or mode is UpdateMode.FULL_MODEL or model.learns_from_gradients:
        return True
    if mode is UpdateMode.NONE:
        return False
    return model.config.outcome_lr > 0 and bool(model.outcome_paths()) and not model.writes_outcome_gradient


def _grad_mode(
    model: ContinualForecaster, state: TensorDict, mode: UpdateMode
) -> AbstractContextManager[Any]:
    """``torch.inference_mode`` for a step that takes no gradient by autograd: it skips
    autograd's bookkeeping on every operation (one memory_only stream, ETTh1-S: 7-33% more
    steps per second in alternating runs, the same forecasts); ``torch.no_grad`` otherwise (the parts that need a
    gradient enable it themselves, on tensors made outside inference mode: :func:`_for_autograd`)."""
    return torch.no_grad() if needs_autograd(model, state, mode) else torch.inference_mode()


def _online_step(mode_at: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run a step function under :func:`_grad_mode` of its ``model`` and ``state`` (its first two
    parameters) and its update ``mode`` (parameter ``mode_at``), given by position or keyword."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        def given(args: tuple[Any, ...], kwargs: dict[str, Any], at: int, name: str) -> Any:
            return args[at] if len(args) > at else kwargs[name]

        @functools.wraps(fn)
        def step(*args: P.args, **kwargs: P.kwargs) -> R:
            model, state = given(args, kwargs, 0, "model"), given(args, kwargs, 1, "state")
            with _grad_mode(model, state, given(args, kwargs, mode_at, "mode")):
                return fn(*args, **kwargs)

        return step

    return wrap


def _for_autograd(state: TensorDict) -> TensorDict:
    """``state`` with tensors autograd may save: a copy where a step under inference mode made
    any (a stream that changes to full_model in the same process, without a bytes round trip)."""
    if any(cast(Tensor, t).is_inference() for t in state.values(include_nested=True, leaves_only=True)):
        return state.clone()
    return state


def predict(model: ContinualForecaster, state: TensorDict) -> Tensor:
    """The forecast ``[b, pred_len, c_out]`` from the current window, learning nothing (the
    combination of the experts' forecasts for a state that combines, pushing nothing)."""
    with _grad_mode(model, state, UpdateMode.NONE):
        return _predict(model, state)


def _predict(model: ContinualForecaster, state: TensorDict) -> Tensor:
    inputs = window(model, state)
    forecast, _ = _forward(model, state, inputs, StorePolicy.NONE)
    forecast = _corrected(model, state, inputs, forecast)
    if not combines(state):
        return forecast
    return combination.mix(state["combo"]["log_weights"], _experts(model, state, forecast))


@_online_step(mode_at=3)
def observe(
    model: ContinualForecaster,
    state: TensorDict,
    values: Tensor,
    mode: UpdateMode,
    feedback: Feedback = Feedback.DELAYED,
    need_forecast: bool = True,
) -> tuple[TensorDict, Tensor | None]:
    """Apply one observation ``values [b, c]`` per stream; return the next state and forecast.

    Order: append the value; with delayed feedback learn from the forecast pair whose horizon
    just completed; let the memory store the newest token; forecast the next horizon (through
    the stream's output corrector, when it has one); for a
    state that combines, let the combination learn from the value, then combine the experts'
    forecasts of the next horizon (:func:`models.combination.step`), which is what is returned.
    """
    cfg = model.config
    history = torch.cat([state["history"][:, 1:], as_dtype(values, state["history"].dtype)[:, None]], dim=1)
    count = state["count"] + 1
    state = replaced(state, {"history": history, "count": count})
    inputs = window(model, state)
    # the fewest and the most observations of a stream: one reduction answers whether any or
    # every stream has a matured pair or a full window (most calls: all of them, or none)
    fewest, most = (int(n) for n in torch.aminmax(count))
    encoded: list[Encoded] | None = None  # the matured pair's window's and inputs', when shared
    before = now = None
    if mode is not UpdateMode.NONE and feedback is Feedback.DELAYED:
        if most >= cfg.seq_len + cfg.pred_len:  # some stream's pair matured
            past, target = history[:, : cfg.seq_len], model.forecast_channels(history[:, cfg.seq_len :])
            if _forecasts_to_learn(model, state, mode):
                encoded = model.encode_together([past, inputs], state["model"])
                before, now = encoded if encoded is not None else (None, None)
            # every stream's did: no mask (each part skips its per-stream selection)
            mask = None if fewest >= cfg.seq_len + cfg.pred_len else count >= cfg.seq_len + cfg.pred_len
            state = learn(model, state, past, target, mode, mask=mask, encoded=before, observed=True)
    stores = mode is not UpdateMode.NONE and stores_tokens(model)
    combined = combines(state)  # every forecast is an expert's: the combination scores them all
    archives = "analog" in state.keys()  # takes every value, keeps every analog forecast
    if not (stores or need_forecast or combined or archives):
        return state, None
    policy = StorePolicy.LAST if stores else StorePolicy.NONE
    frozen = None
    if combined and "params" not in state.keys():  # the frozen expert shares the forward pass
        forecast, model_state, frozen = model.forward_and_frozen(inputs, state["model"], policy, now)
        stored = replaced(state, {"model": model_state})
    else:
        forecast, stored = _forward(model, state, inputs, policy, now)
    forecast = _by_corrector(model, state, inputs, forecast, count)
    changed: dict[str, Tensor | TensorDict] = {}
    if archives:  # (after learning: a matured pair reads only the forecasts kept for it)
        archive, found, has = analog.observe(
            state["analog"],
            model.forecast_channels(values),
            model.forecast_channels(inputs),
            forecast,
            cfg.pred_len,
        )
        changed["analog"] = archive
        forecast = analog.mix(archive, forecast, found, has)
    ready = None if fewest >= cfg.seq_len else is_ready(model, state)  # None: every stream's window is full
    if stores:
        changed["model"] = (
            stored["model"] if ready is None else _where(ready, stored["model"], state["model"])
        )
    if combined:
        experts = _experts(model, state, forecast, frozen)
        value = as_dtype(model.forecast_channels(values), forecast.dtype)
        forecast, changed["combo"] = combination.step(state["combo"], value, experts, COMBINATION, ready)
    return replaced(state, changed), forecast


COMBINATION = combination.CombinationConfig()  # the combination's settings (per stream state)


def _experts(
    model: ContinualForecaster, state: TensorDict, adapted: Tensor, frozen: Tensor | None = None
) -> Tensor:
    """The forecasts the combination weighs, ``[b, e, pred_len, c_out]`` in the order of
    ``combination.EXPERTS``: the frozen checkpoint (shared weights, initial component state;
    ``frozen`` when the caller has it), ``adapted`` (the stream's own) and the last value."""
    inputs = window(model, state)
    if frozen is None:
        b = inputs.shape[0]
        fresh = model.init_state(b, device=inputs.device, dtype=inputs.dtype)
        frozen, _ = model(inputs, fresh, StorePolicy.NONE)
    last = model.forecast_channels(inputs[:, -1:]).expand_as(adapted)  # [b, p, c_out]
    return torch.stack([frozen, adapted, last], dim=1)


def rollout(
    model: ContinualForecaster, model_state: TensorDict, windows: Tensor
) -> tuple[Tensor, TensorDict]:
    """Pretraining as served: ``windows [b, k, seq_len, c]`` are ``k`` consecutive windows of
    each stream (each one observation later than the one before). Each window stores its newest
    token, then forecasts, exactly what :func:`observe` does for a ``memory_only`` stream whose
    window is full; with a fresh ``model_state`` the first window is the stream's first full
    one. Returns forecasts ``[b, k, pred_len, c_out]`` and the next component state.

    Unlike :func:`observe` this keeps the autograd graph, so pretraining can backpropagate
    through the memory's inner loop (and truncate by detaching the returned state).
    """
    policy = StorePolicy.LAST if stores_tokens(model) else StorePolicy.NONE
    forecasts = []
    for j in range(windows.shape[1]):
        forecast, model_state = model(windows[:, j], model_state, policy)
        forecasts.append(forecast)
    return torch.stack(forecasts, dim=1), model_state


def observe_many(
    model: ContinualForecaster,
    state: TensorDict,
    values: Tensor,
    mode: UpdateMode,
    feedback: Feedback = Feedback.DELAYED,
) -> tuple[TensorDict, Tensor]:
    """Apply ``values [b, t, c]`` in time order; return the final state and forecast."""
    if values.shape[1] == 0:
        raise ValueError("observe_many needs at least one observation")
    forecast: Tensor | None = None
    last = values.shape[1] - 1
    for i in range(values.shape[1]):
        state, forecast = observe(model, state, values[:, i], mode, feedback, need_forecast=i == last)
    assert forecast is not None
    return state, forecast


def _forecasts_to_learn(model: ContinualForecaster, state: TensorDict, mode: UpdateMode) -> bool:
    """:func:`learn` forecasts the matured pair's window with the shared weights: a
    ``memory_only`` stream's outcome step or output corrector (observe then encodes that window
    with the newest one, in one backbone pass)."""
    return (
        mode is UpdateMode.MEMORY_ONLY
        and "params" not in state.keys()
        and not model.learns_from_gradients
        and learns_from_targets(model, mode)
    )


@_online_step(mode_at=4)
def learn(
    model: ContinualForecaster,
    state: TensorDict,
    inputs: Tensor,
    targets: Tensor,
    mode: UpdateMode,
    mask: Tensor | None = None,
    encoded: Encoded | None = None,
    observed: bool = False,
    ahead: bool = False,
) -> TensorDict:
    """Learn from fully observed pairs: ``inputs [b, seq_len, c]`` -> ``targets [b, pred_len, c_out]``.

    ``full_model`` takes an AdamW step on each stream's own weights; ``memory_only`` takes an
    SGD step on each stream's own memory weights (:func:`learn_outcome`), a normalised LMS
    step of its output corrector (``models/corrector.py``) on the forecast the memory made of
    the pair before that step, and adds the pair to the evidence of its analog mix
    (``models/analog.py``); gradient-driven memories (FSNet) update their state in both
    learning modes. Streams where ``mask`` is false are left unchanged. ``encoded``: the
    backbone's encoding of ``inputs`` (``ContinualForecaster.encode_together``), when the caller
    has it. ``observed``: the pair is the one whose horizon the stream's last observation
    completed (delayed feedback, :func:`observe`), so its analog evidence comes from the
    forecasts kept since it was served; false for a pair learned right after its forecast
    (immediate feedback), whose analog forecast is made again from the archive as it is.
    ``ahead``: ``inputs`` is the stream's current window and ``targets`` the horizon its last
    forecast was of, revealed before the stream observes it (immediate feedback): the output
    corrector keeps its target as values known at the next forecasts' target times.
    """
    if not learns_from_targets(model, mode):
        return state
    if mode is UpdateMode.MEMORY_ONLY:
        state = ensure_mode(model, state, mode)
        state, raw = _outcome_step(model, state, inputs, targets, mask, encoded)
        state = _learn_corrector(model, state, inputs, targets, mask, raw, encoded, observed, ahead)
        if not model.learns_from_gradients:
            return state
    state = ensure_mode(model, state, mode)
    batched = model.vmaps_stream_weights and not model.learns_from_gradients  # FSNet adapts one by one
    if mode is UpdateMode.FULL_MODEL and state.batch_size[0] > 1 and batched:
        return _learn_batched(model, state, inputs, targets, mask)
    if state.batch_size[0] == 1:  # the common single-stream case skips slicing and concatenation
        return (
            state
            if mask is not None and not bool(mask[0])
            else _learn_one(model, state, inputs, targets, mode)
        )
    rows = []
    for i in range(state.batch_size[0]):
        row = state[i : i + 1]
        if mask is None or bool(mask[i]):
            row = _learn_one(model, row, inputs[i : i + 1], targets[i : i + 1], mode)
        rows.append(row)
    return TensorDict.cat(rows, dim=0)


def learns_from_targets(model: ContinualForecaster, mode: UpdateMode) -> bool:
    """Whether :func:`learn` changes a stream in ``mode``: ``full_model`` always, ``memory_only``
    with a gradient-driven memory (FSNet), with outcome learning (``outcome_lr > 0`` and
    memory weights to step), with an output corrector (``corrector_lr > 0``) or an analog mix
    (``analog_rows > 0``), ``none`` never."""
    if mode is UpdateMode.NONE:
        return False
    outcomes = model.config.outcome_lr > 0 and bool(model.outcome_paths())
    corrects_outputs = mode is UpdateMode.MEMORY_ONLY and (corrects(model) or analogs(model))
    return mode is UpdateMode.FULL_MODEL or model.learns_from_gradients or outcomes or corrects_outputs


def learn_outcome(
    model: ContinualForecaster, state: TensorDict, inputs: Tensor, targets: Tensor, mask: Tensor | None = None
) -> TensorDict:
    """``memory_only`` learning from a realised error, without touching the backbone: an SGD
    step of the matured pair's forecast loss on each stream's own memory weights only (the
    paths :meth:`~models.forecaster.ContinualForecaster.outcome_paths` names), learning rate
    ``outcome_lr``, each stream's gradient clipped to norm ``online_clip``.

    Why: the associative loss the memory stores tokens with never sees a target, so under
    delayed feedback memory_only never used a realised value; this step writes the realised
    correction for that context into the memory, which retrieval reads for similar contexts.
    Batched: a stream's forecast reads only its own memory weights, so the gradient of the sum
    of the streams' losses w.r.t. the stacked weights is each stream's own gradient (one
    forward and one backward pass for B streams). Streams where ``mask`` is false are unchanged.
    """
    return _outcome_step(model, state, inputs, targets, mask)[0]


def _outcome_step(
    model: ContinualForecaster,
    state: TensorDict,
    inputs: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    encoded: Encoded | None = None,
) -> tuple[TensorDict, Tensor | None]:
    """:func:`learn_outcome`, also returning the forecast ``[b, pred_len, c_out]`` of ``inputs``
    its step was taken on (before the step, uncorrected; None when it took none)."""
    cfg = model.config
    paths = model.outcome_paths()
    if cfg.outcome_lr <= 0 or not paths or (mask is not None and not bool(mask.any())):
        return state, None
    components = state["model"]
    params = "params" in state.keys()
    written = None if params else model.outcome_gradient(inputs, components, targets, mask, encoded)
    if written is not None:
        forecast, grads = written
    else:  # autograd, for a memory whose gradient is not written out
        forecast, grads = _outcome_gradient(model, state, inputs, targets, mask, encoded)
    stepped = model.outcome_step(components, _clipped_steps(grads, cfg.online_clip, -cfg.outcome_lr))
    return replaced(state, {"model": stepped}), forecast.detach()


def _clipped_steps(grads: dict[K, Tensor], max_norm: float, lr: float) -> dict[K, Tensor]:
    """``lr`` times :func:`_clip_rows` of ``grads`` (``k`` streams stacked along dim 0), with one
    scale per stream: the clip factor and ``lr`` are multiplied first, so each gradient is
    scaled once (the outcome step runs on every matured pair; equal to scaling twice up to
    float rounding, exactly when the clip leaves a stream unchanged)."""
    first = next(iter(grads.values()))
    if max_norm <= 0:
        return {k: lr * g for k, g in grads.items()}
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # [k, all weights]
    norm = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)  # [k]
    if norm.shape[0] == 1 and not norm.requires_grad and first.dtype in _ROUND_TO:
        # one stream, the usual call (no graph to keep): the float64 steps below on a Python
        # float (the same IEEE operations, ``max_norm / t`` being ``t.reciprocal() * max_norm``)
        # and the scale rounded to the gradients' dtype as ``.to`` rounds it, in place of five
        # tensor operations
        clip = min((1.0 / (float(norm) + 1e-12)) * max_norm, 1.0)
        step = _ROUND_TO[first.dtype](clip * lr)
        return {k: g * step for k, g in grads.items()}
    factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)  # [k]
    scale = (factor * lr).to(first.dtype)
    return {k: g * scale.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as ``torch.Tensor.to(torch.float32)`` rounds)."""
    return cast(float, struct.unpack("f", struct.pack("f", x))[0])


# dtypes whose rounding of a Python float :func:`_clipped_steps` does without a tensor
_ROUND_TO: dict[torch.dtype, Callable[[float], float]] = {torch.float32: _float32, torch.float64: float}


def _outcome_gradient(
    model: ContinualForecaster,
    state: TensorDict,
    inputs: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    encoded: Encoded | None = None,
) -> tuple[Tensor, dict[StatePath, Tensor]]:
    """The forecast of ``inputs`` and each stream's gradient of its loss w.r.t. the outcome
    paths (what :meth:`~models.forecaster.ContinualForecaster.outcome_gradient` writes out),
    by autograd."""
    state = _for_autograd(state)
    components = state["model"]
    leaves = {p: cast(Tensor, components.get(p)).detach().requires_grad_(True) for p in model.outcome_paths()}
    reading = replaced(state, {"model": _with_leaves(components, leaves)})
    with torch.enable_grad():
        forecast, _ = _forward(model, reading, inputs, StorePolicy.NONE, encoded)  # [b, p, c_out]
        losses = (forecast - targets).pow(2).flatten(1).mean(dim=1)  # [b] each stream's F.mse_loss
        if mask is not None:
            losses = torch.where(mask, losses, torch.zeros_like(losses))
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    return forecast, {
        p: torch.zeros_like(leaf) if g is None else g
        for (p, leaf), g in zip(leaves.items(), grads, strict=True)
    }


def _learn_corrector(
    model: ContinualForecaster,
    state: TensorDict,
    inputs: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    raw: Tensor | None,
    encoded: Encoded | None = None,
    observed: bool = False,
    ahead: bool = False,
) -> TensorDict:
    """One normalised LMS step of each stream's output corrector on the matured pair ``inputs``
    -> ``targets``, then the pair's evidence for its analog mix; ``raw`` is the forecaster's
    (uncorrected) forecast of ``inputs``, computed here (no gradient) when the outcome step did
    not make one. Why the forecast before the outcome step: it is the memory the corrector's
    last forecasts were read from. The analog mix learns from the corrected and the analog
    forecasts that were mixed when the pair was forecast (made again when the pair is learned
    right after its forecast: :func:`learn`, ``observed``). The pair's forecast was made at the
    stream's current count when ``ahead``, ``pred_len`` observations ago when ``observed``, at a
    count not known otherwise (a replayed pair: the corrector then uses no known values)."""
    has_parts = "corrector" in state.keys() or "analog" in state.keys()
    if not has_parts or (mask is not None and not bool(mask.any())):
        return state
    if raw is None:
        raw, _ = _forward(model, state, inputs, StorePolicy.NONE, encoded)
    window = model.forecast_channels(inputs)
    count = state["count"]
    at = count if ahead else count - model.config.pred_len if observed else None
    changed: dict[str, TensorDict] = {}
    if "analog" in state.keys():
        if observed:
            corrected, *found = analog.matured(state["analog"])
        else:
            corrected = _by_corrector(model, state, inputs, raw, at)
            found = list(analog.forecast(state["analog"], window, model.config.pred_len))
        changed["analog"] = analog.update(
            state["analog"], window, corrected, found[0], found[1], targets, mask
        )
    if "corrector" in state.keys():
        cfg = model.config
        changed["corrector"] = corrector.update(
            state["corrector"], window, raw, targets, cfg.corrector_lr, mask, at, ahead, cfg.known_lr
        )
    return replaced(state, changed)


def _learn_one(
    model: ContinualForecaster, row: TensorDict, inputs: Tensor, targets: Tensor, mode: UpdateMode
) -> TensorDict:
    cfg = model.config
    row = _for_autograd(row)
    full = mode is UpdateMode.FULL_MODEL
    if full:
        source = _stream_params(row)
    else:  # the shared weights, of which only those adapt reads need a gradient
        shared = dict(model.named_parameters())
        source = {k: shared[k].detach() for k in model.adapted_from()}
    params = {k: v.detach().requires_grad_(True) for k, v in source.items()}
    with torch.enable_grad():
        forecast, _ = _call(model, params, (inputs, row["model"], StorePolicy.NONE))
        loss = F.mse_loss(forecast, targets)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grad_map = {
        k: torch.zeros_like(p) if g is None else g.detach()
        for (k, p), g in zip(params.items(), grads, strict=True)
    }
    if not full:
        return replaced(row, {"model": model.adapt(row["model"], grad_map)})
    # the step on the state's own [1, ...] tensors, keyed as stored: no per-tensor selection of
    # the stream's row and no re-stacking of the results (the anchor broadcasts)
    opt = row["opt"]
    new_p, avg, avg_sq, step = adamw_step(
        _entries(row["params"]),
        {_key(k): g.unsqueeze(0) for k, g in _clip(grad_map, cfg.online_clip).items()},
        _entries(opt["exp_avg"]),
        _entries(opt["exp_avg_sq"]),
        opt["step"][0],
        lr=cfg.online_lr,
        betas=cfg.online_betas,
        weight_decay=cfg.online_weight_decay,
        anchor=_anchor(model, _key),
        anchor_strength=cfg.online_anchor,
    )
    new_params = _one_row(new_p)
    opt_state = _one_row({"exp_avg": _one_row(avg), "exp_avg_sq": _one_row(avg_sq), "step": step.reshape(1)})
    changed: dict[str, Tensor | TensorDict] = {"params": new_params, "opt": opt_state}
    if model.learns_from_gradients:
        # a gradient-driven memory (FSNet) adapts with the weights the stream forecasts with
        # next, its own after this step, as the reference code's update after its optimiser
        # step does: its query is then the calibration the next forward uses (from the
        # unclipped gradient, as in memory_only)
        changed["model"] = model.adapt(row["model"], grad_map, _flat(new_params))
    return replaced(row, changed)


def _learn_batched(
    model: ContinualForecaster, state: TensorDict, inputs: Tensor, targets: Tensor, mask: Tensor | None
) -> TensorDict:
    """``full_model`` for several streams at once: each stream's forecast with its own weights
    under ``vmap``, one backward pass through the sum of the streams' losses (stream i's
    weights reach only stream i's loss, so each gets exactly its own gradient), and the AdamW
    step on the stacked weights. Equals :func:`_learn_one` per stream up to float rounding."""
    cfg = model.config
    state = _for_autograd(state)
    b = state.batch_size[0]
    idx = None if mask is None or bool(mask.all()) else mask.nonzero().squeeze(1)  # [k]
    rows = state if idx is None else state[idx]
    if idx is not None:
        inputs, targets = inputs[idx], targets[idx]
    source = {k.replace("-", "."): cast(Tensor, v) for k, v in rows["params"].items()}  # [k, ...]
    params = {k: v.detach().requires_grad_(True) for k, v in source.items()}
    with torch.enable_grad():
        forecast = torch.func.vmap(_forecast_one(model))(params, inputs, rows["model"])  # [k, p, c_out]
        losses = ((forecast - targets) ** 2).flatten(1).mean(dim=1)  # each stream's F.mse_loss
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
    grad_map = _clip_rows(
        {
            k: torch.zeros_like(p) if g is None else g.detach()
            for (k, p), g in zip(params.items(), grads, strict=True)
        },
        cfg.online_clip,
    )
    opt = rows["opt"]
    new_p, avg, avg_sq, step = adamw_step(
        source,
        grad_map,
        {k.replace("-", "."): cast(Tensor, v) for k, v in opt["exp_avg"].items()},
        {k.replace("-", "."): cast(Tensor, v) for k, v in opt["exp_avg_sq"].items()},
        opt["step"],  # [k]: each stream's own bias correction
        lr=cfg.online_lr,
        betas=cfg.online_betas,
        weight_decay=cfg.online_weight_decay,
        anchor=_anchor(model),  # broadcast over the streams
        anchor_strength=cfg.online_anchor,
    )
    k = rows.batch_size[0]
    updated = rows.clone(recurse=False)
    updated["params"] = TensorDict({_key(n): v for n, v in new_p.items()}, batch_size=[k])
    updated["opt"] = TensorDict(
        {
            "exp_avg": TensorDict({_key(n): v for n, v in avg.items()}, batch_size=[k]),
            "exp_avg_sq": TensorDict({_key(n): v for n, v in avg_sq.items()}, batch_size=[k]),
            "step": step,
        },
        batch_size=[k],
    )
    if idx is None:
        return updated
    out = state.clone()
    out[idx] = updated
    assert out.batch_size[0] == b
    return out


def _anchor(model: ContinualForecaster, key: Callable[[str], str] = str) -> dict[str, Tensor] | None:
    """The pretrained weights a full_model step pulls toward, by ``key(name)``; None where it
    does not pull (``online_anchor`` 0, the baselines as published)."""
    if model.config.online_anchor <= 0:
        return None
    return {key(k): v.detach() for k, v in model.named_parameters()}


def _forecast_one(model: ContinualForecaster) -> Callable[[dict[str, Tensor], Tensor, TensorDict], Tensor]:
    """One stream's forecast ``[p, c_out]`` from its own weights (the body ``vmap`` maps)."""

    def one(params: dict[str, Tensor], inputs: Tensor, model_state: TensorDict) -> Tensor:
        forecast, _ = _call(model, params, (inputs[None], model_state.unsqueeze(0), StorePolicy.NONE))
        return forecast[0]

    return one


# per model: whether two of its modules share a parameter (see _call)
_TIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _call(model: nn.Module, params: dict[str, Tensor], args: tuple[Any, ...]) -> Any:
    """``functional_call`` that looks for tied weights once per model, not on every call
    (about 1 ms a call at the reference-size TCN's 138 weight tensors); no memcast model
    ties any, and one that did would still be called with ``tie_weights``."""
    tied = _TIED.get(model)
    if tied is None:
        every = sum(1 for _ in model.named_parameters(remove_duplicate=False))
        tied = _TIED[model] = every != sum(1 for _ in model.named_parameters())
    return functional_call(model, params, args, tie_weights=tied)


# per model, the store policies whose forward cannot run under vmap (see _forward)
_NO_VMAP: weakref.WeakKeyDictionary[ContinualForecaster, set[StorePolicy]] = weakref.WeakKeyDictionary()


def _forward_one(
    model: ContinualForecaster, policy: StorePolicy
) -> Callable[[dict[str, Tensor], Tensor, TensorDict], tuple[Tensor, TensorDict]]:
    """One stream's forecast and next component state from its own weights (mapped by ``vmap``)."""

    def one(params: dict[str, Tensor], inputs: Tensor, model_state: TensorDict) -> tuple[Tensor, TensorDict]:
        forecast, next_state = _call(model, params, (inputs[None], model_state.unsqueeze(0), policy))
        return forecast[0], next_state.squeeze(0)

    return one


def _clip_rows(grads: dict[K, Tensor], max_norm: float) -> dict[K, Tensor]:
    """:func:`_clip` for ``k`` streams stacked along dim 0: each stream's gradient scaled by its
    own norm, as ``_clip`` does for one stream."""
    if max_norm <= 0:
        return grads
    sq = sum((g.double() ** 2).flatten(1).sum(1) for g in grads.values())  # [k]
    factor = torch.clamp(max_norm / (torch.as_tensor(sq).sqrt() + 1e-12), max=1.0)  # [k]
    return {k: g * factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def _clip(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """A stream's gradient scaled to norm ``max_norm`` at most (0: unchanged).

    A step that cannot run away (full_model, delayed targets): the clipped gradient bounds
    the AdamW moments after a level shift's outlier losses, and the anchor
    (``online_anchor``, :func:`models.optim.adamw_step`) bounds how far a stream's weights
    can drift from the pretrained ones whatever the number of steps.
    """
    if max_norm <= 0:
        return grads
    # one call for every tensor; each tensor's norm in its own dtype (a float64 copy of every
    # gradient cost more than the rest of the clipping), their total in float64
    norms = torch._foreach_norm(list(grads.values()))
    norm = torch.linalg.vector_norm(torch.stack(norms).double())
    factor = float(torch.clamp(max_norm / (norm + 1e-12), max=1.0))
    if factor == 1.0:
        return grads
    return dict(zip(grads, torch._foreach_mul(list(grads.values()), factor), strict=True))


def _forward(
    model: ContinualForecaster,
    state: TensorDict,
    inputs: Tensor,
    policy: StorePolicy,
    encoded: Encoded | None = None,
) -> tuple[Tensor, TensorDict]:
    """Forecast with the shared weights (batched) or, for full_model streams, each stream's own
    (``encoded``, the backbone's encoding of ``inputs``, serves the shared weights only)."""
    if "params" not in state.keys():
        forecast, model_state = model(inputs, state["model"], policy, encoded)
        return forecast, replaced(state, {"model": model_state})
    if state.batch_size[0] > 1 and model.vmaps_stream_weights and policy not in _NO_VMAP.get(model, ()):
        params = {k.replace("-", "."): cast(Tensor, v) for k, v in state["params"].items()}  # [b, ...]
        try:
            forecast, model_state = torch.func.vmap(_forward_one(model, policy))(
                params, inputs, state["model"]
            )
        except RuntimeError as exc:  # a memory whose storing branches on its data (chunks filled)
            if "vmap" not in str(exc):
                raise
            _NO_VMAP.setdefault(model, set()).add(policy)  # pure functions: nothing happened; loop instead
        else:
            return forecast, replaced(state, {"model": model_state})
    forecasts, rows = [], []
    for i in range(state.batch_size[0]):
        row = state if state.batch_size[0] == 1 else state[i : i + 1]
        f, model_state = _call(model, _stream_params(row), (inputs[i : i + 1], row["model"], policy))
        forecasts.append(f)
        rows.append(replaced(row, {"model": model_state}))
    if len(rows) == 1:
        return forecasts[0], rows[0]
    return torch.cat(forecasts, dim=0), TensorDict.cat(rows, dim=0)


def stores_tokens(model: ContinualForecaster) -> bool:
    """True when the forecaster holds a memory that learns from stored tokens."""
    return model.stores_tokens


def _key(param_name: str) -> str:
    """Parameter names flattened into one level of keys (dots would nest on serialisation)."""
    return param_name.replace(".", "-")


def _stream_params(row: TensorDict) -> dict[str, Tensor]:
    return _flat(row["params"])


def _flat(td: TensorDict) -> dict[str, Tensor]:
    """A one-stream per-parameter TensorDict as ``{parameter name: tensor without stream dim}``."""
    return {k.replace("-", "."): cast(Tensor, v)[0] for k, v in td.items()}


def _entries(td: TensorDict) -> dict[str, Tensor]:
    """A one-level per-parameter ``TensorDict``'s tensors by stored key, stream dim kept."""
    return cast(dict[str, Tensor], dict(td.items()))


def _one_row(entries: Mapping[str, Tensor | TensorDict]) -> TensorDict:
    """A one-stream ``TensorDict`` of entries that have its batch dimension already (built
    without validating each entry: the online step made them)."""
    source: dict[Any, Any] = dict(entries)  # tensordict's stubs name no mapping of str keys
    return TensorDict._new_unsafe(source=source, batch_size=torch.Size([1]), nested=False)


def _with_leaves(td: TensorDict, leaves: dict[StatePath, Tensor]) -> TensorDict:
    """``td`` with the tensors at the nested ``leaves`` paths replaced, every node on a path
    copied (:func:`models.base.replaced`) and the rest of the tree shared."""
    children: dict[str, dict[StatePath, Tensor]] = {}
    entries: dict[str, Tensor | TensorDict] = {}
    for path, leaf in leaves.items():
        if len(path) == 1:
            entries[path[0]] = leaf
        else:
            children.setdefault(path[0], {})[path[1:]] = leaf
    for key, below in children.items():
        entries[key] = _with_leaves(cast(TensorDict, td[key]), below)
    return replaced(td, entries)


def _where(mask: Tensor, new: TensorDict, old: TensorDict) -> TensorDict:
    """Per stream: ``new`` where ``mask`` holds, else ``old`` (same keys and shapes)."""
    if bool(mask.all()):
        return new
    merged = new.apply(lambda a, b: where_rows(mask, a, b), old)
    return cast(TensorDict, merged)  # apply returns None only when told to work in place
