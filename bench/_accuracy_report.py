"""The accuracy section of docs/benchmarks.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench._format import num, table

MEMCAST_LABELS = {
    "titans_none": "memcast titans, frozen (none)",
    "titans_memory_only": "memcast titans, memory_only",
    "combo_memory_only": "memcast combination (served default)",
    "titans_full_model": "memcast titans, full_model",
    "fsnet": "memcast fsnet (tcn + FSNet), full_model",
    "naive": "naive (last value)",
    "ogd": "OGD (tcn, full_model)",
    "er": "ER (tcn, full_model + replay)",
    "river_snarimax": "River SNARIMAX",
    "river_holtwinters": "River HoltWinters",
}


def accuracy_section(acc: dict[str, Any]) -> list[str]:
    d = acc["data"]
    s = acc["settings"]
    rows = acc["rows"]
    lines = ["## Accuracy: online test", ""]
    if d["etth1"]:
        lines.append(
            f"Data: **ETTh1** (`{Path(d['path']).name}`), features `{d['features']}` ({len(d['columns'])} variables, all "
            f"forecast), seq_len {d['seq_len']}, the FSNet/OneNet borders and train-split scaler "
            "(`../shared/data/README.md`). MSE / MAE on the scaled values, averaged over every value of every forecast."
        )
    else:
        lines.append(
            f"Data: **ETTh1 was not found; memcast's generated data set** `{Path(d['path']).name}` "
            f"(features `{d['features']}`, {len(d['columns'])} variables), seq_len {d['seq_len']}, 20/5/75 % splits."
        )
    lines.append("")
    full = sorted(v["test_steps_full"] for v in d["per_horizon"].values())
    full_text = f"{full[0]:,}" if full[0] == full[-1] else f"{full[0]:,}–{full[-1]:,}"
    steps = {r["steps"] for r in rows}
    if s["max_steps"] is not None:
        lines.append(
            f"**Test steps capped at {s['max_steps']}** (`--max-steps`) of the {full_text} steps of the full "
            "test split (per horizon): the first days of the test only, a smoke figure, not the protocol's score."
        )
    else:
        lines.append(
            f"Every step of the test split ({', '.join(f'{n:,}' for n in sorted(steps))} forecasts per method)."
        )
    pre = []
    if s.get("epochs") is not None:
        pre.append(f"{s['epochs']} epoch(s)")
    if s.get("max_train_windows") is not None:
        pre.append(f"{s['max_train_windows']} training windows")
    lines.append(
        "Models are pretrained on the train split ("
        + (", ".join(pre) if pre else "the trainer's defaults")
        + ", early stopping on validation) and cached; River models learn every value before the test border."
    )
    lines += [
        "Feedback: *delayed* learns from a forecast once its whole horizon has been observed (what the",
        "service does); *immediate* is the literature's protocol, the true horizon revealed right after",
        "each forecast. River learns value by value and only from observed values (revealed future",
        "values would sit in its lags), so its two columns are one run. `updates/s`: online steps per",
        "second, one thread; a step is one forecast and one update (a memory write or a gradient step",
        "of the model; for River, `learn_one` of every variable's model).",
    ]
    if acc.get("merged_from"):
        lines += [
            f"These results join {len(acc['merged_from'])} runs made at the same time, as parallel processes "
            "(one per horizon): their updates/s shared the machine's 2 cores with each other and other work.",
        ]
    lines += [
        "",
    ]
    for h in sorted({r["horizon"] for r in rows}):
        lines += [f"### Horizon {h}", ""]
        sub = [r for r in rows if r["horizon"] == h]
        feedbacks = sorted({r["feedback"] for r in sub}, key=lambda f: f != "delayed")
        methods = list(dict.fromkeys(r["method"] for r in sub))
        header = ["method"]
        for f in feedbacks:
            header += [f"MSE {f}", f"MAE {f}"]
        header += [f"updates/s {f}" for f in feedbacks] + ["setting"]
        body = []
        for m in methods:
            row = [MEMCAST_LABELS.get(m, m)]
            by_f = {r["feedback"]: r for r in sub if r["method"] == m}
            for f in feedbacks:
                r = by_f.get(f)
                row += [num(r["mse"], 4), num(r["mae"], 4)] if r else ["–", "–"]
            first = by_f.get(feedbacks[0]) or next(iter(by_f.values()))
            for f in feedbacks:
                r = by_f.get(f)
                row.append(num(r["steps_per_s"], 1) if r and m != "naive" else "–")
            row.append(first.get("setting", ""))
            body.append(row)
        lines += table(header, body)
        known = acc.get("known_naive", {}).get(f"{d['features']}/{d['seq_len']}/{h}")
        if known and s["max_steps"] is None:
            naive = next((r for r in sub if r["method"] == "naive"), None)
            if naive:
                lines += [
                    f"Check: naive MSE {naive['mse']:.3f} / MAE {naive['mae']:.3f} here; the data README's "
                    f"figure is {known[0]} / {known[1]}.",
                    "",
                ]
        river = [r for r in sub if r["family"] == "river" and r["feedback"] == feedbacks[0]]
        for r in river:
            val = ", ".join(f"{k}: {v:.4f}" for k, v in r["validation_mse"].items())
            lines += [
                f"<sub>{MEMCAST_LABELS.get(r['method'], r['method'])} validation MSE per setting: {val}</sub>",
                "",
            ]
    return lines


def headline_accuracy(acc: dict[str, Any]) -> list[str]:
    rows = acc["rows"]
    steps = sorted({r["steps"] for r in rows})
    where = "ETTh1" if acc["data"]["etth1"] else "memcast's generated data set (ETTh1 not found)"
    capped = f", test capped at {acc['settings']['max_steps']} steps" if acc["settings"]["max_steps"] else ""
    lines = [
        "### Accuracy: the best memcast configuration against the alternatives",
        "",
        f"Online test MSE on {where}, {acc['data']['features']} features, seq_len {acc['data']['seq_len']}"
        f"{capped} ({', '.join(f'{n:,}' for n in steps)} forecasts per method); details in *Accuracy* below. "
        "The full test splits, both feedback modes and every learning mode beside its frozen checkpoint "
        "are in [results.md](results.md) (`python -m bench.results`). In the *immediate* rows memcast's "
        "output corrector also uses the horizon values the protocol reveals before the next forecast "
        "(its known-value term, `known_lr`): they measure the protocol more than learning; the "
        "*delayed* rows are the service's accuracy.",
        "",
    ]
    body = []
    for h in sorted({r["horizon"] for r in rows}):
        for f in sorted({r["feedback"] for r in rows}, key=lambda x: x != "delayed"):
            sub = [r for r in rows if r["horizon"] == h and r["feedback"] == f]
            mem = [r for r in sub if r["family"] == "memcast"]
            if not mem:
                continue
            best = min(mem, key=lambda r: r["mse"])
            get = {r["method"]: r["mse"] for r in sub}
            river = [r for r in sub if r["family"] == "river"]
            best_river = min(river, key=lambda r: r["mse"]) if river else None
            body.append(
                [
                    h,
                    f,
                    f"{MEMCAST_LABELS.get(best['method'], best['method'])}: {best['mse']:.4f}",
                    num(get.get("titans_none"), 4),
                    num(get.get("naive"), 4),
                    num(get.get("ogd"), 4),
                    f"{num(best_river['mse'], 4)} ({best_river['method'].removeprefix('river_')})"
                    if best_river
                    else "–",
                    _verdict(
                        best["mse"],
                        [
                            get.get("titans_none"),
                            get.get("naive"),
                            get.get("ogd"),
                            best_river["mse"] if best_river else None,
                        ],
                    ),
                ]
            )
    lines += table(
        [
            "horizon",
            "feedback",
            "best learning memcast MSE",
            "frozen",
            "naive",
            "OGD",
            "best River",
            "vs best other",
        ],
        body,
    )
    return lines


def _verdict(mine: float, others: list[float | None]) -> str:
    known = [o for o in others if o is not None and math.isfinite(o)]
    if not known:
        return "–"
    best = min(known)
    change = (mine - best) / best * 100
    return f"{'better' if mine < best else 'worse'} by {abs(change):.1f} %"
