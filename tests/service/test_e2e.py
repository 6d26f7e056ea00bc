"""End to end: ``memcast serve`` as a real process, ``memcast replay`` against it, and the
forecasts it scored equal to the online evaluation's (delayed feedback, same code path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models import Feedback, UpdateMode
from models.checkpoint import load_checkpoint
from tests.conftest import free_port
from tests.service.conftest import SEQ_LEN
from trainer.data import read_frame, split_borders
from trainer.online_eval import metrics, naive_forecasts, replay_stream
from trainer.synthetic import write_synthetic_csv

pytestmark = pytest.mark.slow


def memcast_command() -> list[str]:
    script = Path(sys.executable).parent / "memcast"
    return [str(script)] if script.exists() else [sys.executable, "-m", "memcast.cli"]


@pytest.fixture
def server(checkpoint_root: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCAST_")}
    log = (tmp_path / "serve.log").open("wb")
    args = ["serve", "--port", str(port), "--checkpoints", str(checkpoint_root), "--default-model", "small"]
    process = subprocess.Popen([*memcast_command(), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "memcast serve did not become ready:\n" + (tmp_path / "serve.log").read_text()
                )
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_serve_and_replay_match_online_evaluation(server: str, checkpoint_root: Path, tmp_path: Path) -> None:
    csv = write_synthetic_csv(tmp_path / "tiny.csv", rows=240, channels=2, seed=3)
    out = tmp_path / "replay.json"
    streams, steps = 3, 30
    args = ["replay", "--url", server, "--data", str(csv), "--streams", str(streams), "--concurrency", "2"]
    args += ["--max-steps", str(steps), "--report-every", "20", "--json", str(out)]
    result = subprocess.run([*memcast_command(), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rolling mse" in result.stdout and "last value" in result.stdout
    summary = json.loads(out.read_text())
    assert summary["errors"] == 0 and summary["observations"] == streams * steps == summary["requests"]
    assert (
        summary["throughput_obs_per_s"] > 0
        and summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0
    )

    # the same test split through trainer.online_eval (what `memcast evaluate` runs)
    ckpt = load_checkpoint(checkpoint_root / "small")
    raw = read_frame(csv)[list(ckpt.schema.columns)].to_numpy(dtype=np.float64)
    start, end = split_borders(len(raw), SEQ_LEN, csv.name).test
    series = ckpt.schema.scale(torch.from_numpy(raw[start:end])).float()
    evaluated = replay_stream(
        ckpt.model, series, UpdateMode.MEMORY_ONLY, Feedback.DELAYED, max_steps=steps + 1
    )
    naive = naive_forecasts(series, SEQ_LEN, ckpt.config.pred_len, ckpt.config.out_indices, steps + 1)
    assert summary["scored_values"] == streams * evaluated.forecasts.size
    assert summary["mse"] == pytest.approx(metrics(evaluated.forecasts, evaluated.truths)["mse"], rel=1e-4)
    assert summary["mae"] == pytest.approx(metrics(evaluated.forecasts, evaluated.truths)["mae"], rel=1e-4)
    assert summary["last_value_mse"] == pytest.approx(metrics(naive.forecasts, naive.truths)["mse"], rel=1e-4)

    text = httpx.get(f"{server}/metrics").text
    assert f'memcast_updates_total{{mode="memory_only"}} {float(streams * (SEQ_LEN + steps))}' in text
    assert "memcast_request_duration_seconds_count" in text
