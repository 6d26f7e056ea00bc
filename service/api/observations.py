"""/v1/observations: observations for many streams in one request."""

from __future__ import annotations

from fastapi import APIRouter

from service import schemas
from service.api.deps import Authenticated, EngineDep
from service.api.errors import ERROR_RESPONSES

router = APIRouter(
    prefix="/v1/observations", tags=["observations"], dependencies=[Authenticated], responses=ERROR_RESPONSES
)


@router.post("", response_model=schemas.BulkObservationsOut)
@router.post("/", response_model=schemas.BulkObservationsOut, include_in_schema=False)
async def post_bulk_observations(
    req: schemas.BulkObservations, engine: EngineDep
) -> schemas.BulkObservationsOut:
    """One status per item (`applied`, `duplicate`, or `error` with the code and error this
    item's stream would have had on its own) and the latest forecast per stream; a stream's
    items are applied all or none, and streams never fail each other."""
    return await engine.observe_bulk(req)
