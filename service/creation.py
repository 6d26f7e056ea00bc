"""``POST /v1/streams:batchCreate``: many streams, each with its history, in one request.

Creating a warm stream replays its history through the model, one observation after the other.
One stream per request pays one model call per history row for a single stream; here every
stream of one (model, mode) advances in the same call (:func:`service.compute.compute_many`),
so a thousand streams cost about what a few do, and the store is written once, with one
create-if-absent per stream (:meth:`StateStore.write_many` at expected version 0).

Each specification is checked as ``POST /v1/streams`` checks its body, and fails alone: the
response has one entry per specification, 201 or the code creating it alone would have had
(409 for an id that exists or appears twice, 404 for an unknown model, 422 for a bad field,
naming ``streams.{i}.<field>``). Only a malformed request body fails the whole request.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from pydantic import ValidationError

from models.online import UpdateMode
from service import schemas
from service.compute import Step, compute_many
from service.errors import (
    InvalidObservation,
    NonFiniteState,
    PayloadTooLarge,
    ServiceError,
    StreamExists,
    StreamNotFound,
    status_for,
)
from service.observations import Plan
from service.registry import LoadedModel
from service.store import StreamRecord

if TYPE_CHECKING:
    from service.engine import Engine


@dataclass
class _Spec:
    index: int
    stream_id: str | None = None
    req: schemas.CreateStream | None = None
    model: LoadedModel | None = None
    freq: str | None = None
    plan: Plan | None = None
    step: Step | None = None
    record: StreamRecord | None = None
    error: ServiceError | None = None


def spec_error(exc: ValidationError, index: int) -> InvalidObservation:
    """A malformed specification's 422, naming ``streams.{index}.<field>``."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and ("[" in p or "-" in p))]
    return InvalidObservation(str(first.get("msg", "invalid")), field=".".join(["streams", str(index), *loc]))


async def create_many(engine: Engine, req: schemas.CreateStreams) -> schemas.CreateStreamsOut:
    settings = engine.settings
    if len(req.streams) > settings.max_batch:
        raise PayloadTooLarge(f"{len(req.streams)} streams in one request; the limit is {settings.max_batch}")
    specs = [_check(engine, i, raw) for i, raw in enumerate(req.streams)]
    _refuse_repeated_ids(specs)
    live = [s for s in specs if s.error is None]
    records = await engine.store.get_many([s.stream_id for s in live if s.stream_id is not None])
    for spec, record in zip(live, records, strict=True):
        if record is not None:
            spec.error = StreamExists(spec.stream_id or "")
    await _compute(engine, [s for s in specs if s.error is None])
    writes = [s for s in specs if s.error is None and s.record is not None]
    outcomes = await engine.store.write_many([(s.record, 0) for s in writes if s.record is not None])
    for spec, outcome in zip(writes, outcomes, strict=True):
        if outcome is None or isinstance(outcome, StreamNotFound):  # created meanwhile by another request
            spec.error = StreamExists(spec.stream_id or "")
        else:
            spec.record = outcome
            assert spec.plan is not None and spec.step is not None
            rows = len(spec.plan.rows)
            engine.metrics.applied(outcome.mode, rows, len(spec.plan.statuses) - rows, len(outcome.state))
    return _response(engine, specs)


def _check(engine: Engine, index: int, raw: dict[str, object]) -> _Spec:
    """Validate and plan one specification, as ``Engine.create`` does for one body."""
    spec = _Spec(index)
    try:
        spec.req = req = schemas.CreateStream.model_validate(raw)
    except ValidationError as exc:
        spec.error = spec_error(exc, index)
        given = raw.get("id") if isinstance(raw, dict) else None
        spec.stream_id = given if isinstance(given, str) else None
        return spec
    spec.stream_id = req.id or uuid.uuid4().hex
    prefix = f"streams.{index}."
    try:
        spec.model, spec.freq = engine.creation_target(req, prefix)
        spec.plan = engine.plan_history(spec.model, req.history, prefix)
    except ServiceError as exc:
        spec.error = exc
    return spec


def _refuse_repeated_ids(specs: list[_Spec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.stream_id is None:
            continue
        if spec.stream_id in seen and spec.error is None:
            spec.error = StreamExists(spec.stream_id)
        seen.add(spec.stream_id)


async def _compute(engine: Engine, specs: list[_Spec]) -> None:
    """One model call per (model, mode, combine) for the streams with history; the fresh state for
    those without. Then each stream's first record, as ``Engine.create`` makes it."""
    groups: dict[tuple[str, UpdateMode, bool], list[_Spec]] = {}
    for spec in specs:
        assert spec.req is not None and spec.model is not None and spec.plan is not None
        mode, combine = UpdateMode(spec.req.mode), spec.req.combine
        if spec.plan.rows:
            groups.setdefault((spec.model.name, mode, combine), []).append(spec)
        else:
            spec.step = Step(await engine.fresh_state(spec.model, mode, combine), 0, None)
    calls = []
    for (_, mode, combine), group in groups.items():
        model = group[0].model
        assert model is not None
        rows = [s.plan.rows for s in group if s.plan is not None]
        blobs: list[bytes | None] = [None] * len(group)
        engine.metrics.batch_streams.observe(len(group))
        calls.append(engine.run_model(partial(compute_many, model, blobs, rows, mode, mode, combine)))
    for group, results in zip(groups.values(), await asyncio.gather(*calls), strict=True):
        for spec, result in zip(group, results, strict=True):
            if isinstance(result, NonFiniteState):
                spec.error = NonFiniteState(field=f"streams.{spec.index}.history")
            elif isinstance(result, ServiceError):
                spec.error = result
            else:
                spec.step = result
    for spec in specs:
        if spec.error is None:
            try:
                spec.record = _first_record(engine, spec)
            except ServiceError as exc:
                spec.error = exc


def _first_record(engine: Engine, spec: _Spec) -> StreamRecord:
    assert spec.req is not None and spec.model is not None and spec.plan is not None and spec.step is not None
    record = engine.new_record(
        spec.stream_id or "", spec.model, spec.req.mode, spec.freq, spec.step.state, spec.req.interval_levels
    )
    record, _ = engine.next_record(record, spec.plan, spec.step, spec.model, f"streams.{spec.index}.history")
    return record


def _response(engine: Engine, specs: list[_Spec]) -> schemas.CreateStreamsOut:
    out = []
    for spec in specs:
        if spec.error is not None or spec.record is None:
            error = spec.error or StreamExists(spec.stream_id or "")
            engine.metrics.error(error.type)
            out.append(
                schemas.CreatedStreamOut(
                    index=spec.index,
                    id=spec.stream_id,
                    code=status_for(error),
                    error=schemas.ItemError(**error.body()["error"]),
                )
            )
        else:
            out.append(
                schemas.CreatedStreamOut(
                    index=spec.index, id=spec.stream_id, code=201, stream=engine.summary(spec.record)
                )
            )
    created = sum(1 for s in out if s.code == 201)
    return schemas.CreateStreamsOut(created=created, errors=len(out) - created, streams=out)
