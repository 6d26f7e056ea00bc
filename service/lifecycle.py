"""A stream's state over its life: named snapshots (take, list, read, delete, revert), export
and import, every write of a stream record through the same compare-and-set as observations.

Export format: the stream's own state blob (safetensors, its schema version and the model's
fingerprint in its metadata) with the rest of the record (model, mode, steps, last timestamp,
duplicate window, forecast, accuracy) added as JSON under the metadata key ``memcast.record``.
The tensors are not touched: the header is rewritten, the data bytes are copied. Nothing is
pickled either way. An import is refused with 422 when the blob is not such an export (or its
state does not decode, or its record's accuracy, intervals, forecast or duplicate window do
not fit the model), with 409 when it was made by another model (fingerprint, schema
version or a model not loaded here), and into a stream that has observations; nothing is
written then.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from typing import Any

import numpy as np

from models.intervals import check_levels
from models.online import UpdateMode
from models.state_io import FingerprintMismatchError, StateFormatError, state_from_bytes
from service import schemas
from service.accuracy import Accuracy, report
from service.engine import Engine
from service.errors import Conflict, InvalidObservation, StateIncompatible, StreamNotFound
from service.registry import LoadedModel
from service.store import Snapshot, StreamRecord

ARCHIVE_KEY = "memcast.record"
# the record's fields that travel with its state (identity and times stay with the stream)
CONTENT = (
    "model",
    "fingerprint",
    "mode",
    "schema_version",
    "steps",
    "last_timestamp",
    "last_values_hash",
    "recent",
    "freq",
    "forecast",
    "accuracy",
    "intervals",
)


def content(record: StreamRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in (*CONTENT, "state")}


# -- export / import --------------------------------------------------------------------------------
def export_archive(record: StreamRecord) -> bytes:
    header, data = _split(record.state)
    fields = {k: v for k, v in record.to_fields().items() if k in CONTENT}
    header["__metadata__"] = {**header.get("__metadata__", {}), ARCHIVE_KEY: json.dumps(fields)}
    return _join(header, data)


def read_archive(blob: bytes, stream_id: str) -> StreamRecord:
    """The record an export holds, under ``stream_id``; 422 naming the body when malformed."""
    try:
        header, data = _split(blob)
        meta = dict(header["__metadata__"])
        fields: dict[str, str] = json.loads(meta.pop(ARCHIVE_KEY))
        header["__metadata__"] = meta
        # an export made before a field existed (intervals) reads with its default
        raw = {k.encode(): str(fields[k]).encode() for k in CONTENT if k in fields or k != "intervals"}
        now = json.dumps(_now()).encode()
        raw |= {b"stream_id": json.dumps(stream_id).encode(), b"created_at": now, b"updated_at": now}
        raw |= {b"version": b"0", b"state": _join(header, data)}
        record = StreamRecord.from_fields(raw)
        UpdateMode(record.mode)
    except (KeyError, TypeError, ValueError, struct.error) as exc:  # JSONDecodeError is a ValueError
        raise InvalidObservation(f"not a memcast state export: {exc!r}", field="body") from exc
    if not isinstance(record.steps, int) or record.steps < 0:
        raise InvalidObservation("not a memcast state export: steps", field="body")
    return record


def check_state(model: LoadedModel, record: StreamRecord) -> None:
    """Decode the imported state fully (in a worker thread): fingerprint, schema, count."""
    try:
        state, _ = state_from_bytes(record.state, model.fingerprint)
    except FingerprintMismatchError as exc:
        raise StateIncompatible(str(exc), details={"found": exc.found, "expected": exc.expected}) from exc
    except StateFormatError as exc:
        raise InvalidObservation(f"the exported state does not decode: {exc}", field="body") from exc
    if state.batch_size[0] != 1 or int(state["count"][0]) != record.steps:
        raise InvalidObservation("the exported state does not match its record (steps)", field="body")


def check_content(engine: Engine, model: LoadedModel, record: StreamRecord) -> None:
    """The record's JSON fields, read as serving the stream will read them: accuracy and
    intervals of the model's shape, a forecast of its horizon, a duplicate window of pairs.
    An export edited by hand or by another program is refused here (422 naming the body)
    rather than failing with 500 on the stream's next request."""
    p, c = model.pred_len, len(model.targets)
    try:
        scores = Accuracy.from_json(record.accuracy)
        shapes: list[tuple[Any, tuple[int, ...]]] = []
        if scores.totals is not None:
            shapes.append((scores.totals, (p, 5)))
        if scores.window is not None:
            shapes.append((scores.window.data, (p, scores.window.size, 4)))
            shapes.append((np.array(scores.window.inserted), (p,)))
        if scores.pending is not None:
            k = len(scores.pending)
            shapes += [(scores.pending.forecast, (k, p, c)), (scores.pending.last, (k, c))]
            if k and not bool(
                (
                    (record.steps - scores.pending.origin >= 0) & (record.steps - scores.pending.origin < p)
                ).all()
            ):
                raise ValueError("accuracy.pending: a forecast served more than pred_len steps ago")
        if scores.matured is not None:
            m = len(scores.matured)
            shapes += [(scores.matured.values, (m, c)), (scores.matured.step, (m,))]
        if record.intervals is not None:
            levels = check_levels(record.intervals["levels"])
            if record.intervals.get("ratio") is not None:
                shapes += [
                    (np.array(record.intervals["ratio"], dtype=np.float64), (p, c, len(levels))),
                    (np.array(record.intervals["scale"], dtype=np.float64), (p, c)),
                    (np.array(record.intervals["count"], dtype=np.float64), (p, c)),
                ]
        if record.forecast is not None:
            shapes.append((np.array(record.forecast, dtype=np.float64), (p, c)))
        for array, shape in shapes:
            if array.shape != shape:
                raise ValueError(f"an array of shape {list(array.shape)} where {list(shape)} belongs")
        record.recent.pairs  # noqa: B018  (decodes the duplicate window, or raises)
        report(scores, p, c)
        engine.forecast_body(record)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # binascii.Error is a ValueError
        raise InvalidObservation(
            f"the exported record does not fit model {model.name!r}: {exc}", field="body"
        ) from exc


async def import_stream(engine: Engine, stream_id: str, blob: bytes) -> StreamRecord:
    record = read_archive(blob, stream_id)
    model = engine.compatible_model(record)  # 409: another model's state
    check_content(engine, model, record)
    await engine.run_in_pool(lambda: check_state(model, record))
    try:
        await engine.store.get(stream_id)
    except StreamNotFound:
        return await engine.store.create(record)  # StreamExists (409) if one appeared meanwhile

    async def change(current: StreamRecord) -> tuple[StreamRecord, None]:
        if current.steps:
            raise Conflict(
                f"stream {stream_id!r} has {current.steps} observations; import into a new or reset stream",
                field="stream_id",
            )
        return current.replace(**content(record), updated_at=_now()), None

    stored, _ = await engine.update(stream_id, change)
    assert stored is not None
    return stored


# -- snapshots --------------------------------------------------------------------------------------
async def take_snapshot(engine: Engine, stream_id: str, name: str) -> Snapshot:
    snapshot = Snapshot(name, _now(), await engine.store.get(stream_id))
    await engine.store.put_snapshot(snapshot)
    return snapshot


async def revert(engine: Engine, stream_id: str, name: str) -> StreamRecord:
    snapshot = await engine.store.get_snapshot(stream_id, name)
    engine.compatible_model(snapshot.record)  # 409 when the model changed since

    async def change(current: StreamRecord) -> tuple[StreamRecord, None]:
        return current.replace(**content(snapshot.record), updated_at=_now()), None

    stored, _ = await engine.update(stream_id, change)
    assert stored is not None
    return stored


def snapshot_out(snapshot: Snapshot) -> schemas.SnapshotOut:
    r = snapshot.record
    return schemas.SnapshotOut(
        name=snapshot.name,
        taken_at=snapshot.taken_at,
        model=r.model,
        mode=r.mode,  # type: ignore[arg-type]
        steps=r.steps,
        last_timestamp=r.last_timestamp,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


# -- safetensors framing: u64 header length, JSON header, tensor bytes --------------------------------
def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise ValueError("header longer than the blob")
    header = json.loads(blob[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return header, blob[8 + size :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the tensor data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + data
