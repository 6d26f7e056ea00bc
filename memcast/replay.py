"""``memcast replay``: post a data set's test split to a running server, observation by
observation, over several streams at once, and score the forecasts it serves.

Each stream is a copy of the series. It is created with the rows just before the test border
as history (``seq_len`` by default: the window the first test forecast reads, as in the online
evaluation protocol), so it is warm at once; then every test row is posted in time order.
Every forecast whose horizon lies inside the test split (the one made from the history, then
one per posted row) is scored against the values that followed, on the checkpoint's scale (its
scaler comes from ``GET /v1/models``), next to the last-value forecast: the forecasts and
errors of ``memcast evaluate --feedback delayed`` on the same data, through HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from trainer.data import read_frame, split_borders


@dataclass(frozen=True)
class ReplayClientConfig:
    url: str
    data: Path
    model: str | None = None
    streams: int = 1
    concurrency: int = 1
    mode: str = "memory_only"
    max_steps: int | None = None
    batch: int = 1
    history_rows: int | None = None
    api_key: str | None = None
    report_every: int = 500
    rate: float | None = None  # observations/s over all streams (open loop); None: as fast as answered
    timeout: float = 60.0
    keep: bool = False
    bulk: int | None = None  # items per POST /v1/observations across streams; None: per-stream requests
    prefix: str = field(default_factory=lambda: f"replay-{uuid.uuid4().hex[:6]}")


@dataclass
class Scores:
    """Running squared and absolute errors of the service and of the last-value forecast."""

    n: int = 0
    se: float = 0.0
    ae: float = 0.0
    base_se: float = 0.0
    base_ae: float = 0.0

    def add(self, forecast: np.ndarray, baseline: np.ndarray, actual: np.ndarray) -> None:
        self.n += actual.size
        self.se += float(((forecast - actual) ** 2).sum())
        self.ae += float(np.abs(forecast - actual).sum())
        self.base_se += float(((baseline - actual) ** 2).sum())
        self.base_ae += float(np.abs(baseline - actual).sum())

    def means(self) -> dict[str, float]:
        n = max(self.n, 1)
        nan = math.nan
        return {
            "mse": self.se / n if self.n else nan,
            "mae": self.ae / n if self.n else nan,
            "last_value_mse": self.base_se / n if self.n else nan,
            "last_value_mae": self.base_ae / n if self.n else nan,
        }


@dataclass(frozen=True)
class Series:
    raw: np.ndarray  # [n, c] in the model's column order, file units
    stamps: list[int | str]
    border: int  # first test row
    history_start: int
    end: int  # posting stops before this row (--max-steps)
    split_end: int  # the test split's end: forecasts are scored against rows before it


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_series(path: Path, model: dict[str, Any], history_rows: int | None, max_steps: int | None) -> Series:
    frame = read_frame(path)
    missing = [c for c in model["columns"] if c not in frame.columns]
    if missing:
        raise SystemExit(f"{path} has no column(s) {missing} that model {model['name']!r} reads")
    raw = frame[model["columns"]].to_numpy(dtype=np.float64)
    seq_len = model["seq_len"]
    splits = split_borders(len(raw), seq_len, path.name)
    border = splits.test[0] + seq_len
    history_start = max(0, border - (seq_len if history_rows is None else history_rows))
    end = splits.test[1] if max_steps is None else min(splits.test[1], border + max_steps)
    stamps = [ts.isoformat() for ts in frame["date"]]
    return Series(raw, stamps, border, history_start, end, splits.test[1])


class Replay:
    def __init__(self, config: ReplayClientConfig, model: dict[str, Any], series: Series) -> None:
        self.config, self.model, self.series = config, model, series
        cols = model["columns"]
        self.target_idx = [cols.index(t) for t in model["targets"]]
        self.mean = np.asarray(model["mean"])[self.target_idx]
        self.std = np.asarray(model["std"])[self.target_idx]
        self.total = Scores()
        self.window = Scores()
        self.latencies: list[float] = []
        self.errors = 0
        self.observations = 0
        self.sent_since_report = 0
        self.started = time.perf_counter()
        self.gate = asyncio.Semaphore(config.concurrency)
        self.tls: ssl.SSLContext | bool = True

    def scaled(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    async def run_stream(self, client: httpx.AsyncClient, stream_id: str, index: int) -> None:
        # A client per stream: one stream's posts are sequential, and httpcore scans every
        # pooled connection on each request, which costs more than the request with 100.
        async with httpx.AsyncClient(
            base_url=client.base_url,
            headers=client.headers,
            timeout=client.timeout,
            verify=self.tls,  # loading the CA bundle per client costs ~50 ms each
            limits=httpx.Limits(max_connections=1),
        ) as own:
            await self._post_all(own, stream_id, index)

    async def _post_all(self, client: httpx.AsyncClient, stream_id: str, index: int) -> None:
        s, cfg, pred_len = self.series, self.config, self.model["pred_len"]
        # with a rate, stream k posts at start + (k + n * streams) / rate: evenly spread load
        interval = cfg.streams * cfg.batch / cfg.rate if cfg.rate else 0.0
        due = self.started + (index * cfg.batch / cfg.rate if cfg.rate else 0.0)
        for start in range(s.border, s.end, cfg.batch):
            stop = min(start + cfg.batch, s.end)
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due += interval
            body = {
                "observations": [
                    {"timestamp": s.stamps[t], "values": s.raw[t].tolist()} for t in range(start, stop)
                ]
            }
            async with self.gate:
                t0 = time.perf_counter()
                response = await client.post(f"/v1/streams/{stream_id}/observations", json=body)
                self.latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                self.errors += 1
                _say(f"{stream_id}: {response.status_code} {response.text[:300]}")
                return
            self.observations += stop - start
            self.score(response.json(), last=stop - 1, pred_len=pred_len)
            self.sent_since_report += stop - start
            if self.sent_since_report >= cfg.report_every:
                self.sent_since_report = 0
                self.report()

    async def run_bulk(self, client: httpx.AsyncClient, ids: list[str]) -> None:
        """``--bulk N``: the streams split into ``concurrency`` groups, each posting its streams'
        rows, time step by time step, ``N`` items per ``POST /v1/observations`` (one request in
        flight per group, so that every stream's rows arrive in time order)."""
        from memcast.client import AsyncClient

        assert self.config.bulk is not None
        s, size, pred_len = self.series, self.config.bulk, self.model["pred_len"]
        index = {stamp: t for t, stamp in enumerate(s.stamps)}
        groups = [ids[k :: self.config.concurrency] for k in range(min(self.config.concurrency, len(ids)))]

        async def post_group(group: list[str]) -> None:
            items = [(sid, s.stamps[t], s.raw[t].tolist()) for t in range(s.border, s.end) for sid in group]
            async with AsyncClient(
                self.config.url, api_key=self.config.api_key, timeout=self.config.timeout
            ) as mc:
                for start in range(0, len(items), size):
                    chunk = items[start : start + size]
                    t0 = time.perf_counter()
                    result = await mc.bulk(chunk)
                    self.latencies.append(time.perf_counter() - t0)
                    failed = [o for o in result["observations"] if o["status"] == "error"]
                    if failed:
                        self.errors += 1
                        _say(f"bulk: {len(failed)} items refused, first: {failed[0]}")
                        return
                    self.observations += len(chunk)
                    self.sent_since_report += len(chunk)
                    for stream in result["streams"]:
                        self.score(stream, last=index[stream["last_timestamp"]], pred_len=pred_len)
                    if self.sent_since_report >= self.config.report_every:
                        self.sent_since_report = 0
                        self.report()

        await asyncio.gather(*(post_group(g) for g in groups))

    def score(self, payload: dict[str, Any], last: int, pred_len: int) -> None:
        """Score the forecast made after row ``last`` against the rows that followed it."""
        forecast = payload.get("forecast")
        if forecast is None or last + pred_len >= self.series.split_end:
            return
        targets = self.model["targets"]
        predicted = np.asarray([[row["values"][t] for t in targets] for row in forecast["rows"]])
        actual = self.series.raw[last + 1 : last + 1 + pred_len][:, self.target_idx]
        baseline = np.repeat(self.series.raw[last : last + 1, self.target_idx], pred_len, axis=0)
        args = (self.scaled(predicted), self.scaled(baseline), self.scaled(actual))
        self.total.add(*args)
        self.window.add(*args)

    def report(self) -> None:
        t, w = self.total.means(), self.window.means()
        rate = self.observations / max(time.perf_counter() - self.started, 1e-9)
        _say(
            f"obs {self.observations:>7d} | rolling mse {w['mse']:.4f} mae {w['mae']:.4f} "
            f"(last value {w['last_value_mse']:.4f} / {w['last_value_mae']:.4f}) | "
            f"total mse {t['mse']:.4f} (last value {t['last_value_mse']:.4f}) | {rate:.0f} obs/s"
        )
        self.window = Scores()

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "model": self.model["name"],
            "mode": self.config.mode,
            "streams": self.config.streams,
            "concurrency": self.config.concurrency,
            "rate": self.config.rate,
            "batch": self.config.batch,
            "observations": self.observations,
            "requests": len(self.latencies),
            "errors": self.errors,
            "seconds": seconds,
            "throughput_obs_per_s": self.observations / max(seconds, 1e-9),
            "latency_ms": {
                "p50": float(np.percentile(lat, 50)),
                "p95": float(np.percentile(lat, 95)),
                "p99": float(np.percentile(lat, 99)),
                "mean": float(lat.mean()),
            },
            "scored_values": self.total.n,
            **self.total.means(),
        }


async def replay(config: ReplayClientConfig) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    tls = ssl.create_default_context()
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, timeout=config.timeout, limits=limits, verify=tls
    ) as client:
        model = await _pick_model(client, config.model)
        series = load_series(config.data, model, config.history_rows, config.max_steps)
        history = [
            {"timestamp": series.stamps[t], "values": series.raw[t].tolist()}
            for t in range(series.history_start, series.border)
        ]
        ids = [f"{config.prefix}-{i}" for i in range(config.streams)]
        _say(
            f"replaying {config.data.name}: {series.end - series.border} test rows x {config.streams} stream(s), "
            f"model {model['name']}, mode {config.mode}, concurrency {config.concurrency}"
        )
        run = Replay(config, model, series)
        run.tls = tls
        gate = asyncio.Semaphore(min(config.concurrency, 8))

        async def create(stream_id: str) -> None:
            body = {"id": stream_id, "model": model["name"], "mode": config.mode, "history": history}
            async with gate:  # a history is many observations in one request: allow it time
                response = await client.post("/v1/streams", json=body, timeout=max(config.timeout, 600.0))
            if response.status_code != 201:
                raise SystemExit(f"creating stream {stream_id}: {response.status_code} {response.text[:300]}")

        await asyncio.gather(*(create(i) for i in ids))
        for stream_id in ids:  # the forecast made from the history alone is the first one scored
            response = await client.get(f"/v1/streams/{stream_id}/forecast")
            response.raise_for_status()
            run.score(response.json(), last=series.border - 1, pred_len=model["pred_len"])
        run.started = start = time.perf_counter()
        try:
            if config.bulk:
                await run.run_bulk(client, ids)
            else:
                await asyncio.gather(*(run.run_stream(client, sid, k) for k, sid in enumerate(ids)))
        finally:
            seconds = time.perf_counter() - start
            if not config.keep:
                await asyncio.gather(
                    *(client.delete(f"/v1/streams/{i}") for i in ids), return_exceptions=True
                )
    summary = run.summary(seconds)
    lat = summary["latency_ms"]
    _say(
        f"done: {summary['observations']} observations in {seconds:.1f} s = "
        f"{summary['throughput_obs_per_s']:.0f} obs/s; latency p50 {lat['p50']:.1f} ms, "
        f"p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms; errors {summary['errors']}"
    )
    _say(
        f"scaled errors over {summary['scored_values']} values: mse {summary['mse']:.4f} mae {summary['mae']:.4f} | "
        f"last value mse {summary['last_value_mse']:.4f} mae {summary['last_value_mae']:.4f}"
    )
    return summary


async def _pick_model(client: httpx.AsyncClient, name: str | None) -> dict[str, Any]:
    response = await client.get("/v1/models")
    response.raise_for_status()
    listing = response.json()
    wanted = name or listing["default"]
    for model in listing["models"]:
        if model["name"] == wanted:
            return model
    raise SystemExit(
        f"model {wanted!r} is not served at {client.base_url} (has {[m['name'] for m in listing['models']]})"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
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
    replay.add_argument(
        "--bulk",
        type=int,
        default=None,
        metavar="N",
        help="post N observations per request across streams (POST /v1/observations); --concurrency "
        "groups of streams post at once",
    )
    replay.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    replay.add_argument("--keep", action="store_true", help="keep the streams after the replay")
    replay.add_argument("--json", dest="json_out", type=Path, help="write the summary numbers to this file")
    replay.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    config = ReplayClientConfig(
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
        bulk=args.bulk,
    )
    summary = asyncio.run(replay(config))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2))
    return 0 if summary["errors"] == 0 else 1
