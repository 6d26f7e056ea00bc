"""The per-request work: read a stream's record, validate and order its observations, run
``models.online`` off the event loop, and write the next record by compare-and-set.

One request for a stream = one read, one computation, one write (or no write at all on any
error or when every observation is a duplicate), so nothing partial is ever stored. Requests
for the same stream are serialised by the store's compare-and-set, and within a process by a
per-stream lock that saves them from losing races to each other; different streams proceed
concurrently in the model thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from models.combination import EXPERTS
from models.online import UpdateMode
from models.state_io import STATE_SCHEMA_VERSION
from service import intervals, schemas
from service.accuracy import Accuracy, Scored, Spec, advance_many, history_rows, report
from service.batching import Batcher
from service.compute import Step, combination_weights, compute, recent_values
from service.errors import (
    InvalidObservation,
    NonFiniteState,
    OutOfOrder,
    PayloadTooLarge,
    ServiceError,
    StateIncompatible,
    StreamExists,
    StreamNotFound,
)
from service.metrics import Metrics
from service.observations import Plan, check_freq, future_timestamps, plan_batch
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings
from service.store import StateStore, StreamRecord, Timestamp, update_stream
from service.store.base import Change
from service.store.recent import RecentWindow

T = TypeVar("T")

log = logging.getLogger(__name__)


class StreamLocks:
    """One asyncio lock per stream id in use, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Engine:
    def __init__(
        self, registry: ModelRegistry, store: StateStore, settings: Settings, metrics: Metrics
    ) -> None:
        self.registry, self.store, self.settings, self.metrics = registry, store, settings, metrics
        self._pool = ThreadPoolExecutor(settings.workers_threads, thread_name_prefix="memcast-model")
        self._batcher = Batcher(self._pool, settings.batch_slots, settings.batch_streams, metrics)
        self._locks = StreamLocks()

        self._fresh: dict[tuple[str, str, UpdateMode, bool], bytes] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def locks(self) -> StreamLocks:
        return self._locks

    async def run_model(self, fn: Callable[[], T]) -> T:
        """Run model computation in the model thread pool."""
        return await self._batcher.in_pool(fn)

    async def fresh_state(self, model: LoadedModel, mode: UpdateMode, combine: bool = True) -> bytes:
        """The state of a stream that has seen nothing (the same for every such stream)."""
        key = (model.name, model.fingerprint, mode, combine)
        if key not in self._fresh:
            step = await self.run_model(lambda: compute(model, None, [], mode, combine=combine))
            self._fresh[key] = step.state
        return self._fresh[key]

    async def observe_bulk(self, req: schemas.BulkObservations) -> dict[str, Any]:
        """Observations for many streams in one request (see :mod:`service.bulk`); the
        response body (``schemas.BulkObservationsOut``) as JSON-ready dicts."""
        from service.bulk import BulkRequest

        return await BulkRequest(self, req).run()

    # -- streams ----------------------------------------------------------------------------
    async def create(self, req: schemas.CreateStream) -> StreamRecord:
        model, freq = self.creation_target(req)
        stream_id = req.id or uuid.uuid4().hex
        await self._refuse_existing(stream_id)
        plan = self.plan_history(model, req.history)
        mode = UpdateMode(req.mode)
        try:
            step = await self._batcher.in_pool(
                lambda: compute(model, None, plan.rows, mode, combine=req.combine)
            )
        except NonFiniteState as exc:
            raise NonFiniteState(field="history") from exc
        record = self.new_record(stream_id, model, mode.value, freq, step.state, req.interval_levels)
        # a creation serves one forecast and scores none
        record, _ = self.next_record(record, plan, step, model, "history")
        stored = await self.store.create(record)
        self.metrics.applied(mode.value, len(plan.rows), len(plan.statuses) - len(plan.rows), len(step.state))
        return stored

    # what creating a stream checks and writes, shared by POST /v1/streams, batch creation
    # (service.creation) and bulk observations that create streams (service.bulk); ``prefix``
    # names where the specification sits in the request body ("": the body itself)
    def creation_target(
        self, req: schemas.CreateStream | schemas.BulkCreate, prefix: str = ""
    ) -> tuple[LoadedModel, str | None]:
        """The model and frequency a new stream gets; 404 for an unknown model, 422 for a
        frequency its forecasts cannot be dated with, 413 for too long a history."""
        model = self.registry.get(req.model)
        freq = req.freq if req.freq is not None else _usable_freq(model.schema.freq, model.pred_len)
        check_freq(freq, model.pred_len, field=f"{prefix}freq")
        history = getattr(req, "history", [])
        if len(history) > self.settings.max_history:
            raise PayloadTooLarge(
                f"{prefix}history has {len(history)} rows; the limit is {self.settings.max_history}"
            )
        return model, freq

    def plan_history(
        self, model: LoadedModel, history: Sequence[schemas.Observation], prefix: str = ""
    ) -> Plan:
        """A new stream's history planned; a row not after the one before it is the request's
        own error (422 naming the row), not a conflict with a stream that does not exist yet."""
        try:
            return self.plan(model, history, None, RecentWindow(), prefix=f"{prefix}history")
        except OutOfOrder as exc:
            index = exc.details["index"]
            raise InvalidObservation(
                f"history row {index} is not after the row before it",
                field=f"{prefix}history.{index}.timestamp",
            ) from exc

    @staticmethod
    def new_record(
        stream_id: str,
        model: LoadedModel,
        mode: str,
        freq: str | None,
        state: bytes,
        interval_levels: Sequence[float] | None = None,
    ) -> StreamRecord:
        """A stream's record before anything is applied (``interval_levels`` None: the
        defaults, stored as no intervals yet)."""
        now = _now()
        return StreamRecord(
            stream_id=stream_id,
            state=state,
            model=model.name,
            fingerprint=model.fingerprint,
            mode=mode,
            schema_version=STATE_SCHEMA_VERSION,
            freq=freq,
            created_at=now,
            updated_at=now,
            intervals=intervals.initial(interval_levels) if interval_levels is not None else None,
        )

    async def _refuse_existing(self, stream_id: str) -> None:
        try:
            await self.store.get(stream_id)
        except StreamNotFound:
            return
        raise StreamExists(stream_id)

    async def get(self, stream_id: str) -> StreamRecord:
        return await self.store.get(stream_id)

    async def delete(self, stream_id: str) -> None:
        async with self._locks.hold(stream_id):
            await self.store.delete(stream_id)

    async def reset(self, stream_id: str, req: schemas.ResetStream) -> StreamRecord:
        async def change(current: StreamRecord) -> tuple[StreamRecord, None]:
            model = self.registry.get(req.model if req.model is not None else current.model)
            if current.freq is not None and _usable_freq(current.freq, 1) is not None:
                check_freq(current.freq, model.pred_len, field="model")
            mode = UpdateMode(req.mode or current.mode)
            combine = req.combine if req.combine is not None else _combines(current)
            step = await self._batcher.in_pool(lambda: compute(model, None, [], mode, combine=combine))
            return current.replace(
                state=step.state,
                model=model.name,
                fingerprint=model.fingerprint,
                mode=mode.value,
                schema_version=STATE_SCHEMA_VERSION,
                steps=0,
                last_timestamp=None,
                last_values_hash=None,
                recent=RecentWindow(),
                forecast=None,
                accuracy=None,
                intervals=intervals.cleared(current.intervals),
                updated_at=_now(),
            ), None

        async with self._locks.hold(stream_id):
            record, _ = await update_stream(
                self.store, stream_id, change, attempts=self.settings.store_retries, stats=self.metrics
            )
        assert record is not None
        return record

    # -- observations -------------------------------------------------------------------------
    async def observe(self, stream_id: str, batch: schemas.ObservationBatch) -> dict[str, Any]:
        """Apply one stream's observations; the response body (``schemas.ObservationsOut``) as
        JSON-ready dicts, built without pydantic as the bulk body is: returned as models,
        FastAPI validated and dumped them all again on every response."""
        items = batch.items()
        if len(items) > self.settings.max_batch:
            raise PayloadTooLarge(
                f"{len(items)} observations in one request; the limit is {self.settings.max_batch}"
            )

        Outcome = tuple[Plan, str, Scored]

        async def change(current: StreamRecord) -> tuple[StreamRecord | None, Outcome]:
            model = self.compatible_model(current)
            mode = UpdateMode(batch.mode or current.mode)
            plan = self.plan(model, items, current.last_timestamp, current.recent)
            if not plan.rows:
                return None, (plan, mode.value, Scored())
            step = await self._batcher.observe(model, current.state, plan.rows, mode)
            record, scored = self.next_record(current, plan, step, model)
            return record, (plan, mode.value, scored)

        async with self._locks.hold(stream_id):
            record, (plan, mode, scored) = await update_stream(
                self.store, stream_id, change, attempts=self.settings.store_retries, stats=self.metrics
            )
        assert record is not None
        applied = len(plan.rows)
        nbytes = len(record.state) if applied else None
        self.metrics.applied(mode, applied, len(plan.statuses) - applied, nbytes)
        self.metrics.scored(record.model, mode, scored)
        return {
            **self.status_body(record, mode),
            "applied": applied,
            "duplicates": len(plan.statuses) - applied,
            "observations": [{"timestamp": ts, "status": s} for ts, s in plan.statuses],
            "forecast": self.forecast_body(record),
        }

    async def forecast(self, stream_id: str) -> schemas.ForecastOut:
        record = await self.store.get(stream_id)
        self.compatible_model(record)
        return schemas.ForecastOut(**self.status(record).model_dump(), forecast=self.forecast_of(record))

    async def accuracy(self, stream_id: str) -> schemas.AccuracyOut:
        record = await self.store.get(stream_id)
        model = self.compatible_model(record)
        scores = Accuracy.from_json(record.accuracy)
        since, recent = report(scores, model.pred_len, len(model.targets))
        return schemas.AccuracyOut(
            **self.status(record).model_dump(),
            columns=list(model.targets),
            window=self.settings.accuracy_window,
            pending=len(scores.pending or ()),
            since_creation=since,
            recent=recent,
        )

    async def list_ids(self, cursor: str | None, limit: int) -> schemas.StreamsPage:
        ids, next_cursor = await self.store.list_ids(cursor, limit)
        return schemas.StreamsPage(streams=ids, next_cursor=next_cursor)

    async def history(self, stream_id: str) -> schemas.HistoryOut:
        record = await self.store.get(stream_id)
        model = self.compatible_model(record)
        values = await self._batcher.in_pool(lambda: recent_values(model, record.state))
        rows = history_rows(model, record, values, Accuracy.from_json(record.accuracy))
        return schemas.HistoryOut(
            **self.status(record).model_dump(),
            columns=list(model.columns),
            targets=list(model.targets),
            rows=rows,
        )

    async def update(self, stream_id: str, change: Change[T]) -> tuple[StreamRecord | None, T]:
        """Read-modify-write one stream by compare-and-set (state lifecycle writes use it too)."""
        async with self._locks.hold(stream_id):
            return await update_stream(
                self.store, stream_id, change, attempts=self.settings.store_retries, stats=self.metrics
            )

    async def run_in_pool(self, fn: Callable[[], T]) -> T:
        return await self._batcher.in_pool(fn)

    # -- helpers -------------------------------------------------------------------------------
    def compatible_model(self, record: StreamRecord) -> LoadedModel:
        if record.model not in self.registry.models:
            raise StateIncompatible(f"stream's model {record.model!r} is no longer loaded")
        model = self.registry.models[record.model]
        if record.fingerprint != model.fingerprint:
            raise StateIncompatible(
                f"stream state was made by model {record.model!r} with fingerprint {record.fingerprint[:12]}, "
                f"the loaded one is {model.fingerprint[:12]}",
                details={"found": record.fingerprint, "expected": model.fingerprint},
            )
        if record.schema_version != STATE_SCHEMA_VERSION:
            raise StateIncompatible(
                f"state schema {record.schema_version}, this service reads {STATE_SCHEMA_VERSION}"
            )
        return model

    def plan(
        self,
        model: LoadedModel,
        items: Sequence[schemas.Observation],
        last: Timestamp | None,
        recent: RecentWindow,
        prefix: str = "observations",
    ) -> Plan:
        """Which of ``items`` are new (in time order) and which are duplicates; every path
        that applies observations (one stream, bulk, creation) plans with this."""
        # at least one request's worth, so a whole request re-posted is a duplicate in full
        window = max(self.settings.dedup_window, self.settings.max_batch)
        return plan_batch(model, items, last, recent, window, prefix)

    def next_record(
        self, record: StreamRecord, plan: Plan, step: Step, model: LoadedModel, prefix: str = "observations"
    ) -> tuple[StreamRecord, Scored]:
        """The next record after ``step`` (state, accuracy, intervals, duplicate window) and the
        errors it scored, for every path that applies observations; first checks that its
        forecast can be dated, so that serving it can never fail once it is written."""
        (outcome,) = self.next_records([(record, plan, step, model)], prefix)
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    def next_records(
        self, work: Sequence[tuple[StreamRecord, Plan, Step, LoadedModel]], prefix: str = "observations"
    ) -> list[tuple[StreamRecord, Scored] | ServiceError]:
        """:meth:`next_record` for several streams (a bulk request's), each outcome its own:
        the record and its scored errors, or the stream's error. Accuracy is scored and the
        interval radii are learned for all streams of a model at once
        (:func:`service.accuracy.advance_many`, :func:`service.intervals.learn_many`, each equal
        to doing it stream by stream)."""
        outcomes: list[tuple[StreamRecord, Scored] | ServiceError | None] = [None] * len(work)
        by_model: dict[str, list[int]] = {}
        for k, (record, plan, step, model) in enumerate(work):
            try:
                self._check_dating(record, plan, step, prefix)
            except InvalidObservation as exc:
                outcomes[k] = exc
                continue
            by_model.setdefault(model.name, []).append(k)
        for members in by_model.values():
            model = work[members[0]][3]
            scores_of = advance_many(
                [Accuracy.from_json(work[k][0].accuracy) for k in members],
                self.accuracy_spec(model),
                [work[k][0].steps for k in members],
                [work[k][1].rows for k in members],
                [work[k][2].forecast for k in members],
            )
            entries = [(k, scores, scored) for k, (scores, scored) in zip(members, scores_of, strict=True)]
            learned = intervals.learn_many(
                [work[k][0].intervals for k, _, _ in entries],
                model.pred_len,
                len(model.targets),
                [scored.abs_errors for _, _, scored in entries],
            )
            for (k, scores, scored), radii in zip(entries, learned, strict=True):
                record, plan, step, _ = work[k]
                outcomes[k] = (
                    record.replace(
                        state=step.state,
                        steps=step.steps,
                        last_timestamp=plan.last_timestamp,
                        last_values_hash=plan.last_values_hash,
                        recent=plan.recent,
                        forecast=step.forecast,
                        accuracy=scores.to_json(),
                        intervals=radii,
                        updated_at=_now(),
                    ),
                    scored,
                )
        return outcomes  # type: ignore[return-value]

    @staticmethod
    def _check_dating(record: StreamRecord, plan: Plan, step: Step, prefix: str) -> None:
        """``InvalidObservation`` when the forecast after ``plan`` would be dated past 9999."""
        if step.forecast is None:
            return
        try:
            future_timestamps(plan.last_timestamp, record.freq, len(step.forecast))
        except OverflowError as exc:
            applied = [i for i, (_, status) in enumerate(plan.statuses) if status == "applied"]
            index = applied[-1] if applied else len(plan.statuses) - 1
            raise InvalidObservation(
                f"the forecast after {plan.last_timestamp} at freq {record.freq!r} would be dated past "
                "year 9999",
                field=f"{prefix}.{index}.timestamp",
            ) from exc

    def accuracy_spec(self, model: LoadedModel) -> Spec:
        targets = tuple(model.columns.index(t) for t in model.targets)
        std = tuple(model.schema.std[j] for j in targets)
        window = self.settings.accuracy_window
        return Spec(targets, std, model.pred_len, window, keep=model.seq_len + model.pred_len)

    def seq_len(self, record: StreamRecord) -> int | None:
        model = self.registry.models.get(record.model)
        return model.seq_len if model is not None else None

    def status(self, record: StreamRecord, mode: str | None = None) -> schemas.StreamStatus:
        return schemas.StreamStatus(**self.status_body(record, mode))

    def status_body(self, record: StreamRecord, mode: str | None = None) -> dict[str, Any]:
        """:meth:`status` as the JSON-ready dict ``schemas.StreamStatus`` dumps to."""
        seq_len = self.seq_len(record)
        needs = max(0, seq_len - record.steps) if seq_len is not None else 0
        return {
            "stream_id": record.stream_id,
            "model": record.model,
            "mode": mode or record.mode,
            "steps": record.steps,
            "last_timestamp": record.last_timestamp,
            "ready": seq_len is not None and needs == 0,
            "needs": needs,
        }

    def summary(self, record: StreamRecord) -> schemas.StreamOut:
        model = self.registry.models.get(record.model)
        weights = combination_weights(record.state)  # [pred_len][expert]
        return schemas.StreamOut(
            **self.status(record).model_dump(),
            combine=weights is not None,
            combination=_combination(weights) if weights is not None else None,
            freq=record.freq,
            state_bytes=len(record.state),
            version=record.version,
            fingerprint=record.fingerprint,
            compatible=model is not None and model.fingerprint == record.fingerprint,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    def forecast_of(self, record: StreamRecord) -> schemas.Forecast | None:
        parts = self._forecast_parts(record)
        if parts is None:
            return None
        targets, forecast, stamps = parts
        return intervals.forecast(targets, forecast, stamps, record.intervals)

    def forecast_body(self, record: StreamRecord) -> dict[str, Any] | None:
        """:meth:`forecast_of` as the JSON-ready dict ``schemas.Forecast`` dumps to (bulk
        responses, built without pydantic)."""
        parts = self._forecast_parts(record)
        if parts is None:
            return None
        targets, forecast, stamps = parts
        return intervals.forecast_body(targets, forecast, stamps, record.intervals)

    def _forecast_parts(
        self, record: StreamRecord
    ) -> tuple[Sequence[str], Sequence[Sequence[float]], list[Timestamp | None]] | None:
        """The target names, the stored forecast and its timestamps; None without a forecast
        or with a model this replica does not serve."""
        model = self.registry.models.get(record.model)
        if record.forecast is None or model is None:
            return None
        try:
            stamps = future_timestamps(record.last_timestamp, record.freq, len(record.forecast))
        except OverflowError:  # only a record written before horizons were checked
            stamps = [None] * len(record.forecast)
        return model.targets, record.forecast, stamps


def _combination(weights: list[list[float]]) -> schemas.Combination:
    """The combination's weights as a response body: per horizon step, and their mean."""
    steps = [
        schemas.StepWeights(step=h + 1, weights=dict(zip(EXPERTS, row, strict=True)))
        for h, row in enumerate(weights)
    ]
    mean = {e: sum(row[j] for row in weights) / len(weights) for j, e in enumerate(EXPERTS)}
    return schemas.Combination(experts=list(EXPERTS), weights=mean, steps=steps)


def _combines(record: StreamRecord) -> bool:
    """Whether a stream serves the combination; a state this service cannot read (what a reset
    is for) gets the creation default, True."""
    try:
        return combination_weights(record.state) is not None
    except StateIncompatible:
        return True


def _usable_freq(freq: str | None, horizon: int) -> str | None:
    """A checkpoint's frequency if this service can date forecasts with it, else ``None``
    (forecasts without timestamps rather than a stream that cannot be created)."""
    if freq is None:
        return None
    try:
        check_freq(freq, horizon)
    except InvalidObservation:
        log.warning(
            "frequency %r is not one memcast dates forecasts with; forecasts have no timestamps", freq
        )
        return None
    return freq


def _now() -> str:
    return datetime.now(UTC).isoformat()
