"""The record codec: what the Redis store pays per read and per write of one stream, at steady
state (the default accuracy and duplicate windows full), with the standard library's ``json`` beside
``orjson`` (what ``StreamRecord.to_fields`` / ``from_fields`` use), side by side in one run.

The record is made the way a user makes one: a stream created with history on the embedded
store, then one observation per request until both windows are full, through the app in
process (no HTTP server). Then each codec encodes and decodes that record ``--repeat`` times.

    python -m bench.codec --out runs/bench/codec.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench._common import bench_csv, ensure_checkpoint, machine_info, now_iso, write_json
from service.store import StreamRecord


async def steady_record(checkpoint: Path, data: Path, observations: int) -> StreamRecord:
    import httpx

    from service.app import create_app
    from service.settings import Settings

    rows = [[float(v) for v in r[1:]] for r in list(csv.reader(data.open()))[1:]]
    history = 64
    if history + observations > len(rows):
        raise SystemExit(f"{data} has {len(rows)} rows; {history + observations} are needed")
    settings = Settings(
        checkpoint_dir=checkpoint.parent,
        default_model=checkpoint.name,
        redis_url=None,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://memcast") as client:
            body = {"id": "s", "history": [{"timestamp": t, "values": rows[t]} for t in range(history)]}
            (await client.post("/v1/streams", json=body)).raise_for_status()
            for t in range(history, history + observations):
                obs = {"observations": [{"timestamp": t, "values": rows[t]}]}
                (await client.post("/v1/streams/s/observations", json=obs)).raise_for_status()
        return await app.state.store.get("s")


def stdlib_fields(record: StreamRecord) -> dict[str, bytes | str]:
    """The fields as the standard library would write them (the duplicate window as its pairs)."""
    fields: dict[str, bytes | str] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "state":
            fields[f.name] = value
        else:
            fields[f.name] = json.dumps(list(value) if f.name == "recent" else value)
    return fields


def time_per_call(fn: Callable[[], object], repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def measure(record: StreamRecord, repeat: int) -> dict[str, Any]:
    gc.collect()
    gc.freeze()  # as the server does after startup (service/app.py): what was loaded is not rescanned
    stdlib, fast = stdlib_fields(record), record.to_fields()
    as_bytes = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fast.items()}
    if StreamRecord.from_fields(as_bytes) != record:
        raise SystemExit("orjson fields do not decode to the same record")
    json_fields = [f.name for f in dataclasses.fields(record) if f.name != "state"]

    def stdlib_decode() -> None:
        for name in json_fields:
            json.loads(as_bytes[name.encode()])

    def fast_decode() -> None:
        for name in json_fields:
            orjson.loads(as_bytes[name.encode()])

    return {
        "field_bytes": {k.decode(): len(v) for k, v in as_bytes.items()},
        "record_bytes": sum(len(v) for v in as_bytes.values()),
        "json_bytes_stdlib": sum(len(v) for k, v in stdlib.items() if k != "state"),
        "encode_ms": {
            "json": 1e3 * time_per_call(lambda: stdlib_fields(record), repeat),
            "orjson": 1e3 * time_per_call(record.to_fields, repeat),
        },
        "decode_json_fields_ms": {
            "json": 1e3 * time_per_call(stdlib_decode, repeat),
            "orjson": 1e3 * time_per_call(fast_decode, repeat),
        },
        "from_fields_ms": 1e3 * time_per_call(lambda: StreamRecord.from_fields(as_bytes), repeat),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", type=Path, help="a checkpoint directory (default: make a small one)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch: checkpoint, data")
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("runs/bench/codec.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    checkpoint = ensure_checkpoint(args.work, args.checkpoint_dir)
    from service.settings import Settings

    defaults = Settings(redis_url=None)
    observations = max(defaults.dedup_window, defaults.accuracy_window) + 64  # both windows full
    data = bench_csv(args.work, rows=observations + 200)
    record = asyncio.run(steady_record(checkpoint, data, observations))
    result = {"kind": "codec", "date": now_iso(), "machine": machine_info(), "observations": observations}
    result |= measure(record, args.repeat)
    if record.accuracy is not None:
        result["accuracy_part_bytes"] = {k: len(orjson.dumps(v)) for k, v in record.accuracy.items()}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
