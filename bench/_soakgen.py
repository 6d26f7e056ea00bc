"""The load generator of ``bench/soak.py``, in its own process (as ``bench/_loadgen.py``):

    python -m bench._soakgen SPEC.json OUT.json

Creates the streams (warm: ``seq_len + pred_len`` rows of history), writes ``SPEC.ready`` with
the wall-clock time posting starts, then posts one observation per request at a fixed rate
(open loop: request ``k`` is due at ``start + k / rate``, to stream ``k mod N``) until the
duration is over. A stream never has two requests in flight: a stream whose previous request
is still out when its next turn comes skips that turn (counted). An observation is
*acknowledged* when the server answers 200 (applied, or a duplicate of one applied before);
a stream re-posts its next unacknowledged observation on its next turn, so after a 503 or a
lost connection it retries the same step, at the pace ``Retry-After: 1`` asks for.

Latency is measured from the moment a request was due, not from when it was sent, so a
server that falls behind shows it (no coordinated omission). ``OUT.json`` holds per-minute
counts by status and latency percentiles, and each stream's acknowledged steps.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import write_json
from bench._http import RawPoster
from bench._loadgen import Streams, create_streams, percentiles


class Minutes:
    """Counts by status and latencies, per minute since posting started."""

    def __init__(self) -> None:
        self.status: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.latency: dict[int, list[float]] = collections.defaultdict(list)
        self.samples: list[str] = []

    def add(self, minute: int, status: str, latency_s: float | None, sample: str | None = None) -> None:
        self.status[minute][status] += 1
        if latency_s is not None:
            self.latency[minute].append(latency_s)
        if sample is not None and len(self.samples) < 20:
            self.samples.append(sample)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "minute": m,
                "requests": sum(self.status[m].values()),
                "by_status": dict(self.status[m]),
                "latency_ms": percentiles(self.latency[m]),
            }
            for m in sorted(self.status)
        ]


async def post_loop(spec: dict[str, Any], streams: Streams, start: float) -> tuple[Minutes, int]:
    """Post at ``spec['rate']`` requests/s for ``spec['seconds']``; (per-minute stats, skipped turns)."""
    n, rate, seconds = len(streams.ids), spec["rate"], spec["seconds"]
    pool: asyncio.Queue[RawPoster] = asyncio.Queue()
    for _ in range(spec["connections"]):
        pool.put_nowait(RawPoster(spec["url"], spec["timeout"]))
    minutes, busy, tasks = Minutes(), [False] * n, set()
    skipped = 0

    async def post(i: int, due: float) -> None:
        poster = await pool.get()
        step = streams.cursor[i]
        body = json.dumps({"timestamp": step, "values": streams.row(i, step)}).encode()
        minute = int((due - start) // 60)
        try:
            status, data = await poster.request("POST", f"/v1/streams/{streams.ids[i]}/observations", body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            minutes.add(minute, f"transport: {type(exc).__name__}", None, f"{type(exc).__name__}: {exc}")
        else:
            latency = time.time() - due
            if status == 200:
                streams.cursor[i] = step + 1  # acknowledged
                minutes.add(minute, "200", latency)
            else:
                minutes.add(minute, str(status), latency, f"{status} {data[:200].decode(errors='replace')}")
        finally:
            pool.put_nowait(poster)
            busy[i] = False

    k = 0
    while True:
        due = start + k / rate
        if due >= start + seconds:
            break
        await asyncio.sleep(max(0.0, due - time.time()))
        i = k % n
        k += 1
        if busy[i]:
            skipped += 1
            continue
        busy[i] = True
        task = asyncio.create_task(post(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    while not pool.empty():
        await pool.get_nowait().aclose()
    return minutes, skipped


async def client_main(spec: dict[str, Any], ready: Path) -> dict[str, Any]:
    import httpx

    from trainer.data import read_frame

    # set-up is not timed: a creation learns its whole history, slow on a busy machine
    async with httpx.AsyncClient(base_url=spec["url"], timeout=max(120.0, spec["timeout"])) as client:
        listing = (await client.get("/v1/models")).json()
        model = next(m for m in listing["models"] if m["name"] == spec["model"])
        raw = read_frame(spec["data"])[model["columns"]].to_numpy(dtype=float).tolist()
        streams = Streams(raw, model["seq_len"] + model["pred_len"])
        errors: list[str] = []
        creation = {"mode": "memory_only", "create_concurrency": 8}
        created, create_s = await create_streams(
            client, streams, spec["streams"], spec | creation, "memory_only", errors
        )
        if errors:
            raise RuntimeError(f"creating the streams failed: {errors[:3]}")
    start = time.time() + 1.0
    ready.write_text(json.dumps({"start": start}))
    minutes, skipped = await post_loop(spec, streams, start)
    return {
        "start": start,
        "streams": created,
        "create_seconds": create_s,
        "history": streams.history,
        "skipped_turns": skipped,
        "minutes": minutes.rows(),
        "error_samples": minutes.samples,
        # what the server acknowledged: steps of stream i = its history + acknowledged posts
        "acknowledged_steps": dict(zip(streams.ids, streams.cursor, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    spec = json.loads(spec_path.read_text())
    write_json(out_path, asyncio.run(client_main(spec, spec_path.with_suffix(".ready"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
