"""/v1/observations: observations for many streams in one request."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Response

from service import schemas
from service.api.deps import Authenticated, EngineDep
from service.api.errors import ERROR_RESPONSES

router = APIRouter(
    prefix="/v1/observations", tags=["observations"], dependencies=[Authenticated], responses=ERROR_RESPONSES
)


@router.post("", response_model=schemas.BulkObservationsOut)
@router.post("/", response_model=schemas.BulkObservationsOut, include_in_schema=False)
async def post_bulk_observations(req: schemas.BulkObservations, engine: EngineDep) -> Response:
    """One status per item (`applied`, `duplicate`, or `error` with the code and error this
    item's stream would have had on its own) and the latest forecast per stream; a stream's
    items are applied all or none, and streams never fail each other."""
    # the body is built as dicts (service.bulk: the schema above documents it) and sent as
    # orjson bytes: validating and serialising it as models cost about as much per stream
    # as learning from the observation (docs/bulk.md)
    body = await engine.observe_bulk(req)
    return Response(orjson.dumps(body), media_type="application/json")
