"""Offline pretraining, checkpoints and the online evaluation (``memcast pretrain / evaluate``).

Names are loaded on first use, so ``from trainer.checkpoint import load_checkpoint`` (what the
service needs) does not import pandas, tqdm or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Checkpoint": "trainer.checkpoint",
    "CheckpointError": "trainer.checkpoint",
    "DataSchema": "trainer.checkpoint",
    "is_checkpoint": "trainer.checkpoint",
    "load_checkpoint": "trainer.checkpoint",
    "save_checkpoint": "trainer.checkpoint",
    "DataError": "trainer.data",
    "load_dataset": "trainer.data",
    "EvalConfig": "trainer.evaluate",
    "evaluate": "trainer.evaluate",
    "TrainConfig": "trainer.train_config",
    "pretrain": "trainer.pretrain",
    "write_synthetic_csv": "trainer.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
