"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import MetricsDep, RegistryDep, StoreDep
from service.errors import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(registry: RegistryDep, store: StoreDep, metrics: MetricsDep) -> JSONResponse:
    checks = {"models": len(registry) > 0, "store": True}
    try:
        await store.ping()
    except StoreUnavailable:
        checks["store"] = False
    ready = all(checks.values())
    metrics.models_loaded.set(len(registry))
    body = {"status": "ready" if ready else "not ready", "checks": checks, "models": sorted(registry.models)}
    return JSONResponse(
        body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "1"}
    )


@router.get("/metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
