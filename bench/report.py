"""docs/benchmarks.md and its plots, from the JSON files of floor.py, load.py, accuracy.py and
step_cost.py.

    python -m bench.report --floor runs/bench/quick/floor.json --load runs/bench/quick/load.json \\
        --accuracy runs/bench/quick/accuracy.json --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench._accuracy_report import accuracy_section, headline_accuracy
from bench._format import table
from bench._plots import plot_load
from bench._speed_report import findings, floor_section, headline, load_section
from bench.step_cost import section as step_cost_section

SOAK_LINK = [
    "## Soak",
    "",
    "Steady load for a long time with a Redis restart in the middle (memory over time, errors,",
    "p99 per minute, lost acknowledged observations): [soak.md](soak.md), by `python -m bench.soak`.",
    "",
]


def machine_section(sources: list[dict[str, Any]]) -> list[str]:
    m = sources[0]["machine"]
    lines = ["## Machine", ""]
    lines += table(
        ["", ""],
        [
            ["CPU", m["cpu"]],
            ["cores (logical / usable)", f"{m['logical_cores']} / {m.get('usable_cores')}"],
            ["RAM", f"{m['ram_gib']} GiB"],
            ["OS, Python, torch", f"{m['os']}, Python {m['python']}, torch {m['torch']} (CPU)"],
            ["torch threads", "1 in every benchmark process and in the server (`MEMCAST_TORCH_THREADS=1`)"],
            [
                "load average at the start of each part",
                "; ".join(
                    f"{s['kind']} {', '.join(str(x) for x in s['machine']['load_average'])}" for s in sources
                ),
            ],
        ],
    )
    lines += [
        "The machine is shared with other work: a load average above the core count means the",
        "benchmark processes got less than the whole CPU, so absolute speeds are lower bounds and",
        "vary from run to run. Server CPU time per observation (service tables) is less sensitive to",
        "this than wall-clock throughput.",
        "",
    ]
    return lines


def write_report(
    out: Path,
    floor: dict[str, Any] | None,
    load: dict[str, Any] | None,
    acc: dict[str, Any] | None,
    step_cost: dict[str, Any] | None,
    commands: list[str],
    mode: str,
    wall_s: float | None = None,
) -> Path:
    sources = [s for s in (floor, load, acc, step_cost) if s is not None]
    if not sources:
        raise SystemExit("nothing to report")
    img_dir = out.parent / "img"
    dates = sorted(s["date"] for s in sources)
    commits = sorted({s["machine"].get("commit", "unknown") for s in sources})
    lines = [
        "# memcast benchmarks",
        "",
        f"Measured {dates[0]} – {dates[-1]} (UTC) at commit {', '.join(f'`{c}`' for c in commits)} by "
        f"`python -m bench.run_all{' --quick' if mode == 'quick' else ''}`"
        + (f" in {wall_s / 60:.1f} min" if wall_s else "")
        + ". Every figure below comes from that run on the machine described here; regenerate with "
        "`make bench` (quick) or `.venv/bin/python -m bench.run_all` (full).",
        "",
    ]
    if mode == "quick":
        lines += [
            "**Quick mode**: fewer streams, short cells, capped test steps and tiny pretraining. Use these",
            "figures to compare runs of this script with each other, not as the protocol's scores.",
            "",
        ]
    lines += ["## Headline", ""]
    if acc is not None:
        lines += headline_accuracy(acc)
    lines += headline(floor, load)
    lines += findings(floor, load)
    if acc is not None:
        lines += accuracy_section(acc)
    if floor is not None:
        lines += floor_section(floor)
    if step_cost is not None:
        lines += step_cost_section(step_cost)
    if load is not None:
        plot_load(load, img_dir)
        lines += load_section(load, floor, "img")
    if (out.parent / "soak.md").is_file():  # written by bench.soak, a run of its own
        lines += SOAK_LINK
    lines += machine_section(sources)
    lines += ["## Commands", "", "```bash", *commands, "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floor", type=Path)
    p.add_argument("--load", type=Path)
    p.add_argument("--accuracy", type=Path)
    p.add_argument("--step-cost", type=Path)
    p.add_argument("--mode", default="full", choices=["quick", "full"])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--command", action="append", default=[], help="a command to list first (repeatable)")
    p.add_argument("--wall-s", type=float, help="wall time of the whole run")
    args = p.parse_args(argv)

    def read(path: Path | None) -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    parts = [read(args.floor), read(args.load), read(args.accuracy), read(args.step_cost)]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    commands = args.command + [s["command"].replace(root, "") for s in parts if s is not None]
    write_report(args.out, *parts, commands=commands, mode=args.mode, wall_s=args.wall_s)
    print(f"report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
