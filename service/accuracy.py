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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

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


def _b64(values: np.ndarray) -> str:
    return binascii.b2a_base64(np.ascontiguousarray(values, dtype="<f8").tobytes(), newline=False).decode()


def _floats(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only float64 array of ``shape`` from :func:`_b64`'s text."""
    return np.frombuffer(binascii.a2b_base64(text), dtype="<f8").reshape(shape)


@dataclass(frozen=True, eq=False)
class Pending:
    """The served forecasts whose horizon has not fully matured, oldest first (``k <= p``)."""

    origin: np.ndarray  # [k] int64: observations seen when each forecast was served
    forecast: np.ndarray  # [k, p, c]
    last: np.ndarray  # [k, c] the last-value forecast at each origin

    def __len__(self) -> int:
        return len(self.origin)

    @classmethod
    def empty(cls, p: int, c: int) -> Pending:
        return cls(np.zeros(0, dtype=np.int64), np.zeros((0, p, c)), np.zeros((0, c)))

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin.tolist(),
            "shape": list(self.forecast.shape[1:]),
            "f8": _b64(self.forecast),
            "last": _b64(self.last),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | list[Any]) -> Pending:
        if isinstance(data, list):  # a record written before the arrays: [origin, [p][c], [c]] each
            p, c = (len(data[0][1]), len(data[0][2])) if data else (0, 0)
            return cls(
                np.array([int(o) for o, _, _ in data], dtype=np.int64),
                np.array([f for _, f, _ in data], dtype=np.float64).reshape(len(data), p, c),
                np.array([last for _, _, last in data], dtype=np.float64).reshape(len(data), c),
            )
        origin = np.array(data["origin"], dtype=np.int64)
        p, c = data["shape"]
        return cls(origin, _floats(data["f8"], (len(origin), p, c)), _floats(data["last"], (len(origin), c)))


@dataclass(frozen=True)
class Matured:
    """The latest served forecast of one observed value (the one made closest to it)."""

    index: int  # the observation's number, 1-based
    step: int  # made this many steps ahead
    values: Row  # [c]


@dataclass(frozen=True, eq=False)
class MaturedRows:
    """:class:`Matured` entries of the latest observed values, oldest first, as arrays."""

    index: np.ndarray  # [m] int64
    step: np.ndarray  # [m] int64
    values: np.ndarray  # [m, c]

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[Matured]:
        for i, h, v in zip(self.index.tolist(), self.step.tolist(), self.values.tolist(), strict=True):
            yield Matured(i, h, tuple(v))

    @classmethod
    def empty(cls, c: int) -> MaturedRows:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, c)))

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index.tolist(),
            "step": self.step.tolist(),
            "c": self.values.shape[1],
            "f8": _b64(self.values),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | list[Any]) -> MaturedRows:
        if isinstance(data, list):  # a record written before the arrays: [index, step, [c]] each
            c = len(data[0][2]) if data else 0
            return cls(
                np.array([int(i) for i, _, _ in data], dtype=np.int64),
                np.array([int(h) for _, h, _ in data], dtype=np.int64),
                np.array([v for _, _, v in data], dtype=np.float64).reshape(len(data), c),
            )
        index = np.array(data["index"], dtype=np.int64)
        return cls(
            index, np.array(data["step"], dtype=np.int64), _floats(data["f8"], (len(index), data["c"]))
        )


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


class _Json(dict[str, Any]):
    """:meth:`Accuracy.to_json`'s dict, holding the scores it was made from: a record kept in
    process (the embedded store's, the Redis store's hints) is scored again without decoding
    its base64 arrays. Plain JSON to everything else (a ``dict``, equal to one)."""

    __slots__ = ("decoded",)

    def __init__(self, data: dict[str, Any], decoded: Accuracy) -> None:
        super().__init__(data)
        self.decoded = decoded


# totals[step]: [values scored, sum |e|, sum e^2, sum |e_last|, sum e_last^2]
@dataclass(frozen=True, eq=False)
class Accuracy:
    """A stream's scoring state. Arrays, and base64 floats in the record's JSON: a steady-state
    record holds ``p`` pending forecasts, ``seq_len + pred_len`` matured values and the ring,
    and as JSON lists they were decoded into thousands of Python objects on every write, which
    also made the cyclic collector the largest single cost of a bulk request."""

    pending: Pending | None = None  # None: nothing served yet
    totals: np.ndarray | None = None  # [p, 5]
    window: Ring | None = None
    matured: MaturedRows | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "pending": self.pending.to_json() if self.pending is not None else [],
            "totals": self.totals.tolist() if self.totals is not None else [],
            "ring": self.window.to_json() if self.window is not None else None,
            "matured": self.matured.to_json() if self.matured is not None else [],
        }
        return _Json(data, self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Accuracy):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # arrays: not hashable

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Accuracy:
        if isinstance(data, _Json):
            return data.decoded
        if not data:
            return cls()
        ring = data.get("ring")
        old = data.get("window")  # a record written before the ring
        totals = data["totals"]
        return cls(
            pending=Pending.from_json(data["pending"]) if data["pending"] else None,
            totals=np.array(totals, dtype=np.float64).reshape(-1, 5) if totals else None,
            window=Ring.from_json(ring) if ring else Ring.from_lists(old) if old else None,
            matured=MaturedRows.from_json(data["matured"]) if data["matured"] else None,
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
    p, c = spec.pred_len, len(spec.targets)
    totals = acc.totals.copy() if acc.totals is not None else np.zeros((p, 5))
    ring = (acc.window or Ring.empty(p, spec.window)).resized(p, spec.window)
    data, inserted = ring.data.copy(), np.array(ring.inserted, dtype=np.int64)
    pending = acc.pending if acc.pending is not None else Pending.empty(p, c)
    matured = acc.matured if acc.matured is not None else MaturedRows.empty(c)
    new_index: list[int] = []
    new_step: list[int] = []
    new_values: list[np.ndarray] = []
    scored = Scored()
    std = np.array(spec.std, dtype=np.float64)
    targets = np.array(spec.targets, dtype=np.int64)
    observed = np.array(rows, dtype=np.float64).reshape(len(rows), -1)[:, targets] if rows else None  # [n, c]
    for i in range(len(rows)):
        s = steps_before + i + 1
        assert observed is not None
        actual = observed[i]  # [c]
        row_errors = np.full((p, c), math.nan)
        k = len(pending)
        if k:
            step = s - pending.origin - 1  # [k] horizon index, distinct (past horizons were dropped)
            made = pending.forecast[np.arange(k), step]  # [k, c]
            errors, naive = made - actual, pending.last - actual  # [k, c]
            abs_errors, abs_naive = np.abs(errors), np.abs(naive)
            sums = np.empty((k, 5))
            sums[:, 0] = c
            sums[:, 1] = abs_errors.sum(1)
            sums[:, 2] = (errors**2).sum(1)
            sums[:, 3] = abs_naive.sum(1)
            sums[:, 4] = (naive**2).sum(1)
            totals[step] += sums
            data[step, inserted[step] % spec.window] = sums[:, 1:] / c
            inserted[step] += 1
            row_errors[step] = abs_errors
            scored.errors.extend((abs_errors / std).ravel().tolist())
            scored.last_value_errors.extend((abs_naive / std).ravel().tolist())
            closest = int(np.argmin(step))
            new_index.append(s)
            new_step.append(int(step[closest]) + 1)
            new_values.append(made[closest])
            live = pending.origin + p > s
            if not live.all():
                pending = Pending(pending.origin[live], pending.forecast[live], pending.last[live])
        scored.abs_errors.append(row_errors.tolist())
    if forecast is not None and observed is not None:
        pending = Pending(
            np.append(pending.origin, steps_before + len(rows)),
            np.concatenate([pending.forecast, np.array(forecast, dtype=np.float64).reshape(1, p, c)]),
            np.concatenate([pending.last, observed[-1:]]),
        )
    keep = spec.keep
    if new_index and keep:
        matured = MaturedRows(
            np.append(matured.index, new_index)[-keep:],
            np.append(matured.step, new_step)[-keep:],
            np.concatenate([matured.values, np.stack(new_values)])[-keep:],
        )
    elif keep:
        matured = MaturedRows(matured.index[-keep:], matured.step[-keep:], matured.values[-keep:])
    else:
        matured = MaturedRows.empty(c)
    return (
        Accuracy(
            pending=pending if len(pending) else None,
            totals=totals,
            window=Ring(data, tuple(inserted.tolist())),
            matured=matured if len(matured) else None,
        ),
        scored,
    )


def advance_many(
    accs: Sequence[Accuracy],
    spec: Spec,
    steps_before: Sequence[int],
    rows: Sequence[Sequence[Sequence[float]]],
    forecasts: Sequence[Sequence[Sequence[float]] | None],
) -> list[tuple[Accuracy, Scored]]:
    """:func:`advance` for several streams of one spec (a bulk request's), equal to calling it
    for each (``tests/service/test_accuracy.py``).

    Why: scoring is a few dozen array operations on arrays of a few dozen values, so one call
    per stream cost more than everything else a stream's observation needs on the event loop
    but the response. The common case (one new row and a forecast to keep, a full window of
    the spec's size, as many pending forecasts and matured values as the other streams: every
    stream in steady state) is scored for all such streams in one set of operations; the rest
    one by one."""
    out: list[tuple[Accuracy, Scored] | None] = [None] * len(accs)
    groups: dict[tuple[int, int], list[tuple[int, _Steady]]] = {}
    for i, acc in enumerate(accs):
        steady = _steady(acc, spec, rows[i], forecasts[i])
        if steady is None:
            out[i] = advance(acc, spec, steps_before[i], rows[i], forecasts[i])
        else:
            groups.setdefault((len(steady.pending), len(steady.matured)), []).append((i, steady))
    for group in groups.values():
        if len(group) == 1:  # (a batch of one costs more than the call it replaces)
            i = group[0][0]
            out[i] = advance(accs[i], spec, steps_before[i], rows[i], forecasts[i])
            continue
        members = [i for i, _ in group]
        batch = _advance_batch(
            [steady for _, steady in group],
            spec,
            [steps_before[i] for i in members],
            [rows[i][0] for i in members],
            [forecasts[i] for i in members],
        )
        for i, result in zip(members, batch, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]


class _Steady(NamedTuple):
    """The parts of a stream's :class:`Accuracy` in steady state (every one present)."""

    pending: Pending
    matured: MaturedRows
    totals: np.ndarray
    window: Ring


def _steady(
    acc: Accuracy, spec: Spec, rows: Sequence[Sequence[float]], forecast: Sequence[Sequence[float]] | None
) -> _Steady | None:
    """``acc``'s parts when this observation is scored in a batch (one new row, a forecast to
    keep, every part present and the window of the spec's size); None otherwise."""
    if (
        len(rows) != 1
        or forecast is None
        or spec.keep <= 0
        or acc.pending is None
        or acc.matured is None
        or acc.totals is None
        or acc.window is None
        or acc.window.data.shape[:2] != (spec.pred_len, spec.window)
    ):
        return None
    return _Steady(acc.pending, acc.matured, acc.totals, acc.window)


def _advance_batch(
    parts: Sequence[_Steady],
    spec: Spec,
    steps_before: Sequence[int],
    rows: Sequence[Sequence[float]],
    forecasts: Sequence[Sequence[Sequence[float]] | None],
) -> list[tuple[Accuracy, Scored]]:
    """:func:`advance`'s loop body for streams in steady state at once (axis ``b``), each with
    its one new row, ``k`` pending forecasts and ``m`` matured values (see :func:`advance_many`)."""
    p, c, size = spec.pred_len, len(spec.targets), spec.window
    origin = np.stack([part.pending.origin for part in parts])  # [b, k]
    made_all = np.stack([part.pending.forecast for part in parts])  # [b, k, p, c]
    last = np.stack([part.pending.last for part in parts])  # [b, k, c]
    totals = np.stack([part.totals for part in parts])  # [b, p, 5]
    data = np.stack([part.window.data for part in parts])  # [b, p, size, 4]
    inserted = np.array([part.window.inserted for part in parts], dtype=np.int64)  # [b, p]
    observed = np.array(rows, dtype=np.float64)[:, np.array(spec.targets, dtype=np.int64)]  # [b, c]
    s = np.array(steps_before, dtype=np.int64) + 1  # [b]
    b, k = origin.shape
    streams = np.arange(b)[:, None]
    step = s[:, None] - origin - 1  # [b, k]
    made = made_all[streams, np.arange(k)[None, :], step]  # [b, k, c]
    errors, naive = made - observed[:, None], last - observed[:, None]
    abs_errors, abs_naive = np.abs(errors), np.abs(naive)
    sums = np.empty((b, k, 5))
    sums[..., 0] = c
    sums[..., 1] = abs_errors.sum(2)
    sums[..., 2] = (errors**2).sum(2)
    sums[..., 3] = abs_naive.sum(2)
    sums[..., 4] = (naive**2).sum(2)
    totals[streams, step] += sums  # a stream's steps are distinct
    data[streams, step, inserted[streams, step] % size] = sums[..., 1:] / c
    inserted[streams, step] += 1
    row_errors = np.full((b, p, c), math.nan)
    row_errors[streams, step] = abs_errors
    std = np.array(spec.std, dtype=np.float64)
    scaled, scaled_naive = (
        (abs_errors / std).reshape(b, -1).tolist(),
        (abs_naive / std).reshape(b, -1).tolist(),
    )
    closest = np.argmin(step, axis=1)  # [b]
    new_step = step[np.arange(b), closest] + 1
    new_values = made[np.arange(b), closest]  # [b, c]
    live = origin + p > s[:, None]  # [b, k]
    forecast = np.array(forecasts, dtype=np.float64).reshape(b, 1, p, c)
    keep = spec.keep
    out = []
    for j in range(b):
        alive = live[j]
        acc = Accuracy(
            pending=Pending(
                np.append(origin[j][alive], s[j]),
                np.concatenate([made_all[j][alive], forecast[j]]),
                np.concatenate([last[j][alive], observed[j : j + 1]]),
            ),
            totals=totals[j].copy(),
            window=Ring(data[j].copy(), tuple(inserted[j].tolist())),
            matured=MaturedRows(
                np.append(parts[j].matured.index, s[j])[-keep:],
                np.append(parts[j].matured.step, new_step[j])[-keep:],
                np.concatenate([parts[j].matured.values, new_values[j : j + 1]])[-keep:],
            ),
        )
        out.append((acc, Scored(scaled[j], scaled_naive[j], [row_errors[j].tolist()])))
    return out


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
    if acc.totals is None:
        return _summary(0, ()), []
    totals = acc.totals.tolist()
    per_step = [_summary(t[0], t[1:]) for t in totals]
    return _summary(sum(t[0] for t in totals), acc.totals[:, 1:].sum(axis=0).tolist()), per_step


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
    made = {entry.index: entry for entry in acc.matured or ()}
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
