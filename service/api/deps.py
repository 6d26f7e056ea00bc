"""Dependencies, declared once as ``Annotated`` aliases; tests swap them through
``app.dependency_overrides``.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
a thread hop per dependency per request.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine
from service.errors import Unauthorized
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings
from service.store import StateStore


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_store(request: Request) -> StateStore:
    return request.app.state.store


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[StateStore, Depends(get_store)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")


async def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> None:
    """When keys are configured, the request must carry one (constant-time comparison)."""
    keys = settings.api_key_list
    if not keys:
        return
    supplied = (bearer.credentials if bearer is not None else None) or api_key
    if not supplied:
        raise Unauthorized("an API key is required: Authorization: Bearer <key> or X-API-Key")
    given = supplied.encode()
    valid = False
    for key in keys:  # compare with every key, so timing does not say which one nearly matched
        valid |= hmac.compare_digest(given, key.encode())
    if not valid:
        raise Unauthorized("the API key is not valid")


Authenticated = Depends(require_api_key)
