"""Service speed: ``memcast serve`` (embedded store, and Redis) under an async HTTP load generator
running in a separate process, on loopback only.

The generator is asyncio: httpx for set-up (models, stream creation, reads) and, for the timed
posting loop, a minimal keep-alive HTTP/1.1 client (``bench/_http.py``): on a 2-core machine
httpx's 2-5 ms of CPU per request would starve the server it measures (``--http-client httpx``
runs the loop with httpx instead).

For each store, the driver starts a ``redis-server`` of its own on a free port (Redis runs
only) and ``memcast serve`` on another, then runs the load generator (``bench/_loadgen.py``)
in a child process. The generator:

1. creates the streams, each with ``seq_len + pred_len`` rows of history (warm: ready to
   forecast, and a ``full_model`` stream learns from its first posted observation);
2. for each update mode, stream count N and concurrency C (C <= N: a stream posts in time
   order, so it never has two requests in flight), posts one observation per request, the
   streams taken round-robin, until the cell's observation cap or time budget is reached;
3. records per cell: throughput (applied observations / s), latency percentiles, errors,
   the state bytes of a stream (``GET /v1/streams/{id}``), Redis round trips and commands per
   observation (``INFO commandstats`` deltas), the mean streams per model call (the server's
   ``memcast_batch_streams`` histogram), CPU seconds of server and generator, and the
   server's resident memory.

Streams are created in the first mode listed; the cells of a later mode post to the same
streams with ``"mode": <mode>`` in each request (the API's per-request override), so a
``memory_only`` stream's first ``full_model`` request adds its per-stream weight copy and
every later one is an ordinary ``full_model`` update.

    python -m bench.load --out runs/bench/load.json                   # full grid
    python -m bench.load --streams 1,64 --concurrency 1,16,64 --cell-seconds 4 --floor runs/bench/floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import (
    ROOT,
    bench_csv,
    child_env,
    ensure_checkpoint,
    machine_info,
    now_iso,
    which_redis,
    write_json,
)
from memcast.harness import RedisServer, ServeProcess


# ---------------------------------------------------------------------------------------------
# driver: processes
# ---------------------------------------------------------------------------------------------
def start_redis(work: Path) -> tuple[RedisServer, str]:
    """A ``redis-server`` child on a free loopback port, no persistence; and its version."""
    if which_redis() is None:
        raise RuntimeError("redis-server is not on PATH")
    server = RedisServer(work / "redis")
    server.start()
    with server.client() as client:
        version = str(client.info("server")["redis_version"])
    return server, version


def start_server(
    checkpoint: Path,
    log: Path,
    redis_url: str | None,
    workers_threads: int | None,
    settings: dict[str, str] | None = None,
) -> tuple[ServeProcess, str, dict[str, Any]]:
    """``memcast serve`` on a free loopback port serving ``checkpoint``; its model name and the
    thread and batching settings it runs with (``settings``: more MEMCAST_* variables)."""
    name = json.loads((checkpoint / "config.json").read_text())["name"]
    extra = {"MEMCAST_LOG_LEVEL": "warning", **(settings or {})}
    if redis_url:
        extra["MEMCAST_REDIS_URL"] = redis_url
    if workers_threads:
        extra["MEMCAST_WORKERS_THREADS"] = str(workers_threads)
    args = ["--checkpoints", str(checkpoint), "--default-model", name]
    server = ServeProcess(args, env=child_env(**extra), log=log, cwd=ROOT)
    server.start(timeout=180)
    own = {k: v for k, v in server.env.items() if k.startswith(("MEMCAST_", "OMP_", "MKL_"))}
    return server, name, own


def server_settings_from(pairs: list[str]) -> dict[str, str]:
    bad = [kv for kv in pairs if "=" not in kv or not kv.startswith("MEMCAST_")]
    if bad:
        raise SystemExit(f"--server-env takes MEMCAST_NAME=VALUE, got {bad}")
    return dict(kv.split("=", 1) for kv in pairs)


def effective_settings(env: dict[str, str]) -> dict[str, Any]:
    """The server's thread and batching settings: the service's defaults, overridden by ``env``."""
    from service.settings import Settings

    names = ("workers_threads", "batch_streams", "torch_threads", "max_batch")
    values = {name: Settings.model_fields[name].default for name in names}
    for name in names:
        if f"MEMCAST_{name.upper()}" in env:
            values[name] = env[f"MEMCAST_{name.upper()}"]
    return values


def run_store(store: str, args: argparse.Namespace, checkpoint: Path, data: Path) -> dict[str, Any]:
    """One store: start Redis (if asked) and the server, run the generator process, stop both."""
    work: Path = args.work
    redis, redis_version = start_redis(work) if store == "redis" else (None, None)
    try:
        server, model_name, server_env = start_server(
            checkpoint,
            work / "logs" / f"serve-{store}.log",
            redis.url if redis else None,
            args.workers_threads,
            server_settings_from(args.server_env),
        )
        try:
            spec = {
                "url": server.url,
                "server_pid": server.process.pid if server.process else None,
                "redis_url": redis.url if redis else None,
                "model": model_name,
                "data": str(data),
                "modes": args.modes.split(","),
                "streams": sorted(int(n) for n in args.streams.split(",")),
                "concurrency": sorted(int(c) for c in args.concurrency.split(",")),
                "cell_seconds": args.cell_seconds,
                "cell_obs": args.cell_obs,
                "create_concurrency": args.create_concurrency,
                "timeout": args.request_timeout,
                "http_client": args.http_client,
                "bulk": args.bulk,
                "bulk_create_streams": args.bulk_create_streams,
                "deadline": time.time() + args.store_budget,
            }
            spec_path = work / f"client-{store}.spec.json"
            out_path = work / f"client-{store}.json"
            write_json(spec_path, spec)
            out_path.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "bench._loadgen", str(spec_path), str(out_path)]
            result = subprocess.run(cmd, env=child_env(), timeout=args.store_budget + 300, cwd=ROOT)
            if result.returncode != 0 or not out_path.is_file():
                raise RuntimeError(f"the load generator failed for the {store} store ({result.returncode})")
            outcome = json.loads(out_path.read_text())
        finally:
            server.stop()
        outcome.update(
            store=store,
            server_env=server_env,
            server_settings=effective_settings(server_env),
            redis_version=redis_version,
        )
        return outcome
    finally:
        if redis is not None:
            redis.stop()


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def attach_floor(result: dict[str, Any], floor_path: Path | None) -> None:
    """Ratio service / floor for each cell: against the floor at B=1 and the best floor over B
    (same model, same mode)."""
    if floor_path is None or not floor_path.is_file():
        return
    floor = json.loads(floor_path.read_text())
    rows = [r for r in floor["rows"] if r["config"].endswith("(checkpoint)")] or floor["rows"]
    result["floor_source"] = str(floor_path)
    for store in result["stores"]:
        for cell in store["cells"]:
            mine = [r for r in rows if r["mode"] == cell["mode"]]
            if not mine:
                continue
            b1 = next((r["obs_per_s"] for r in mine if r["batch"] == 1), None)
            best = max(r["obs_per_s"] for r in mine)
            cell["floor_b1_obs_per_s"], cell["floor_best_obs_per_s"] = b1, best
            cell["ratio_to_floor_b1"] = cell["obs_per_s"] / b1 if b1 else None
            cell["ratio_to_floor_best"] = cell["obs_per_s"] / best if best else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(args.work, args.checkpoint_dir)
    data = args.data or bench_csv(args.work)
    stores = [s for s in args.stores.split(",") if s]
    if "redis" in stores and which_redis() is None:
        print("load: redis-server is not on PATH, skipping the Redis store")
        stores.remove("redis")
    result: dict[str, Any] = {
        "kind": "load",
        "date": now_iso(),
        "machine": machine_info(),
        "checkpoint": str(checkpoint),
        "data": str(data),
        "settings": {
            k: getattr(args, k)
            for k in (
                "modes",
                "streams",
                "concurrency",
                "cell_seconds",
                "cell_obs",
                "create_concurrency",
                "http_client",
                "workers_threads",
                "bulk",
            )
        },
        "command": " ".join(["python", *sys.argv]),
        "stores": [],
    }
    for store in stores:
        print(f"load: {store} store", flush=True)
        result["stores"].append(run_store(store, args, checkpoint, data))
    attach_floor(result, args.floor)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", type=Path, help="a checkpoint directory (default: make a small one)")
    p.add_argument("--data", type=Path, help="CSV whose rows the streams post (default: memcast make-data)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch: checkpoint, logs, redis")
    p.add_argument("--stores", default="embedded,redis")
    p.add_argument("--modes", default="memory_only,full_model")
    p.add_argument("--streams", default="1,100,1000", help="stream counts N")
    p.add_argument("--concurrency", default="1,16,64", help="requests in flight C (cells with C > N skipped)")
    p.add_argument("--cell-seconds", type=float, default=20.0, help="time budget of one cell")
    p.add_argument("--cell-obs", type=int, default=20000, help="observations posted in one cell, at most")
    p.add_argument("--create-concurrency", type=int, default=8, help="stream creations in flight")
    p.add_argument("--store-budget", type=float, default=3600.0, help="seconds for one store's cells")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument(
        "--http-client",
        choices=["raw", "httpx"],
        default="raw",
        help="posting client: a minimal keep-alive HTTP/1.1 client (default) or httpx",
    )
    p.add_argument("--workers-threads", type=int, help="MEMCAST_WORKERS_THREADS (default: the service's)")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="MEMCAST_X=VALUE",
        help="a setting of the server (repeatable), e.g. MEMCAST_LOOP=asyncio MEMCAST_HTTP=h11",
    )
    p.add_argument(
        "--bulk",
        type=int,
        default=0,
        help="observations per POST /v1/observations, one per stream (0: one per request, per stream); "
        "streams are then created in bulk too",
    )
    p.add_argument(
        "--bulk-create-streams",
        type=int,
        default=250,
        help="streams per batch creation request (with --bulk)",
    )
    p.add_argument("--floor", type=Path, help="floor.json of the same checkpoint: adds ratios to the floor")
    p.add_argument("--out", type=Path, default=Path("runs/bench/load.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(args)
    write_json(args.out, result)
    print(f"load: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
