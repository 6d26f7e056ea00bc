"""End to end: ``memcast serve`` as a real process, ``memcast replay`` against it, and the
forecasts it scored equal to the online evaluation's (delayed feedback, same code path)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from memcast.harness import ServeProcess, memcast_command
from models import Feedback, UpdateMode
from models.checkpoint import load_checkpoint
from tests.service.conftest import SEQ_LEN
from trainer.data import read_frame, split_borders
from trainer.online_eval import metrics, naive_forecasts, replay_stream
from trainer.synthetic import write_synthetic_csv

pytestmark = pytest.mark.slow


@pytest.fixture
def server(checkpoint_root: Path, tmp_path: Path) -> Iterator[str]:
    args = ["--checkpoints", str(checkpoint_root), "--default-model", "small"]
    with ServeProcess(args, log=tmp_path / "serve.log") as process:
        yield process.url


@pytest.mark.parametrize("bulk", [False, True], ids=["per-stream", "bulk"])
def test_serve_and_replay_match_online_evaluation(
    server: str, checkpoint_root: Path, tmp_path: Path, bulk: bool
) -> None:
    """With ``--bulk 3`` over 3 streams one request carries one time step of every stream, so
    every forecast is scored, as with one request per observation."""
    csv = write_synthetic_csv(tmp_path / "tiny.csv", rows=240, channels=2, seed=3)
    out = tmp_path / "replay.json"
    streams, steps = 3, 30
    args = ["replay", "--url", server, "--data", str(csv), "--streams", str(streams)]
    args += ["--bulk", "3", "--concurrency", "1"] if bulk else ["--concurrency", "2"]
    args += ["--max-steps", str(steps), "--report-every", "20", "--json", str(out)]
    result = subprocess.run([*memcast_command(), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rolling mse" in result.stdout and "last value" in result.stdout
    summary = json.loads(out.read_text())
    assert summary["errors"] == 0 and summary["observations"] == streams * steps
    assert summary["requests"] == (steps if bulk else streams * steps)
    assert (
        summary["throughput_obs_per_s"] > 0
        and summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0
    )

    # the same test split through trainer.online_eval (what `memcast evaluate` runs)
    ckpt = load_checkpoint(checkpoint_root / "small")
    raw = read_frame(csv)[list(ckpt.schema.columns)].to_numpy(dtype=np.float64)
    start, end = split_borders(len(raw), SEQ_LEN, csv.name).test
    series = ckpt.schema.scale(torch.from_numpy(raw[start:end])).float()
    evaluated = replay_stream(  # combine: what a stream serves by default
        ckpt.model, series, UpdateMode.MEMORY_ONLY, Feedback.DELAYED, max_steps=steps + 1, combine=True
    )
    naive = naive_forecasts(series, SEQ_LEN, ckpt.config.pred_len, ckpt.config.out_indices, steps + 1)
    assert summary["scored_values"] == streams * evaluated.forecasts.size
    assert summary["mse"] == pytest.approx(metrics(evaluated.forecasts, evaluated.truths)["mse"], rel=1e-4)
    assert summary["mae"] == pytest.approx(metrics(evaluated.forecasts, evaluated.truths)["mae"], rel=1e-4)
    assert summary["last_value_mse"] == pytest.approx(metrics(naive.forecasts, naive.truths)["mse"], rel=1e-4)

    text = httpx.get(f"{server}/metrics").text
    assert f'memcast_updates_total{{mode="memory_only"}} {float(streams * (SEQ_LEN + steps))}' in text
    assert "memcast_request_duration_seconds_count" in text
