"""/v1/streams/{id}: a stream's state over its life: named snapshots, revert, export, import."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from service import lifecycle, schemas
from service.api.deps import Authenticated, EngineDep
from service.api.errors import ERROR_RESPONSES
from service.api.streams import StreamIdPath

router = APIRouter(
    prefix="/v1/streams/{stream_id}", tags=["state"], dependencies=[Authenticated], responses=ERROR_RESPONSES
)

NamePath = Annotated[schemas.SnapshotName, Path(description="snapshot name")]


@router.post("/snapshots", status_code=status.HTTP_201_CREATED, response_model=schemas.SnapshotOut)
async def create_snapshot(
    stream_id: StreamIdPath, req: schemas.CreateSnapshot, engine: EngineDep
) -> schemas.SnapshotOut:
    return lifecycle.snapshot_out(await lifecycle.take_snapshot(engine, stream_id, req.name))


@router.get("/snapshots", response_model=schemas.SnapshotsOut)
async def list_snapshots(stream_id: StreamIdPath, engine: EngineDep) -> schemas.SnapshotsOut:
    await engine.get(stream_id)  # 404 for a stream that does not exist
    taken = await engine.store.list_snapshots(stream_id)
    return schemas.SnapshotsOut(snapshots=[lifecycle.snapshot_out(s) for s in taken])


@router.get("/snapshots/{name}", response_model=schemas.SnapshotOut)
async def get_snapshot(stream_id: StreamIdPath, name: NamePath, engine: EngineDep) -> schemas.SnapshotOut:
    return lifecycle.snapshot_out(await engine.store.get_snapshot(stream_id, name))


@router.delete("/snapshots/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_snapshot(stream_id: StreamIdPath, name: NamePath, engine: EngineDep) -> Response:
    await engine.store.delete_snapshot(stream_id, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/snapshots/{name}/revert", response_model=schemas.StreamOut)
async def revert_to_snapshot(stream_id: StreamIdPath, name: NamePath, engine: EngineDep) -> schemas.StreamOut:
    return engine.summary(await lifecycle.revert(engine, stream_id, name))


@router.get(
    "/export", response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}}
)
async def export_stream(stream_id: StreamIdPath, engine: EngineDep) -> Response:
    archive = lifecycle.export_archive(await engine.get(stream_id))
    disposition = f'attachment; filename="{stream_id}.safetensors"'
    return Response(
        archive, media_type="application/octet-stream", headers={"Content-Disposition": disposition}
    )


@router.post("/import", response_model=schemas.StreamOut)
async def import_stream(stream_id: StreamIdPath, request: Request, engine: EngineDep) -> schemas.StreamOut:
    """The body is an export (``application/octet-stream``, at most ``MEMCAST_MAX_BODY_BYTES``)."""
    return engine.summary(await lifecycle.import_stream(engine, stream_id, await request.body()))
