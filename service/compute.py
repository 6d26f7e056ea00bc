"""Model computation, run in a worker thread: decode states, ``models.online.observe``, encode.

Values arrive raw (the stream's units); they are scaled with the checkpoint's ``DataSchema``
before the model sees them, and forecasts are unscaled back. Each thread computes with its own
replica of the model (see :mod:`service.registry`).

Axis legend: ``b`` streams, ``t`` observations, ``c`` channels, ``p`` horizon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import Tensor

from models import combination
from models.forecaster import ContinualForecaster
from models.online import (
    UpdateMode,
    combines,
    ensure_mode,
    init_stream_state,
    is_ready,
    observe,
    observe_many,
)
from models.state_io import (
    FingerprintMismatchError,
    StateFormatError,
    state_from_bytes,
    state_to_bytes,
    states_from_bytes,
    states_to_bytes,
)
from service.errors import NonFiniteState, ServiceError, StateIncompatible
from service.registry import LoadedModel

Forecast = tuple[tuple[float, ...], ...]  # [pred_len][c_out] in the stream's units


@dataclass(frozen=True)
class Step:
    """What one computation produced for one stream."""

    state: bytes
    steps: int
    forecast: Forecast | None  # None until the stream has seen seq_len values


def compute(
    model: LoadedModel,
    blob: bytes | None,
    rows: list[list[float]],
    mode: UpdateMode,
    create_mode: UpdateMode | None = None,
    combine: bool = True,
) -> Step:
    """Decode (or start, in ``create_mode``, default ``mode``: a bulk request may create a
    stream in one mode and post to it in another; ``combine``: the new stream serves the
    per-stream combination) one stream's state, learn from ``rows`` in order, encode."""
    net = model.replica()
    with torch.no_grad():  # full_model learning enables grad itself, inside models.online.learn
        state = (
            init_stream_state(net, 1, create_mode or mode, combine=combine)
            if blob is None
            else decode(model, blob)
        )
        state = ensure_mode(net, state, mode)
        out = None
        if rows:
            scaled = model.schema.scale(torch.tensor(rows, dtype=torch.float64))  # [t, c]
            state, out = observe_many(net, state, scaled[None], mode)  # out [1, p, c_out]
        return _finish(model, state, out, 0, bool(is_ready(net, state)[0]))


def compute_batch(
    model: LoadedModel, blobs: list[bytes], rows: list[list[float]], mode: UpdateMode
) -> list[Step | ServiceError]:
    """One new observation for each of several streams, in ONE ``observe`` call over the
    stream dimension; the per-stream results (or errors) come back in order."""
    net = model.replica()
    results: list[Step | ServiceError | None] = [None] * len(blobs)
    with torch.no_grad():
        shared = decode_shared(model, blobs)
        states, ok = (
            ([ensure_mode(net, shared, mode)], list(range(len(blobs)))) if shared is not None else ([], [])
        )
        for i, blob in enumerate(blobs if shared is None else []):
            try:
                states.append(ensure_mode(net, decode(model, blob), mode))
                ok.append(i)
            except StateIncompatible as exc:
                results[i] = exc
        if ok:
            try:
                state = states[0] if len(states) == 1 else TensorDict.cat(states, dim=0)  # [b]
            except (RuntimeError, KeyError, ValueError):
                # states of different layouts (e.g. one has its own weights): one call each
                for i in ok:
                    results[i] = compute(model, blobs[i], [rows[i]], mode)
                return results  # type: ignore[return-value]
            scaled = model.schema.scale(torch.tensor([rows[i] for i in ok], dtype=torch.float64))  # [b, c]
            state, out = observe(net, state, scaled, mode)
            assert out is not None  # need_forecast defaults to True
            _finish_many(model, state, out, ok, results)  # a stream turned non-finite: its own error
    return results  # type: ignore[return-value]


def recent_values(model: LoadedModel, blob: bytes) -> list[list[float]]:
    """The raw values the state's window holds (at most ``seq_len + pred_len``), oldest first."""
    state = decode(model, blob)
    history = state["history"][0].double()  # [seq_len + pred_len, c], scaled
    held = history[history.shape[0] - min(int(state["count"][0]), history.shape[0]) :]
    mean = torch.tensor(model.schema.mean, dtype=torch.float64)
    std = torch.tensor(model.schema.std, dtype=torch.float64)
    return (held * std + mean).tolist()


def compute_many(
    model: LoadedModel,
    blobs: list[bytes | None],
    rows: list[list[list[float]]],
    mode: UpdateMode,
    fresh_mode: UpdateMode,
    fresh_combine: bool = True,
) -> list[Step | ServiceError]:
    """Several streams, each with its own (non-empty) rows, in one ``observe`` call per time
    step over the streams that still have a row (``None``: a new stream, started in
    ``fresh_mode``). Equals :func:`compute` per stream up to float rounding; a stream whose
    state cannot be read or turns non-finite is that stream's error only."""
    net = model.replica()
    results: list[Step | ServiceError | None] = [None] * len(blobs)
    with torch.no_grad():
        fast = _start_many(model, net, blobs, rows, mode, fresh_mode, fresh_combine)
        decoded: dict[int, TensorDict] = {}
        for i, blob in enumerate(blobs if fast is None else []):
            try:
                state = (
                    init_stream_state(net, 1, fresh_mode, combine=fresh_combine)
                    if blob is None
                    else decode(model, blob)
                )
                decoded[i] = ensure_mode(net, state, mode)
            except StateIncompatible as exc:
                results[i] = exc
        if fast is not None:
            order, state = fast
        else:
            # longest first, so that the streams with a row at step t are a prefix [:k]
            order = sorted(decoded, key=lambda i: -len(rows[i]))
            if not order:
                return results  # type: ignore[return-value]
            try:
                state = TensorDict.cat([decoded[i] for i in order], dim=0)  # [b]
            except (RuntimeError, KeyError, ValueError):  # states of different layouts: one call each
                for i in order:
                    results[i] = compute(model, blobs[i], rows[i], mode, fresh_mode, fresh_combine)
                return results  # type: ignore[return-value]
        lengths = [len(rows[i]) for i in order]
        c = len(rows[order[0]][0])
        values = torch.zeros(len(order), lengths[0], c, dtype=torch.float64)  # [b, t, c]
        for j, i in enumerate(order):
            values[j, : lengths[j]] = torch.tensor(rows[i], dtype=torch.float64)
        values = model.schema.scale(values)
        outs: dict[int, Tensor] = {}  # position in order -> forecast [p, c_out]
        for t in range(lengths[0]):
            k = sum(1 for n in lengths if n > t)  # streams with a row at step t
            ending = [j for j in range(k) if lengths[j] == t + 1]
            sub = state if k == len(order) else state[:k]
            sub, out = observe(net, sub, values[:k, t], mode, need_forecast=bool(ending))
            state = sub if k == len(order) else TensorDict.cat([sub, state[k:]], dim=0)
            for j in ending:
                assert out is not None
                outs[j] = out[j]
        _finish_many(model, state, torch.stack([outs[j] for j in range(len(order))]), order, results)
    return results  # type: ignore[return-value]


def _finish_many(
    model: LoadedModel,
    state: TensorDict,
    out: Tensor,
    order: list[int],
    results: list[Step | ServiceError | None],
) -> None:
    """:func:`_finish` for every stream of a ``[b]`` state at once (checks, unscaling and the
    encoding's bookkeeping done once, not per stream); ``out`` ``[b, p, c_out]``."""
    finite = torch.isfinite(out).flatten(1).all(1)  # [b]
    for t in state.values(include_nested=True, leaves_only=True):
        if isinstance(t, Tensor) and t.is_floating_point():
            finite &= torch.isfinite(t).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t)
    ready = (state["count"] >= model.seq_len).tolist()  # models.online.is_ready
    forecasts = model.schema.unscale_targets(out.double()).tolist()  # [b][p][c_out]
    blobs = states_to_bytes(state, model.fingerprint, {"model": model.name})
    counts = state["count"].tolist()
    for j, i in enumerate(order):
        if not bool(finite[j]):
            results[i] = NonFiniteState()
            continue
        forecast = tuple(tuple(row) for row in forecasts[j]) if ready[j] else None
        results[i] = Step(blobs[j], int(counts[j]), forecast)


def combination_weights(blob: bytes) -> list[list[float]] | None:
    """The weights ``[pred_len][expert]`` (experts in ``models.combination.EXPERTS`` order) of a
    stream whose state combines; ``None`` for a stream that serves its adapted forecast."""
    try:
        state, _ = state_from_bytes(blob)
    except StateFormatError as exc:
        raise StateIncompatible(f"stored state is unreadable: {exc}") from exc
    if not combines(state):
        return None
    weights: list[list[float]] = combination.weights(state["combo"])[0].double().tolist()
    return weights


def decode_shared(model: LoadedModel, blobs: Sequence[bytes]) -> TensorDict | None:
    """The ``[b]`` state of streams whose blobs share one layout (the usual batch: one model,
    one mode), decoded in one go (``models.state_io.states_from_bytes``); ``None`` when they do
    not, or when one is unreadable or another model's: the caller then decodes them one by one,
    so that each such stream gets its own error."""
    if not blobs:
        return None
    try:
        return states_from_bytes(blobs, model.fingerprint)
    except (StateFormatError, FingerprintMismatchError):
        return None


def _start_many(
    model: LoadedModel,
    net: ContinualForecaster,
    blobs: list[bytes | None],
    rows: list[list[list[float]]],
    mode: UpdateMode,
    fresh_mode: UpdateMode,
    fresh_combine: bool,
) -> tuple[list[int], TensorDict] | None:
    """:func:`compute_many`'s ``(order, [b] state)`` when every stored blob shares one layout
    and the new streams' states can join them: decoded in one go, then gathered longest first;
    ``None`` otherwise (the caller decodes one by one)."""
    stored = [i for i, blob in enumerate(blobs) if blob is not None]
    fresh = [i for i, blob in enumerate(blobs) if blob is None]
    parts = []
    if stored:
        shared = decode_shared(model, [blobs[i] for i in stored])  # type: ignore[misc]
        if shared is None:
            return None
        parts.append(ensure_mode(net, shared, mode))
    if fresh:
        parts.append(
            ensure_mode(net, init_stream_state(net, len(fresh), fresh_mode, combine=fresh_combine), mode)
        )
    try:
        state = TensorDict.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    except (RuntimeError, KeyError, ValueError):  # different layouts (e.g. a new stream in another mode)
        return None
    position = {i: j for j, i in enumerate(stored + fresh)}
    # longest first, so that the streams with a row at step t are a prefix [:k]
    order = sorted(range(len(blobs)), key=lambda i: -len(rows[i]))
    if order != stored + fresh:
        state = state[torch.tensor([position[i] for i in order])]
    return order, state


def decode(model: LoadedModel, blob: bytes) -> TensorDict:
    try:
        state, _ = state_from_bytes(blob, model.fingerprint)
    except FingerprintMismatchError as exc:
        raise StateIncompatible(str(exc), details={"found": exc.found, "expected": exc.expected}) from exc
    except StateFormatError as exc:
        raise StateIncompatible(f"stored state is unreadable: {exc}") from exc
    return state


def _finish(model: LoadedModel, state: TensorDict, out: Tensor | None, row: int, ready: bool) -> Step:
    """Encode one stream's result, refusing (``NonFiniteState``) a state or forecast with inf
    or NaN: committed, it would make every later forecast NaN."""
    if not _finite(state) or (out is not None and not bool(torch.isfinite(out[row]).all())):
        raise NonFiniteState()
    forecast = None
    if out is not None and ready:
        unscaled = model.schema.unscale_targets(out[row].double())  # [p, c_out]
        forecast = tuple(tuple(float(v) for v in r) for r in unscaled.tolist())
    blob = state_to_bytes(state, model.fingerprint, {"model": model.name})
    return Step(blob, int(state["count"][0]), forecast)


def _finite(state: TensorDict) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in state.values(include_nested=True, leaves_only=True)
        if isinstance(t, Tensor) and t.is_floating_point()
    )
