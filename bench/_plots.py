"""The plots of docs/benchmarks.md (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_load(load: dict[str, Any], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    cells = [(s["store"], c) for s in load["stores"] for c in s["cells"]]
    combos = list(dict.fromkeys((st, c["mode"]) for st, c in cells))
    written = []

    fig, axes = plt.subplots(1, max(len(combos), 1), figsize=(4 * max(len(combos), 1), 3.4), squeeze=False)
    for ax, (st, mode) in zip(axes[0], combos, strict=False):
        sub = [c for s, c in cells if s == st and c["mode"] == mode]
        n_max = max(c["streams"] for c in sub)
        sub = sorted((c for c in sub if c["streams"] == n_max), key=lambda c: c["concurrency"])
        xs = [c["concurrency"] for c in sub]
        for p, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
            ax.plot(xs, [c["latency_ms"][p] for c in sub], style, label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_title(f"{st}, {mode}, N={n_max}", fontsize=9)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = img_dir / "bench_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for st, mode in combos:
        sub = [c for s, c in cells if s == st and c["mode"] == mode]
        for conc in sorted({c["concurrency"] for c in sub}):
            pts = sorted((c for c in sub if c["concurrency"] == conc), key=lambda c: c["streams"])
            if len(pts) < 2 and conc != 1:
                ax.plot(
                    [p["streams"] for p in pts],
                    [p["obs_per_s"] for p in pts],
                    "x",
                    label=f"{st} {mode} C={conc}",
                )
                continue
            ax.plot(
                [p["streams"] for p in pts],
                [p["obs_per_s"] for p in pts],
                "o-",
                label=f"{st} {mode} C={conc}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("streams N")
    ax.set_ylabel("observations / s")
    ax.set_title("service throughput vs streams", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = img_dir / "bench_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
