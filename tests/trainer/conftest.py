"""Small data sets and configurations that keep the trainer tests fast (a few seconds each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer.synthetic import write_synthetic_csv
from trainer.train_config import TrainConfig

SEQ, PRED = 16, 4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The models here are tiny: intra-op threads only add synchronisation, and on a busy
    2-core machine (tests of other packages running beside these) they make steps ~10x slower.
    Module scope, so that module-scoped fixtures (a pretrained checkpoint) run under it too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 hourly rows, 3 columns (load_a, load_b, OT): 120 train / 30 validation / 450 test rows."""
    return write_synthetic_csv(tmp_path_factory.mktemp("data") / "tiny.csv", rows=600, channels=3, seed=1)


def tiny_config(data: Path, out: Path, **changes: object) -> TrainConfig:
    """An lstm without memory, 8 features: trains in well under a second per epoch."""
    base = TrainConfig.build(
        data=str(data),
        features="MS",
        seq_len=SEQ,
        pred_len=PRED,
        backbone="lstm",
        memory="none",
        d_model=8,
        n_layers=1,
        epochs=2,
        batch_size=16,
        lr=3e-3,
        seed=0,
        out=str(out),
        progress=False,
    )
    return base.replace(**changes)
