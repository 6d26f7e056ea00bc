from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memcast.cli import main
from models.checkpoint import load_checkpoint
from trainer import methods as methods_module
from trainer.report import CUMULATIVE_PNG, REPORT_JSON, SLICE_PNG

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
        assert name in table
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


def test_evaluate_rejects_an_unknown_method(tmp_path: Path) -> None:
    csv = tmp_path / "s.csv"
    main(["make-data", "--out", str(csv), "--rows", "300"])
    with pytest.raises(ValueError, match="unknown method"):
        main(["evaluate", "--data", str(csv), "--methods", "naive,magic", "--out", str(tmp_path / "e")])


@pytest.mark.parametrize("variant", ["mlp", "simple", "advanced"])
def test_pretrain_selects_the_memory_variant_by_name(tmp_path: Path, variant: str) -> None:
    csv = tmp_path / "s.csv"
    main(["make-data", "--out", str(csv), "--rows", "300", "--channels", "2"])
    ckpt = tmp_path / "ckpt"
    args = ["pretrain", "--data", str(csv), "--features", "S", "--memory-variant", variant, *SMALL]
    assert main([*args, "--out", str(ckpt)]) == 0
    assert load_checkpoint(ckpt).config.neural_memory.variant == variant
