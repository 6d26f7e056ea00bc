"""Accuracy on the online test: memcast's default configurations against the last value, OGD
and River, on the same scaled values with the same metric.

Data: ETTh1 (``../shared/data/ETTh1.csv``, the FSNet/OneNet borders and scaler of
``trainer.data``) when present, else memcast's generated data set (the output says which).
For every horizon and both feedback modes:

- memcast (``titans_memory_only``, ``combo_memory_only``, ``titans_full_model``, ``fsnet``),
  ``naive``, the frozen checkpoint (``titans_none``) and ``ogd``
  through ``trainer.evaluate.evaluate``, the code ``memcast evaluate --methods`` runs: each
  model is pretrained on the train split (early stopping on validation), then replays the
  test split one step at a time through ``models.online``;
- River's ``SNARIMAX`` and ``HoltWinters`` (additive, the data's daily season; only where
  the data has a known season), one model per forecast variable, ``learn_one`` / ``forecast``:
  each model first learns every value before the test border, then at each test step
  forecasts ``horizon`` values and learns the value just observed. River learns value by
  value, so it can only learn what has been observed: immediate feedback (the revealed
  horizon) would put future values into its lags, and both feedback modes are the same run.
  River's settings are picked per horizon on the validation split from a small grid (as the
  memcast models are early-stopped on it).

Every method forecasts the same steps (``--max-steps`` caps them; the output says so) and is
scored with ``trainer.online_eval.metrics`` over every value of every forecast. ``steps/s``
counts online steps (forecast + update of every variable) per wall-clock second.

    python -m bench.accuracy --out runs/bench/accuracy.json                  # full test split
    python -m bench.accuracy --max-steps 200 --epochs 1 --max-train-windows 64   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import SHARED_ETTH1, machine_info, now_iso, single_thread, write_json
from trainer.data import LoadedData, load_dataset
from trainer.online_eval import count_steps, metrics, truths_of

MEMCAST_METHODS = ("titans_memory_only", "combo_memory_only", "titans_full_model", "fsnet")
BASELINES = ("naive", "titans_none", "ogd")  # titans_none: the same checkpoint, frozen
# Last-value figures on ETTh1, online test split (../shared/data/README.md): (features, seq_len, h) -> MSE, MAE
KNOWN_NAIVE = {("M", 60, 1): (0.363, 0.355), ("M", 60, 24): (2.796, 0.962), ("S", 48, 12): (0.0806, 0.203)}
_SEASONS = {"h": 24, "H": 24, "15min": 96, "15T": 96, "30min": 48, "D": 7}


# ---------------------------------------------------------------------------------------------
# River
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RiverSpec:
    family: str  # "snarimax" or "holtwinters"
    params: tuple[tuple[str, float], ...]

    @property
    def label(self) -> str:
        p = dict(self.params)
        if self.family == "snarimax":
            season = f"({p['sp']},{p['sd']},0)m{p['m']}" if p["sp"] or p["sd"] else ""
            return f"SNARIMAX({p['p']},{p['d']},{p['q']}){season} sgd lr {p['lr']}"
        return f"HoltWinters(alpha={p['alpha']}, beta={p['beta']}, gamma={p['gamma']}, season={p['seasonality']})"

    def build(self) -> Any:
        from river import linear_model, optim, preprocessing, time_series

        p = dict(self.params)
        if self.family == "snarimax":
            regressor = preprocessing.StandardScaler() | linear_model.LinearRegression(
                optimizer=optim.SGD(p["lr"]), intercept_lr=0.01
            )
            return time_series.SNARIMAX(
                p=int(p["p"]), d=int(p["d"]), q=int(p["q"]), m=int(p["m"]), sp=int(p["sp"]),
                sd=int(p["sd"]), sq=0, regressor=regressor,
            )  # fmt: skip
        return time_series.HoltWinters(
            alpha=p["alpha"], beta=p["beta"], gamma=p["gamma"], seasonality=int(p["seasonality"])
        )


def river_grid(season: int | None, quick: bool) -> dict[str, list[RiverSpec]]:
    """The candidate settings, per family; HoltWinters only with a known season."""

    def sn(p: int, d: int, sp: int, lr: float) -> RiverSpec:
        m = season or 1
        params = {"p": p, "d": d, "q": 0, "m": m, "sp": sp if season else 0, "sd": 0, "lr": lr}
        return RiverSpec("snarimax", tuple(params.items()))

    snarimax = [sn(1, 0, 2, 0.001), sn(1, 1, 2, 0.001), sn(1, 0, 0, 0.001)]
    if not quick:
        snarimax += [sn(3, 0, 2, 0.001), sn(1, 0, 1, 0.005), sn(3, 1, 2, 0.001)]
    grid = {"snarimax": snarimax}
    if season:
        hw = [(0.3, 0.01, 0.3), (0.7, 0.01, 0.2)] + ([] if quick else [(0.5, 0.01, 0.1), (0.9, 0.001, 0.05)])
        grid["holtwinters"] = [
            RiverSpec("holtwinters", (("alpha", a), ("beta", b), ("gamma", g), ("seasonality", season)))
            for a, b, g in hw
        ]
    return grid


def river_replay(
    spec: RiverSpec, before: np.ndarray, series: np.ndarray, seq_len: int, horizon: int, steps: int
) -> tuple[np.ndarray, float]:
    """One model per column of ``series [n, c]`` (the split, starting ``seq_len`` rows before its
    border): learn ``before`` then, at each step, forecast and learn the observed value.
    Returns forecasts ``[steps, horizon, c]`` and the wall time of the online phase."""
    models = [spec.build() for _ in range(series.shape[1])]
    for c, model in enumerate(models):
        for v in before[:, c]:
            model.learn_one(float(v))
        for v in series[:seq_len, c]:
            model.learn_one(float(v))
    out = np.empty((steps, horizon, series.shape[1]))
    started = time.perf_counter()
    for k in range(steps):
        t = seq_len + k
        for c, model in enumerate(models):
            out[k, :, c] = model.forecast(horizon=horizon)
            model.learn_one(float(series[t, c]))
    return out, time.perf_counter() - started


def select_river(
    grid: list[RiverSpec], data: LoadedData, out_idx: list[int], seq_len: int, horizon: int, val_steps: int
) -> tuple[RiverSpec, dict[str, float]]:
    """The setting with the lowest validation MSE (learning the train rows first)."""
    # the validation split starts with the train split's last seq_len rows: learn those once
    train = data.split("train")[:-seq_len, out_idx]
    val = data.split("val")[:, out_idx]
    steps = count_steps(len(val), seq_len, horizon, val_steps)
    truths = truths_of(torch.as_tensor(val), seq_len, horizon, tuple(range(len(out_idx))), steps)
    scores: dict[str, float] = {}
    best: tuple[float, RiverSpec] | None = None
    for spec in grid:
        with np.errstate(all="ignore"):
            forecasts, _ = river_replay(spec, train, val, seq_len, horizon, steps)
            mse = metrics(forecasts, truths)["mse"] if np.isfinite(forecasts).all() else math.inf
        scores[spec.label] = mse
        if best is None or mse < best[0]:
            best = (mse, spec)
    assert best is not None
    return best[1], scores


def run_river(
    data: LoadedData, seq_len: int, horizon: int, max_steps: int | None, quick: bool, val_steps: int
) -> list[dict[str, Any]]:
    schema = data.schema
    out_idx = list(schema.target_indices)
    season = _SEASONS.get(schema.freq or "")
    test = data.split("test")
    start = data.splits.test[0]
    before = data.scaled[:start][:, out_idx]
    series = test[:, out_idx]
    steps = count_steps(len(test), seq_len, horizon, max_steps)
    truths = truths_of(torch.as_tensor(test), seq_len, horizon, tuple(out_idx), steps)
    rows = []
    for family, grid in river_grid(season, quick).items():
        spec, scores = select_river(grid, data, out_idx, seq_len, horizon, val_steps)
        with np.errstate(all="ignore"):
            forecasts, wall = river_replay(spec, before, series, seq_len, horizon, steps)
        m = metrics(forecasts, truths)
        rows.append(
            {
                "method": f"river_{family}",
                "family": "river",
                "mse": m["mse"],
                "mae": m["mae"],
                "steps": steps,
                "wall_s": wall,
                "steps_per_s": steps / max(wall, 1e-9),
                "setting": spec.label,
                "validation_mse": scores,
                "finite": bool(np.isfinite(forecasts).all()),
            }
        )
        print(f"  {rows[-1]['method']:20s} mse {m['mse']:.4f} mae {m['mae']:.4f}  [{spec.label}]", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# memcast and the other baselines (trainer.evaluate)
# ---------------------------------------------------------------------------------------------
def run_memcast(args: argparse.Namespace, horizon: int, feedback: str) -> list[dict[str, Any]]:
    from trainer.evaluate import EvalConfig, evaluate
    from trainer.pretrain import TrainConfig

    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_train_windows is not None:
        overrides["max_train_windows"] = args.max_train_windows
    train = TrainConfig.build(
        data=str(args.data),
        features=args.features,
        seq_len=args.seq_len,
        pred_len=horizon,
        progress=False,
        **overrides,
    )
    cfg = EvalConfig(
        train=train,
        methods=tuple(args.methods.split(",")),
        feedback=feedback,
        max_steps=args.max_steps,
        out=str(args.work / "eval" / f"h{horizon}-{feedback}"),
        runs_dir=str(args.work / "models"),
        plots=False,
    )
    report = evaluate(cfg)
    rows = []
    for name, m in report["methods"].items():
        family = "memcast" if name in MEMCAST_METHODS or name == "memcast" else "baseline"
        row = {k: m.get(k) for k in ("mse", "mae", "steps", "wall_s", "steps_per_s", "learn_calls", "mode")}
        row.update(method=name, family=family, setting=_model_label(m))
        rows.append(row)
        print(
            f"  {name:20s} mse {m['mse']:.4f} mae {m['mae']:.4f}  {m['steps_per_s']:.1f} steps/s", flush=True
        )
    return rows


def _model_label(m: dict[str, Any]) -> str:
    if "backbone" not in m:
        return "last value"
    return f"{m['backbone']}+{m['memory']}, {m['mode']}" + (" + replay" if m.get("replay") else "")


# ---------------------------------------------------------------------------------------------
def resolve_data(args: argparse.Namespace) -> tuple[Path, bool]:
    """(path, is ETTh1). Without ETTh1, memcast's generated data set, made once under work."""
    if args.data is not None:
        return args.data, args.data.name.startswith("ETTh1")
    if SHARED_ETTH1.is_file():
        return SHARED_ETTH1, True
    from trainer.synthetic import write_synthetic_csv

    path = args.work / "data" / "synthetic-accuracy.csv"
    if not path.is_file():
        write_synthetic_csv(path, rows=4000, channels=4, seed=0)
    return path, False


def run(args: argparse.Namespace) -> dict[str, Any]:
    single_thread()
    logging.basicConfig(level=logging.WARNING)
    args.data, is_etth1 = resolve_data(args)
    if not is_etth1:
        print(f"accuracy: ETTh1 not found at {SHARED_ETTH1}; using memcast's generated data set {args.data}")
    horizons = [int(h) for h in args.horizons.split(",")]
    feedbacks = args.feedback.split(",")
    rows: list[dict[str, Any]] = []
    data_info: dict[str, Any] = {}
    started = time.perf_counter()
    for h in horizons:
        data = load_dataset(args.data, args.features, None, args.seq_len, h)
        full_steps = count_steps(len(data.split("test")), args.seq_len, h)
        data_info[str(h)] = {"test_steps_full": full_steps, "splits": data.splits.to_dict()}
        for feedback in feedbacks:
            print(f"accuracy: h={h} feedback={feedback}", flush=True)
            for row in run_memcast(args, h, feedback):
                rows.append({"horizon": h, "feedback": feedback, **row})
        if not args.no_river:
            print(f"accuracy: h={h} River (one run serves both feedback modes)", flush=True)
            for row in run_river(data, args.seq_len, h, args.max_steps, args.quick, args.river_val_steps):
                for feedback in feedbacks:
                    rows.append({"horizon": h, "feedback": feedback, **row})
    first = load_dataset(args.data, args.features, None, args.seq_len, horizons[0])
    return {
        "kind": "accuracy",
        "date": now_iso(),
        "machine": machine_info(),
        "data": {
            "path": str(args.data),
            "etth1": is_etth1,
            "features": args.features,
            "columns": list(first.schema.columns),
            "targets": list(first.schema.targets),
            "freq": first.schema.freq,
            "seq_len": args.seq_len,
            "per_horizon": data_info,
        },
        "settings": {
            "max_steps": args.max_steps,
            "epochs": args.epochs,
            "max_train_windows": args.max_train_windows,
            "methods": args.methods,
            "river_val_steps": args.river_val_steps,
            "quick": args.quick,
        },
        "known_naive": {f"{f}/{s}/{h}": v for (f, s, h), v in KNOWN_NAIVE.items()} if is_etth1 else {},
        "command": " ".join(["python", *sys.argv]),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="CSV (default: ../shared/data/ETTh1.csv, else generated)")
    p.add_argument("--features", default="M", choices=["S", "M", "MS"])
    p.add_argument("--seq-len", type=int, default=60)
    p.add_argument("--horizons", default="1,24,48")
    p.add_argument("--feedback", default="delayed,immediate")
    p.add_argument("--methods", default=",".join(BASELINES[:2] + MEMCAST_METHODS + BASELINES[2:]))
    p.add_argument("--max-steps", type=int, help="cap on online test steps (default: the whole test split)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: the trainer's)")
    p.add_argument("--max-train-windows", type=int, help="pretraining windows (default: all)")
    p.add_argument("--river-val-steps", type=int, default=400, help="validation steps per River candidate")
    p.add_argument("--no-river", action="store_true")
    p.add_argument("--quick", action="store_true", help="smaller River grid")
    p.add_argument("--work", type=Path, default=Path("runs/bench/accuracy"), help="models and reports")
    p.add_argument("--out", type=Path, default=Path("runs/bench/accuracy.json"))
    p.add_argument(
        "--merge", type=Path, nargs="+", help="instead of running: join these results (e.g. one per horizon)"
    )
    return p


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from several runs with the same data and settings (say, one per horizon, run
    in parallel): rows and per-horizon data joined, the earliest date, the commands listed."""
    parts = [json.loads(p.read_text()) for p in paths]
    result = dict(parts[0])
    result["rows"] = [row for part in parts for row in part["rows"]]
    result["data"] = dict(parts[0]["data"])
    result["data"]["per_horizon"] = {h: v for part in parts for h, v in part["data"]["per_horizon"].items()}
    result["date"] = min(part["date"] for part in parts)
    result["wall_s"] = max(part["wall_s"] for part in parts)
    result["merged_from"] = [str(p) for p in paths]
    result["command"] = " ; ".join(part["command"] for part in parts) + " ; python " + " ".join(sys.argv)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.merge:
        write_json(args.out, merge(args.merge))
        print(f"accuracy: merged {len(args.merge)} results into {args.out}")
        return 0
    result = run(args)
    write_json(args.out, result)
    print(f"accuracy: wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
