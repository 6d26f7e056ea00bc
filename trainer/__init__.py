"""Offline pretraining and the online evaluation (``memcast pretrain / evaluate / make-data``).

The checkpoint format lives in ``models.checkpoint``: the service reads checkpoints without
importing this package (and so without pandas, tqdm or matplotlib).
"""

from trainer.data import DataError, load_dataset
from trainer.evaluate import EvalConfig, evaluate
from trainer.pretrain import pretrain
from trainer.synthetic import write_synthetic_csv
from trainer.train_config import TrainConfig

__all__ = [
    "DataError",
    "EvalConfig",
    "TrainConfig",
    "evaluate",
    "load_dataset",
    "pretrain",
    "write_synthetic_csv",
]
