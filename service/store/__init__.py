"""Per-stream state stores: embedded (in-process, the default) or Redis."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import Snapshot, StateStore, StoreStats, StreamRecord, Timestamp, update_stream
from service.store.embedded import EmbeddedStore
from service.store.redis_store import RedisStore


def make_store(settings: Settings) -> StateStore:
    if not settings.redis_url:
        return EmbeddedStore()
    return RedisStore(
        settings.redis_url,
        prefix=settings.redis_key_prefix,
        timeout_s=settings.store_timeout_s,
        retry_after=settings.retry_after_s,
        cache_bytes=int(settings.record_cache_mb * 2**20),
    )


__all__ = [
    "EmbeddedStore",
    "RedisStore",
    "Snapshot",
    "StateStore",
    "StoreStats",
    "StreamRecord",
    "Timestamp",
    "make_store",
    "update_stream",
]
