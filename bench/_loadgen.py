"""The load generator of ``bench/load.py``, run as its own process so that it never shares an
interpreter (or its GIL) with the server it measures:

    python -m bench._loadgen SPEC.json OUT.json

``SPEC.json`` (written by the driver) names the server, the model, the data, the grid and the
time budget; ``OUT.json`` receives the cells, the stream creations and the memory readings.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench._common import write_json
from bench._http import HttpxPoster, RawPoster

# Commands our Lua scripts run inside Redis (commandstats counts them too) and commands of
# connection set-up and of this benchmark's own monitoring: neither is a round trip per request.
_SCRIPT_INTERNAL = {"exists", "hset", "hget", "hmget"}  # (the service sends HMGET for snapshots only)
_NOT_REQUESTS = {"info", "ping", "hello", "select", "auth"}
_NOT_REQUEST_PREFIXES = ("config|", "client|", "command|")


class Streams:
    """The streams' data: stream i reads the CSV rows from its own offset, one row per step,
    with integer timestamps; ``cursor[i]`` is the next step it posts."""

    def __init__(self, raw: list[list[float]], history: int) -> None:
        self.raw, self.history = raw, history
        self.cursor: list[int] = []
        self.ids: list[str] = []

    def row(self, i: int, step: int) -> list[float]:
        return self.raw[(i * 37 + step) % len(self.raw)]

    def add(self, stream_id: str) -> int:
        self.ids.append(stream_id)
        self.cursor.append(self.history)
        return len(self.ids) - 1

    def history_body(self, i: int, model: str, mode: str) -> dict[str, Any]:
        rows = [{"timestamp": t, "values": self.row(i, t)} for t in range(self.history)]
        return {"id": self.ids[i], "model": model, "mode": mode, "freq": "1", "history": rows}


class Probe:
    """Server-side counters read between cells: Redis commandstats, the server's metrics, RSS, CPU."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import psutil

        self.process = psutil.Process(spec["server_pid"])
        self.redis = None
        if spec["redis_url"]:
            import redis

            self.redis = redis.Redis.from_url(spec["redis_url"])

    def rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            total += child.memory_info().rss
        return int(total)

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of the main threads: event loop, HTTP, validation, store client;
        CPU seconds of the other threads: model computation, state encoding), summed over the
        server and its worker processes (``MEMCAST_PROCESSES``)."""
        main = other = 0.0
        for process in (self.process, *self.process.children(recursive=True)):
            for t in process.threads():
                if t.id == process.pid:
                    main += t.user_time + t.system_time
                else:
                    other += t.user_time + t.system_time
        return main, other

    def redis_cpu(self) -> float | None:
        """CPU seconds Redis has used (its own ``INFO cpu``, every thread)."""
        if self.redis is None:
            return None
        info = self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def commandstats(self) -> dict[str, int]:
        if self.redis is None:
            return {}
        stats = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def redis_memory(self) -> int | None:
        return None if self.redis is None else int(self.redis.info("memory")["used_memory"])


def round_trips(before: dict[str, int], after: dict[str, int]) -> tuple[int, int, dict[str, int]]:
    """(client round trips, commands incl. those inside scripts, per-command deltas) between two
    commandstats snapshots, without connection set-up and monitoring commands."""
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    delta = {
        k: v for k, v in delta.items() if k not in _NOT_REQUESTS and not k.startswith(_NOT_REQUEST_PREFIXES)
    }
    commands = sum(delta.values())
    trips = sum(v for k, v in delta.items() if k not in _SCRIPT_INTERNAL)
    return trips, commands, delta


async def batch_histogram(client: Any) -> tuple[float, float]:
    """(sum, count) of the server's ``memcast_batch_streams`` histogram."""
    text = (await client.get("/metrics")).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("memcast_batch_streams_sum"):
            total = float(line.split()[-1])
        elif line.startswith("memcast_batch_streams_count"):
            count = float(line.split()[-1])
    return total, count


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    import numpy as np

    if not latencies_s:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan, "max": math.nan}
    ms = np.asarray(latencies_s) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


async def create_streams(
    client: Any, streams: Streams, upto: int, spec: dict[str, Any], mode: str, errors: list[str]
) -> tuple[int, float]:
    """Create streams until there are ``upto``; return (created, seconds)."""
    first = len(streams.ids)
    for i in range(first, upto):
        streams.add(f"bench-{i:05d}")
    gate = asyncio.Semaphore(spec["create_concurrency"])

    async def create(i: int) -> None:
        async with gate:
            response = await client.post("/v1/streams", json=streams.history_body(i, spec["model"], mode))
        if response.status_code != 201:
            errors.append(f"create {streams.ids[i]}: {response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(create(i) for i in range(first, upto)))
    return upto - first, time.perf_counter() - started


async def create_streams_bulk(
    client: Any, streams: Streams, upto: int, spec: dict[str, Any], mode: str, errors: list[str]
) -> tuple[int, float]:
    """Create streams until there are ``upto`` with their whole history in batch creations
    (``POST /v1/streams:batchCreate``), ``bulk_create_streams`` streams per request,
    ``create_concurrency`` requests in flight."""
    first = len(streams.ids)
    for i in range(first, upto):
        streams.add(f"bench-{i:05d}")
    per_request = max(1, spec["bulk_create_streams"])
    chunks = [list(range(k, min(k + per_request, upto))) for k in range(first, upto, per_request)]
    gate = asyncio.Semaphore(spec["create_concurrency"])

    async def post(chunk: list[int]) -> None:
        body = {"streams": [streams.history_body(i, spec["model"], mode) for i in chunk]}
        async with gate:
            response = await client.post("/v1/streams:batchCreate", json=body)
        if response.status_code != 200:
            errors.append(f"batch create: {response.status_code} {response.text[:200]}")
            return
        errors.extend(f"batch create: {s}" for s in response.json()["streams"] if s["code"] != 201)

    started = time.perf_counter()
    await asyncio.gather(*(post(chunk) for chunk in chunks))
    return upto - first, time.perf_counter() - started


async def run_cell(
    url: str, streams: Streams, n: int, concurrency: int, mode: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """Post single observations to streams 0..n-1, round-robin, ``concurrency`` in flight (one
    connection each)."""
    kind = HttpxPoster if spec.get("http_client") == "httpx" else RawPoster
    posters = [kind(url, spec["timeout"]) for _ in range(concurrency)]
    queue = collections.deque(range(n))
    latencies: list[float] = []
    errors: list[str] = []
    applied = sent = 0
    budget = spec["cell_obs"]
    try:
        # one untimed request per connection, so connection set-up is not in the latencies
        await asyncio.gather(*(p.request("GET", "/healthz") for p in posters))
        started = time.perf_counter()
        deadline = started + spec["cell_seconds"]

        async def bulk_worker(poster: RawPoster | HttpxPoster) -> None:
            """One bulk request at a time: one observation for each of ``bulk`` streams taken
            from the queue (a stream is in one request at a time: its rows stay in order)."""
            nonlocal applied, sent
            while queue and sent < budget and time.perf_counter() < deadline:
                taken = [queue.popleft() for _ in range(min(spec["bulk"], len(queue)))]
                items = [
                    {
                        "stream_id": streams.ids[i],
                        "timestamp": streams.cursor[i],
                        "values": streams.row(i, streams.cursor[i]),
                    }
                    for i in taken
                ]
                sent += len(items)
                body = orjson.dumps({"observations": items, "mode": mode})
                t0 = time.perf_counter()
                try:
                    status, data = await poster.request("POST", "/v1/observations", body)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    latencies.append(time.perf_counter() - t0)
                    if status != 200:
                        errors.append(f"{status} {data[:200].decode(errors='replace')}")
                    else:
                        for i, item in zip(taken, orjson.loads(data)["observations"], strict=True):
                            if item["status"] == "error":
                                errors.append(str(item["error"])[:200])
                            else:
                                applied += item["status"] == "applied"
                            if item["status"] != "error" or item["code"] == 409:
                                streams.cursor[i] += 1
                queue.extend(taken)

        async def worker(poster: RawPoster | HttpxPoster) -> None:
            nonlocal applied, sent
            if spec.get("bulk"):
                return await bulk_worker(poster)
            while queue and sent < budget and time.perf_counter() < deadline:
                i = queue.popleft()
                sent += 1
                step = streams.cursor[i]
                body = orjson.dumps({"timestamp": step, "values": streams.row(i, step), "mode": mode})
                t0 = time.perf_counter()
                try:
                    status, data = await poster.request(
                        "POST", f"/v1/streams/{streams.ids[i]}/observations", body
                    )
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    # retried later: a repeat of an applied observation is acknowledged as a duplicate
                    errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    latencies.append(time.perf_counter() - t0)
                    if status == 200:
                        applied += 1
                        streams.cursor[i] = step + 1
                    else:
                        errors.append(f"{status} {data[:200].decode(errors='replace')}")
                        if status == 409:  # out of order: move on
                            streams.cursor[i] = step + 1
                queue.append(i)

        await asyncio.gather(*(worker(p) for p in posters))
        seconds = time.perf_counter() - started
        status, data = await posters[0].request("GET", f"/v1/streams/{streams.ids[0]}")
        info = json.loads(data) if status == 200 else {}
    finally:
        await asyncio.gather(*(p.aclose() for p in posters))
    return {
        "observations": applied,
        "requests": len(latencies) if spec.get("bulk") else sent,
        "bulk": spec.get("bulk") or None,
        "seconds": seconds,
        "obs_per_s": applied / seconds if seconds > 0 else math.nan,
        "latency_ms": percentiles(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "state_bytes": info.get("state_bytes"),
    }


async def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx
    import psutil

    from trainer.data import read_frame

    probe = Probe(spec)
    me = psutil.Process()
    result: dict[str, Any] = {"cells": [], "creation": [], "memory": [], "errors": []}
    async with httpx.AsyncClient(base_url=spec["url"], timeout=spec["timeout"]) as client:
        listing = (await client.get("/v1/models")).json()
        model = next(m for m in listing["models"] if m["name"] == spec["model"])
        frame = read_frame(spec["data"])
        raw = frame[model["columns"]].to_numpy(dtype=float).tolist()
        streams = Streams(raw, model["seq_len"] + model["pred_len"])
        result["model"] = {k: model[k] for k in ("name", "columns", "seq_len", "pred_len", "config")}
        result["memory"].append(
            {
                "after": "start",
                "streams": 0,
                "rss_bytes": probe.rss(),
                "redis_used_memory": probe.redis_memory(),
            }
        )
        creation_mode = spec["modes"][0]
        for mode in spec["modes"]:
            for n in spec["streams"]:
                if time.time() > spec["deadline"]:
                    result["errors"].append(f"time budget spent before mode {mode}, N={n}")
                    break
                if n > len(streams.ids):
                    errors: list[str] = []
                    make = create_streams_bulk if spec.get("bulk") else create_streams
                    created, seconds = await make(client, streams, n, spec, creation_mode, errors)
                    result["creation"].append(
                        {"streams": n, "created": created, "seconds": seconds, "errors": len(errors)}
                    )
                    result["errors"] += errors[:5]
                    result["memory"].append(
                        {
                            "after": f"creating {creation_mode} streams",
                            "streams": n,
                            "rss_bytes": probe.rss(),
                            "redis_used_memory": probe.redis_memory(),
                        }
                    )
                    print(f"  created {created} warm streams ({n} in all) in {seconds:.1f} s", flush=True)
                for c in spec["concurrency"]:
                    if c > n or time.time() > spec["deadline"]:
                        continue
                    stats0, batch0, cpu0, mine0, redis0 = (
                        probe.commandstats(),
                        await batch_histogram(client),
                        probe.cpu(),
                        me.cpu_times(),
                        probe.redis_cpu(),
                    )
                    cell = await run_cell(spec["url"], streams, n, c, mode, spec)
                    stats1, batch1, cpu1, mine1, redis1 = (
                        probe.commandstats(),
                        await batch_histogram(client),
                        probe.cpu(),
                        me.cpu_times(),
                        probe.redis_cpu(),
                    )
                    obs = max(cell["observations"], 1)
                    trips, commands, per_command = round_trips(stats0, stats1)
                    calls = batch1[1] - batch0[1]
                    cell.update(
                        mode=mode,
                        streams=n,
                        concurrency=c,
                        redis_round_trips_per_obs=trips / obs if probe.redis else None,
                        redis_commands_per_obs=commands / obs if probe.redis else None,
                        redis_calls=per_command,
                        streams_per_model_call=(batch1[0] - batch0[0]) / calls if calls else None,
                        server_cpu_s=sum(cpu1) - sum(cpu0),
                        server_loop_cpu_s=cpu1[0] - cpu0[0],
                        server_model_cpu_s=cpu1[1] - cpu0[1],
                        client_cpu_s=(mine1.user + mine1.system) - (mine0.user + mine0.system),
                        redis_cpu_s=redis1 - redis0 if redis0 is not None and redis1 is not None else None,
                        rss_bytes=probe.rss(),
                    )
                    result["cells"].append(cell)
                    lat = cell["latency_ms"]
                    print(
                        f"  {mode:12s} N={n:<5d} C={c:<3d} {cell['obs_per_s']:8.1f} obs/s  p50 {lat['p50']:7.1f} "
                        f"p95 {lat['p95']:7.1f} p99 {lat['p99']:7.1f} ms  errors {cell['errors']}  "
                        f"state {cell['state_bytes']} B  server CPU {cell['server_cpu_s'] * 1000 / obs:.2f} ms/obs"
                        + (
                            f"  redis {cell['redis_round_trips_per_obs']:.2f} rt/obs, "
                            f"CPU {cell['redis_cpu_s'] * 1000 / obs:.2f} ms/obs"
                            if probe.redis
                            else ""
                        ),
                        flush=True,
                    )
            result["memory"].append(
                {
                    "after": f"{mode} cells",
                    "streams": len(streams.ids),
                    "rss_bytes": probe.rss(),
                    "redis_used_memory": probe.redis_memory(),
                }
            )
    return result


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_json(out_path, asyncio.run(client_main(json.loads(spec_path.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
