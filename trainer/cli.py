"""``memcast pretrain``, ``memcast evaluate`` and ``memcast make-data``.

Examples::

    memcast make-data --out data/synthetic.csv
    memcast pretrain --data ../shared/data/ETTh1.csv --features S --target OT --seq-len 48 \\
        --pred-len 12 --epochs 2 --batch-size 8 --lr 1e-4 --out checkpoints/etth1-s
    memcast evaluate --checkpoint checkpoints/etth1-s --feedback immediate --mode full_model
    memcast evaluate --data ../shared/data/ETTh1.csv --features S --seq-len 48 --pred-len 12 \\
        --epochs 2 --batch-size 8 --lr 1e-4 --methods naive,ogd,er,fsnet,fsnet_nomem,titans_memory_only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import REPORT_FILE, CheckpointError, is_checkpoint
from models.online import Feedback, UpdateMode
from trainer.flags import add_train_flags, given
from trainer.train_config import TrainConfig, TrainConfigError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="train a model offline and write a checkpoint directory")
    _add_train_flags(p)
    p.add_argument("--out", help="checkpoint directory (default checkpoints/<data>_<features>_<model>)")
    p.add_argument("--name", help="checkpoint name (default: the directory name)")
    p.set_defaults(func=run_pretrain)

    e = subparsers.add_parser("evaluate", help="online test: replay the test split through the online update")
    _add_train_flags(e)
    e.add_argument(
        "--checkpoint", help="the memcast method's checkpoint; its training settings are the defaults"
    )
    e.add_argument("--methods", default="naive,memcast", help="comma-separated (see trainer/methods.py)")
    e.add_argument("--mode", choices=[m.value for m in UpdateMode], default=UpdateMode.MEMORY_ONLY.value)
    e.add_argument("--feedback", choices=[f.value for f in Feedback], default=Feedback.DELAYED.value)
    e.add_argument("--max-steps", type=int, help="stop the online test after this many steps")
    e.add_argument("--out", help="report directory (default runs/eval/<data>_<features>_<lens>_<feedback>)")
    e.add_argument("--runs-dir", default="runs", help="cache of checkpoints pretrained for the methods")
    e.add_argument("--er-buffer", type=int, default=500, help="experience replay buffer size")
    e.add_argument("--er-samples", type=int, default=2, help="replayed pairs per learned pair")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument("--save-forecasts", action="store_true", help="also write forecasts.npz")
    e.add_argument(
        "--interval-levels",
        default="0.8,0.95",
        help="prediction-interval levels to score (coverage, mean width), comma-separated, each in (0, 1)",
    )
    e.set_defaults(func=run_evaluate)

    d = subparsers.add_parser("make-data", help="write memcast's generated multivariate data set (CSV)")
    d.add_argument("--out", default="data/synthetic.csv")
    d.add_argument("--rows", type=int, default=4000)
    d.add_argument("--channels", type=int, default=4, help="columns besides the date, the last is OT")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--regimes",
        type=int,
        default=0,
        help="K > 0: abrupt switches among K recurring regimes (levels, seasonality, cross-channel mixing)",
    )
    d.set_defaults(func=run_make_data)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Data, model and training flags, generated from the dataclasses; unset ones take
    TrainConfig's (or the checkpoint's) values."""
    add_train_flags(p)
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice). On a busy machine 1 is much faster for "
        "the online test, whose batch-1 steps gain nothing from intra-op parallelism",
    )


def train_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from ``base`` (a checkpoint's training settings) and the flags given."""
    values = given(args)
    if not values.get("data") and not (base or {}).get("data"):
        raise TrainConfigError(
            "--data is required (or a --checkpoint whose train_report.json names its data)"
        )
    config = TrainConfig.from_dict(base) if base else TrainConfig(data=values["data"])
    return config.replace(**values)


def run_pretrain(args: argparse.Namespace) -> int:
    from trainer.pretrain import pretrain

    _set_threads(args)
    cfg = train_config(args)
    out = args.out or f"checkpoints/{_stem(cfg)}_{cfg.model.backbone}_{cfg.model.memory}"
    cfg = cfg.replace(out=out, name=args.name)
    try:
        path = pretrain(cfg)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    sys.stdout.write(f"checkpoint written to {path}\n")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import EvalConfig, evaluate
    from trainer.report import format_table

    _set_threads(args)
    base = _checkpoint_train_settings(Path(args.checkpoint)) if args.checkpoint else None
    train = train_config(args, base)
    out = args.out or f"runs/eval/{_stem(train)}_{args.feedback}"
    cfg = EvalConfig(
        train=train,
        methods=tuple(m for m in args.methods.split(",") if m.strip()),
        checkpoint=args.checkpoint,
        mode=args.mode,
        feedback=args.feedback,
        online_lr=args.online_lr,
        max_steps=args.max_steps,
        out=out,
        runs_dir=args.runs_dir,
        er_buffer=args.er_buffer,
        er_samples=args.er_samples,
        plots=not args.no_plots,
        save_forecasts=args.save_forecasts,
        interval_levels=tuple(float(v) for v in args.interval_levels.split(",") if v.strip()),
    )
    report = evaluate(cfg)
    sys.stdout.write(format_table(report) + f"\nreport: {Path(out) / 'report.json'}\n")
    return 0


def run_make_data(args: argparse.Namespace) -> int:
    from trainer.synthetic import write_synthetic_csv

    path = write_synthetic_csv(
        args.out, rows=args.rows, channels=args.channels, seed=args.seed, regimes=args.regimes
    )
    sys.stdout.write(f"wrote {args.rows} rows to {path}\n")
    return 0


def _checkpoint_train_settings(directory: Path) -> dict[str, Any]:
    """The training settings recorded with a checkpoint (data, lengths, model sizes)."""
    if not is_checkpoint(directory):
        raise CheckpointError(f"{directory} is not a checkpoint directory")
    report_path = directory / REPORT_FILE
    settings: dict[str, Any] = {}
    if report_path.is_file():
        settings = dict(json.loads(report_path.read_text()).get("config", {}))
    schema = json.loads((directory / "config.json").read_text())["data"]
    settings.update(
        features=schema["features"],
        target=schema["targets"][-1],
        seq_len=schema["seq_len"],
        pred_len=schema["pred_len"],
    )
    for key in ("out", "name", "device", "progress"):
        settings.pop(key, None)
    if isinstance(settings.get("model"), dict):  # this version's layout: lengths live in the model
        settings["model"] = settings["model"] | {"seq_len": schema["seq_len"], "pred_len": schema["pred_len"]}
        settings.pop("seq_len"), settings.pop("pred_len")
    return settings


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # chosen once, at the edge, like the device


def _stem(cfg: TrainConfig) -> str:
    return f"{Path(cfg.data).stem}_{cfg.features}_{cfg.seq_len}_{cfg.pred_len}"
