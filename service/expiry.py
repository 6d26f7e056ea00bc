"""Idle expiry (``MEMCAST_STREAM_TTL_S``): a background sweep deletes streams, with their
snapshots, whose record was last written more than the TTL ago.

The sweep pages through the stream ids, reads each record and deletes it only if its version
and incarnation are still the ones it read (``StateStore.delete_if_unchanged``), so a stream
written or re-created meanwhile is never lost. Every replica may sweep; the compare-and-set makes them agree. The count of
deleted streams is the ``memcast_streams_expired_total`` counter.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from service.errors import StoreUnavailable, StreamNotFound
from service.metrics import Metrics
from service.store import StateStore

log = logging.getLogger(__name__)


async def sweep(store: StateStore, ttl_s: float, metrics: Metrics, now: datetime | None = None) -> int:
    """One pass over every stream; returns how many expired."""
    now = now or datetime.now(UTC)
    expired, cursor = 0, None
    while True:
        ids, cursor = await store.list_ids(cursor, 500)
        for stream_id in ids:
            try:
                record = await store.get(stream_id)
            except StreamNotFound:
                continue
            idle = (now - datetime.fromisoformat(record.updated_at)).total_seconds()
            if idle > ttl_s and await store.delete_if_unchanged(record):
                expired += 1
                metrics.streams_expired.inc()
        if cursor is None:
            return expired


async def run_sweeps(store: StateStore, ttl_s: float, metrics: Metrics) -> None:
    """Sweep every ``min(ttl / 4, 60)`` seconds until cancelled; a store outage skips a pass."""
    interval = min(ttl_s / 4, 60.0)
    while True:
        await asyncio.sleep(interval)
        try:
            count = await sweep(store, ttl_s, metrics)
        except StoreUnavailable as exc:
            log.warning("expiry sweep skipped: %s", exc)
            continue
        if count:
            log.info("expired %d idle stream(s)", count)
