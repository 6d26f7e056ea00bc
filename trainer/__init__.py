"""Offline pretraining and the online evaluation (``memcast pretrain / evaluate / make-data``).

The checkpoint format lives in ``models.checkpoint``: the service reads checkpoints without
importing this package (and so without pandas, tqdm or matplotlib). The entry points are
``trainer.pretrain.pretrain`` and ``trainer.evaluate.evaluate``; they are not re-exported here,
where their names would hide the modules that hold them.
"""

from trainer.data import DataError, load_dataset
from trainer.evaluate import EvalConfig
from trainer.synthetic import write_synthetic_csv
from trainer.train_config import TrainConfig

__all__ = ["DataError", "EvalConfig", "TrainConfig", "load_dataset", "write_synthetic_csv"]
