"""The service's own cost per stream of a bulk request (``POST /v1/observations``), in process.

A random-weight checkpoint of the speed benchmarks' shape (lstm + titans, d_model 32, 4
columns, seq_len 48, pred_len 12: no training needed, the cost does not depend on the
weights) is served by the app in process (httpx ASGI transport, no HTTP server) on the
embedded store or a real ``redis-server`` started here (append-only file on, fsync every
second, as a deployment runs it). One stream is brought to steady state through the API (a
history of 1,000 rows fills the duplicate window, then single observations fill the accuracy
window), and its record is copied to ``--streams`` stream ids. Then ``--requests`` bulk
requests of ``--per-request`` streams (one observation each) are timed, cycling over the
streams; the model call (in the model thread) is timed apart, so that what is left is the
service's bookkeeping: reading and writing records, planning, accuracy, intervals, response.

    python -m bench.bulk --store redis --requests 40 [--profile runs/bench/bulk.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

COLUMNS = ("a", "b", "c", "OT")
SEQ_LEN, PRED_LEN, HISTORY = 48, 12, 1000


def make_checkpoint(directory: Path) -> Path:
    import torch

    from models import ContinualForecaster, ModelConfig
    from models.checkpoint import DataSchema, save_checkpoint

    torch.manual_seed(0)
    config = ModelConfig(
        backbone="lstm",
        memory="titans",
        channels=len(COLUMNS),
        seq_len=SEQ_LEN,
        pred_len=PRED_LEN,
        d_model=32,
    )
    model = ContinualForecaster(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    schema = DataSchema(
        columns=COLUMNS,
        targets=COLUMNS,
        mean=(0.0,) * len(COLUMNS),
        std=(1.0,) * len(COLUMNS),
        seq_len=SEQ_LEN,
        pred_len=PRED_LEN,
        freq="h",
    )
    return save_checkpoint(directory / "bench", model, schema, name="bench")


def row(t: int) -> list[float]:
    return [round(math.sin(t / 7 + k) + 0.01 * k * t, 6) for k in range(len(COLUMNS))]


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx
    import torch

    from memcast.harness import RedisServer
    from service.app import create_app
    from service.settings import Settings

    torch.set_num_threads(1)
    make_checkpoint(work / "ckpt")
    server = None
    url = None
    if args.store == "redis":
        server = RedisServer(work / "redis", extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
        server.start()
        url = server.url
    settings = Settings(
        checkpoint_dir=work / "ckpt", default_model="bench", redis_url=url, workers_threads=1, torch_threads=1
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://memcast", timeout=600
            ) as client:
                pid = server.process.pid if server is not None and server.process is not None else None
                return await measure(args, app, client, pid)
    finally:
        if server is not None:
            server.stop()


def _cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (0 for none)."""
    if pid is None:
        return 0.0
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def measure(args: argparse.Namespace, app: Any, client: Any, server_pid: int | None) -> dict[str, Any]:
    store, engine = app.state.store, app.state.engine
    body = {"id": "seed", "history": [{"timestamp": t, "values": row(t)} for t in range(HISTORY)]}
    (await client.post("/v1/streams", json=body)).raise_for_status()
    t = HISTORY
    for _ in range(args.warm):
        obs = {"observations": [{"timestamp": t, "values": row(t)}]}
        (await client.post("/v1/streams/seed/observations", json=obs)).raise_for_status()
        t += 1
    seed = await store.get("seed")
    fields = seed.to_fields()
    sizes = {k: len(v) for k, v in fields.items()}
    ids = [f"s{i:05d}" for i in range(args.streams)]
    for start in range(0, len(ids), 250):
        chunk = ids[start : start + 250]
        await store.write_many([(seed.replace(stream_id=i, version=0, incarnation=""), 0) for i in chunk])

    model_s: list[float] = []
    run_model = engine.run_model

    async def timed(fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return await run_model(fn)
        finally:
            model_s.append(time.perf_counter() - started)

    engine.run_model = timed
    per_request = args.per_request
    requests = [ids[(k * per_request) % len(ids) :][:per_request] for k in range(args.requests + 2)]
    stamps = dict.fromkeys(ids, t)

    cpus: list[float] = []
    collecting: list[float] = [0.0, 0.0]  # start of the running collection, seconds collecting

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[0] = time.perf_counter()
        else:
            collecting[1] += time.perf_counter() - collecting[0]

    gc.callbacks.append(on_gc)
    if args.gc_threshold:
        gc.set_threshold(*args.gc_threshold)

    async def one(streams: list[str]) -> float:
        items = []
        for s in streams:
            items.append({"stream_id": s, "timestamp": stamps[s], "values": row(stamps[s])})
            stamps[s] += 1
        started, cpu = time.perf_counter(), time.thread_time()
        response = await client.post("/v1/observations", json={"observations": items})
        elapsed = time.perf_counter() - started
        cpus.append(time.thread_time() - cpu)
        response.raise_for_status()
        assert response.json()["applied"] == len(streams), response.text[:500]
        return elapsed

    for streams in requests[:2]:  # warm-up
        await one(streams)
    gc.collect()
    model_s.clear()
    cpus.clear()
    collecting[1] = 0.0
    redis_cpu = _cpu(server_pid)
    profiler = cProfile.Profile() if args.profile else None
    walls = []
    if profiler:
        profiler.enable()
    for streams in requests[2:]:
        walls.append(await one(streams))
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    redis_cpu = _cpu(server_pid) - redis_cpu
    gc.callbacks.remove(on_gc)
    wall, model = statistics.median(walls), statistics.median(model_s)
    return {
        "store": args.store,
        "streams": args.streams,
        "per_request": per_request,
        "requests": args.requests,
        "record_field_bytes": sizes,
        "record_bytes": sum(sizes.values()),
        "request_ms_median": round(wall * 1e3, 2),
        "model_ms_median": round(model * 1e3, 2),
        "service_ms_per_stream": round((wall - model) * 1e3 / per_request, 3),
        # CPU time of the event-loop thread (the service's bookkeeping; the model runs in its
        # own thread): unlike wall time, not inflated by other jobs on the machine
        "loop_cpu_ms_per_stream": round(statistics.median(cpus) * 1e3 / per_request, 3),
        "gc_ms_per_stream": round(collecting[1] * 1e3 / (per_request * len(walls)), 3),
        "redis_cpu_ms_per_stream": round(redis_cpu * 1e3 / (per_request * len(walls)), 3),
        "obs_per_s_in_process": round(per_request / wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", choices=("embedded", "redis"), default="redis")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--per-request", type=int, default=100)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument(
        "--warm", type=int, default=PRED_LEN + 48 + 2, help="single observations after the history"
    )
    p.add_argument("--profile", type=Path, help="write a cProfile of the timed requests (event-loop thread)")
    p.add_argument(
        "--gc-threshold",
        type=int,
        nargs=3,
        help="gc.set_threshold for the timed requests (default: the app's)",
    )
    p.add_argument("--out", type=Path, help="append the result as a JSON line")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
