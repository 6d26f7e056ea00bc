"""Ordering and idempotency of a stream's observations, and forecast timestamps.

Timestamps are integer steps or datetimes and must increase within a stream; datetimes are
compared as instants, and those with a time zone are kept and returned in UTC (``+02:00`` and
``Z`` forms of one instant are the same timestamp).

Idempotency rule: an observation whose timestamp is not after the last applied one is a
*duplicate* (acknowledged, not learned from again) when an observation with the same instant
and the same values is among the stream's last ``window`` applied ones, and a conflict (409
with the last applied timestamp) otherwise. The engine makes ``window`` at least the largest
batch a request may carry, so re-posting any whole request right after it was applied (a
client retrying a timed-out request) is acknowledged in full. The record stays bounded: it
keeps ``(timestamp, 64-bit values hash)`` pairs for that many observations and no more. An
observation older than the last applied one that was never applied (skipped over by a later
one) is refused from then on.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from service.errors import InvalidObservation, OutOfOrder
from service.freq import FreqError
from service.freq import parse as parse_freq
from service.registry import LoadedModel
from service.schemas import Observation
from service.store import Timestamp
from service.store.recent import RecentWindow

FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Plan:
    """What to do with a batch: the rows to learn from and each observation's status."""

    rows: list[list[float]]  # raw values of the new observations, in the model's column order
    statuses: list[tuple[Timestamp, str]]  # (timestamp, "applied" | "duplicate") per observation
    last_timestamp: Timestamp | None
    last_values_hash: str | None
    recent: RecentWindow


def canonical(timestamp: int | datetime) -> Timestamp:
    """The stored form: integer steps as they are, datetimes in ISO 8601, in UTC when they
    have a time zone, so that equal instants are equal strings."""
    if isinstance(timestamp, int):
        return timestamp
    if timestamp.tzinfo is not None:
        timestamp = timestamp.astimezone(UTC)
    return timestamp.isoformat()


def _stored(timestamp: Timestamp) -> Timestamp:
    """A timestamp read from a record, in canonical form (records written before timestamps
    were normalised to UTC may hold other offsets)."""
    return timestamp if isinstance(timestamp, int) else canonical(datetime.fromisoformat(timestamp))


def values_row(model: LoadedModel, values: list[float] | dict[str, float], field: str) -> list[float]:
    """The raw values in the model's column order; 422 naming the field for unknown, missing
    or surplus columns and for a value the model cannot represent."""
    columns = model.columns
    if isinstance(values, dict):
        unknown = sorted(set(values) - set(columns))
        if unknown:
            raise InvalidObservation(
                f"unknown columns {unknown}; model {model.name!r} reads {list(columns)}",
                field=field,
                details={"unknown": unknown, "columns": list(columns)},
            )
        missing = [c for c in columns if c not in values]
        if missing:
            raise InvalidObservation(f"missing columns {missing}", field=field, details={"missing": missing})
        row = [float(values[c]) for c in columns]
        names = list(columns)
    else:
        if len(values) != len(columns):
            raise InvalidObservation(
                f"{len(values)} values given, model {model.name!r} reads {len(columns)}: {list(columns)}",
                field=field,
            )
        row = [float(v) for v in values]
        names = [str(j) for j in range(len(row))]
    _check_representable(model, row, names, field)
    return row


def _check_representable(model: LoadedModel, row: list[float], names: list[str], field: str) -> None:
    """The model computes in float32 on scaled values: a finite value whose scaled form
    overflows float32 (1e39, 1e308) would turn the stream's state into inf/NaN for good."""
    schema = model.schema
    for value, mean, std, name in zip(row, schema.mean, schema.std, names, strict=True):
        scaled = (value - mean) / std
        if not math.isfinite(scaled) or abs(scaled) > FLOAT32_MAX:
            raise InvalidObservation(
                f"value {value!r} is out of range for model {model.name!r}: scaled by its mean {mean:g} and "
                f"std {std:g} it is beyond float32 ({FLOAT32_MAX:.3g})",
                field=f"{field}.{name}",
            )


def values_hash(row: Sequence[float]) -> str:
    return hashlib.blake2b(struct.pack(f"<{len(row)}d", *row), digest_size=8).hexdigest()


def plan_batch(
    model: LoadedModel,
    observations: Sequence[Observation],
    last_timestamp: Timestamp | None,
    recent: RecentWindow,
    window: int,
    prefix: str = "observations",
    indices: Sequence[int] | None = None,
) -> Plan:
    """Validate a batch in order against the stream's last applied observation (see the
    module docstring for the duplicate rule); ``window`` bounds the remembered observations.
    Errors name ``{prefix}.{n}``, where ``n`` is ``indices[i]`` (an item's place in a bulk
    request) or the observation's own index ``i``."""
    rows: list[list[float]] = []
    statuses: list[tuple[Timestamp, str]] = []
    # The window is only appended to while items are after the last applied one (nearly
    # always): its pairs are read, and put in canonical form (records written before
    # timestamps were normalised to UTC may hold other offsets), only when an item is not.
    added: list[tuple[Timestamp, str]] = []
    seen: set[tuple[Timestamp, str]] | None = None
    latest = recent.last()
    last_hash: str | None = latest[1] if latest else None
    for j, obs in enumerate(observations):
        i = indices[j] if indices is not None else j
        ts = canonical(obs.timestamp)
        row = values_row(model, obs.values, f"{prefix}.{i}.values")
        digest = values_hash(row)
        if last_timestamp is None or _after(ts, last_timestamp, f"{prefix}.{i}.timestamp"):
            rows.append(row)
            statuses.append((ts, "applied"))
            last_timestamp, last_hash = ts, digest
            added.append((ts, digest))
            if seen is not None:
                seen.add((ts, digest))
        elif (ts, digest) in (seen := _remembered(recent, added) if seen is None else seen):
            statuses.append((ts, "duplicate"))
        else:
            same = _stored(ts) == _stored(last_timestamp)
            reason = (
                "has other values than the last applied observation"
                if same
                else f"is older than the last applied observation and not one of the last {window} applied"
            )
            raise OutOfOrder(
                f"observation {i} at {ts} {reason} ({last_timestamp}); timestamps must increase",
                index=i,
                last_timestamp=last_timestamp,
            )
    return Plan(rows, statuses, last_timestamp, last_hash, recent.extended(added, window))


def _remembered(recent: RecentWindow, added: list[tuple[Timestamp, str]]) -> set[tuple[Timestamp, str]]:
    """The pairs a re-post is checked against, in canonical form, as a set."""
    pairs = recent.pairs
    if pairs and not isinstance(pairs[-1][0], int):
        pairs = tuple((_stored(ts), digest) for ts, digest in pairs)
    return {*pairs, *added}


def _after(ts: Timestamp, last: Timestamp, field: str) -> bool:
    if isinstance(ts, int) != isinstance(last, int):
        kind = "integer steps" if isinstance(last, int) else "datetimes"
        raise InvalidObservation(f"this stream's timestamps are {kind}", field=field)
    if isinstance(ts, int):
        return ts > int(last)
    a, b = datetime.fromisoformat(ts), datetime.fromisoformat(str(last))
    if (a.tzinfo is None) != (b.tzinfo is None):
        raise InvalidObservation("mixing timestamps with and without a time zone", field=field)
    return a > b


def check_freq(freq: str | None, horizon: int, field: str = "freq") -> None:
    """Refuse (422 naming ``field``) a frequency that is malformed, not positive, or whose
    ``horizon`` steps could never be dated, before anything is written."""
    if freq is None:
        return
    try:
        parse_freq(freq).check_horizon(horizon)
    except FreqError as exc:
        raise InvalidObservation(str(exc), field=field) from exc


def future_timestamps(last: Timestamp | None, freq: str | None, horizon: int) -> list[Timestamp | None]:
    """``last + k * freq`` for k = 1..horizon where the frequency fits the timestamps (integer
    steps for integer timestamps, units for datetimes), ``None`` each where it does not.

    ``OverflowError`` when a timestamp would be past year 9999: the engine computes these
    before writing, so that it refuses the observation rather than fail after committing it.
    """
    none: list[Timestamp | None] = [None] * horizon
    if last is None or freq is None:
        return none
    try:
        parsed = parse_freq(freq)
    except FreqError:  # a frequency stored before frequencies were checked: no timestamps
        return none
    if isinstance(last, int):
        if parsed.step is None:
            return none
        return [last + k * parsed.step for k in range(1, horizon + 1)]
    if parsed.step is not None:
        return none
    start = datetime.fromisoformat(last)
    return [parsed.after(start, k).isoformat() for k in range(1, horizon + 1)]
