"""/v1/streams: create, inspect, delete and reset streams; post observations; read forecasts."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Body, Path, Query, Response, status

from service import schemas
from service.api.deps import Authenticated, EngineDep
from service.api.errors import ERROR_RESPONSES
from service.creation import create_many

router = APIRouter(
    prefix="/v1/streams", tags=["streams"], dependencies=[Authenticated], responses=ERROR_RESPONSES
)

StreamIdPath = Annotated[schemas.StreamId, Path(description="stream id")]


# "/v1/streams/" too, answered in place: the app does not redirect slashes (a 307 on a POST
# makes clients re-send the body, or drop it)
@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.StreamOut)
@router.post(
    "/", status_code=status.HTTP_201_CREATED, response_model=schemas.StreamOut, include_in_schema=False
)
async def create_stream(
    req: schemas.CreateStream, engine: EngineDep, response: Response
) -> schemas.StreamOut:
    record = await engine.create(req)
    response.headers["Location"] = f"/v1/streams/{record.stream_id}"
    return engine.summary(record)


@router.post(":batchCreate", response_model=schemas.CreateStreamsOut)
async def create_streams(req: schemas.CreateStreams, engine: EngineDep) -> schemas.CreateStreamsOut:
    """Create many streams, each with its history, in one request: each stream's history is
    replayed in the same model calls as the others'. 200 with one result per stream (201 or
    the error creating it alone would have had); a bad specification fails only its stream."""
    return await create_many(engine, req)


@router.get("", response_model=schemas.StreamsPage)
async def list_streams(
    engine: EngineDep,
    cursor: Annotated[str | None, Query(max_length=256, description="from the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.StreamsPage:
    return await engine.list_ids(cursor, limit)


@router.get("/{stream_id}", response_model=schemas.StreamOut)
async def get_stream(stream_id: StreamIdPath, engine: EngineDep) -> schemas.StreamOut:
    return engine.summary(await engine.get(stream_id))


@router.delete("/{stream_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_stream(stream_id: StreamIdPath, engine: EngineDep) -> Response:
    await engine.delete(stream_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{stream_id}/reset", response_model=schemas.StreamOut)
async def reset_stream(
    stream_id: StreamIdPath, engine: EngineDep, req: Annotated[schemas.ResetStream | None, Body()] = None
) -> schemas.StreamOut:
    return engine.summary(await engine.reset(stream_id, req or schemas.ResetStream()))


@router.post("/{stream_id}/observations", response_model=schemas.ObservationsOut)
async def post_observations(
    stream_id: StreamIdPath, batch: schemas.ObservationBatch, engine: EngineDep
) -> Response:
    # built as dicts (Engine.observe; the schema above documents it) and sent as orjson bytes
    return Response(orjson.dumps(await engine.observe(stream_id, batch)), media_type="application/json")


@router.get("/{stream_id}/forecast", response_model=schemas.ForecastOut)
async def get_forecast(stream_id: StreamIdPath, engine: EngineDep) -> schemas.ForecastOut:
    return await engine.forecast(stream_id)


@router.get("/{stream_id}/accuracy", response_model=schemas.AccuracyOut)
async def get_accuracy(stream_id: StreamIdPath, engine: EngineDep) -> schemas.AccuracyOut:
    return await engine.accuracy(stream_id)


@router.get("/{stream_id}/history", response_model=schemas.HistoryOut)
async def get_history(stream_id: StreamIdPath, engine: EngineDep) -> schemas.HistoryOut:
    return await engine.history(stream_id)
