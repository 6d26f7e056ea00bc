"""The compute floor: ``models.online.observe`` in-process (no HTTP, no store, no codec) for B
streams batched, per update mode, in observations per second, plus the state size per stream.

Every stream is warm: it has seen ``seq_len + pred_len`` values, so a ``full_model`` stream
learns from a matured forecast pair on every observation (delayed feedback, what the service
does). The warm state of one stream is replicated B times (compute does not depend on the
values), then every step feeds one new value per stream. Each cell runs at most ``--max-steps``
steps and stops after ``--budget`` seconds, but always times at least one step.

Besides the floor, the time to encode and decode one stream's state (``state_to_bytes`` /
``state_from_bytes``, what the service adds per stream and request) is measured once per mode.

    python -m bench.floor --out runs/bench/floor.json                 # default model, every B
    python -m bench.floor --checkpoint checkpoints/x --configs checkpoint,fsnet --batches 1,8
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    BENCH_CHANNELS,
    BENCH_PRED_LEN,
    BENCH_SEQ_LEN,
    machine_info,
    now_iso,
    single_thread,
    write_json,
)
from models import ContinualForecaster, ModelConfig, UpdateMode, init_stream_state, observe
from models.online import observe_many
from models.state_io import model_fingerprint, state_from_bytes, state_nbytes, state_to_bytes

MODES = tuple(m.value for m in UpdateMode)


def default_config() -> ModelConfig:
    """The default ModelConfig (lstm + titans memory, d_model 32) at the benchmark checkpoint's size."""
    return ModelConfig(seq_len=BENCH_SEQ_LEN, pred_len=BENCH_PRED_LEN, channels=BENCH_CHANNELS)


# other configurations at the benchmark's size (random weights: the speed of an update and the
# size of a state do not depend on the weights' values)
VARIANTS: dict[str, dict[str, Any]] = {
    "fsnet": {"backbone": "tcn", "memory": "fsnet"},
    "fsnet_nomem": {"backbone": "tcn", "memory": "fsnet_nomem"},
    "titans_mal": {"backbone": "titans", "memory": "titans", "fusion": "layer"},
    "none": {"memory": "none"},
    # the FSNet reference code's size (a tcn of width 64 and 11 dilated blocks, ~0.5M weights):
    # the cost of one learning step against the weights it updates, the paper's setting
    "fsnet_ref_size": {"backbone": "tcn", "memory": "fsnet", "d_model": 64, "n_layers": 11},
    "ogd_ref_size": {"backbone": "tcn", "memory": "none", "d_model": 64, "n_layers": 11},
}


def build_models(configs: list[str], checkpoint: Path | None) -> dict[str, ContinualForecaster]:
    """``titans``: the checkpoint's model if given, else the default config (random weights);
    the names of :data:`VARIANTS`: that configuration at the same size."""
    base = default_config()
    models: dict[str, ContinualForecaster] = {}
    if checkpoint is not None:
        from models.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        base = ckpt.config
    for name in configs:
        if name == "titans":
            if checkpoint is not None:
                models[f"{base.backbone}+{base.memory} (checkpoint)"] = ckpt.model
                continue
            config = base
        elif name in VARIANTS:
            config = base.replace(**VARIANTS[name])
        else:
            raise SystemExit(f"unknown config {name!r}: titans, {', '.join(VARIANTS)}")
        torch.manual_seed(0)
        model = ContinualForecaster(config).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        size = (
            ""
            if name not in ("fsnet_ref_size", "ogd_ref_size")
            else f", d_model {config.d_model} x {config.n_layers}"
        )
        models[f"{config.backbone}+{config.memory}{size}"] = model
    return models


def series(steps: int, channels: int, seed: int = 0) -> torch.Tensor:
    """A scaled-looking multivariate series ``[steps, c]``: daily cycles plus noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(steps, dtype=torch.float32)[:, None]
    phase = torch.rand(1, channels, generator=g) * 2 * math.pi
    return torch.sin(2 * math.pi * t / 24 + phase) + 0.2 * torch.randn(steps, channels, generator=g)


def warm_state(model: ContinualForecaster, mode: UpdateMode, batch: int, data: torch.Tensor) -> Any:
    cfg = model.config
    one = init_stream_state(model, 1, mode)
    one, _ = observe_many(model, one, data[None, : cfg.seq_len + cfg.pred_len], mode)
    return torch.cat([one] * batch, dim=0) if batch > 1 else one


def measure_cell(
    model: ContinualForecaster, mode: UpdateMode, batch: int, budget_s: float, max_steps: int
) -> dict[str, Any]:
    cfg = model.config
    warm = cfg.seq_len + cfg.pred_len
    data = series(warm + max_steps + batch + 1, cfg.channels)
    state = warm_state(model, mode, batch, data)
    offsets = torch.arange(batch)  # stream i reads the series shifted by i rows
    steps, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while steps < max_steps and (steps == 0 or time.perf_counter() - started < budget_s):
        values = data[warm + steps + offsets]  # [b, c]
        state, forecast = observe(model, state, values, mode)
        steps += 1
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    assert forecast is not None and forecast.shape[0] == batch
    one = state[0:1]
    return {
        "mode": mode.value,
        "batch": batch,
        "steps": steps,
        "observations": steps * batch,
        "seconds": seconds,
        "obs_per_s": steps * batch / seconds,
        "ms_per_step": 1000 * seconds / steps,
        # CPU time is less sensitive than wall time to other processes on a shared machine
        "cpu_seconds": cpu_seconds,
        "cpu_ms_per_obs": 1000 * cpu_seconds / (steps * batch),
        "state_nbytes": state_nbytes(one),
    }


def measure_codec(model: ContinualForecaster, mode: UpdateMode, repeats: int = 20) -> dict[str, float]:
    """Encode + decode of one warm stream's state, as the service does per stream and request."""
    cfg = model.config
    data = series(cfg.seq_len + cfg.pred_len + 1, cfg.channels)
    state = warm_state(model, mode, 1, data)
    fingerprint = model_fingerprint(model, cfg.digest())
    blob = state_to_bytes(state, fingerprint, {"model": "bench"})
    started = time.perf_counter()
    for _ in range(repeats):
        blob = state_to_bytes(state, fingerprint, {"model": "bench"})
        state, _ = state_from_bytes(blob, fingerprint)
    return {"blob_bytes": len(blob), "codec_ms": 1000 * (time.perf_counter() - started) / repeats}


def run(args: argparse.Namespace) -> dict[str, Any]:
    single_thread()
    models = build_models(args.configs.split(","), args.checkpoint)
    modes = [UpdateMode(m) for m in args.modes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, model in models.items():
        for mode in modes:
            codec = measure_codec(model, mode)
            for batch in batches:
                if time.perf_counter() - started > args.total_budget:
                    print(f"floor: total budget of {args.total_budget:.0f} s spent, skipping the rest")
                    break
                row = {"config": name, **measure_cell(model, mode, batch, args.budget, args.max_steps)}
                row["parameters"] = sum(p.numel() for p in model.parameters())
                row.update(state_blob_bytes=codec["blob_bytes"], codec_ms=codec["codec_ms"])
                rows.append(row)
                print(
                    f"floor {name:28s} {mode.value:12s} B={batch:<4d} {row['obs_per_s']:9.1f} obs/s "
                    f"({row['steps']} steps, {row['ms_per_step']:.1f} ms/step) state {row['state_blob_bytes']} B",
                    flush=True,
                )
    config = next(iter(models.values())).config
    return {
        "kind": "floor",
        "date": now_iso(),
        "machine": machine_info(),
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "model": {"seq_len": config.seq_len, "pred_len": config.pred_len, "channels": config.channels},
        "settings": {
            "budget_s": args.budget,
            "max_steps": args.max_steps,
            "total_budget_s": args.total_budget,
            "torch_threads": torch.get_num_threads(),
        },
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: the default config)")
    p.add_argument(
        "--configs", default="titans", help=f"comma-separated: titans (the default), {', '.join(VARIANTS)}"
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", default="1,8,64,256", help="streams per observe call")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per cell (at least one step)")
    p.add_argument("--max-steps", type=int, default=200, help="steps per cell")
    p.add_argument("--total-budget", type=float, default=600.0, help="seconds for every cell together")
    p.add_argument("--out", type=Path, default=Path("runs/bench/floor.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    print(f"floor: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
