"""Evaluation outputs: ``report.json``, per-step errors, PNG plots, and the printed table."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trainer.online_eval import StreamResult, step_mse

REPORT_JSON = "report.json"
STEPS_CSV = "per_step_mse.csv"
CUMULATIVE_PNG = "cumulative_mse.png"
SLICE_PNG = "forecast_slice.png"
FORECASTS_NPZ = "forecasts.npz"
SLICE_LENGTH = 240


def write_outputs(
    out: Path,
    report: dict[str, Any],
    results: Mapping[str, StreamResult],
    plots: bool = True,
    forecasts: bool = False,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if forecasts and results:
        arrays = {f"forecast/{name}": r.forecasts for name, r in results.items()}
        arrays["truth"] = next(iter(results.values())).truths
        np.savez_compressed(out / FORECASTS_NPZ, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    errors = {name: step_mse(r.forecasts, r.truths) for name, r in results.items()}
    _write_steps_csv(out / STEPS_CSV, errors)
    if plots and results:
        plot_cumulative_mse(out / CUMULATIVE_PNG, errors, report)
        plot_forecast_slice(out / SLICE_PNG, results, report)
        report["plots"] = [CUMULATIVE_PNG, SLICE_PNG]
    _write_json(out / REPORT_JSON, report)


def format_table(report: dict[str, Any]) -> str:
    """The methods as a text table, best MSE first."""
    first: dict[str, Any] = next(iter(report["methods"].values()), {})
    levels = list(first.get("intervals", {}))
    header = (
        "method",
        "mode",
        "MSE",
        "MAE",
        "RMSE",
        "MAPE%",
        *(f"cov{_pct(lv)}%" for lv in levels),
        *(f"width{_pct(lv)}" for lv in levels),
        "steps/s",
        "wall s",
    )
    rows = [
        (
            name,
            m["mode"],
            f"{m['mse']:.4f}",
            f"{m['mae']:.4f}",
            f"{m['rmse']:.4f}",
            f"{100 * m['mape']:.2f}",
            *(f"{100 * m['intervals'][lv]['coverage']:.1f}" for lv in levels),
            *(f"{m['intervals'][lv]['mean_width']:.3f}" for lv in levels),
            f"{m['steps_per_s']:.1f}",
            f"{m['wall_s']:.1f}",
        )
        for name, m in sorted(report["methods"].items(), key=lambda kv: kv[1]["mse"])
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in (header, *rows)]
    data = report["data"]
    title = (
        f"{Path(data['path']).name} features={data['features']} seq_len={data['seq_len']} "
        f"pred_len={data['pred_len']} feedback={report['feedback']} steps={data['test_steps']}"
    )
    return "\n".join([title, lines[0], "-" * len(lines[0]), *lines[1:]])


def _pct(level: str) -> str:
    return f"{100 * float(level):g}"


def plot_cumulative_mse(path: Path, errors: Mapping[str, np.ndarray], report: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, err in errors.items():
        ax.plot(np.cumsum(err) / np.arange(1, len(err) + 1), label=name, linewidth=1.2)
    ax.set_xlabel("test step")
    ax.set_ylabel("cumulative MSE (scaled)")
    ax.set_title(f"Online test, {report['feedback']} feedback")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forecast_slice(path: Path, results: Mapping[str, StreamResult], report: dict[str, Any]) -> None:
    """Truth vs forecasts of the first target, at horizon 1 and at the last horizon, on the
    last ``SLICE_LENGTH`` steps."""
    plt = _pyplot()
    pred_len = report["data"]["pred_len"]
    horizons = [0] if pred_len == 1 else [0, pred_len - 1]
    fig, axes = plt.subplots(len(horizons), 1, figsize=(10, 3.2 * len(horizons)), squeeze=False)
    first = next(iter(results.values()))
    steps = first.steps
    lo = max(0, steps - SLICE_LENGTH)
    for ax, h in zip(axes[:, 0], horizons, strict=True):
        x = np.arange(lo, steps) + h  # the test step each forecast value is for
        ax.plot(x, first.truths[lo:, h, 0], color="black", linewidth=1.6, label="truth")
        for name, r in results.items():
            ax.plot(x, r.forecasts[lo:, h, 0], linewidth=1.0, label=name)
        ax.set_title(f"{report['data']['targets'][0]}: forecast {h + 1} step(s) ahead")
        ax.set_xlabel("test step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_steps_csv(path: Path, errors: Mapping[str, np.ndarray]) -> None:
    names = list(errors)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *names])
        for i, row in enumerate(zip(*(errors[n] for n in names), strict=True)):
            writer.writerow([i, *(f"{v:.6g}" for v in row)])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
