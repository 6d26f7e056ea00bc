"""/v1/models: the loaded checkpoints, with the scaler each one applies to raw values."""

from __future__ import annotations

from fastapi import APIRouter

from service import schemas
from service.api.deps import Authenticated, RegistryDep
from service.api.errors import ERROR_RESPONSES

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[Authenticated], responses=ERROR_RESPONSES
)


@router.get("", response_model=schemas.ModelsOut)
@router.get("/", response_model=schemas.ModelsOut, include_in_schema=False)
async def list_models(registry: RegistryDep) -> schemas.ModelsOut:
    return schemas.ModelsOut(
        default=registry.default,
        models=[
            schemas.ModelOut(**model.describe(), default=name == registry.default)
            for name, model in sorted(registry.models.items())
        ],
    )
