"""The dataset registry, the missing-data error, and the in-memory data module.

``create_datamodule(cfg, seed)`` builds the ``LightningDataModule`` named by ``cfg.name``, where
``cfg`` is the resolved ``data`` section of a run config. Each builder in :data:`DATASETS` takes
``(cfg, seed)``.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor

from bench.data.loader import InMemoryLoader
from bench.registry import Registry

DATASETS: Registry = Registry("dataset")

HOW_GENERIC = (
    "pass data.root=/path/to/existing/copy, or allow data.download=true on a machine with internet"
)
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a blackholed network fails instead of hanging


def create_datamodule(cfg: DictConfig, seed: int = 0) -> pl.LightningDataModule:
    return DATASETS.get(cfg.name)(cfg, seed)


class DataUnavailable(Exception):
    """The dataset is neither on disk nor downloadable.

    ``str()`` is one line naming the dataset, where it was looked for and how to get it, so the
    CLI can print it and a table run can mark the row ``data unavailable`` and go on.
    """

    def __init__(self, dataset: str, looked_in: Sequence[str | Path], how: str, reason: str = ""):
        self.dataset, self.looked_in, self.how = dataset, [str(p) for p in looked_in], how
        detail = f" ({' '.join(reason.split())})" if reason else ""
        super().__init__(
            f"{dataset} data unavailable: looked in {', '.join(self.looked_in)}{detail}; "
            f"to get it: {how}"
        )


@contextmanager
def unavailable_on_failure(
    dataset: str, looked_in: Sequence[str | Path], how: str
) -> Iterator[None]:
    """Turn torchvision's "not found" and failed-download errors into :class:`DataUnavailable`.

    torchvision downloads with ``urlopen`` and no timeout; the default socket timeout is bounded
    meanwhile so that a network that drops packets fails fast rather than hanging the run.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except (RuntimeError, OSError) as err:  # torchvision: RuntimeError; urllib: URLError/OSError
        raise DataUnavailable(dataset, looked_in, how, reason=str(err)) from err
    finally:
        socket.setdefaulttimeout(previous)


def absolute(path: str | Path) -> Path:
    """For messages: where a relative ``data.root`` really points."""
    return Path(os.path.abspath(path))


@dataclass
class Arrays:
    """A whole small dataset: ``x`` as uint8 ``(N, C, H, W)`` pixels or float features, ``y``
    as int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


def split_indices(
    n: int, val_size: int, train_subset: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    """Seeded hold-out of ``val_size`` validation samples from ``n`` training samples.

    The papers draw validation from the training set (rec-LRA §4: 2,000 of the 60,000
    MNIST/FMNIST training images, 5,000 of CIFAR-10's 50,000) and report test error on the
    official test set. The split depends only on ``(n, seed)``, so every DDP rank computes the
    same one. ``train_subset`` keeps at most the first N remaining shuffled samples (smoke
    budgets). Both index sets are returned sorted, keeping the stored order for evaluation.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"data.val_size={val_size} must be in [0, {n}) for {n} training samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        train = train[:train_subset]
    return train.sort().values, val.sort().values


def to_float(x: Tensor) -> Tensor:
    """Pixels to float32 in [0, 1] (the rec-LRA preprocessing: divide by 255); features as is."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def normalized(how: str, train_x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``none``: as loaded (pixels/255, the rec-LRA MNIST protocol); ``standard``: minus the
    per-channel (per-feature) mean, over the std, both from the training split only."""
    if how == "none":
        return (train_x, *others)
    if how != "standard":
        raise ValueError(f"data.normalize={how!r}; valid choices: none, standard")
    dims = [d for d in range(train_x.dim()) if d != 1]
    std, mean = torch.std_mean(train_x, dim=dims, keepdim=True)
    return tuple((x - mean) / std for x in (train_x, *others))


class InMemoryDataModule(pl.LightningDataModule):
    """Holds a small dataset as float32 tensors, normalized once, and serves
    :class:`InMemoryLoader` batches.

    ``load(cfg) -> Arrays`` reads or downloads the data. ``prepare_data`` (run by Lightning on
    one process per node, before the others start) calls it so any download happens once; the
    result is cached, and ``setup`` on every process loads it again only if it is not cached.
    """

    def __init__(self, cfg: DictConfig, seed: int, load: Callable[[DictConfig], Arrays]):
        super().__init__()
        self.cfg, self.seed, self._load = cfg, seed, load
        self._arrays: Arrays | None = None
        self.train: tuple[Tensor, Tensor] | None = None
        self.val: tuple[Tensor, Tensor] | None = None
        self.test: tuple[Tensor, Tensor] | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None

    def prepare_data(self) -> None:
        if self._arrays is None:
            self._arrays = self._load(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:  # Lightning calls setup once per stage
            return
        self.prepare_data()
        a, cfg = self._arrays, self.cfg
        self._arrays = None  # the splits below hold the data; free the raw copy
        train, val = split_indices(len(a.train_y), cfg.val_size, cfg.train_subset, self.seed)
        xs = normalized(cfg.normalize, *map(to_float, (a.train_x[train], a.train_x[val], a.test_x)))
        self.train, self.val, self.test = zip(xs, (a.train_y[train], a.train_y[val], a.test_y))
        self.input_shape, self.num_classes = tuple(self.train[0].shape[1:]), a.num_classes
        if cfg.augment and self.input_shape != (3, 32, 32):
            raise ValueError(
                f"data.augment=true is for 32x32 colour images; {cfg.name} has {self.input_shape}"
            )

    def _loader(self, split: tuple[Tensor, Tensor], train: bool = False) -> InMemoryLoader:
        trainer = self.trainer
        return InMemoryLoader(
            *split,
            self.cfg.batch_size if train else self.cfg.eval_batch_size,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            train=train,
            seed=self.seed,
            epoch=lambda: self.trainer.current_epoch if self.trainer else 0,
            augment=train and self.cfg.augment,
        )

    def train_dataloader(self) -> InMemoryLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> InMemoryLoader:
        return self._loader(self.val)

    def test_dataloader(self) -> InMemoryLoader:
        return self._loader(self.test)

    def train_eval_dataloader(self) -> InMemoryLoader:
        """The training split in stored order, unaugmented: for the final train error."""
        return self._loader(self.train)
