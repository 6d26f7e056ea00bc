"""The FastAPI application: ``create_app(settings)``; uvicorn uses it as a factory.

The lifespan loads the model registry, opens the state store and starts the engine, all kept
on ``app.state``; nothing lives in module globals, so several apps can share a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

import torch
from fastapi import FastAPI

from service.api import health, models, observations, state, streams, ui
from service.api.errors import install_error_handlers
from service.engine import Engine
from service.expiry import run_sweeps
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, LatencyMiddleware
from service.registry import load_registry
from service.settings import Settings, get_settings
from service.store import RedisStore, make_store

log = logging.getLogger(__name__)

# the cyclic collector's thresholds while the app serves (see lifespan)
GC_THRESHOLDS = (100_000, 20, 10)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        registry = load_registry(settings.checkpoint_dir, settings.default_model, settings.device)
        metrics.models_loaded.set(len(registry))
        store = make_store(settings)
        if isinstance(store, RedisStore) and store.cache is not None:
            metrics.watch_cache(store.cache)
        engine = Engine(registry, store, settings, metrics)
        app.state.registry, app.state.store, app.state.engine = registry, store, engine
        # What is loaded now (torch, the models, the app) lives as long as the app. Frozen, the
        # cyclic collector stops re-scanning it on each of the many collections that decoding
        # records (tens of thousands of small objects per stream) triggers. Measured in process
        # on Redis, 1,000 warm streams, bulk requests of 100: 191 -> 359 observations/s.
        gc.collect()
        gc.freeze()
        # A bulk request decodes, builds and drops hundreds of thousands of containers that all
        # live until the response is sent: with the default first threshold (700 allocations)
        # they are collected, promoted and rescanned many times per request. Measured
        # (``python -m bench.bulk --store redis``, 1,000 streams, requests of 100): collection
        # took 0.96 to 1.32 ms per stream with (700, 10, 10), 0.34 ms with (100000, 20, 10).
        # Cyclic garbage waits a little longer; nothing else changes.
        thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info(
            "memcast ready to serve %d model(s) with the %s store",
            len(registry),
            "redis" if settings.redis_url else "embedded",
        )
        sweeper = (
            asyncio.create_task(run_sweeps(store, settings.stream_ttl_s, metrics))
            if settings.stream_ttl_s
            else None
        )
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            engine.close()
            await store.aclose()
            gc.unfreeze()  # an app made again in the same process (tests) frees this one
            gc.set_threshold(*thresholds)

    app = FastAPI(
        title="memcast",
        version=version("memcast"),  # the installed distribution's: service never imports the CLI package
        description="Online forecasting that keeps learning from every observation.",
        lifespan=lifespan,
        redirect_slashes=False,  # collection routes accept a trailing slash themselves
    )
    app.state.settings, app.state.metrics = settings, metrics
    install_error_handlers(app)
    app.include_router(streams.router)
    app.include_router(state.router)
    app.include_router(observations.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(ui.router)
    # outermost last: latency covers everything, including refused bodies
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    return app
