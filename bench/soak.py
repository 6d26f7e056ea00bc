"""Soak: ``memcast serve`` on Redis held at a steady load for a long time, with one Redis
restart in the middle. A benchmark, not a test: it reports what happened.

    python -m bench.soak                      # 100 obs/s over 100 streams for 30 minutes
    python -m bench.soak --minutes 5 --out runs/bench/soak.json --doc docs/soak.md

Redis runs with the deployment's ``docker/redis.conf`` (append-only file, ``appendfsync
everysec``), so the restart (SIGTERM, as ``docker compose restart redis``; ``--restart kill``
for SIGKILL) keeps the data. The load generator (``bench/_soakgen.py``, its own process)
creates the streams, then posts at a fixed rate; while it runs this driver samples the
server's resident memory and Redis's memory every ``--sample-s`` seconds and restarts Redis
at half time. Afterwards it compares each stream's ``steps`` in Redis with the observations
the server acknowledged (200): an acknowledged observation missing from Redis is *lost*.

Reported: RSS of the server over time, requests per minute by status, p50/p99 latency per
minute (from the moment a request was due), lost acknowledged observations, and the restart's
outage as the clients saw it. JSON to ``--out``; ``--doc`` writes the Markdown page and its plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import ROOT, bench_csv, child_env, ensure_checkpoint, machine_info, now_iso, write_json
from bench.load import server_settings_from, start_server
from memcast.harness import RedisServer

REDIS_CONF = ROOT / "docker" / "redis.conf"


def sample(server_pid: int, redis: RedisServer, start: float) -> dict[str, Any]:
    """Resident memory and CPU seconds of the server (and its children), and Redis's
    ``used_memory``, now."""
    import psutil
    import redis as redis_py

    process = psutil.Process(server_pid)
    children = process.children(recursive=True)
    rss = process.memory_info().rss + sum(c.memory_info().rss for c in children)
    cpu = sum(sum(p.cpu_times()[:2]) for p in (process, *children))
    try:
        with redis.client(timeout=1.0) as client:
            used: int | None = int(client.info("memory")["used_memory"])
    except redis_py.RedisError:
        used = None  # down or loading
    return {"t_s": round(time.time() - start, 1), "rss_bytes": rss, "cpu_s": cpu, "redis_used_memory": used}


def restart_redis(redis: RedisServer, how: str, outage_s: float) -> dict[str, float]:
    """Stop Redis (SIGTERM or SIGKILL), leave it down ``outage_s``, start it again (it reloads
    its append-only file before answering)."""
    t0 = time.time()
    if how == "kill":
        redis.kill()
    else:
        redis.stop()
    time.sleep(outage_s)
    t1 = time.time()
    redis.start(timeout=120)
    return {"stopped_at": t0, "started_at": t1, "ready_at": time.time()}


def redis_steps(redis: RedisServer, prefix: str, ids: list[str]) -> dict[str, int | None]:
    """Each stream's ``steps`` as Redis holds it (``None``: the stream is gone)."""
    with redis.client() as client:
        values = [client.hget(f"{prefix}:{{{i}}}", "steps") for i in ids]
    return {i: None if v is None else int(json.loads(v)) for i, v in zip(ids, values, strict=True)}


def lost_observations(acknowledged: dict[str, int], stored: dict[str, int | None]) -> dict[str, Any]:
    lost = {i: n - (stored[i] or 0) for i, n in acknowledged.items() if (stored[i] or 0) < n}
    extra = {i: s - acknowledged[i] for i, s in stored.items() if s is not None and s > acknowledged[i]}
    return {
        "lost": sum(lost.values()),
        "streams_losing": len(lost),
        "streams_missing": sum(1 for s in stored.values() if s is None),
        # applied but never acknowledged (the answer was lost): harmless, a re-post is a duplicate
        "applied_unacknowledged": sum(extra.values()),
        "lost_by_stream": dict(list(lost.items())[:20]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(work, args.checkpoint_dir)
    data = args.data or bench_csv(work)
    redis_dir = work / "soak-redis"
    shutil.rmtree(redis_dir, ignore_errors=True)  # a fresh append-only file
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(redis_dir, config=REDIS_CONF, log=logs / "soak-redis.log")
    redis.start()
    machine = machine_info()
    seconds = args.minutes * 60
    try:
        server, model, server_env = start_server(
            checkpoint, logs / "soak-serve.log", redis.url, None, server_settings_from(args.server_env)
        )
        try:
            assert server.process is not None
            spec = {
                "url": server.url,
                "model": model,
                "data": str(data),
                "streams": args.streams,
                "rate": args.rate,
                "seconds": seconds,
                "connections": args.connections,
                "timeout": args.request_timeout,
            }
            spec_path, out_path = work / "soak.spec.json", work / "soak-client.json"
            write_json(spec_path, spec)
            for stale in (out_path, spec_path.with_suffix(".ready")):
                stale.unlink(missing_ok=True)
            generator = subprocess.Popen(
                [sys.executable, "-m", "bench._soakgen", str(spec_path), str(out_path)],
                env=child_env(),
                cwd=ROOT,
            )
            samples, restart = watch(
                generator, server.process.pid, redis, spec_path.with_suffix(".ready"), args
            )
            if generator.returncode != 0 or not out_path.is_file():
                raise RuntimeError(f"the soak generator failed ({generator.returncode})")
            client = json.loads(out_path.read_text())
            samples.append(sample(server.process.pid, redis, client["start"]))
            stored = redis_steps(redis, "memcast", list(client["acknowledged_steps"]))
        finally:
            server.stop()
    finally:
        redis.stop()
    start = client["start"]
    return {
        "kind": "soak",
        "date": now_iso(),
        "machine": machine,
        "command": " ".join(["python -m bench.soak", *(sys.argv[1:] if args.record_argv else [])]),
        "settings": {
            "minutes": args.minutes,
            "streams": args.streams,
            "rate_obs_per_s": args.rate,
            "connections": args.connections,
            "restart": args.restart,
            "outage_s": args.outage_s,
            "redis_conf": "docker/redis.conf (appendonly yes, appendfsync everysec)",
            "server_env": server_env,
        },
        "checkpoint": str(checkpoint),
        "restart": {k: round(v - start, 2) for k, v in restart.items()},
        "memory": samples,
        "minutes": client["minutes"],
        "skipped_turns": client["skipped_turns"],
        "error_samples": client["error_samples"],
        "observations": lost_observations(client["acknowledged_steps"], stored)
        | {
            "acknowledged": sum(client["acknowledged_steps"].values()) - client["history"] * client["streams"]
        },
    }


def watch(
    generator: subprocess.Popen[bytes],
    server_pid: int,
    redis: RedisServer,
    ready: Path,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample memory until the generator exits; restart Redis once, at half time."""
    while not ready.is_file():
        if generator.poll() is not None:
            raise RuntimeError(f"the soak generator exited ({generator.returncode}) before posting")
        time.sleep(0.2)
    start = json.loads(ready.read_text())["start"]
    half = start + args.minutes * 30
    samples: list[dict[str, Any]] = []
    restart: dict[str, float] = {}
    next_sample = start
    while generator.poll() is None:
        now = time.time()
        if args.restart != "none" and not restart and now >= half:
            print(f"soak: restarting Redis ({args.restart}) at {now - start:.0f} s", flush=True)
            restart = restart_redis(redis, args.restart, args.outage_s)
        if now >= next_sample:
            samples.append(sample(server_pid, redis, start))
            next_sample += args.sample_s
            if len(samples) % 6 == 1:
                print(
                    f"soak: {samples[-1]['t_s']:.0f} s, server RSS {samples[-1]['rss_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
        time.sleep(0.2)
    return samples, restart


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="posting time (the restart is at half)")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--rate", type=float, default=100.0, help="observations per second, all streams together")
    p.add_argument("--connections", type=int, default=16, help="HTTP connections of the generator")
    p.add_argument(
        "--restart",
        choices=["term", "kill", "none"],
        default="term",
        help="how Redis is stopped (none: it is not)",
    )
    p.add_argument("--outage-s", type=float, default=5.0, help="seconds Redis stays down")
    p.add_argument("--sample-s", type=float, default=10.0, help="memory sampling period")
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="MEMCAST_NAME=VALUE",
        help="a server setting (repeatable), e.g. MEMCAST_PROCESSES=2",
    )
    p.add_argument("--checkpoint-dir", type=Path, help="a checkpoint directory (default: make a small one)")
    p.add_argument("--data", type=Path, help="CSV whose rows the streams post (default: memcast make-data)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch: checkpoint, logs, redis")
    p.add_argument("--out", type=Path, default=Path("runs/bench/soak.json"))
    p.add_argument("--doc", type=Path, help="write the Markdown report (and its plot beside it, in img/)")
    p.add_argument("--no-record-argv", dest="record_argv", action="store_false", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(args)
    write_json(args.out, result)
    print(f"soak: wrote {args.out}")
    if args.doc is not None:
        from bench._soak_report import write_soak_report

        write_soak_report(result, args.doc)
        print(f"soak: wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
