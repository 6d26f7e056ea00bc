"""Live accuracy of a stream's served forecasts, scored as their horizon matures.

Pure bookkeeping on plain numbers (no torch, no I/O); the engine calls :func:`advance` once
per applied batch, where it builds the next record, so every path that applies observations
(single requests, the cross-stream micro-batch, stream creation) scores the same way, and a
duplicate, never applied, is never scored.

The forecast a request returns (the one stored in the record) is *served*; it is kept
*pending*, with the last observed target values at its origin (the last-value forecast), until
its horizon has matured, so at most ``pred_len`` are pending. When the ``s``-th observation
arrives, the pending forecast served after observation ``o`` has its step ``h = s - o`` scored
against it, and so has the last-value forecast. Forecasts a request did not return (those
inside a batch of several observations, or inside a creation history) were never served and
are not scored: one observation per request scores every step, as ``memcast evaluate`` does.

Per horizon step the record keeps sums since creation and a ring of the latest ``window``
scored values (each the mean over the target columns), as JSON: no pickle. Errors are in the
stream's units, averaged over the target columns; skill is ``1 - MAE / MAE_last_value``.

Axis legend: ``p`` horizon steps, ``c`` target columns.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service import schemas

if TYPE_CHECKING:
    from service.registry import LoadedModel
    from service.store import StreamRecord

Row = tuple[float, ...]  # [c] target values


@dataclass(frozen=True)
class Spec:
    """What scoring needs to know about a stream's model and the service settings."""

    targets: tuple[int, ...]  # indices of the target columns in an observation row
    std: tuple[float, ...]  # the checkpoint's scale of each target (for the aggregate metrics)
    pred_len: int
    window: int  # scored values per step in the recent window
    keep: int  # matured values whose forecast is kept for display (the history's length)


@dataclass(frozen=True)
class Pending:
    origin: int  # observations seen when the forecast was served
    forecast: tuple[Row, ...]  # [p][c]
    last: Row  # [c] the last-value forecast


@dataclass(frozen=True)
class Matured:
    """The latest served forecast of one observed value (the one made closest to it)."""

    index: int  # the observation's number, 1-based
    step: int  # made this many steps ahead
    values: Row  # [c]


@dataclass(frozen=True)
class Scored:
    """Errors scored by one :func:`advance`, one per target value, for the aggregate metrics:
    ``|forecast - actual| / std`` in the checkpoint's scale, comparable across streams."""

    errors: list[float] = field(default_factory=list)
    last_value_errors: list[float] = field(default_factory=list)
    # per applied row, [p][c] |forecast - actual| in the stream's units (NaN: no forecast of
    # that step matured): what service.intervals learns from
    abs_errors: list[list[list[float]]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Ring:
    """The recent window: per horizon step, the latest ``size`` scored values as ``[mean |e|,
    mean e^2, mean |e_last|, mean e_last^2]`` (over the target columns), in a ring.

    Why a float64 array, stored base64 in the record's JSON: the window is most of a record
    (48 x 4 floats per step), and as JSON lists it was decoded into thousands of Python objects
    and encoded back on every write. Only sums over a window are ever read, so slot order does
    not matter: ``inserted[h]`` values were written to step ``h`` in all, the next goes to slot
    ``inserted[h] % size``, and unwritten slots hold zeros.
    """

    data: np.ndarray  # [p, size, 4] float64; read-only when decoded from a record
    inserted: tuple[int, ...]  # [p] values ever written per step

    @property
    def size(self) -> int:
        return int(self.data.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self.inserted == other.inserted and np.array_equal(self.data, other.data)

    __hash__ = None  # type: ignore[assignment]  # an array: not hashable

    def filled(self) -> list[int]:
        return [min(n, self.size) for n in self.inserted]

    def oldest_first(self, h: int) -> np.ndarray:
        """Step ``h``'s values ``[filled, 4]``, oldest first."""
        n, size = self.inserted[h], self.size
        kept = min(n, size)
        return self.data[h, (n - kept + np.arange(kept)) % size]

    def resized(self, pred_len: int, size: int) -> Ring:
        """This ring with room for ``size`` values per step (the setting changed): the latest kept."""
        if self.data.shape[:2] == (pred_len, size):
            return self
        data = np.zeros((pred_len, size, 4))
        inserted = []
        for h in range(min(pred_len, self.data.shape[0])):
            latest = self.oldest_first(h)[-size:]
            data[h, : len(latest)] = latest
            inserted.append(len(latest))
        return Ring(data, tuple(inserted + [0] * (pred_len - len(inserted))))

    @classmethod
    def empty(cls, pred_len: int, size: int) -> Ring:
        return cls(np.zeros((pred_len, size, 4)), (0,) * pred_len)

    def to_json(self) -> dict[str, Any]:
        data = np.ascontiguousarray(self.data, dtype="<f8")
        return {
            "size": self.size,
            "inserted": list(self.inserted),
            "f8": binascii.b2a_base64(data.tobytes(), newline=False).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ring:
        inserted = tuple(int(n) for n in data["inserted"])
        values = np.frombuffer(binascii.a2b_base64(data["f8"]), dtype="<f8")
        return cls(values.reshape(len(inserted), int(data["size"]), 4), inserted)

    @classmethod
    def from_lists(cls, window: Sequence[Sequence[Sequence[float]]]) -> Ring:
        """A window as records written before the ring held it: lists, oldest first."""
        size = max((len(w) for w in window), default=1) or 1
        data = np.zeros((len(window), size, 4))
        for h, entries in enumerate(window):
            if entries:
                data[h, : len(entries)] = entries
        return cls(data, tuple(len(w) for w in window))


# totals[step]: [values scored, sum |e|, sum e^2, sum |e_last|, sum e_last^2]
@dataclass(frozen=True)
class Accuracy:
    pending: tuple[Pending, ...] = ()
    totals: tuple[tuple[float, ...], ...] = ()
    window: Ring | None = None  # None: nothing scored yet
    matured: tuple[Matured, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "pending": [[p.origin, [list(r) for r in p.forecast], list(p.last)] for p in self.pending],
            "totals": [list(t) for t in self.totals],
            "ring": self.window.to_json() if self.window is not None else None,
            "matured": [[m.index, m.step, list(m.values)] for m in self.matured],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Accuracy:
        if not data:
            return cls()
        ring = data.get("ring")
        old = data.get("window")  # a record written before the ring
        return cls(
            pending=tuple(
                Pending(int(o), tuple(map(tuple, f)), tuple(last)) for o, f, last in data["pending"]
            ),
            totals=tuple(map(tuple, data["totals"])),
            window=Ring.from_json(ring) if ring else Ring.from_lists(old) if old else None,
            matured=tuple(Matured(int(i), int(s), tuple(v)) for i, s, v in data["matured"]),
        )


def advance(
    acc: Accuracy,
    spec: Spec,
    steps_before: int,
    rows: Sequence[Sequence[float]],
    forecast: Sequence[Sequence[float]] | None,
) -> tuple[Accuracy, Scored]:
    """Score the pending forecasts on the new ``rows`` (observations ``steps_before + 1 ..``),
    then keep ``forecast`` (served after the last row) pending."""
    p = spec.pred_len
    totals = [list(t) for t in acc.totals] or [[0.0] * 5 for _ in range(p)]
    ring = (acc.window or Ring.empty(p, spec.window)).resized(p, spec.window)
    data, inserted = ring.data.copy(), list(ring.inserted)
    pending, matured, scored = list(acc.pending), list(acc.matured), Scored()
    for i, row in enumerate(rows):
        s = steps_before + i + 1
        actual = [float(row[j]) for j in spec.targets]
        c = len(actual)
        closest: Matured | None = None
        row_errors = [[math.nan] * c for _ in range(p)]
        for entry in pending:
            h = s - entry.origin  # 1 <= h <= p: entries past their horizon were dropped
            errors = [f - a for f, a in zip(entry.forecast[h - 1], actual, strict=True)]
            naive = [f - a for f, a in zip(entry.last, actual, strict=True)]
            ae, se = sum(abs(e) for e in errors), sum(e * e for e in errors)
            ae_last, se_last = sum(abs(e) for e in naive), sum(e * e for e in naive)
            total = totals[h - 1]
            for k, v in enumerate((c, ae, se, ae_last, se_last)):
                total[k] += v
            data[h - 1, inserted[h - 1] % spec.window] = (ae / c, se / c, ae_last / c, se_last / c)
            inserted[h - 1] += 1
            row_errors[h - 1] = [abs(e) for e in errors]
            scored.errors.extend(abs(e) / sd for e, sd in zip(errors, spec.std, strict=True))
            scored.last_value_errors.extend(abs(e) / sd for e, sd in zip(naive, spec.std, strict=True))
            if closest is None or h < closest.step:
                closest = Matured(s, h, entry.forecast[h - 1])
        scored.abs_errors.append(row_errors)
        if closest is not None:
            matured.append(closest)
        pending = [e for e in pending if e.origin + p > s]
    if forecast is not None and rows:
        last = tuple(float(rows[-1][j]) for j in spec.targets)
        pending.append(Pending(steps_before + len(rows), tuple(tuple(r) for r in forecast), last))
    return (
        Accuracy(
            pending=tuple(pending),
            totals=tuple(tuple(t) for t in totals),
            window=Ring(data, tuple(inserted)),
            matured=tuple(matured[-spec.keep :]) if spec.keep else (),
        ),
        scored,
    )


@dataclass(frozen=True)
class Summary:
    """MAE and MSE of the served and of the last-value forecasts over some scored values."""

    count: int  # values scored (per target column and step)
    mae: float | None
    mse: float | None
    last_value_mae: float | None
    last_value_mse: float | None

    @property
    def skill(self) -> float | None:
        if self.mae is None or not self.last_value_mae:
            return None
        return 1.0 - self.mae / self.last_value_mae


def _summary(count: float, sums: Sequence[float]) -> Summary:
    if not count:
        return Summary(0, None, None, None, None)
    ae, se, ae_last, se_last = (v / count for v in sums)
    return Summary(int(count), ae, se, ae_last, se_last)


def since_creation(acc: Accuracy) -> tuple[Summary, list[Summary]]:
    """The pooled summary over every step, and one per step."""
    per_step = [_summary(t[0], t[1:]) for t in acc.totals]
    n = sum(t[0] for t in acc.totals)
    pooled = [sum(t[k] for t in acc.totals) for k in range(1, 5)]
    return _summary(n, pooled), per_step


def recent(acc: Accuracy, columns: int) -> tuple[Summary, list[Summary]]:
    """The same over the window (``columns`` target values per ring entry)."""
    if acc.window is None:
        return _summary(0, ()), []
    sums = acc.window.data.sum(axis=1) * columns  # [p, 4]: unwritten slots are zeros
    counts = [n * columns for n in acc.window.filled()]
    per_step = [_summary(n, sums[h].tolist()) for h, n in enumerate(counts)]
    return _summary(sum(counts), sums.sum(axis=0).tolist()), per_step


def history_rows(
    model: LoadedModel, record: StreamRecord, values: list[list[float]], acc: Accuracy
) -> list[schemas.HistoryRow]:
    """The latest observations (``values``, from the state) with their timestamps (the record's
    recent window) and the forecast each got, for display."""
    m = min(len(values), len(record.recent))
    first = record.steps - m + 1  # observation number of the first row shown
    made = {entry.index: entry for entry in acc.matured}
    rows = []
    for j, (row, (timestamp, _)) in enumerate(
        zip(values[len(values) - m :], record.recent[len(record.recent) - m :], strict=True)
    ):
        entry = made.get(first + j)
        rows.append(
            schemas.HistoryRow(
                timestamp=timestamp,
                values=dict(zip(model.columns, row, strict=True)),
                forecast=dict(zip(model.targets, entry.values, strict=True)) if entry else None,
                forecast_step=entry.step if entry else None,
            )
        )
    return rows


def report(
    acc: Accuracy, pred_len: int, columns: int
) -> tuple[schemas.AccuracyWindow, schemas.AccuracyWindow]:
    """(since creation, recent window) as response bodies, every step listed."""
    empty = Summary(0, None, None, None, None)

    def body(pooled: Summary, per_step: list[Summary]) -> schemas.AccuracyWindow:
        per_step = per_step or [empty] * pred_len
        return schemas.AccuracyWindow(
            **_fields(pooled),
            steps=[schemas.StepAccuracy(step=h + 1, **_fields(s)) for h, s in enumerate(per_step)],
        )

    return body(*since_creation(acc)), body(*recent(acc, columns))


def _fields(s: Summary) -> dict[str, Any]:
    return {
        "count": s.count,
        "mae": s.mae,
        "mse": s.mse,
        "last_value_mae": s.last_value_mae,
        "last_value_mse": s.last_value_mse,
        "skill": s.skill,
    }
