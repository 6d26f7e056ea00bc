"""``memcast pretrain`` under ``torchrun``: two CPU processes (gloo) train as one process does
on the same global batch, and share the work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memcast.harness import clean_env, free_port
from models.checkpoint import REPORT_FILE, WEIGHTS_FILE
from tests.trainer.conftest import PRED, SEQ, tiny_config
from trainer.pretrain import pretrain

pytestmark = pytest.mark.slow  # torchrun and two processes importing torch

ROOT = Path(__file__).resolve().parents[2]
# Two processes differ from one only in the order of floating-point sums (gradients summed
# across ranks in float64, validation errors summed per rank): after 2 epochs the losses
# agreed to 1e-7 relative (fresh and carried, measured); 1e-4 leaves room for other kernels
# and is far below what training changes (the control below).
RTOL = 1e-4


def torchrun(data: Path, out: Path, memory: str, memory_pretraining: str, batch_size: int) -> dict:
    """``memcast pretrain`` with ``tiny_config``'s settings on 2 processes; its report."""
    binary = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert binary is not None, "torchrun is installed with torch"
    args = [
        *("--data", str(data), "--features", "MS", "--seq-len", str(SEQ), "--pred-len", str(PRED)),
        *("--backbone", "lstm", "--memory", memory, "--d-model", "8", "--n-layers", "1"),
        *("--epochs", "2", "--batch-size", str(batch_size), "--lr", "3e-3", "--seed", "0"),
        *("--memory-pretraining", memory_pretraining, "--tbptt", "3", "--no-progress", "--out", str(out)),
    ]
    command = [binary, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "memcast.cli"]
    done = subprocess.run(
        [*command, "pretrain", *args],
        cwd=ROOT,
        env=clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / REPORT_FILE).read_text())


# fresh: 101 train windows in batches of 20, so the last batch has one window and the second
# process none (it still takes part in the step); carried: 12 // tbptt 3 = 4 streams, 2 per process
@pytest.mark.parametrize(
    ("memory", "memory_pretraining", "batch_size"),
    [("none", "fresh", 20), ("titans", "carried", 12)],
)
def test_pretrain_two_processes_match_one_process(
    tiny_csv: Path, tmp_path: Path, memory: str, memory_pretraining: str, batch_size: int
) -> None:
    changes = dict(memory=memory, memory_pretraining=memory_pretraining, batch_size=batch_size, tbptt=3)
    one = pretrain(tiny_config(tiny_csv, tmp_path / "one", **changes))
    single = json.loads((one / REPORT_FILE).read_text())
    double = torchrun(tiny_csv, tmp_path / "two", memory, memory_pretraining, batch_size)

    assert double["processes"] == 2 and single["processes"] == 1
    assert double["memory_pretraining"] == single["memory_pretraining"] == memory_pretraining
    ignore = ("out", "name", "progress")
    assert {k: v for k, v in double["config"].items() if k not in ignore} == {
        k: v for k, v in single["config"].items() if k not in ignore
    }, "the command line must say what tiny_config says"
    # each process trained on its half of every global batch
    for one_epoch, two_epochs in zip(single["epochs"], double["epochs"], strict=True):
        (total,) = one_epoch["windows_by_process"]
        first, second = two_epochs["windows_by_process"]
        assert first + second == total and abs(first - second) <= total // 10, two_epochs
        assert two_epochs["batches"] == one_epoch["batches"]
        assert two_epochs["train_loss"] == pytest.approx(one_epoch["train_loss"], rel=RTOL)
        assert two_epochs["val_loss"] == pytest.approx(one_epoch["val_loss"], rel=RTOL)
    assert double["initial_val_loss"] == pytest.approx(single["initial_val_loss"], rel=RTOL)
    assert double["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=RTOL)
    # the control: training moved the loss by far more than the tolerance
    assert abs(single["best_val_loss"] - single["initial_val_loss"]) > 100 * RTOL * single["initial_val_loss"]
    weights_one, weights_two = load_file(one / WEIGHTS_FILE), load_file(tmp_path / "two" / WEIGHTS_FILE)
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
