"""``memcast evaluate``'s interval scores are ``models.intervals`` replayed in the delayed
order, per level, and the table prints them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.intervals import coverage, replay
from trainer.evaluate import interval_scores
from trainer.online_eval import StreamResult
from trainer.report import format_table


def test_interval_scores_are_the_replayed_coverage_and_width_per_level() -> None:
    rng = np.random.default_rng(0)
    truths = rng.normal(size=(400, 3, 2)).astype(np.float32)
    forecasts = (truths + rng.normal(scale=0.5, size=truths.shape)).astype(np.float32)
    scores = interval_scores(StreamResult(forecasts, truths, 1.0, 0), (0.5, 0.9))
    lower, upper = replay(
        torch.from_numpy(forecasts), torch.from_numpy(truths), torch.tensor([0.5, 0.9], dtype=torch.float64)
    )
    cov, width, count = coverage(lower, upper, torch.from_numpy(truths))
    assert list(scores) == ["0.5", "0.9"]
    for i, level in enumerate(scores):
        assert scores[level]["coverage"] == pytest.approx(float(cov[i]), abs=0)
        assert scores[level]["mean_width"] == pytest.approx(float(width[i]), abs=0)
        assert (
            scores[level]["count"] == int(count[i]) == 400 * 3 * 2 - 3 * 2 * 2
        )  # step h waits for h forecasts
        assert abs(scores[level]["coverage"] - float(level)) < 0.06


def test_table_prints_coverage_and_width_per_level() -> None:
    row = {
        "mode": "none",
        "mse": 1.0,
        "mae": 1.0,
        "rmse": 1.0,
        "mape": 0.1,
        "steps_per_s": 1.0,
        "wall_s": 1.0,
    }
    row["intervals"] = {
        "0.8": {"coverage": 0.7912, "mean_width": 3.25},
        "0.95": {"coverage": 0.9431, "mean_width": 5.5},
    }
    data = {"path": "x.csv", "features": "M", "seq_len": 4, "pred_len": 2, "test_steps": 9}
    table = format_table({"methods": {"naive": row}, "data": data, "feedback": "delayed"})
    header, _, line = table.splitlines()[1:]
    assert header.split()[6:10] == ["cov80%", "cov95%", "width80", "width95"]
    assert line.split()[6:10] == ["79.1", "94.3", "3.250", "5.500"]
