"""The speed sections of docs/benchmarks.md: the compute floor, the service under load, memory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench._format import floor_at, kib, matched_floor, mib, num, ratio, table


def headline(floor: dict[str, Any] | None, load: dict[str, Any] | None) -> list[str]:
    if load is None:
        return []
    lines = ["### Service: throughput and latency against the compute floor", ""]
    body = []
    for store in load["stores"]:
        for mode in dict.fromkeys(c["mode"] for c in store["cells"]):
            sub = [c for c in store["cells"] if c["mode"] == mode]
            n_max = max(c["streams"] for c in sub)
            for c in sorted((c for c in sub if c["streams"] == n_max), key=lambda c: c["concurrency"]):
                body.append(
                    [
                        store["store"],
                        mode,
                        n_max,
                        c["concurrency"],
                        num(c["obs_per_s"]),
                        num(c["latency_ms"]["p50"]),
                        num(c["latency_ms"]["p99"]),
                        c["errors"],
                        num(c.get("streams_per_model_call"), 1),
                        ratio(c["obs_per_s"], floor_at(floor, c, 1)),
                        ratio(c["obs_per_s"], matched_floor(floor, c)),
                        cpu_ratio(floor, c),
                    ]
                )
    header = ["store", "mode", "N", "C", "obs/s", "p50 ms", "p99 ms", "errors", "streams/call"]
    header += ["ratio to floor B=1", "ratio to floor, same batch", "CPU ratio, same batch"]
    lines += table(header, body)
    lines += [
        "Ratio = service throughput / in-process floor of the same update mode (section *Compute floor*), "
        "both in wall-clock observations per second: against the floor of one stream (B=1), and against "
        "the floor at the batch the service reached (`streams/call`, the mean streams per model call). "
        "The two were measured minutes apart on a shared machine, so other processes weigh on them "
        "differently; *CPU ratio* compares CPU time per observation instead (floor CPU ms / server CPU ms), "
        "which the other processes barely change. Details, Redis round trips and memory below.",
        "",
    ]
    return lines


def cpu_ratio(floor: dict[str, Any] | None, cell: dict[str, Any]) -> str:
    """Floor CPU time per observation (at the service's batch) / server CPU time per observation."""
    per_cpu_s = matched_floor(floor, cell, cpu=True)
    if not per_cpu_s or not cell.get("server_cpu_s"):
        return "–"
    server_ms = 1000 * cell["server_cpu_s"] / max(cell["observations"], 1)
    return num((1000 / per_cpu_s) / server_ms, 2)


def findings(floor: dict[str, Any] | None, load: dict[str, Any] | None) -> list[str]:
    """A few sentences read off the tables of this run: where the service's time goes."""
    if load is None:
        return []
    out: list[str] = []
    codec = {}
    if floor is not None:
        rows = [r for r in floor["rows"] if r["config"].endswith("(checkpoint)")] or floor["rows"]
        codec = {r["mode"]: r["codec_ms"] for r in rows}
    for mode in ("memory_only", "full_model"):
        cells = [
            c for s in load["stores"] if s["store"] == "embedded" for c in s["cells"] if c["mode"] == mode
        ]
        if not cells:
            continue
        n_max = max(c["streams"] for c in cells)
        c = max((c for c in cells if c["streams"] == n_max), key=lambda c: c["concurrency"])
        obs = max(c["observations"], 1)
        base = matched_floor(floor, c, cpu=True)
        parts = [
            f"`{mode}`, embedded store, N={n_max}, C={c['concurrency']}: the server spent "
            f"{1000 * c['server_cpu_s'] / obs:.1f} ms of CPU per observation"
        ]
        if c.get("server_loop_cpu_s") is not None:
            parts.append(
                f" ({1000 * c['server_loop_cpu_s'] / obs:.1f} ms in the event-loop thread: HTTP, validation, "
                f"JSON, store; {1000 * c['server_model_cpu_s'] / obs:.1f} ms in the model threads)"
            )
        if base:
            parts.append(
                f", against {1000 / base:.2f} ms of CPU for `observe` alone in-process at the same batch "
                f"({num(c.get('streams_per_model_call'), 1)} streams per call)"
            )
        if mode in codec:
            parts.append(f" and {codec[mode]:.2f} ms to decode + encode one stream's state")
        busy = c["server_cpu_s"] / c["seconds"] if c["seconds"] else math.nan
        parts.append(f"; the server process used {busy:.2f} CPU cores on average during the cell.")
        out.append("- " + "".join(parts))
    redis = [c for s in load["stores"] if s["store"] == "redis" for c in s["cells"]]
    if redis:
        trips = sorted(
            {round(c["redis_round_trips_per_obs"], 2) for c in redis if c.get("redis_round_trips_per_obs")}
        )
        out.append(
            f"- Redis: {trips[0]:.2f}–{trips[-1]:.2f} round trips per observation (`HGETALL` to read the record, "
            "one `EVALSHA` compare-and-set to write it); creating a stream adds a read and the create script."
        )
    full = [c for s in load["stores"] for c in s["cells"] if c["mode"] == "full_model"]
    if full:
        out.append(
            "- `full_model` requests batch across streams like `memory_only` ones (each stream learns with its "
            "own weights, stacked over the stream dimension); `streams/call` says how many shared a call."
        )
    return ["### Where the service's time goes", "", *out, ""] if out else []


def floor_section(floor: dict[str, Any]) -> list[str]:
    rows = floor["rows"]
    m = floor["model"]
    lines = [
        "## Compute floor: `models.online.observe` in-process",
        "",
        f"No HTTP, no store, no state encoding: B warm streams batched in one `observe` call per step "
        f"(seq_len {m['seq_len']}, pred_len {m['pred_len']}, {m['channels']} channels; "
        + (
            f"checkpoint `{Path(floor['checkpoint']).name}`"
            if floor.get("checkpoint")
            else "the default ModelConfig"
        )
        + f"). Each cell runs at most {floor['settings']['max_steps']} steps or {floor['settings']['budget_s']} s "
        "(at least one step). Observations per second:",
        "",
    ]
    batches = sorted({r["batch"] for r in rows})
    for config in dict.fromkeys(r["config"] for r in rows):
        sub = [r for r in rows if r["config"] == config]
        body = []
        for mode in dict.fromkeys(r["mode"] for r in sub):
            by_b = {r["batch"]: r for r in sub if r["mode"] == mode}
            any_r = next(iter(by_b.values()))
            body.append(
                [mode]
                + [num(by_b[b]["obs_per_s"]) if b in by_b else "–" for b in batches]
                + [kib(any_r["state_nbytes"]), kib(any_r["state_blob_bytes"]), num(any_r["codec_ms"], 2)]
            )
        weights = f", {sub[0]['parameters']:,} weights" if "parameters" in sub[0] else ""
        lines += [f"**{config}**{weights}: observations / s (wall clock)", ""]
        lines += table(
            ["update mode"]
            + [f"B={b}" for b in batches]
            + ["state tensors / stream", "state blob / stream", "encode+decode ms / stream"],
            body,
        )
        if all("cpu_ms_per_obs" in r for r in sub):
            cpu_body = []
            for mode in dict.fromkeys(r["mode"] for r in sub):
                by_b = {r["batch"]: r for r in sub if r["mode"] == mode}
                cpu_body.append(
                    [mode] + [num(by_b[b]["cpu_ms_per_obs"], 2) if b in by_b else "–" for b in batches]
                )
            lines += [f"**{config}**: CPU ms per observation (less sensitive to other processes)", ""]
            lines += table(["update mode"] + [f"B={b}" for b in batches], cpu_body)
    lines += [
        "`full_model` learns with each stream's own weights and optimizer moments, stacked over the",
        "stream dimension (`models.online.learn`: `torch.func.vmap` where the model allows, a loop over",
        "the streams for FSNet). The last column is what",
        "the service adds per stream and request to turn the stored blob into a state and back",
        "(`state_from_bytes` + `state_to_bytes`), measured apart from the floor.",
        "",
    ]
    return lines


def load_section(load: dict[str, Any], floor: dict[str, Any] | None, img_rel: str) -> list[str]:
    lines = [
        "## Service: `memcast serve` under load",
        "",
        "`memcast serve` (one process; "
        + _server_settings(load)
        + ") on loopback, driven by an asyncio load "
        "generator in a separate process on the same machine, one keep-alive connection per request in flight ("
        + _client_kind(load)
        + "). Each stream was created with "
        "`seq_len + pred_len` rows of history (warm), then posts one observation per request, in time order; "
        f"streams are taken round-robin, C requests in flight (C <= N). Cells stop after "
        f"{load['settings']['cell_obs']:,} observations or {load['settings']['cell_seconds']} s. "
        "Streams are created in `memory_only`; the `full_model` cells post to the same streams with "
        '`"mode": "full_model"` (a stream\'s first such request adds its weight copy).',
        "",
        "Columns: throughput = applied observations / s; latency per request; `rt/obs` = Redis round trips per "
        "observation (`INFO commandstats` delta, without the commands the Lua scripts run inside Redis); "
        "`streams/call` = mean streams per model call (the server's cross-stream micro-batching); "
        "`server CPU ms/obs` = server process CPU time per observation (event-loop thread: HTTP, validation, "
        "store client + model threads: state decoding, `observe`, encoding); ratio = throughput / floor of the "
        "same mode at B=1, at the batch the service reached (`streams/call`, interpolated) and at its best B.",
        "",
    ]
    header = ["store", "mode", "N", "C", "obs/s", "p50 ms", "p95 ms", "p99 ms", "errors", "state / stream"]
    header += [
        "rt/obs",
        "streams/call",
        "server CPU ms/obs",
        "client CPU ms/req",
        "ratio floor B=1",
        "ratio floor same batch",
        "ratio best floor",
    ]
    body = []
    for store in load["stores"]:
        for c in store["cells"]:
            lat = c["latency_ms"]
            body.append(
                [
                    store["store"],
                    c["mode"],
                    c["streams"],
                    c["concurrency"],
                    num(c["obs_per_s"]),
                    num(lat["p50"]),
                    num(lat["p95"]),
                    num(lat["p99"]),
                    c["errors"],
                    kib(c["state_bytes"]),
                    num(c["redis_round_trips_per_obs"], 2)
                    if c.get("redis_round_trips_per_obs") is not None
                    else "–",
                    num(c["streams_per_model_call"], 1) if c.get("streams_per_model_call") else "–",
                    _cpu_split(c),
                    num(1000 * c["client_cpu_s"] / max(c["requests"], 1), 1),
                    ratio(c["obs_per_s"], floor_at(floor, c, 1)),
                    ratio(c["obs_per_s"], matched_floor(floor, c)),
                    ratio(c["obs_per_s"], floor_at(floor, c, None)),
                ]
            )
    lines += table(header, body)
    redis_cells = [c for s in load["stores"] if s["store"] == "redis" for c in s["cells"]]
    if redis_cells:
        calls = redis_cells[-1]["redis_calls"]
        obs = max(redis_cells[-1]["observations"], 1)
        per = ", ".join(f"`{k}` {v / obs:.2f}" for k, v in sorted(calls.items()))
        lines += [
            f"Redis commands per observation in the last Redis cell: {per} (`hget`/`hset` run inside the compare-and-set script).",
            "",
        ]
    lines += [f"![latency percentiles vs concurrency]({img_rel}/bench_latency.png)", ""]
    lines += [f"![throughput vs streams]({img_rel}/bench_throughput.png)", ""]
    lines += memory_section(load)
    return lines


def _cpu_split(c: dict[str, Any]) -> str:
    obs = max(c["observations"], 1)
    total = num(1000 * c["server_cpu_s"] / obs, 1)
    if c.get("server_loop_cpu_s") is None:
        return total
    return f"{total} ({num(1000 * c['server_loop_cpu_s'] / obs, 1)} + {num(1000 * c['server_model_cpu_s'] / obs, 1)})"


def _server_settings(load: dict[str, Any]) -> str:
    settings = next((s.get("server_settings") for s in load["stores"] if s.get("server_settings")), {})
    return ", ".join(f"`MEMCAST_{k.upper()}={v}`" for k, v in settings.items()) or "the service's defaults"


def _client_kind(load: dict[str, Any]) -> str:
    if load["settings"].get("http_client") == "httpx":
        return "httpx"
    return (
        "httpx for set-up; a minimal HTTP/1.1 client for the timed posts, since httpx's 2-5 ms of CPU per "
        "request would take the CPU the server needs on this machine"
    )


def memory_section(load: dict[str, Any]) -> list[str]:
    lines = ["### Memory", ""]
    body, notes = [], []
    for store in load["stores"]:
        mem = store["memory"]
        for point in mem:
            body.append(
                [
                    store["store"],
                    point.get("after", ""),
                    point["streams"],
                    mib(point["rss_bytes"]),
                    mib(point["redis_used_memory"]) if point.get("redis_used_memory") is not None else "–",
                ]
            )
        created = [p for p in mem if str(p.get("after", "")).startswith("creating")]
        if len(created) < 2:
            continue
        lo, hi = created[0], created[-1]
        span = hi["streams"] - lo["streams"]
        rss_per = (hi["rss_bytes"] - lo["rss_bytes"]) / span
        what = "server RSS"
        if store["store"] == "redis" and hi.get("redis_used_memory") is not None:
            redis_per = (hi["redis_used_memory"] - lo["redis_used_memory"]) / span
            notes.append(f"Redis `used_memory` per warm stream: {kib(int(redis_per))}.")
        else:
            notes.append(f"Server RSS per warm stream (embedded store): {kib(int(rss_per))}.")
        if store["store"] != "embedded":
            continue
        if hi["streams"] >= 1000:
            notes.append(
                f"**{what} with {hi['streams']:,} warm `memory_only` streams (embedded store): "
                f"{mib(hi['rss_bytes'])}** (idle server: {mib(mem[0]['rss_bytes'])})."
            )
        else:
            est = hi["rss_bytes"] + (1000 - hi["streams"]) * rss_per
            notes.append(
                f"Largest run here: {hi['streams']} streams. **Extrapolated** {what} with 1,000 warm `memory_only` "
                f"streams (embedded store): {mib(est)} ({mib(hi['rss_bytes'])} at {hi['streams']} streams plus the "
                f"measured increase per stream, {kib(int(rss_per))}); the full run (`bench/run_all.py` without "
                "`--quick`) measures it."
            )
        full = [c for c in store["cells"] if c["mode"] == "full_model" and c.get("state_bytes")]
        if full:
            notes.append(
                f"A `full_model` stream's state is {kib(full[-1]['state_bytes'])} (its own weights and AdamW "
                f"moments): 1,000 such streams hold {mib(1000 * full[-1]['state_bytes'])} of state."
            )
    lines += table(["store", "after", "streams", "server RSS", "Redis used_memory"], body)
    lines += notes + [""]
    creation = [(s["store"], c) for s in load["stores"] for c in s["creation"] if c["created"] > 1]
    if creation:
        model = load["stores"][0]["model"]
        rate = ", ".join(
            f"{st} store {c['created']} in {c['seconds']:.1f} s ({c['created'] / c['seconds']:.1f}/s)"
            for st, c in creation
        )
        lines += [f"Stream creation with {model['seq_len'] + model['pred_len']} rows of history: {rate}.", ""]
    return lines
