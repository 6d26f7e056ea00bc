"""Cross-stream micro-batching: single observations for different streams of one model and
mode, arriving while the model threads are busy, share one ``observe`` call.

No request waits for a batch to fill: a job runs as soon as a slot is free, with whatever
else is queued by then (natural batching), at most ``max_streams`` streams per call and at
most ``slots`` calls at once. ``full_model`` streams batch too: each learns with its own
weights, stacked over the stream dimension (``models.online`` vmaps the step where the model
allows, and loops over the streams where it does not, FSNet). Several observations in one
request run on their own. Results equal the one-stream computation up to float rounding;
``MEMCAST_BATCH_STREAMS=1`` turns this off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from models.online import UpdateMode
from service.compute import Step, compute, compute_batch
from service.errors import ServiceError
from service.metrics import Metrics
from service.registry import LoadedModel

T = TypeVar("T")


@dataclass
class _Queue:
    jobs: list[tuple[bytes, list[float], asyncio.Future[Step]]] = field(default_factory=list)
    running: int = 0


class Batcher:
    def __init__(self, pool: Executor, slots: int, max_streams: int, metrics: Metrics) -> None:
        self._pool, self._slots, self._max, self._metrics = pool, slots, max_streams, metrics
        self._queues: dict[tuple[str, UpdateMode], _Queue] = {}

    async def in_pool(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a model thread, alone (no batching: creation, reset, a whole request)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def observe(
        self, model: LoadedModel, blob: bytes, rows: list[list[float]], mode: UpdateMode
    ) -> Step:
        if self._max <= 1 or len(rows) != 1:
            self._metrics.batch_streams.observe(1)
            return await self.in_pool(lambda: compute(model, blob, rows, mode))
        future: asyncio.Future[Step] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault((model.name, mode), _Queue())
        queue.jobs.append((blob, rows[0], future))
        self._pump(model, mode, queue)
        return await future

    def _pump(self, model: LoadedModel, mode: UpdateMode, queue: _Queue) -> None:
        while queue.jobs and queue.running < self._slots:
            batch, queue.jobs = queue.jobs[: self._max], queue.jobs[self._max :]
            queue.running += 1
            task = asyncio.ensure_future(self._run_batch(model, mode, batch))
            task.add_done_callback(lambda _t: self._done(model, mode, queue))

    def _done(self, model: LoadedModel, mode: UpdateMode, queue: _Queue) -> None:
        queue.running -= 1
        if not queue.jobs and not queue.running:
            self._queues.pop((model.name, mode), None)
        else:
            self._pump(model, mode, queue)

    async def _run_batch(
        self,
        model: LoadedModel,
        mode: UpdateMode,
        batch: list[tuple[bytes, list[float], asyncio.Future[Step]]],
    ) -> None:
        self._metrics.batch_streams.observe(len(batch))
        blobs, rows = [b for b, _, _ in batch], [r for _, r, _ in batch]
        try:
            results: list[Step | ServiceError] = await self.in_pool(
                lambda: compute_batch(model, blobs, rows, mode)
            )
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            results = [exc] * len(batch)  # type: ignore[list-item]
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # the request was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
