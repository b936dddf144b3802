"""The small image sets: Fashion-MNIST, MNIST, CIFAR-10 and CIFAR-100, held in memory.

Fashion-MNIST is the embedded default: it is read from IDX files wherever a copy already is
(the Debian package included), and only otherwise through torchvision. The others use
torchvision's standard classes and on-disk layouts, so an existing copy is reused by pointing
``data.root`` at it.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig

from bench.data.base import (
    DATASETS,
    HOW_GENERIC,
    Arrays,
    InMemoryDataModule,
    absolute,
    unavailable_on_failure,
)
from bench.data.crop import with_crop
from bench.data.idx import read_idx
from bench.data.whitening import WhitenedDataModule

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
HOW_FMNIST = f"{HOW_GENERIC}; or apt-get install dataset-fashion-mnist"
IDX_STEMS = (  # in the order of Arrays' fields
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def find_idx(folder: Path) -> list[Path] | None:
    """The four IDX files (raw or ``.gz``) in ``folder``, or None unless all are there."""
    found = []
    for stem in IDX_STEMS:
        present = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
        if not present:
            return None
        found.append(present[0])
    return found


def mnist_arrays(train_x, train_y, test_x, test_y) -> Arrays:
    """``(N, 28, 28)`` uint8 images and labels of a 10-class MNIST-like set."""
    return Arrays(train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(), 10)


def load_fmnist(cfg: DictConfig) -> Arrays:
    """Look in ``<root>/FashionMNIST/raw`` (torchvision's layout), then ``<root>`` itself, then
    the Debian copy: a copy the user points at wins over the system one. Download only if
    none has the files."""
    root = Path(cfg.root)
    folders = [root / "FashionMNIST" / "raw", root, DEBIAN_FMNIST]
    for folder in folders:
        files = find_idx(folder)
        if files:
            return mnist_arrays(*(torch.from_numpy(read_idx(f)) for f in files))
    looked_in = [absolute(f) for f in folders]
    fashion = torchvision.datasets.FashionMNIST
    return load_torchvision_mnist(fashion, cfg, "fmnist", looked_in, HOW_FMNIST)


def load_torchvision_mnist(
    cls: type[torchvision.datasets.MNIST],
    cfg: DictConfig,
    name: str,
    looked_in: list[Path],
    how: str,
) -> Arrays:
    with unavailable_on_failure(name, looked_in, how):
        train = cls(cfg.root, train=True, download=cfg.download)
        test = cls(cfg.root, train=False, download=cfg.download)
    return mnist_arrays(train.data, train.targets, test.data, test.targets)


def load_mnist(cfg: DictConfig) -> Arrays:
    looked_in = [absolute(Path(cfg.root) / "MNIST" / "raw")]
    return load_torchvision_mnist(torchvision.datasets.MNIST, cfg, "mnist", looked_in, HOW_GENERIC)


def without_md5(cls: type[torchvision.datasets.CIFAR10]) -> type[torchvision.datasets.CIFAR10]:
    """``cls`` with every md5 dropped: torchvision's ``check_integrity(path, None)`` then only
    checks that the file exists. Lets ``data.verify=false`` accept small test files written in
    the real pickle-batch format; a download still verifies the archive."""
    return type(
        f"{cls.__name__}WithoutMD5",
        (cls,),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


def load_cifar(cfg: DictConfig, cls: type[torchvision.datasets.CIFAR10]) -> Arrays:
    name = cls.__name__.lower()
    if not cfg.verify:
        cls = without_md5(cls)
    looked_in = [absolute(Path(cfg.root) / cls.base_folder)]
    with unavailable_on_failure(name, looked_in, HOW_GENERIC):
        train = cls(cfg.root, train=True, download=cfg.download)
        test = cls(cfg.root, train=False, download=cfg.download)

    def chw(data):  # torchvision keeps HWC numpy arrays for PIL; the models want CHW
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()

    return Arrays(
        chw(train.data), torch.tensor(train.targets), chw(test.data), torch.tensor(test.targets),
        len(train.classes),
    )


@DATASETS.register("fmnist")
def fmnist(cfg: DictConfig, seed: int) -> InMemoryDataModule:
    return InMemoryDataModule(cfg, seed, load_fmnist)


@DATASETS.register("mnist")
def mnist(cfg: DictConfig, seed: int) -> InMemoryDataModule:
    return InMemoryDataModule(cfg, seed, load_mnist)


def cifar_module(cfg: DictConfig) -> type[InMemoryDataModule]:
    """``data.normalize: gcn_zca`` (rlra's CIFAR-10 preprocessing) whitens; see bench/data/whitening.py."""
    return WhitenedDataModule if cfg.normalize == "gcn_zca" else InMemoryDataModule


@DATASETS.register("cifar10")
def cifar10(cfg: DictConfig, seed: int) -> InMemoryDataModule:
    return with_crop(cifar_module(cfg), cfg)(cfg, seed, partial(load_cifar, cls=torchvision.datasets.CIFAR10))


@DATASETS.register("cifar100")
def cifar100(cfg: DictConfig, seed: int) -> InMemoryDataModule:
    return with_crop(cifar_module(cfg), cfg)(cfg, seed, partial(load_cifar, cls=torchvision.datasets.CIFAR100))
