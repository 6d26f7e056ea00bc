"""docs/soak.md and its plot, from the JSON of ``bench/soak.py``."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from bench._format import table

MIB = 2**20


def rss_growth_mib_per_hour(memory: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of the server's RSS over the second half of the run (the first half
    holds the warm-up: allocator pools, caches filling)."""
    points = [(m["t_s"], m["rss_bytes"] / MIB) for m in memory]
    points = points[len(points) // 2 :]
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return None if var == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / var * 3600


def cpu_ms_per_request(memory: list[dict[str, Any]], row: dict[str, Any]) -> float | None:
    """Server CPU per request in one minute, from the memory samples nearest its edges (a
    rising figure means each request costs more; a steady one under falling throughput means
    the machine gave the server less CPU)."""
    inside = [
        m for m in memory if "cpu_s" in m and 60 * row["minute"] <= m["t_s"] <= 60 * (row["minute"] + 1)
    ]
    if len(inside) < 2 or not row["requests"]:
        return None
    first, last = inside[0], inside[-1]
    share = (last["t_s"] - first["t_s"]) / 60  # the samples span most of the minute, not all of it
    return None if share <= 0 else (last["cpu_s"] - first["cpu_s"]) * 1000 / (row["requests"] * share)


def totals(minutes: list[dict[str, Any]]) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for row in minutes:
        out.update(row["by_status"])
    return out


def plot_soak(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    restart = result["restart"].get("stopped_at")
    memory = result["memory"]
    axes[0].plot([m["t_s"] / 60 for m in memory], [m["rss_bytes"] / MIB for m in memory], ".-")
    axes[0].set_ylabel("server RSS (MiB)")
    rows = result["minutes"]
    xs = [r["minute"] + 0.5 for r in rows]
    axes[1].plot(xs, [r["latency_ms"]["p99"] for r in rows], "^-", label="p99")
    axes[1].plot(xs, [r["latency_ms"]["p50"] for r in rows], "o-", label="p50")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("latency (ms, from due time)")
    axes[1].legend(fontsize=8)
    axes[2].bar(xs, [r["requests"] - r["by_status"].get("200", 0) for r in rows], width=0.8)
    axes[2].set_ylabel("requests not answered 200")
    for ax in axes:
        ax.set_xlabel("minute")
        ax.grid(True, alpha=0.3)
        if restart is not None:
            ax.axvline(restart / 60, color="red", linestyle="--", linewidth=1)
    fig.suptitle("soak: red line = Redis restart", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def soak_lines(result: dict[str, Any], img: str) -> list[str]:
    s, obs, memory = result["settings"], result["observations"], result["memory"]
    counts = totals(result["minutes"])
    requests = sum(counts.values())
    posting_s = s["minutes"] * 60
    growth = rss_growth_mib_per_hour(memory)
    restart = result["restart"]
    bad_minutes = [r["minute"] for r in result["minutes"] if r["requests"] != r["by_status"].get("200", 0)]
    worst = max(result["minutes"], key=lambda r: r["latency_ms"]["p99"])
    steady = [r["latency_ms"]["p99"] for r in result["minutes"] if r["minute"] not in bad_minutes]
    redis_mem = [m["redis_used_memory"] for m in memory if m["redis_used_memory"] is not None]
    lines = [
        f"{s['streams']} streams, {s['rate_obs_per_s']:g} observations/s in all (one per stream per "
        f"{s['streams'] / s['rate_obs_per_s']:g} s), for {s['minutes']:g} min; Redis "
        + (
            f"({s['redis_conf']}) stopped with SIG{s['restart'].upper()} at {restart['stopped_at']:.0f} s, "
            f"started again {s['outage_s']:g} s later, answering at {restart['ready_at']:.0f} s."
            if restart
            else f"({s['redis_conf']}) not restarted."
        ),
        "",
    ]
    lines += table(
        ["", ""],
        [
            [
                "requests (answered 200)",
                f"{requests} ({counts.get('200', 0)}, {counts.get('200', 0) / posting_s:.1f}/s)",
            ],
            ["requests by status", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))],
            ["turns skipped (stream's previous request still out)", str(result["skipped_turns"])],
            ["**acknowledged observations lost**", f"**{obs['lost']}** of {obs['acknowledged']}"],
            ["streams missing after the run", str(obs["streams_missing"])],
            [
                "applied but unacknowledged (answer lost; a re-post is a duplicate)",
                str(obs["applied_unacknowledged"]),
            ],
            ["minutes (from 0) with any non-200", ", ".join(str(m) for m in bad_minutes) or "none"],
            [
                "p99 latency, minutes without errors (median of minutes / worst)",
                f"{sorted(steady)[len(steady) // 2]:.0f} / {max(steady):.0f} ms" if steady else "n/a",
            ],
            ["p99 latency, worst minute", f"{worst['latency_ms']['p99']:.0f} ms (minute {worst['minute']})"],
            [
                "server RSS: first sample / last / max",
                f"{memory[0]['rss_bytes'] / MIB:.0f} / {memory[-1]['rss_bytes'] / MIB:.0f} / "
                f"{max(m['rss_bytes'] for m in memory) / MIB:.0f} MiB",
            ],
            ["server RSS trend, second half", "n/a" if growth is None else f"{growth:+.1f} MiB/hour"],
            [
                "Redis used_memory: first / last",
                f"{redis_mem[0] / MIB:.1f} / {redis_mem[-1] / MIB:.1f} MiB" if redis_mem else "n/a",
            ],
        ],
    )
    lines += [
        f"![soak]({img}/soak.png)",
        "",
        "Per minute (latency from the moment each request was due):",
        "",
    ]
    lines += table(
        ["minute", "requests", "by status", "p50 ms", "p99 ms", "max ms", "server CPU ms/request"],
        [
            [
                str(r["minute"]),
                str(r["requests"]),
                ", ".join(f"{k}: {v}" for k, v in sorted(r["by_status"].items())),
                f"{r['latency_ms']['p50']:.0f}",
                f"{r['latency_ms']['p99']:.0f}",
                f"{r['latency_ms']['max']:.0f}",
                "–" if (cpu := cpu_ms_per_request(memory, r)) is None else f"{cpu:.1f}",
            ]
            for r in result["minutes"]
        ],
    )
    if result["error_samples"]:
        lines += ["Error samples:", "", "```", *result["error_samples"][:5], "```", ""]
    return lines


def write_soak_report(result: dict[str, Any], out: Path) -> Path:
    plot_soak(result, out.parent / "img" / "soak.png")
    m = result["machine"]
    lines = [
        "# memcast soak",
        "",
        f"Measured {result['date']} (UTC) at commit `{m.get('commit', 'unknown')}` by `{result['command']}` "
        f"on {m['cpu']} ({m.get('usable_cores')} usable cores, load average at the start "
        f"{', '.join(str(x) for x in m['load_average'])}; the machine is shared, so latencies are upper "
        "bounds). Regenerate with `python -m bench.soak --doc docs/soak.md` (30 min by default). "
        "How it runs: `bench/soak.py`'s docstring.",
        "",
    ]
    lines += soak_lines(result, "img")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
