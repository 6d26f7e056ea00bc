"""Server memory with many streams: ``memcast serve`` on Redis, ``--streams`` warm streams made
with ``POST /v1/streams:batchCreate``, then one bulk round of observations to every stream;
the server's resident memory (with its children) after each phase. State lives in Redis, so
the server's memory should not grow with the number of streams.

    python -m bench.rss --streams 10000 --out runs/bench/rss.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench._common import bench_csv, ensure_checkpoint, machine_info, now_iso, write_json
from bench._loadgen import Streams
from bench.load import start_redis, start_server


def rss_mib(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    return (process.memory_info().rss + sum(c.memory_info().rss for c in process.children(True))) / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(args.work, args.checkpoint_dir)
    data = args.data or bench_csv(args.work)
    redis, _ = start_redis(args.work)
    phases: list[dict[str, Any]] = []
    try:
        server, model, _ = start_server(checkpoint, args.work / "logs" / "rss-serve.log", redis.url, None)
        assert server.process is not None
        pid = server.process.pid
        try:
            phases.append({"phase": "started", "streams": 0, "rss_mib": rss_mib(pid)})
            with data.open() as f:
                raw = [[float(v) for v in line.split(",")[1:]] for line in list(f)[1:]]
            streams = Streams(raw, args.history)
            with httpx.Client(base_url=server.url, timeout=600) as client:
                started = time.perf_counter()
                for first in range(0, args.streams, args.per_request):
                    ids = range(first, min(first + args.per_request, args.streams))
                    for i in ids:
                        streams.add(f"rss-{i:06d}")
                    body = {"streams": [streams.history_body(i, model, "memory_only") for i in ids]}
                    response = client.post("/v1/streams:batchCreate", json=body)
                    response.raise_for_status()
                    if response.json()["errors"]:
                        raise RuntimeError(f"batch create failed: {response.text[:300]}")
                created_s = time.perf_counter() - started
                phases.append({"phase": "created", "streams": args.streams, "rss_mib": rss_mib(pid)})
                started = time.perf_counter()
                for first in range(0, args.streams, 100):
                    items = [
                        {
                            "stream_id": streams.ids[i],
                            "timestamp": args.history,
                            "values": streams.row(i, args.history),
                        }
                        for i in range(first, min(first + 100, args.streams))
                    ]
                    response = client.post(
                        "/v1/observations", json={"observations": items, "forecasts": "none"}
                    )
                    response.raise_for_status()
                observed_s = time.perf_counter() - started
                phases.append({"phase": "observed", "streams": args.streams, "rss_mib": rss_mib(pid)})
        finally:
            server.stop()
    finally:
        redis.stop()
    return {
        "kind": "rss",
        "date": now_iso(),
        "machine": machine_info(),
        "streams": args.streams,
        "history_rows": args.history,
        "create_seconds": round(created_s, 1),
        "observe_round_seconds": round(observed_s, 1),
        "phases": phases,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument(
        "--history", type=int, default=60, help="history rows per stream (warm: seq_len + pred_len)"
    )
    p.add_argument("--per-request", type=int, default=250, help="streams per batch creation request")
    p.add_argument("--checkpoint-dir", type=Path, help="a checkpoint directory (default: make a small one)")
    p.add_argument("--data", type=Path, help="CSV whose rows the streams post (default: memcast make-data)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch: checkpoint, logs, redis")
    p.add_argument("--out", type=Path, default=Path("runs/bench/rss.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
