"""The cost of one online learning step against the number of weights it updates.

One stream, one thread, ``full_model`` with delayed feedback (each observation learns from the
pair it matured, then forecasts the next horizon), on the shapes of the FSNet paper's ETTh2-M
60 -> 1 online test (seq_len 60, pred_len 1, 7 channels), for memcast's tcn baselines at their
default size, at the FSNet reference code's width and depth (a TCN of width 64 and 11 dilated
blocks, ~0.55M weights with the adapters: ``_ref_size``) and at the reference's count of trained
weights (its last block is 320 wide: 1.02M for FSNet, 0.64M for its OGD: ``_ref_weights``).
Random weights: the cost of a step does not depend on their values; nor does the data's (a
daily sine with noise is fed). ``--as-published``: the step as the baselines' papers (and the
reference code) take it and as the results page's ``ogd`` and ``fsnet`` rows learn, online lr
1e-3 with no gradient clipping and no pull toward the pretrained weights, where the default is
the service's full_model step (clipped, anchored AdamW).

The reference code itself is not part of this repository; compare a run of it with these rows
on the same machine, or compare two memcast commits side by side by running this module from
each checkout (``PYTHONPATH=<checkout> python -m bench.step_cost``), alternating.

    python -m bench.step_cost --out runs/bench/step_cost.json
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect='ffi_call*' \
        python -m bench.step_cost --configs fsnet_ref_size --steps 5 --region   # instructions
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._common import machine_info, now_iso, single_thread, write_json
from bench._format import num
from bench._format import table as markdown_table
from bench.floor import series
from bench.results import REFERENCE_ONLINE, REFERENCE_ONLINE_LR
from models import ContinualForecaster, ModelConfig, UpdateMode, init_stream_state, observe

SEQ_LEN, PRED_LEN, CHANNELS = 60, 1, 7
REFERENCE_SIZE = {"d_model": 64, "n_layers": 11}
CONFIGS: dict[str, dict[str, Any]] = {
    "ogd": {"backbone": "tcn", "memory": "none"},
    "fsnet": {"backbone": "tcn", "memory": "fsnet"},
    "ogd_ref_size": {"backbone": "tcn", "memory": "none", **REFERENCE_SIZE},
    "fsnet_ref_size": {"backbone": "tcn", "memory": "fsnet", **REFERENCE_SIZE},
    # as many trained weights as the reference code's models (FSNet 1,018,045, its TS2Vec encoder
    # for OGD 640,327), whose last block is 320 wide: memcast's blocks are one width, so wider
    "ogd_ref_weights": {"backbone": "tcn", "memory": "none", "d_model": 98, "n_layers": 11},
    "fsnet_ref_weights": {"backbone": "tcn", "memory": "fsnet", "d_model": 96, "n_layers": 11},
    "titans": {},  # the default model (lstm + titans memory), full_model
}


def build(name: str, as_published: bool = False) -> ContinualForecaster:
    torch.manual_seed(0)
    learning: dict[str, Any] = {**REFERENCE_ONLINE, "online_lr": REFERENCE_ONLINE_LR} if as_published else {}
    config = ModelConfig(seq_len=SEQ_LEN, pred_len=PRED_LEN, channels=CHANNELS, **CONFIGS[name], **learning)
    model = ContinualForecaster(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure(
    name: str, steps: int, warm: int = 10, as_published: bool = False, region: bool = False
) -> dict[str, Any]:
    """``steps`` timed observations after the window filled and ``warm`` learning steps;
    ``region``: the timed steps run inside one foreign-function call (:func:`in_region`)."""
    model = build(name, as_published)
    mode = UpdateMode.FULL_MODEL
    start = SEQ_LEN + PRED_LEN + warm
    data = series(start + steps, CHANNELS)  # bench.floor's: daily cycles plus noise
    state = init_stream_state(model, 1, mode)
    for i in range(start):
        state, _ = observe(model, state, data[None, i], mode)

    def timed() -> None:
        nonlocal state
        for i in range(start, start + steps):
            state, _ = observe(model, state, data[None, i], mode)

    cpu, wall = time.process_time(), time.perf_counter()
    in_region(timed) if region else timed()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    config = model.config
    return {
        "config": name,
        "model": f"{config.backbone}+{config.memory}, d_model {config.d_model} x {config.n_layers}",
        "weights": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "cpu_ms_per_step": 1000 * cpu / steps,
        "steps_per_s": steps / wall,
        "cpu_steps_per_s": steps / cpu,
    }


def in_region(fn: Callable[[], None]) -> None:
    """Call ``fn`` through ctypes, so that an instruction count can be limited to it: under
    ``valgrind --tool=callgrind --collect-atstart=no --toggle-collect='ffi_call*'`` only what
    runs inside the foreign call is counted (the timed steps, not the imports, the model's
    construction or the warm-up). Counts repeat to a few parts in 10,000 whatever else the
    machine runs, where times on a shared machine moved by a third between runs."""
    ctypes.CFUNCTYPE(None)(fn)()


def table(rows: list[dict[str, Any]]) -> str:
    header = ["config", "model", "weights", "CPU ms / step", "steps / s (CPU)", "steps / s (wall)"]
    cells = [
        [
            r["config"],
            r["model"],
            num(r["weights"]),
            num(r["cpu_ms_per_step"], 2),
            num(r["cpu_steps_per_s"]),
            num(r["steps_per_s"]),
        ]
        for r in rows
    ]
    return "\n".join(markdown_table(header, cells))


def section(result: dict[str, Any]) -> list[str]:
    """The report's section (``bench.report``)."""
    shapes = result["shapes"]
    return [
        "## The cost of a learning step",
        "",
        f"`python -m bench.step_cost{' --as-published' if result.get('as_published') else ''}`: "
        "one stream, one thread, `full_model` with delayed feedback "
        f"(learn from the matured pair, then forecast), seq_len {shapes['seq_len']}, pred_len "
        f"{shapes['pred_len']}, {shapes['channels']} channels (the FSNet paper's ETTh2-M 60 -> 1 "
        "online test), random weights. `_ref_size`: the FSNet reference code's width and depth (a "
        "TCN of width 64 and 11 dilated blocks); `_ref_weights`: as many trained weights as the "
        "reference's models (its last block is 320 wide, memcast's blocks are one width). CPU "
        "time per step is less sensitive to other jobs than wall time; the reference code itself "
        "is compared side by side in [bulk.md](bulk.md).",
        "",
        table(result["rows"]),
        "",
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=100, help="timed steps per config")
    p.add_argument(
        "--as-published",
        action="store_true",
        help="learn as the baselines' papers do: online lr 1e-3, no clipping, no anchor",
    )
    p.add_argument(
        "--region",
        action="store_true",
        help="run the timed steps inside one ctypes call, for callgrind --toggle-collect='ffi_call*'",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench/step_cost.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    single_thread()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    rows = []
    for name in names:
        rows.append(measure(name, args.steps, as_published=args.as_published, region=args.region))
        r = rows[-1]
        print(
            f"step_cost {name:15s} {r['weights']:>8,} weights  {r['cpu_ms_per_step']:7.2f} ms/step",
            flush=True,
        )
    result = {
        "kind": "step_cost",
        "date": now_iso(),
        "machine": machine_info(),
        "shapes": {"seq_len": SEQ_LEN, "pred_len": PRED_LEN, "channels": CHANNELS},
        "as_published": args.as_published,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    write_json(args.out, result)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
