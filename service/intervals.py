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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.intervals import DEFAULT_LEVELS, IntervalState, check_levels, init_state, update
from service import schemas


@dataclass(frozen=True)
class Band:
    level: float
    lower: list[list[float]]  # [p][c]
    upper: list[list[float]]  # [p][c]


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
            if data is not None and data.get("ratio") is not None:
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
        ratio_out = state.ratio.tolist()
        scale_out = torch.where(seen, state.scale, torch.zeros_like(state.scale)).tolist()
        count_out = state.count.tolist()
        for j, i in enumerate(members):
            out[i] = {
                "levels": list(key),
                "ratio": ratio_out[j],
                "scale": scale_out[j],
                "count": count_out[j],
            }
    return out  # type: ignore[return-value]


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


def bands(data: dict[str, Any] | None, forecast: Sequence[Sequence[float]]) -> list[Band]:
    """The intervals of ``forecast [p][c]`` at each level, ascending; an empty list before the
    first matured error. A step with no interval yet has NaN bounds.

    ``models.intervals.bounds`` in plain floats (float64 either way, so the same numbers): it
    runs for every stream of every response, where a few hundred products cost less than
    building tensors for them."""
    if data is None or data.get("ratio") is None:
        return []
    levels: list[float] = data["levels"]
    cells = [
        [(f, r, s if n > 0 else math.nan) for f, r, s, n in zip(f_row, r_row, s_row, n_row, strict=True)]
        for f_row, r_row, s_row, n_row in zip(
            forecast, data["ratio"], data["scale"], data["count"], strict=True
        )
    ]
    out = []
    for i in sorted(range(len(levels)), key=lambda i: levels[i]):
        lower = [[f - r[i] * s for f, r, s in row] for row in cells]
        upper = [[f + r[i] * s for f, r, s in row] for row in cells]
        out.append(Band(float(levels[i]), lower, upper))
    return out


def forecast(
    targets: Sequence[str],
    values: Sequence[Sequence[float]],
    stamps: Sequence[schemas.TimestampOut | None],
    data: dict[str, Any] | None,
) -> schemas.Forecast:
    """The forecast ``values [p][c]`` as a response body, with the bounds learned so far: every
    level in ``intervals``, the highest also as ``lower``/``upper`` (what the stream page draws)."""
    found = bands(data, values)
    rows = []
    # model_construct: these are the service's own numbers, checked when they were learned;
    # validating a few hundred of them again for every stream of every response costs more
    # than the rest of the response
    for k, row in enumerate(values):
        ready = [b for b in found if not any(math.isnan(v) for v in b.lower[k])]
        levels = [
            schemas.Interval.model_construct(
                level=b.level,
                lower=dict(zip(targets, b.lower[k], strict=True)),
                upper=dict(zip(targets, b.upper[k], strict=True)),
            )
            for b in ready
        ]
        rows.append(
            schemas.ForecastRow.model_construct(
                step=k + 1,
                timestamp=stamps[k],
                values=dict(zip(targets, row, strict=True)),
                lower=levels[-1].lower if levels else None,
                upper=levels[-1].upper if levels else None,
                intervals=levels,
            )
        )
    return schemas.Forecast.model_construct(columns=list(targets), levels=sorted(_levels(data)), rows=rows)


def forecast_body(
    targets: Sequence[str],
    values: Sequence[Sequence[float]],
    stamps: Sequence[schemas.TimestampOut | None],
    data: dict[str, Any] | None,
) -> dict[str, Any]:
    """:func:`forecast` as the JSON-ready dict ``schemas.Forecast`` dumps to, without
    pydantic models (for bulk responses: one per stream, where building and serialising the
    models cost more than the rest of the stream's work); ``tests/service/test_intervals.py``
    holds the two equal."""
    found = bands(data, values)
    rows = []
    for k, row in enumerate(values):
        levels = [
            {
                "level": b.level,
                "lower": dict(zip(targets, b.lower[k], strict=True)),
                "upper": dict(zip(targets, b.upper[k], strict=True)),
            }
            for b in found
            if not any(math.isnan(v) for v in b.lower[k])
        ]
        rows.append(
            {
                "step": k + 1,
                "timestamp": stamps[k],
                "values": dict(zip(targets, row, strict=True)),
                "lower": levels[-1]["lower"] if levels else None,
                "upper": levels[-1]["upper"] if levels else None,
                "intervals": levels,
            }
        )
    return {"columns": list(targets), "levels": sorted(_levels(data)), "rows": rows}


def _levels(data: dict[str, Any] | None) -> list[float]:
    return list(data["levels"]) if data else [float(v) for v in DEFAULT_LEVELS]
