from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from memcast.cli import build_parser, main
from models.checkpoint import load_checkpoint
from models.config import ModelConfig, NeuralMemoryConfig
from trainer import methods as methods_module
from trainer.cli import train_config
from trainer.flags import train_flags
from trainer.report import CUMULATIVE_PNG, REPORT_JSON, SLICE_PNG
from trainer.train_config import TrainConfig

SMALL = ["--seq-len", "16", "--pred-len", "4", "--d-model", "8", "--n-layers", "1", "--epochs", "1"]
SMALL += ["--batch-size", "16", "--lr", "3e-3", "--max-train-windows", "48", "--no-progress"]


def test_make_data_pretrain_evaluate_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = tmp_path / "synthetic.csv"
    assert main(["make-data", "--out", str(csv), "--rows", "500", "--channels", "3", "--seed", "2"]) == 0
    ckpt = tmp_path / "ckpt"
    pretrain_args = ["pretrain", "--data", str(csv), "--features", "MS", "--memory", "none", *SMALL]
    assert main([*pretrain_args, "--out", str(ckpt)]) == 0
    assert load_checkpoint(ckpt).config.backbone == "lstm"

    methods = "naive,memcast,ogd,er,fsnet,fsnet_nomem,titans_memory_only"
    out, runs = tmp_path / "eval", tmp_path / "runs"
    evaluate_args = ["evaluate", "--checkpoint", str(ckpt), "--methods", methods, "--mode", "full_model"]
    evaluate_args += [
        "--feedback",
        "immediate",
        "--max-steps",
        "25",
        "--out",
        str(out),
        "--runs-dir",
        str(runs),
    ]
    evaluate_args += ["--online-lr", "1e-2", "--er-samples", "1", "--threads", "1"]
    assert main(evaluate_args) == 0
    table = capsys.readouterr().out
    report = json.loads((out / REPORT_JSON).read_text())
    assert set(report["methods"]) == set(methods.split(","))
    for name, row in report["methods"].items():
        assert row["steps"] == 25, name
        assert all(math.isfinite(row[k]) for k in ("mse", "mae", "rmse", "mape", "steps_per_s")), name
        assert set(row["intervals"]) == {"0.8", "0.95"}, name
        assert 0 <= row["intervals"]["0.8"]["coverage"] <= 1 and row["intervals"]["0.8"]["count"] > 0, name
        assert name in table
    assert "cov80%" in table and "width95" in table
    assert report["feedback"] == "immediate" and report["data"]["features"] == "MS"
    assert report["methods"]["er"]["learn_calls"] > report["methods"]["ogd"]["learn_calls"] == 25
    assert report["methods"]["fsnet"]["memory"] == "fsnet"
    # the methods' models were pretrained with the checkpoint's settings (d_model 8, seq_len 16)
    assert report["methods"]["ogd"]["backbone"] == "tcn"
    assert load_checkpoint(report["methods"]["ogd"]["checkpoint"]).config.d_model == 8
    assert (out / CUMULATIVE_PNG).stat().st_size > 0 and (out / SLICE_PNG).stat().st_size > 0

    # a second run reuses the cached checkpoints: pretraining again would fail here
    def no_pretraining(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrained again")

    monkeypatch.setattr(methods_module, "pretrain", no_pretraining)
    again = ["evaluate", "--checkpoint", str(ckpt), "--methods", "ogd", "--max-steps", "5"]
    assert main([*again, "--out", str(tmp_path / "eval2"), "--runs-dir", str(runs), "--no-plots"]) == 0


def test_evaluate_rejects_an_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "s.csv"
    main(["make-data", "--out", str(csv), "--rows", "300"])
    code = main(["evaluate", "--data", str(csv), "--methods", "naive,magic", "--out", str(tmp_path / "e")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("memcast evaluate: error: unknown method 'magic'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain"], "--data is required"),
        (
            ["pretrain", "--data", "{csv}", "--memory", "fsnet"],
            "memory 'fsnet' does not work with backbone 'lstm'",
        ),
        (["pretrain", "--data", "{csv}", "--epochs", "0"], "epochs and batch_size must be >= 1"),
        (["pretrain", "--data", "{tmp}/missing.csv"], "missing.csv"),
        (["evaluate", "--checkpoint", "{tmp}"], "is not a checkpoint"),
    ],
)
def test_cli_reports_domain_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    csv = tmp_path / "s.csv"
    main(["make-data", "--out", str(csv), "--rows", "300"])
    capsys.readouterr()
    argv = [a.format(csv=csv, tmp=tmp_path) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_generated_flags_cover_every_config_field() -> None:
    """A field added to TrainConfig or ModelConfig (nested groups too) is a flag of pretrain and
    evaluate, with the dataclass default when unset."""
    parser = build_parser()
    args = parser.parse_args(["pretrain", "--data", "x.csv", "--neural-memory.chunk-size", "4", "--no-revin"])
    config = train_config(args)
    assert config.model.neural_memory.chunk_size == 4 and config.model.revin is False
    assert config.epochs == TrainConfig(data="x.csv").epochs
    dests = {flag.dest for _, flags in train_flags() for flag in flags}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"channels", "targets"}
    nested = {"neural_memory", "fsnet", "cms"}
    assert model_fields - nested <= dests
    assert {f"neural_memory.{f.name}" for f in dataclasses.fields(NeuralMemoryConfig)} <= dests
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "out", "name"} <= dests


@pytest.mark.parametrize("variant", ["mlp", "simple", "advanced"])
def test_pretrain_selects_the_memory_variant_by_name(tmp_path: Path, variant: str) -> None:
    csv = tmp_path / "s.csv"
    main(["make-data", "--out", str(csv), "--rows", "300", "--channels", "2"])
    ckpt = tmp_path / "ckpt"
    args = ["pretrain", "--data", str(csv), "--features", "S", "--neural-memory.variant", variant, *SMALL]
    assert main([*args, "--out", str(ckpt)]) == 0
    assert load_checkpoint(ckpt).config.neural_memory.variant == variant
