"""Data modules for every dataset the suite trains on, built by name from the ``data`` config.

>>> dm = create_datamodule(cfg.data, seed=cfg.seed)
>>> dm.prepare_data(); dm.setup("fit")      # DataUnavailable if absent and not downloadable
>>> dm.input_shape, dm.num_classes
((1, 28, 28), 10)

Every module also offers ``train_eval_dataloader()``: the training split in stored order,
unaugmented, for the final train error the papers report.
"""
from bench.data import imagenet, synthetic, text, vision  # noqa: F401  (each registers its builders)
from bench.data.base import DATASETS, DataUnavailable, create_datamodule
from bench.data.loader import InMemoryLoader

__all__ = ["DATASETS", "DataUnavailable", "InMemoryLoader", "create_datamodule"]
