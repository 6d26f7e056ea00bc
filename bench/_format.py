"""Number formatting, markdown tables and floor look-ups shared by the report sections."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def num(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def kib(n: int | None) -> str:
    return "–" if n is None else f"{n / 1024:,.1f} KiB"


def mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f} MiB"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def floor_at(floor: dict[str, Any] | None, cell: dict[str, Any], batch: int | None) -> float | None:
    """The wall-clock floor of the cell's mode at ``batch`` (None: the best over batches)."""
    if floor is None:
        return None
    rows = [r for r in floor["rows"] if r["config"].endswith("(checkpoint)")] or floor["rows"]
    values = [r["obs_per_s"] for r in rows if r["mode"] == cell["mode"] and batch in (None, r["batch"])]
    return max(values) if values else None


def matched_floor(floor: dict[str, Any] | None, cell: dict[str, Any], cpu: bool = False) -> float | None:
    """The floor of the cell's mode at the batch the service reached (mean streams per model
    call), interpolated log-log between the measured batches: observations per wall-clock
    second, or with ``cpu`` per CPU second."""
    if floor is None:
        return None
    rows = [r for r in floor["rows"] if r["config"].endswith("(checkpoint)")] or floor["rows"]
    if cpu and not all("cpu_ms_per_obs" in r for r in rows):
        return None
    points = sorted(
        (r["batch"], 1000 / r["cpu_ms_per_obs"] if cpu else r["obs_per_s"])
        for r in rows
        if r["mode"] == cell["mode"]
    )
    if not points:
        return None
    b = max(float(cell.get("streams_per_model_call") or 1.0), 1.0)
    if b <= points[0][0]:
        return points[0][1]
    for (b0, y0), (b1, y1) in zip(points, points[1:], strict=False):
        if b <= b1:
            w = (math.log(b) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    return points[-1][1]


def ratio(value: float, floor: float | None) -> str:
    return num(value / floor, 2) if floor else "–"
