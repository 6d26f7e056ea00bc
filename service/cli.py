"""``memcast serve`` and ``memcast settings``."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the forecasting service (uvicorn)")
    serve.add_argument("--host", help="bind address (MEMCAST_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MEMCAST_PORT, default 8000)")
    serve.add_argument("--checkpoints", help="checkpoint directory (MEMCAST_CHECKPOINT_DIR)")
    serve.add_argument("--default-model", help="MEMCAST_DEFAULT_MODEL")
    serve.add_argument("--redis-url", help="MEMCAST_REDIS_URL; unset: the embedded in-process store")
    serve.add_argument("--workers-threads", type=int, help="model threads (MEMCAST_WORKERS_THREADS)")
    serve.add_argument(
        "--processes",
        type=int,
        help="server processes sharing the port (MEMCAST_PROCESSES; needs Redis above 1)",
    )
    serve.add_argument("--log-level", dest="server_log_level", help="uvicorn log level (MEMCAST_LOG_LEVEL)")
    serve.set_defaults(func=run_serve)

    settings = subparsers.add_parser("settings", help="list the service's MEMCAST_* settings and defaults")
    settings.set_defaults(func=run_settings)


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
        "MEMCAST_PROCESSES": args.processes,
        "MEMCAST_LOG_LEVEL": args.server_log_level,
    }
    # Flags become environment variables so that the factory (and any worker) reads one Settings.
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = str(value)
    get_settings.cache_clear()
    settings = Settings()
    if settings.processes > 1 and not settings.redis_url:
        # each process would hold its own embedded store: a stream's requests would land on
        # different states depending on which process accepted the connection
        sys.stderr.write(
            "memcast serve: MEMCAST_PROCESSES above 1 needs MEMCAST_REDIS_URL (the embedded store "
            "lives in one process); set a Redis URL or run one process\n"
        )
        return 2
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop=settings.loop,
        http=settings.http,
        access_log=settings.log_level == "debug",
        # one process (None) runs in this one; more fork workers that share the socket, and
        # share streams through Redis as replicas do
        workers=settings.processes if settings.processes > 1 else None,
    )
    return 0


def run_settings(args: argparse.Namespace) -> int:
    from service.settings import settings_table

    sys.stdout.write(settings_table())
    return 0
