"""The benchmark scripts run end to end on tiny inputs and write their outputs.

Nothing here asserts a speed or an accuracy: the scripts are run as a user runs them (separate
processes), with a tiny checkpoint, a tiny CSV, a few streams and a few steps, and the tests
check the JSON they write and the report made from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.step_cost import build
from models import ContinualForecaster, ModelConfig
from models.checkpoint import DataSchema, save_checkpoint
from trainer.synthetic import write_synthetic_csv

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN, PRED_LEN = 8, 3


def run_script(script: str, *args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCAST_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def tiny_checkpoint(directory: Path) -> Path:
    """An lstm + titans checkpoint for the tiny CSV's two columns (random weights, no training)."""
    torch.manual_seed(0)
    config = ModelConfig(channels=2, seq_len=SEQ_LEN, pred_len=PRED_LEN, d_model=8, n_layers=1)
    schema = DataSchema(
        columns=("load_a", "OT"),
        targets=("load_a", "OT"),
        mean=(0.0, 0.0),
        std=(1.0, 1.0),
        seq_len=SEQ_LEN,
        pred_len=PRED_LEN,
        freq="h",
    )
    return save_checkpoint(directory, ContinualForecaster(config), schema, name="tiny")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run floor, load, accuracy and step_cost once on tiny inputs; their JSON files by part."""
    work = tmp_path_factory.mktemp("bench")
    csv = write_synthetic_csv(work / "tiny.csv", rows=400, channels=2, seed=1)
    checkpoint = tiny_checkpoint(work / "checkpoints" / "tiny")
    results = work / "quick"
    out = {part: results / f"{part}.json" for part in ("floor", "load", "accuracy", "step_cost")}
    run_script(
        "floor.py",
        *("--checkpoint", str(checkpoint), "--configs", "titans,fsnet", "--batches", "1,3"),
        *("--budget", "0.05", "--max-steps", "2", "--out", str(out["floor"])),
    )
    stores = "embedded,redis" if shutil.which("redis-server") else "embedded"
    run_script(
        "load.py",
        *("--checkpoint-dir", str(checkpoint), "--data", str(csv), "--work", str(work / "load")),
        *("--stores", stores, "--streams", "1,2", "--concurrency", "1,2", "--cell-seconds", "1"),
        *("--cell-obs", "4", "--floor", str(out["floor"]), "--out", str(out["load"])),
    )
    run_script(
        "accuracy.py",
        *("--data", str(csv), "--seq-len", "16", "--horizons", "1,4", "--max-steps", "6"),
        *("--epochs", "1", "--max-train-windows", "16", "--quick", "--river-val-steps", "4"),
        *("--work", str(work / "accuracy"), "--out", str(out["accuracy"])),
    )
    run_script(
        *("step_cost.py", "--configs", "ogd,fsnet_ref_size", "--steps", "2", "--as-published", "--region"),
        *("--out", str(out["step_cost"])),
    )
    return out


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_floor_writes_every_mode_and_batch(outputs: dict[str, Path]) -> None:
    floor = read(outputs["floor"])
    cells = {(r["config"], r["mode"], r["batch"]) for r in floor["rows"]}
    assert len(cells) == 2 * 3 * 2 == len(floor["rows"])
    for row in floor["rows"]:
        assert row["steps"] >= 1 and row["obs_per_s"] > 0
        assert row["state_nbytes"] > 0 and row["state_blob_bytes"] > row["state_nbytes"]
    assert floor["machine"]["torch_threads"] == 1


def test_load_writes_cells_for_each_store(outputs: dict[str, Path]) -> None:
    load = read(outputs["load"])
    expected_stores = ["embedded", "redis"] if shutil.which("redis-server") else ["embedded"]
    assert [s["store"] for s in load["stores"]] == expected_stores
    for store in load["stores"]:
        # C > N is skipped: N=1 runs C=1 only, N=2 runs C=1 and C=2, in each mode
        grid = {(c["mode"], c["streams"], c["concurrency"]) for c in store["cells"]}
        assert grid == {(m, n, c) for m in ("memory_only", "full_model") for n, c in ((1, 1), (2, 1), (2, 2))}
        for cell in store["cells"]:
            assert cell["errors"] == 0, cell["error_samples"]
            assert cell["observations"] >= 1 and cell["latency_ms"]["p99"] >= cell["latency_ms"]["p50"] > 0
            assert cell["state_bytes"] > 0 and cell["ratio_to_floor_b1"] > 0
            if store["store"] == "redis":
                assert cell["redis_round_trips_per_obs"] >= 1
        assert store["memory"][0]["rss_bytes"] > 0 and store["creation"][-1]["errors"] == 0
    full = [c for s in load["stores"] for c in s["cells"] if c["mode"] == "full_model"]
    memory_only = [c for s in load["stores"] for c in s["cells"] if c["mode"] == "memory_only"]
    assert min(c["state_bytes"] for c in full) > max(c["state_bytes"] for c in memory_only)


def test_accuracy_writes_every_method_horizon_and_feedback(outputs: dict[str, Path]) -> None:
    acc = read(outputs["accuracy"])
    assert acc["data"]["etth1"] is False
    methods = {r["method"] for r in acc["rows"]}
    learners = {"titans_memory_only", "combo_memory_only", "titans_full_model", "fsnet", "ogd"}
    assert methods >= {"naive", "titans_none", "river_snarimax", *learners}
    for h in (1, 4):
        for feedback in ("delayed", "immediate"):
            rows = [r for r in acc["rows"] if r["horizon"] == h and r["feedback"] == feedback]
            assert {r["method"] for r in rows} == methods
            assert all(r["steps"] == 6 and r["mse"] >= 0 for r in rows)


def test_report_writes_markdown_and_plots(outputs: dict[str, Path], tmp_path: Path) -> None:
    from bench.report import main as report_main

    out = tmp_path / "docs" / "benchmarks.md"
    args = ["--mode", "quick", "--out", str(out)]
    for part, path in outputs.items():
        args += [f"--{part.replace('_', '-')}", str(path)]
    assert report_main(args) == 0
    text = out.read_text()
    headings = (
        "## Headline",
        "## Accuracy",
        "## Compute floor",
        "## The cost of a learning step",
        "## Service",
    )
    assert all(heading in text for heading in (*headings, "### Memory", "## Commands"))
    assert "| fsnet_ref_size | tcn+fsnet, d_model 64 x 11 | 551,666 |" in text
    assert "ETTh1 was not found" in text and "capped at 6" in text
    assert (tmp_path / "docs" / "img" / "bench_latency.png").stat().st_size > 0
    assert (tmp_path / "docs" / "img" / "bench_throughput.png").stat().st_size > 0


def test_run_all_rebuilds_report_from_existing_results(outputs: dict[str, Path], tmp_path: Path) -> None:
    work = outputs["floor"].parents[1]
    out = tmp_path / "benchmarks.md"
    stdout = run_script("run_all.py", "--quick", "--report-only", "--work", str(work), "--out", str(out))
    text = out.read_text()
    assert "report" in stdout and "## Service" in text and "## The cost of a learning step" in text


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_soak_restarts_redis_and_loses_no_acknowledged_observation(tmp_path: Path) -> None:
    """A 15-second soak: the Redis restart in the middle is seen as 503s, and every
    observation the server acknowledged is in Redis afterwards."""
    csv = write_synthetic_csv(tmp_path / "tiny.csv", rows=400, channels=2, seed=1)
    checkpoint = tiny_checkpoint(tmp_path / "checkpoints" / "tiny")
    out, doc = tmp_path / "soak.json", tmp_path / "docs" / "soak.md"
    run_script(
        "soak.py",
        *("--checkpoint-dir", str(checkpoint), "--data", str(csv), "--work", str(tmp_path / "work")),
        *("--minutes", "0.25", "--streams", "5", "--rate", "20", "--outage-s", "1", "--sample-s", "2"),
        *("--out", str(out), "--doc", str(doc)),
    )
    soak = read(out)
    statuses = {k for row in soak["minutes"] for k in row["by_status"]}
    assert "200" in statuses and statuses <= {"200", "503"}, soak["error_samples"]
    assert sum(row["by_status"].get("503", 0) for row in soak["minutes"]) > 0, "the restart went unseen"
    assert soak["observations"]["acknowledged"] > 100
    assert soak["observations"]["lost"] == 0 and soak["observations"]["streams_missing"] == 0
    assert 0 < soak["restart"]["stopped_at"] < soak["restart"]["ready_at"] < 15
    assert len(soak["memory"]) >= 5 and all(m["rss_bytes"] > 0 for m in soak["memory"])
    assert "acknowledged observations lost" in doc.read_text() and (doc.parent / "img" / "soak.png").is_file()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_rss_creates_warm_streams_and_reports_memory_per_phase(tmp_path: Path) -> None:
    csv = write_synthetic_csv(tmp_path / "tiny.csv", rows=200, channels=2, seed=1)
    checkpoint = tiny_checkpoint(tmp_path / "checkpoints" / "tiny")
    out = tmp_path / "rss.json"
    run_script(
        "rss.py",
        *("--checkpoint-dir", str(checkpoint), "--data", str(csv), "--work", str(tmp_path / "work")),
        *("--streams", "5", "--per-request", "2", "--history", str(SEQ_LEN + PRED_LEN), "--out", str(out)),
    )
    result = read(out)
    assert [p["phase"] for p in result["phases"]] == ["started", "created", "observed"]
    assert all(p["rss_mib"] > 0 for p in result["phases"]) and result["streams"] == 5


def test_results_writes_every_table_and_the_acceptance_from_job_files(tmp_path: Path) -> None:
    """``python -m bench.results --quick`` runs every method group under both feedback modes
    plus River on the generated regimes, and the page lists every row; ``--report-only``
    rebuilds the same page from the job files alone."""
    work, page = tmp_path / "work", tmp_path / "docs" / "results.md"
    stdout = run_script("results", "--quick", "--jobs", "2", "--work", str(work), "--out", str(page))
    assert "results: wrote" in stdout
    jobs = sorted(p.stem for p in (work / "quick" / "jobs").glob("*.json"))
    groups = ("served", "pure", "no_corrector", "full", "ogd", "fsnet")
    expected = {f"evaluate-regimes-{f}-{g}" for f in ("delayed", "immediate") for g in groups}
    speed = {f"speed-regimes-delayed-speed-r{r}" for r in (1, 2, 3)}  # issue 10's cost line, run alone
    assert expected | speed | {"river-regimes"} <= set(jobs)
    text = page.read_text()
    assert "3 runs one after the other with nothing beside them;" in text
    for row in ("frozen checkpoint", "combo_memory_only", "pure (`outcome_lr` 0, `corrector_lr` 0, `analog_rows` 0)", "no corrector", "combo_full_model",
                "`ogd`", "`fsnet`", "River SNARIMAX", "River Holt-Winters"):  # fmt: skip
        assert text.count(row) >= 4, row  # two summaries and two detail tables
    assert "## Delayed feedback" in text and "## Immediate feedback" in text
    assert text.index("## Delayed feedback") < text.index("## Immediate feedback")
    assert "generated recurring regimes: memory_only >= 15% under frozen" in text
    served = json.loads((work / "quick" / "jobs" / "evaluate-regimes-delayed-served.json").read_text())
    frozen = served["methods"]["titans_none"]["mse"]
    assert f"{frozen:.4f} (+0.0%)" in text
    assert (page.parent / "img" / "results_vs_frozen.png").stat().st_size > 0

    page.unlink()
    run_script("results", "--quick", "--report-only", "--work", str(work), "--out", str(page))
    assert page.read_text() == text

    # --resume reruns only what is missing: one evaluation, and the pretrainings whose
    # checkpoints are gone (before any evaluation needs them)
    jobs_dir = work / "quick" / "jobs"
    kept = (jobs_dir / "evaluate-regimes-delayed-served.json").stat().st_mtime_ns
    (jobs_dir / "evaluate-regimes-delayed-ogd.json").unlink()
    shutil.rmtree(work / "models")
    stdout = run_script("results", "--quick", "--resume", "--work", str(work), "--out", str(page))
    assert "[4/4" in stdout and "evaluate-regimes-delayed-ogd" in stdout
    assert (jobs_dir / "evaluate-regimes-delayed-served.json").stat().st_mtime_ns == kept
    assert "It kept the jobs of `python -m bench.results --quick --jobs 2" in page.read_text()


def test_step_cost_reports_each_config_against_its_weights(outputs: dict[str, Path]) -> None:
    result = read(outputs["step_cost"])
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"ogd", "fsnet_ref_size"} and result["shapes"]["channels"] == 7
    assert 500_000 < rows["fsnet_ref_size"]["weights"] < 600_000 and rows["ogd"]["weights"] < 20_000
    assert all(r["steps"] == 2 and r["cpu_ms_per_step"] > 0 for r in rows.values())
    assert result["as_published"] is True


def test_step_cost_as_published_learns_as_the_baselines_papers() -> None:
    """The switch gives the baselines' online settings (the results page's ogd and fsnet rows)."""
    published, default = build("ogd", as_published=True).config, build("ogd").config
    assert (published.online_lr, published.online_clip, published.online_anchor) == (1e-3, 0.0, 0.0)
    assert default.online_clip > 0 and default.online_anchor > 0
