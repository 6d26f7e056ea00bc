"""Helpers shared by the benchmark scripts: threads, subprocess environment, the machine, the
small checkpoint the speed benchmarks use, and JSON output."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memcast.harness import memcast_command

ROOT = Path(__file__).resolve().parents[1]
SHARED_ETTH1 = ROOT.parent / "shared" / "data" / "ETTh1.csv"

# The small checkpoint of the speed benchmarks: the trainer's default model (lstm backbone +
# titans memory, d_model 32) on memcast's generated data set (4 columns), the demo's lengths.
BENCH_SEQ_LEN, BENCH_PRED_LEN = 48, 12
BENCH_CHANNELS = 4


def single_thread() -> None:
    """One torch intra-op thread: on a small, shared machine more threads only contend."""
    import torch

    torch.set_num_threads(1)


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: no inherited MEMCAST_* settings, one math thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCAST_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MEMCAST_TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu or "unknown",
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in load],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
    }


def git_commit() -> str:
    """The commit the benchmarks ran on (``+dirty`` with uncommitted changes), for the report."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def run_checked(args: Sequence[str], timeout: float, log: Path | None = None) -> None:
    """Run a child command with the benchmark environment; raise with its output on failure."""
    result = subprocess.run(
        list(args), env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def ensure_checkpoint(
    work: Path, given: Path | None = None, *, epochs: int = 1, train_windows: int = 256, rows: int = 2000
) -> Path:
    """A checkpoint directory for the speed benchmarks: ``given``, or a small one made once under
    ``work`` with ``memcast make-data`` + ``memcast pretrain`` (the CLI a user runs)."""
    if given is not None:
        from models.checkpoint import is_checkpoint

        if not is_checkpoint(given):
            raise SystemExit(f"{given} is not a checkpoint directory (model.safetensors + config.json)")
        return given
    out = work / "checkpoints" / "bench"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    data = bench_csv(work, rows)
    started = time.perf_counter()
    args = [*memcast_command(), "--log-level", "WARNING", "pretrain", "--data", str(data), "--out", str(out)]
    args += ["--seq-len", str(BENCH_SEQ_LEN), "--pred-len", str(BENCH_PRED_LEN), "--d-model", "32"]
    args += ["--epochs", str(epochs), "--max-train-windows", str(train_windows), "--no-progress"]
    run_checked(args, timeout=1800, log=work / "logs" / "pretrain.log")
    print(f"made the benchmark checkpoint {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def bench_csv(work: Path, rows: int = 2000) -> Path:
    """memcast's generated data set (``memcast make-data``), made once under ``work``."""
    data = work / "data" / f"synthetic-{rows}.csv"
    if not data.is_file():
        args = [*memcast_command(), "make-data", "--out", str(data), "--rows", str(rows)]
        args += ["--channels", str(BENCH_CHANNELS)]
        run_checked(args, timeout=300)
    return data


def which_redis() -> str | None:
    return shutil.which("redis-server")
