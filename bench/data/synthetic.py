"""A seeded synthetic classification set of any input shape and class count.

It needs no files, so unit tests and the smoke runs of tables whose data is absent always have
data. Each class is a Gaussian blob, ``x = mean[y] + N(0, I)`` with class means drawn from
``N(0, I)``: the classes are linearly separable in expectation, so a linear model beats chance
by far, and a rule that learns nothing shows it.
"""
from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig

from bench.data.base import DATASETS, Arrays, InMemoryDataModule


def make_synthetic(cfg: DictConfig, seed: int) -> Arrays:
    """Train and test sets from one generator: identical for a seed, different across seeds."""
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(cfg.shape)
    means = torch.randn((cfg.num_classes, *shape), generator=generator)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, cfg.num_classes, (n,), generator=generator)
        return means[y] + torch.randn((n, *shape), generator=generator), y

    return Arrays(*sample(cfg.n_train), *sample(cfg.n_test), num_classes=cfg.num_classes)


@DATASETS.register("synthetic")
def synthetic(cfg: DictConfig, seed: int) -> InMemoryDataModule:
    return InMemoryDataModule(cfg, seed, partial(make_synthetic, seed=seed))
