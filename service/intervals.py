"""A stream's prediction intervals: its levels and the ``models.intervals`` state, kept as JSON
in the record (``StreamRecord.intervals``, no pickle) and learned from the same matured errors
that :mod:`service.accuracy` scores, once per applied observation, in the order the service
meets them: what ``memcast evaluate`` replays (``models.intervals.replay``).

JSON: ``{"levels": [l], "ratio": [p][c][l] | null, "scale": [p][c] | null, "count": [p][c] | null}``;
``null`` before the first matured error. Units: the stream's (the radii follow the errors').

Axis legend: ``p`` horizon steps, ``c`` target columns, ``l`` levels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.intervals import DEFAULT_LEVELS, IntervalState, check_levels, init_state, update
from service import schemas


def initial(levels: Sequence[float] = DEFAULT_LEVELS) -> dict[str, Any]:
    return {
        "levels": [float(v) for v in check_levels(list(levels)).tolist()],
        "ratio": None,
        "scale": None,
        "count": None,
    }


def cleared(data: dict[str, Any] | None) -> dict[str, Any]:
    """Nothing learned, the same levels (a reset)."""
    return initial(_levels(data))


def learn_many(
    datas: Sequence[dict[str, Any] | None],
    pred_len: int,
    columns: int,
    abs_errors: Sequence[Sequence[Sequence[Sequence[float]]]],
) -> list[dict[str, Any]]:
    """Learn each stream's radii from the matured ``|e|`` of its applied observations,
    ``abs_errors[i] [rows][p][c]`` (NaN: none), for all the streams of one model at once (one
    stream, or a bulk request's): one ``models.intervals.update`` per row position over every
    stream with the same levels. ``update`` is elementwise over the stream dimension and a row
    of NaN changes nothing, so a stream with fewer rows is padded with NaN and every stream gets
    the numbers it would get alone (``tests/service/test_intervals.py`` holds them equal to
    learning stream by stream)."""
    out: list[dict[str, Any] | None] = [None] * len(datas)
    groups: dict[tuple[float, ...], list[int]] = {}
    errors_of: dict[int, np.ndarray] = {}
    for i, (data, errors) in enumerate(zip(datas, abs_errors, strict=True)):
        levels = _levels(data)
        matured_i = np.array(errors, dtype=np.float64).reshape(len(errors), pred_len, columns)
        if np.isnan(matured_i).all():
            out[i] = data if data is not None else initial(levels)
        else:
            groups.setdefault(tuple(levels), []).append(i)
            errors_of[i] = matured_i
    # (lists through numpy: torch.tensor reads nested Python lists far slower)
    for key, members in groups.items():
        lv = torch.tensor(key, dtype=torch.float64)
        ratios, scales, counts = [], [], []
        for i in members:
            data = datas[i]
            if isinstance(data, _Learned):
                ratios.append(data.ratio)
                scales.append(data.scale)
                counts.append(data.count)
            elif data is not None and data.get("ratio") is not None:
                ratios.append(data["ratio"])
                scales.append(data["scale"])
                counts.append(data["count"])
            else:
                fresh_ratio, fresh_scale, fresh_count = _fresh(key, pred_len, columns)
                ratios.append(fresh_ratio)
                scales.append(fresh_scale)
                counts.append(fresh_count)
        count = _tensor(counts, (len(members), pred_len, columns))
        scale = _tensor(scales, (len(members), pred_len, columns))
        state = IntervalState(  # a cell without errors has a NaN scale
            ratio=_tensor(ratios, (len(members), pred_len, columns, len(key))),
            scale=torch.where(count > 0, scale, torch.full_like(scale, math.nan)),
            count=count,
        )
        rows = max(len(errors_of[i]) for i in members)
        padded = np.full((len(members), rows, pred_len, columns), math.nan)
        for j, i in enumerate(members):
            padded[j, : len(errors_of[i])] = errors_of[i]
        matured = torch.from_numpy(padded)  # [b, t, p, c]
        for t in range(rows):
            state = update(state, matured[:, t], lv)
        seen = state.count > 0
        arrays = (
            state.ratio.numpy(),
            torch.where(seen, state.scale, torch.zeros_like(state.scale)).numpy(),
            state.count.numpy(),
        )
        lists = [array.tolist() for array in arrays]
        for j, i in enumerate(members):
            data = {"levels": list(key), "ratio": lists[0][j], "scale": lists[1][j], "count": lists[2][j]}
            out[i] = _Learned(data, *(array[j].copy() for array in arrays))
    return out  # type: ignore[return-value]


class _Learned(dict[str, Any]):
    """:func:`learn_many`'s JSON dict for one stream, holding its ratio ``[p, c, l]``, scale and
    count ``[p, c]`` as the arrays they were made from: a record kept in process (the Redis
    store's hints) is learned from and served again without reading nested lists back into
    arrays, which cost more than the learning. Plain JSON to everything else (a ``dict``,
    equal to one)."""

    __slots__ = ("count", "ratio", "scale")

    def __init__(self, data: dict[str, Any], ratio: np.ndarray, scale: np.ndarray, count: np.ndarray) -> None:
        super().__init__(data)
        for array in (ratio, scale, count):
            array.flags.writeable = False
        self.ratio, self.scale, self.count = ratio, scale, count


@functools.lru_cache(maxsize=64)
def _fresh(levels: tuple[float, ...], pred_len: int, columns: int) -> tuple[np.ndarray, ...]:
    """A stream's interval state before its first error (ratio, scale, count; read-only)."""
    fresh = init_state(1, pred_len, torch.tensor(levels, dtype=torch.float64), columns)
    arrays = (fresh.ratio[0].numpy().copy(), fresh.scale[0].numpy().copy(), fresh.count[0].numpy().copy())
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _tensor(values: Sequence[Any], shape: tuple[int, ...]) -> torch.Tensor:
    """Nested lists (or arrays) of floats as a float64 tensor of ``shape``."""
    return torch.from_numpy(np.array(values, dtype=np.float64).reshape(shape))


def _bounds(data: dict[str, Any] | None, forecast: Sequence[Sequence[float]]) -> tuple[list[Any], ...]:
    """The levels ascending, the bounds ``lower, upper [l][p][c]`` of ``forecast [p][c]`` at
    each and whether a level's step is shown ``[l][p]`` (once an error has matured in each of
    its columns), as nested lists; no levels before the first matured error.

    ``models.intervals.bounds`` in numpy (float64 either way, so the same numbers): it runs for
    every stream of every response, where building torch tensors for a few hundred products
    costs more than the products."""
    if data is None or data.get("ratio") is None:
        return [], [], [], []
    levels = np.asarray(data["levels"], dtype=np.float64)
    order = np.argsort(levels, kind="stable")
    if isinstance(data, _Learned):
        count, scale, ratio = data.count, data.scale, data.ratio
    else:
        count = np.asarray(data["count"], dtype=np.float64)
        scale = np.asarray(data["scale"], dtype=np.float64)
        ratio = np.asarray(data["ratio"], dtype=np.float64)
    scale = np.where(count > 0, scale, math.nan)  # [p, c]
    ratio = ratio[..., order]  # [p, c, l]
    radius = np.moveaxis(ratio * scale[..., None], -1, 0)  # [l, p, c]
    f = np.asarray(forecast, dtype=np.float64)
    lower = f - radius
    ready = np.logical_not(np.isnan(lower).any(axis=2)).tolist()  # [l][p]
    return levels[order].tolist(), lower.tolist(), (f + radius).tolist(), ready


def forecast_body(
    targets: Sequence[str],
    values: Sequence[Sequence[float]],
    stamps: Sequence[schemas.TimestampOut | None],
    data: dict[str, Any] | None,
) -> dict[str, Any]:
    """The forecast ``values [p][c]`` as the JSON-ready dict ``schemas.Forecast`` dumps to, with
    the bounds learned so far: every level in ``intervals``, the highest also as
    ``lower``/``upper`` (what the stream page draws). Plain dicts: a bulk response holds one per
    stream, where building and serialising pydantic models cost more than the rest of the
    stream's work."""
    levels, lower, upper, ready = _bounds(data, values)
    bands = list(zip(levels, lower, upper, ready, strict=True))
    rows = []
    for k, row in enumerate(values):
        shown = [
            {
                "level": level,
                "lower": dict(zip(targets, lo[k], strict=True)),
                "upper": dict(zip(targets, up[k], strict=True)),
            }
            for level, lo, up, has in bands
            if has[k]
        ]
        rows.append(
            {
                "step": k + 1,
                "timestamp": stamps[k],
                "values": dict(zip(targets, row, strict=True)),
                "lower": shown[-1]["lower"] if shown else None,
                "upper": shown[-1]["upper"] if shown else None,
                "intervals": shown,
            }
        )
    return {"columns": list(targets), "levels": sorted(_levels(data)), "rows": rows}


def forecast(
    targets: Sequence[str],
    values: Sequence[Sequence[float]],
    stamps: Sequence[schemas.TimestampOut | None],
    data: dict[str, Any] | None,
) -> schemas.Forecast:
    """:func:`forecast_body` as the response model of the one-stream endpoints."""
    return schemas.Forecast.model_validate(forecast_body(targets, values, stamps, data))


def _levels(data: dict[str, Any] | None) -> list[float]:
    return list(data["levels"]) if data else [float(v) for v in DEFAULT_LEVELS]
