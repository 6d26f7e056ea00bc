"""Service fixtures: tiny random checkpoints (no training) and in-process apps on either store."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from memcast.harness import RedisServer
from models import ContinualForecaster, ModelConfig
from models.checkpoint import DataSchema, save_checkpoint
from service.app import create_app
from service.settings import Settings
from service.store import StreamRecord

COLUMNS = ("load_a", "OT")
SEQ_LEN, PRED_LEN = 8, 3
SCHEMA = DataSchema(
    columns=COLUMNS,
    targets=COLUMNS,
    mean=(10.0, 5.0),
    std=(2.0, 3.0),
    seq_len=SEQ_LEN,
    pred_len=PRED_LEN,
    freq="h",
)


def make_checkpoint(
    directory: Path, *, seed: int = 0, memory: str = "titans", name: str | None = None
) -> Path:
    """A checkpoint with random (seeded) weights: fast, and every weight matters."""
    torch.manual_seed(seed)
    config = ModelConfig(
        backbone="lstm", memory=memory, channels=len(COLUMNS), seq_len=SEQ_LEN, pred_len=PRED_LEN, d_model=8
    )
    model = ContinualForecaster(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return save_checkpoint(directory, model, SCHEMA, name=name)


def series(n: int, start: int = 0, scale: float = 1.0) -> list[dict[str, Any]]:
    """``n`` observations with integer timestamps ``start ..`` in raw units."""
    out = []
    for t in range(start, start + n):
        load = 10.0 + scale * (2.0 * torch.sin(torch.tensor(t / 3.0)).item() + 0.1 * t)
        out.append({"timestamp": t, "values": [round(load, 6), round(5.0 + 0.5 * load - 0.01 * t, 6)]})
    return out


def state_content(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """A state blob as (parsed header, tensor bytes): safetensors writes its metadata map in no
    fixed order, so equal states need not be equal byte strings."""
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MEMCAST_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    make_checkpoint(root / "small", seed=0)
    make_checkpoint(root / "plain", seed=1, memory="none")
    return root


@pytest.fixture
def settings(checkpoint_root: Path, store_url: str | None) -> Settings:
    return Settings(
        checkpoint_dir=checkpoint_root,
        default_model="small",
        redis_url=store_url,
        workers_threads=2,
        torch_threads=None,  # leave the test process's torch threads alone
    )


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient

    async def record(self, stream_id: str) -> StreamRecord:
        return await self.app.state.store.get(stream_id)

    async def create(
        self, stream_id: str, history: list[dict[str, Any]] | None = None, **body: Any
    ) -> httpx.Response:
        response = await self.client.post(
            "/v1/streams", json={"id": stream_id, "history": history or [], **body}
        )
        assert response.status_code == 201, response.text
        return response

    async def post(self, stream_id: str, observations: list[dict[str, Any]], **body: Any) -> httpx.Response:
        return await self.client.post(
            f"/v1/streams/{stream_id}/observations", json={"observations": observations, **body}
        )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Api]:
    """An app with its lifespan entered and an httpx client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://memcast") as client:
            yield Api(app, client)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings) as api:
        yield api


@pytest.fixture
def isolated_checkpoints(tmp_path: Path) -> Iterator[Path]:
    """A checkpoint directory of this test's own, which it may change."""
    make_checkpoint(tmp_path / "ckpt" / "small", seed=0)
    yield tmp_path / "ckpt"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own (it may be stopped, killed and started again) with
    ``appendfsync always``: an acknowledged write is on disk."""
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
