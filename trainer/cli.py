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
from models.config import BACKBONES, FUSIONS, MEMORIES, MEMORY_VARIANTS
from models.online import Feedback, UpdateMode
from trainer.train_config import MEMORY_PRETRAINING

log = logging.getLogger(__name__)

# flag dest -> TrainConfig field, for the flags shared by pretrain and evaluate
_TRAIN_FLAGS = (
    "data features target seq_len pred_len backbone memory fusion d_model n_layers n_heads dropout "
    "online_lr epochs batch_size lr weight_decay seed patience clip cosine warmup two_phase_epochs "
    "max_train_windows memory_pretraining tbptt val_fraction test_fraction device"
).split()


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
    e.set_defaults(func=run_evaluate)

    d = subparsers.add_parser("make-data", help="write memcast's generated multivariate data set (CSV)")
    d.add_argument("--out", default="data/synthetic.csv")
    d.add_argument("--rows", type=int, default=4000)
    d.add_argument("--channels", type=int, default=4, help="columns besides the date, the last is OT")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_make_data)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Data, model and optimisation flags; unset ones take TrainConfig's (or the checkpoint's) values."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="CSV with a date column and numeric columns")
    g.add_argument("--features", choices=["S", "M", "MS"])
    g.add_argument("--target", help="target column (default OT, else the last column)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--pred-len", type=int)
    g.add_argument("--val-fraction", type=float, help="non-ETT files: validation share (default 0.05)")
    g.add_argument("--test-fraction", type=float, help="non-ETT files: online test share (default 0.75)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=BACKBONES)
    m.add_argument("--memory", choices=MEMORIES)
    m.add_argument("--fusion", choices=FUSIONS)
    m.add_argument(
        "--memory-variant",
        choices=MEMORY_VARIANTS,
        help="Titans memory type (sets neural_memory.variant): mlp (plain MLP memory), simple "
        "(momentum and forgetting), advanced (separate Q/K/V, gradient-based surprise; default)",
    )
    m.add_argument("--d-model", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--online-lr", type=float, help="full_model: per-stream learning rate")
    m.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another ModelConfig field, JSON value (e.g. revin=false, neural_memory.chunk_size=4)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--patience", type=int, help="epochs without validation improvement before stopping")
    t.add_argument("--clip", type=float, help="max gradient norm (0: off)")
    t.add_argument("--cosine", action="store_true", default=None, help="cosine learning-rate decay")
    t.add_argument("--warmup", type=float, help="fraction of steps with linear warmup")
    t.add_argument(
        "--two-phase", dest="two_phase_epochs", type=int, help="epochs with the backbone frozen first"
    )
    t.add_argument("--max-train-windows", type=int)
    t.add_argument(
        "--memory-pretraining",
        choices=MEMORY_PRETRAINING,
        help="carried (default): train a token-storing memory as served, its state carried over "
        "consecutive windows; fresh: a fresh memory per window that stores the whole window",
    )
    t.add_argument("--tbptt", type=int, help="carried: windows per truncated-backpropagation segment")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice). On a busy machine 1 is much faster for "
        "the online test, whose batch-1 steps gain nothing from intra-op parallelism",
    )


def train_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """TrainConfig from ``base`` (a checkpoint's training settings) and the flags given."""
    from trainer.train_config import TrainConfig

    values = dict(base or {})
    values.update({k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None})
    options = dict(tuple(kv) for kv in values.get("model_options", ()))
    options.update(_parse_model_opts(args.model_opt))
    if getattr(args, "memory_variant", None):
        options["neural_memory.variant"] = args.memory_variant
    values["model_options"] = tuple(sorted(options.items()))
    values["progress"] = not args.no_progress
    if not values.get("data"):
        raise SystemExit("--data is required (or a --checkpoint whose train_report.json names its data)")
    return TrainConfig.from_dict(values)


def run_pretrain(args: argparse.Namespace) -> int:
    from trainer.pretrain import pretrain

    _set_threads(args)
    cfg = train_config(args)
    out = args.out or f"checkpoints/{_stem(cfg)}_{cfg.backbone}_{cfg.memory}"
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
    )
    report = evaluate(cfg)
    sys.stdout.write(format_table(report) + f"\nreport: {Path(out) / 'report.json'}\n")
    return 0


def run_make_data(args: argparse.Namespace) -> int:
    from trainer.synthetic import write_synthetic_csv

    path = write_synthetic_csv(args.out, rows=args.rows, channels=args.channels, seed=args.seed)
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
    return settings


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # chosen once, at the edge, like the device


def _parse_model_opts(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-opt {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def _stem(cfg: Any) -> str:
    return f"{Path(cfg.data).stem}_{cfg.features}_{cfg.seq_len}_{cfg.pred_len}"
