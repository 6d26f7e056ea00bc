"""Prometheus metrics, one registry per app (so several apps in one process never clash)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.accuracy import Scored
from service.store.cache import RecordCache

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # |error| / the target's std
BYTES_BUCKETS = tuple(float(2**k) for k in range(8, 27, 2))  # 256 B .. 64 MiB


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "memcast_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.updates = Counter(
            "memcast_updates", "Observations learned from, by update mode", ["mode"], registry=r
        )
        self.duplicates = Counter("memcast_duplicates", "Observations acknowledged as duplicates", registry=r)
        self.state_bytes = Histogram(
            "memcast_state_bytes",
            "Size of a stream state written to the store",
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.store_conflicts = Counter(
            "memcast_store_conflicts", "Compare-and-set writes that lost a race", registry=r
        )
        self.store_retries = Counter(
            "memcast_store_retries", "Read-modify-write attempts retried", registry=r
        )
        self.errors = Counter("memcast_errors", "Error responses, by kind", ["kind"], registry=r)
        self.batch_streams = Histogram(
            "memcast_batch_streams",
            "Streams computed in one model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        # sum / count of each is the MAE over every stream; 1 - served / last_value is the skill
        self.forecast_errors = Histogram(
            "memcast_forecast_abs_error",
            "Absolute error of served forecasts as their values matured, in units of the target's std",
            ["model", "mode"],
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.last_value_errors = Histogram(
            "memcast_last_value_abs_error",
            "Absolute error of the last-value forecast over the same values, in units of the target's std",
            ["model", "mode"],
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.streams_expired = Counter(
            "memcast_streams_expired",
            "Streams deleted after MEMCAST_STREAM_TTL_S without a write",
            registry=r,
        )
        self.models_loaded = Gauge("memcast_models_loaded", "Checkpoints loaded", registry=r)
        self.record_cache = Gauge(
            "memcast_record_cache",
            "Stream records kept in process as write hints (MEMCAST_RECORD_CACHE_MB): "
            "entries, bytes, and hits and misses since start",
            ["what"],
            registry=r,
        )

    def watch_cache(self, cache: RecordCache) -> None:
        """Report ``cache``'s entries, bytes, hits and misses whenever metrics are scraped."""
        for what, read in (
            ("entries", lambda: len(cache)),
            ("bytes", lambda: cache.nbytes),
            ("hits", lambda: cache.hits),
            ("misses", lambda: cache.misses),
        ):
            self.record_cache.labels(what=what).set_function(read)

    # StoreStats
    def conflict(self) -> None:
        self.store_conflicts.inc()

    def retry(self) -> None:
        self.store_retries.inc()

    def applied(self, mode: str, applied: int, duplicates: int, state_bytes: int | None) -> None:
        if applied:
            self.updates.labels(mode=mode).inc(applied)
        if duplicates:
            self.duplicates.inc(duplicates)
        if state_bytes is not None:
            self.state_bytes.observe(state_bytes)

    def scored(self, model: str, mode: str, *scored: Scored) -> None:
        """The errors of one or more streams' scoring (a bulk request's streams of one model and
        mode together: one pass over the buckets, not one per stream)."""
        observe_all(
            self.forecast_errors.labels(model=model, mode=mode), [e for s in scored for e in s.errors]
        )
        observe_all(
            self.last_value_errors.labels(model=model, mode=mode),
            [e for s in scored for e in s.last_value_errors],
        )

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, counted per bucket first: a forecast
    scores ``pred_len x targets`` errors per observation, and one ``observe`` each (a lock and
    a bucket scan per value) cost more than scoring them. Uses the client's internal buckets,
    as ``Histogram.observe`` does; ``tests/service/test_metrics.py`` holds the two equal."""
    if not values:
        return
    bounds = histogram._upper_bounds  # ends with +inf: every (finite or infinite) value has a bucket
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds)).tolist()
    histogram._sum.inc(math.fsum(values))
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)
