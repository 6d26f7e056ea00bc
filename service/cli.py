"""``memcast serve`` and ``memcast replay``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the forecasting service (uvicorn)")
    serve.add_argument("--host", help="bind address (MEMCAST_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MEMCAST_PORT, default 8000)")
    serve.add_argument("--checkpoints", help="checkpoint directory (MEMCAST_CHECKPOINT_DIR)")
    serve.add_argument("--default-model", help="MEMCAST_DEFAULT_MODEL")
    serve.add_argument("--redis-url", help="MEMCAST_REDIS_URL; unset: the embedded in-process store")
    serve.add_argument("--workers-threads", type=int, help="model threads (MEMCAST_WORKERS_THREADS)")
    serve.add_argument("--log-level", dest="server_log_level", help="uvicorn log level (MEMCAST_LOG_LEVEL)")
    serve.set_defaults(func=run_serve)

    replay = subparsers.add_parser(
        "replay", help="post a data set's test split to a running server and score its forecasts"
    )
    replay.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    replay.add_argument("--data", required=True, type=Path, help="CSV with a date column")
    replay.add_argument("--model", help="model name (default: the server's default model)")
    replay.add_argument("--streams", type=int, default=1, help="streams, each a copy of the series")
    replay.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: streams)")
    replay.add_argument("--mode", default="memory_only", choices=["memory_only", "full_model", "none"])
    replay.add_argument("--max-steps", type=int, default=None, help="observations per stream (default: all)")
    replay.add_argument("--batch", type=int, default=1, help="observations per request")
    replay.add_argument(
        "--rate",
        type=float,
        default=None,
        help="target observations/s over all streams (default: as fast as answered)",
    )
    replay.add_argument(
        "--history-rows",
        type=int,
        default=None,
        help="rows before the test border sent at creation (default seq_len)",
    )
    replay.add_argument(
        "--api-key", default=os.environ.get("MEMCAST_API_KEY"), help="sent as Bearer (MEMCAST_API_KEY)"
    )
    replay.add_argument(
        "--report-every", type=int, default=500, help="print the rolling errors every N observations"
    )
    replay.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    replay.add_argument("--keep", action="store_true", help="keep the streams after the replay")
    replay.add_argument("--json", dest="json_out", type=Path, help="write the summary numbers to this file")
    replay.set_defaults(func=run_replay)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.settings import Settings, get_settings

    overrides = {
        "MEMCAST_HOST": args.host,
        "MEMCAST_PORT": args.port,
        "MEMCAST_CHECKPOINT_DIR": args.checkpoints,
        "MEMCAST_DEFAULT_MODEL": args.default_model,
        "MEMCAST_REDIS_URL": args.redis_url,
        "MEMCAST_WORKERS_THREADS": args.workers_threads,
        "MEMCAST_LOG_LEVEL": args.server_log_level,
    }
    # Flags become environment variables so that the factory (and any worker) reads one Settings.
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = str(value)
    get_settings.cache_clear()
    settings = Settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
    )
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from service.replay import ReplayConfig, replay

    config = ReplayConfig(
        url=args.url,
        data=args.data,
        model=args.model,
        streams=args.streams,
        concurrency=args.concurrency or args.streams,
        mode=args.mode,
        max_steps=args.max_steps,
        batch=args.batch,
        history_rows=args.history_rows,
        api_key=args.api_key,
        report_every=args.report_every,
        rate=args.rate,
        timeout=args.timeout,
        keep=args.keep,
    )
    summary = asyncio.run(replay(config))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2))
    return 0 if summary["errors"] == 0 else 1
