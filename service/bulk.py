"""``POST /v1/observations``: observations for many streams in one request.

The same rules as one stream's request, per stream: its items are validated and planned by
:func:`service.observations.plan_batch` (applied in time order, duplicates acknowledged, the
stream's items applied all or none), learned from by ``models.online`` and written by
compare-and-set. Streams are independent: one stream's error is reported on its items and
never fails another stream. The request is refused as a whole only when its body is.

Store round trips per request: one read of every stream (:meth:`StateStore.get_many`; for a
stream whose record this process holds, :meth:`StateStore.confirm_many` checks its version
instead, at the same time) and one write of every changed stream
(:meth:`StateStore.write_many`, one compare-and-set per stream); only streams that lost a race
are read and computed again. Model calls: one per (model,
update mode) group (:func:`service.compute.compute_many`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from models.online import UpdateMode
from service import schemas
from service.accuracy import Scored
from service.compute import Step, compute_many
from service.errors import (
    InvalidObservation,
    PayloadTooLarge,
    ServiceError,
    StoreContention,
    StreamNotFound,
    status_for,
)
from service.observations import Plan, canonical, plan_batch
from service.registry import LoadedModel
from service.store import StreamRecord

if TYPE_CHECKING:
    from service.engine import Engine


@dataclass
class _Stream:
    """One stream of a bulk request: its items (request indices) and, once done, its outcome."""

    stream_id: str
    indices: list[int] = field(default_factory=list)
    error: ServiceError | None = None
    record: StreamRecord | None = None  # as stored after this request (or as read)
    plan: Plan | None = None
    mode: str | None = None
    created: bool = False


@dataclass
class _Job:
    """One stream's work in one attempt."""

    stream: _Stream
    current: StreamRecord  # version 0: not stored yet (created by this request)
    model: LoadedModel
    mode: UpdateMode
    plan: Plan
    step: Step | None = None


def item_error(exc: ValidationError, index: int) -> InvalidObservation:
    """A malformed item's 422, naming ``observations.{index}.<field>`` (without pydantic's
    union branch tags)."""
    errors = exc.errors()
    order = ("stream_id", "timestamp", "values")

    def rank(error: Any) -> tuple[int, int]:  # the deepest, then the first field, is the informative one
        loc = error.get("loc", ())
        return len(loc), -(order.index(loc[0]) if loc and loc[0] in order else len(order))

    first = max(errors, key=rank)
    loc = [str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and ("[" in p or "-" in p))]
    if loc and loc[0] != "values":
        loc = loc[:1]  # timestamp: int | datetime reports each branch
    return InvalidObservation(
        str(first.get("msg", "invalid")), field=".".join(["observations", str(index), *loc])
    )


def _instant(item: schemas.BulkItem) -> Any:
    return item.timestamp


def time_order(indices: list[int], items: Sequence[schemas.BulkItem | None]) -> list[int]:
    """The stream's items sorted by timestamp (stable); as given when they do not compare
    (integers mixed with datetimes, or naive with aware: planning names the offender)."""
    try:
        return sorted(indices, key=lambda i: _instant(items[i]))  # type: ignore[arg-type]
    except TypeError:
        return indices


class BulkRequest:
    def __init__(self, engine: Engine, req: schemas.BulkObservations) -> None:
        self.engine, self.req = engine, req
        self.new: tuple[StreamRecord, LoadedModel] | None = None
        self.items: list[schemas.BulkItem | None] = []
        self.item_errors: dict[int, ServiceError] = {}
        self.streams: dict[str, _Stream] = {}

    def parse(self) -> None:
        limit = self.engine.settings.max_batch
        if len(self.req.observations) > limit:
            raise PayloadTooLarge(
                f"{len(self.req.observations)} observations in one request; the limit is {limit}"
            )
        for i, raw in enumerate(self.req.observations):
            try:
                item: schemas.BulkItem | None = schemas.BulkItem.model_validate(raw)
            except ValidationError as exc:
                item = None
                self.item_errors[i] = item_error(exc, i)
            self.items.append(item)
            sid = item.stream_id if item is not None else raw.get("stream_id")
            if isinstance(sid, str) and (item is not None or _valid_id(sid)):
                self.streams.setdefault(sid, _Stream(sid)).indices.append(i)
        for stream in self.streams.values():
            bad = [i for i in stream.indices if i in self.item_errors]
            if bad:  # all or nothing: one malformed item keeps the stream's others out
                stream.error = self.item_errors[bad[0]]

    async def run(self) -> dict[str, Any]:
        self.parse()
        if self.req.create is not None:  # a bad spec is the body's error: refused before anything
            self.new = await self._new_stream_template(self.req.create)
        todo = [s for s in self.streams.values() if s.error is None]
        async with AsyncExitStack() as stack:
            for sid in sorted(s.stream_id for s in todo):  # one order everywhere: no deadlock
                await stack.enter_async_context(self.engine.locks.hold(sid))
            retries, attempt = self.engine.settings.store_retries, 0
            while todo and attempt < retries:
                todo = await self._attempt(todo)
                attempt += 1
                if todo and attempt < retries:
                    self.engine.metrics.retry()
                    await asyncio.sleep(random.uniform(0, min(0.1, 0.002 * 2**attempt)))
            for stream in todo:
                stream.error = StoreContention(
                    f"stream {stream.stream_id!r} is being updated concurrently; try again"
                )
        return self.response()

    async def _read(self, streams: list[_Stream]) -> list[StreamRecord | None]:
        """Each stream's current record: the records this process holds (the store's hints,
        ``service/store/cache.py``) confirmed by version, the others read; two store round
        trips at most, the confirmations moving a few bytes per stream."""
        store = self.engine.store
        hints = [store.hint(s.stream_id) for s in streams]
        held = [hint for hint in hints if hint is not None]
        missing = [s.stream_id for s, hint in zip(streams, hints, strict=True) if hint is None]
        confirmed, fetched = await asyncio.gather(
            store.confirm_many(held) if held else _nothing(),
            store.get_many(missing) if missing else _nothing(),
        )
        confirmed_it, fetched_it = iter(confirmed), iter(fetched)
        return [next(confirmed_it) if hint is not None else next(fetched_it) for hint in hints]

    async def _attempt(self, streams: list[_Stream]) -> list[_Stream]:
        """Read, plan, compute and write ``streams``; return those that lost a race."""
        store = self.engine.store
        jobs: list[_Job] = []
        for stream, record in zip(streams, await self._read(streams), strict=True):
            try:
                job = self._job(stream, record)
            except ServiceError as exc:
                stream.error = exc
                continue
            if job is None:
                assert stream.plan is not None and stream.mode is not None
                self.engine.metrics.applied(stream.mode, 0, len(stream.plan.statuses), None)
            else:
                jobs.append(job)
        await self._compute(jobs)
        writes: list[tuple[_Job, StreamRecord, Scored]] = []
        stepped = [(job, job.step) for job in jobs if job.step is not None]
        nexts = self.engine.next_records([(j.current, j.plan, step, j.model) for j, step in stepped])
        for (job, _), following in zip(stepped, nexts, strict=True):
            if isinstance(following, ServiceError):
                job.stream.error = following
            else:
                writes.append((job, *following))
        outcomes = await store.write_many([(new, job.current.version) for job, new, _ in writes])
        lost: list[_Stream] = []
        scored_by: dict[tuple[str, str], list[Scored]] = {}
        for (job, _, scored), outcome in zip(writes, outcomes, strict=True):
            stream = job.stream
            if outcome is None:
                stream.created = False
                lost.append(stream)
            elif isinstance(outcome, StreamNotFound):
                stream.error = outcome
            else:
                stream.record, stream.plan, stream.mode = outcome, job.plan, job.mode.value
                applied = len(job.plan.rows)
                self.engine.metrics.applied(
                    job.mode.value, applied, len(job.plan.statuses) - applied, len(outcome.state)
                )
                scored_by.setdefault((outcome.model, job.mode.value), []).append(scored)
        for (model, mode), scores in scored_by.items():
            self.engine.metrics.scored(model, mode, *scores)
        return lost

    def _job(self, stream: _Stream, record: StreamRecord | None) -> _Job | None:
        """Plan one stream; ``None`` when nothing is to be written (every item a duplicate)."""
        engine, req = self.engine, self.req
        if record is None:
            if self.new is None:
                raise StreamNotFound(stream.stream_id)
            template, model = self.new
            record = template.replace(stream_id=stream.stream_id)
            stream.created = True
        else:
            model = engine.compatible_model(record)
        mode = UpdateMode(req.mode or record.mode)
        order = time_order(stream.indices, self.items)
        observations = [item for item in (self.items[i] for i in order) if item is not None]
        window = max(engine.settings.dedup_window, engine.settings.max_batch)  # as Engine.plan
        plan = plan_batch(model, observations, record.last_timestamp, record.recent, window, indices=order)
        plan = _reindex(plan, order)
        if not plan.rows:  # every item a duplicate (never so for a new stream)
            stream.record, stream.plan, stream.mode = record, plan, mode.value
            return None
        return _Job(stream, record, model, mode, plan)

    async def _new_stream_template(self, spec: schemas.BulkCreate) -> tuple[StreamRecord, LoadedModel]:
        """A new stream's record (without its id): every new stream of one model and mode
        starts from the same state, computed once."""
        model, freq = self.engine.creation_target(spec, "create.")
        state = await self.engine.fresh_state(model, UpdateMode(spec.mode), spec.combine)
        record = self.engine.new_record("", model, spec.mode, freq, state)
        return record, model

    async def _compute(self, jobs: list[_Job]) -> None:
        """One model call per (model, mode, start mode) group."""
        groups: dict[tuple[str, UpdateMode], list[_Job]] = {}
        for job in jobs:  # every job has rows: a stream with none is not written
            groups.setdefault((job.model.name, job.mode), []).append(job)
        calls = []
        for (_, mode), group in groups.items():
            blobs: list[bytes | None] = [j.current.state for j in group]
            rows = [j.plan.rows for j in group]
            self.engine.metrics.batch_streams.observe(len(group))
            calls.append(
                self.engine.run_model(partial(compute_many, group[0].model, blobs, rows, mode, mode))
            )
        for group, results in zip(groups.values(), await asyncio.gather(*calls), strict=True):
            for job, result in zip(group, results, strict=True):
                if isinstance(result, ServiceError):
                    job.stream.error = result
                else:
                    job.step = result

    def response(self) -> dict[str, Any]:
        """The response body (``schemas.BulkObservationsOut``) as plain JSON-ready dicts.

        Built without pydantic: a response carries one status per item and a forecast per
        stream (pred_len rows with every interval level), and constructing, re-validating
        and serialising those as models cost more per stream than learning from the
        observation did. The endpoint sends these bytes as they are; the tests hold the body
        valid against ``schemas.BulkObservationsOut`` and equal to what it dumps."""
        engine, with_forecast = self.engine, self.req.forecasts == "last"
        out_items: list[dict[str, Any] | None] = [None] * len(self.items)
        out_streams: list[dict[str, Any]] = []
        applied = duplicates = 0
        for stream in self.streams.values():
            if stream.error is not None or stream.record is None or stream.plan is None:
                error = stream.error or StoreContention("not written")
                code = status_for(error)
                for i in stream.indices:
                    own = self.item_errors.get(i)
                    out_items[i] = self._error_item(i, own or error, self.items[i])
                out_streams.append(
                    _stream_out(stream.stream_id, code, False, None, None, None, None, 0, 0, None, error)
                )
                continue
            sid = stream.stream_id
            n = 0
            for i, (ts, status) in zip(stream.indices, stream.plan.statuses, strict=True):
                out_items[i] = {
                    "stream_id": sid,
                    "timestamp": ts,
                    "status": status,
                    "code": 200,
                    "error": None,
                }
                n += status == "applied"
            applied, duplicates = applied + n, duplicates + len(stream.plan.statuses) - n
            record = stream.record
            fields = engine.status_body(record)
            out_streams.append(
                _stream_out(
                    sid,
                    201 if stream.created else 200,
                    stream.created,
                    record.steps,
                    record.last_timestamp,
                    fields["ready"],
                    fields["needs"],
                    n,
                    len(stream.plan.statuses) - n,
                    engine.forecast_body(record) if with_forecast else None,
                    None,
                )
            )
        for i, item in enumerate(out_items):
            if item is None:  # a malformed item without a usable stream id
                out_items[i] = self._error_item(i, self.item_errors[i], None)
        done = [item for item in out_items if item is not None]
        return {
            "applied": applied,
            "duplicates": duplicates,
            "errors": sum(1 for item in done if item["status"] == "error"),
            "observations": done,
            "streams": out_streams,
        }

    def _error_item(self, index: int, error: ServiceError, item: schemas.BulkItem | None) -> dict[str, Any]:
        self.engine.metrics.error(error.type)
        raw = self.req.observations[index]
        sid = item.stream_id if item is not None else raw.get("stream_id")
        ts = _timestamp_out(item.timestamp) if item is not None else None
        return {
            "stream_id": sid if isinstance(sid, str) else None,
            "timestamp": ts,
            "status": "error",
            "code": status_for(error),
            "error": _error_out(error),
        }


def _error_out(error: ServiceError) -> dict[str, Any]:
    """``schemas.ItemError`` as a dict: every field, ``None`` where absent."""
    body = error.body()["error"]
    return {
        "type": body["type"],
        "message": body["message"],
        "field": body.get("field"),
        "details": body.get("details"),
    }


def _stream_out(
    stream_id: str,
    code: int,
    created: bool,
    steps: int | None,
    last_timestamp: Any,
    ready: bool | None,
    needs: int | None,
    applied: int,
    duplicates: int,
    forecast: dict[str, Any] | None,
    error: ServiceError | None,
) -> dict[str, Any]:
    """``schemas.BulkStreamOut`` as a dict, its fields in the schema's order."""
    return {
        "stream_id": stream_id,
        "code": code,
        "created": created,
        "steps": steps,
        "last_timestamp": last_timestamp,
        "ready": ready,
        "needs": needs,
        "applied": applied,
        "duplicates": duplicates,
        "forecast": forecast,
        "error": _error_out(error) if error is not None else None,
    }


def _reindex(plan: Plan, order: list[int]) -> Plan:
    """Statuses in the stream's request order (the plan's are in time order)."""
    position = {i: j for j, i in enumerate(order)}
    ordered = sorted(order)
    statuses = [plan.statuses[position[i]] for i in ordered]
    return Plan(plan.rows, statuses, plan.last_timestamp, plan.last_values_hash, plan.recent)


async def _nothing() -> list[StreamRecord | None]:
    return []


def _timestamp_out(ts: int | datetime) -> int | str:
    return canonical(ts)


def _valid_id(sid: str) -> bool:
    from pydantic import TypeAdapter

    try:
        TypeAdapter(schemas.StreamId).validate_python(sid)
    except ValidationError:
        return False
    return True
