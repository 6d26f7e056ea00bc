"""Run every benchmark and write docs/benchmarks.md (+ docs/img/*.png).

    python -m bench.run_all --quick      # `make bench`: a short version of everything (< 5 min)
    python -m bench.run_all              # the full grid: N up to 1,000 streams, the whole test split

Each part runs in its own process (one torch thread) and writes a JSON file under
``runs/bench/<quick|full>/``; the report is made from those files, so a part can be re-run
alone (``--only load``) and the report rebuilt from the others (``--report-only``).
The small checkpoint the speed benchmarks serve is made once under ``runs/bench/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench._common import ROOT, bench_csv, child_env, ensure_checkpoint
from bench.report import main as report_main

PARTS = ("floor", "load", "accuracy", "step_cost")

QUICK = {
    "floor": ["--configs", "titans", "--batches", "1,8,64,256", "--budget", "0.5", "--max-steps", "30",
              "--total-budget", "90"],
    "load": ["--streams", "1,64", "--concurrency", "1,16,64", "--cell-seconds", "3", "--cell-obs", "1500",
             "--store-budget", "150"],
    "accuracy": ["--max-steps", "100", "--epochs", "1", "--max-train-windows", "64", "--quick",
                 "--river-val-steps", "150"],
    "step_cost": ["--steps", "30"],
}  # fmt: skip
FULL = {
    "floor": ["--configs", "titans,fsnet,fsnet_nomem,titans_mal,none,fsnet_ref_size,ogd_ref_size", "--batches", "1,8,64,256", "--budget", "3",
              "--max-steps", "200"],
    "load": ["--streams", "1,100,1000", "--concurrency", "1,16,64", "--cell-seconds", "20", "--cell-obs", "20000",
             "--store-budget", "3600"],
    "accuracy": [],
    "step_cost": ["--steps", "200"],
}  # fmt: skip


def run_part(part: str, extra: list[str], out: Path, log: Path) -> None:
    cmd = [sys.executable, "-m", f"bench.{part}", *extra, "--out", str(out)]
    print(f"== {part}: {' '.join(['python', *cmd[1:]])}", flush=True)
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:  # show progress and keep a log
            sys.stdout.write("   " + line)
            sink.write(line)
        code = process.wait()
    if code != 0:
        raise SystemExit(f"{part} failed ({code}); see {log}")
    print(f"== {part}: done in {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short version of everything (under 5 minutes)")
    p.add_argument(
        "--only", help=f"comma-separated parts to run ({', '.join(PARTS)}); the others' JSON is reused"
    )
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the JSON files")
    p.add_argument("--checkpoint-dir", type=Path, help="serve this checkpoint (default: make a small one)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch and results root")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args(argv)

    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    work = (ROOT / args.work).resolve() if not args.work.is_absolute() else args.work
    results = work / mode
    outputs = {part: results / f"{part}.json" for part in PARTS}
    parts = [] if args.report_only else (args.only.split(",") if args.only else list(PARTS))
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}: {', '.join(PARTS)}")
    settings = QUICK if args.quick else FULL
    if {"floor", "load"} & set(parts):
        checkpoint = ensure_checkpoint(work, args.checkpoint_dir, train_windows=128)
        data = bench_csv(work)
    for part in parts:
        extra = list(settings[part])
        if part == "floor":
            extra += ["--checkpoint", str(checkpoint)]
        elif part == "load":
            extra += [
                "--checkpoint-dir",
                str(checkpoint),
                "--data",
                str(data),
                "--work",
                str(results / "load"),
            ]
            extra += ["--floor", str(outputs["floor"])]
        elif part == "accuracy":
            extra += ["--work", str(work / "accuracy")]  # pretrained models are cached across runs
        run_part(part, extra, outputs[part], results / "logs" / f"{part}.log")
    wall = time.perf_counter() - started
    me = "python -m bench.run_all " + " ".join(argv if argv is not None else sys.argv[1:])
    report_args = ["--mode", mode, "--out", str(args.out), "--command", me.strip()]
    if parts:
        report_args += ["--wall-s", f"{wall:.1f}"]
    for part, path in outputs.items():
        if path.is_file():
            report_args += [f"--{part.replace('_', '-')}", str(path)]
    report_main(report_args)
    print(f"run_all: {mode} run finished in {wall:.0f} s; report {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
