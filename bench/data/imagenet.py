"""ImageNet (ILSVRC2012) from an ImageFolder layout: ``<root>/train/<class>/*`` and
``<root>/val/<class>/*``.

Too large for memory, so it is decoded by a ``torch.utils.data.DataLoader`` with worker
processes; Lightning injects the ``DistributedSampler`` under DDP. Transforms are the standard
ones: RandomResizedCrop + horizontal flip for training (always; ``data.augment`` is about the
in-memory sets), Resize to size/0.875 + CenterCrop for evaluation. The official val folder is
the test set; ``data.val_size`` images may be held out of train for validation.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from bench.data.base import (
    DATASETS,
    DataUnavailable,
    absolute,
    split_indices,
    unavailable_on_failure,
)

HOW_IMAGENET = (
    "download ILSVRC2012 from image-net.org (registration required) and pass "
    "data.root=<folder with train/ and val/, one subfolder per class>"
)
# The usual ImageNet statistics: computing them over 1.28M images per run would be wasteful.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Transformed(Dataset):
    """``folder[indices[i]]`` with ``transform`` applied: one folder scan serves the train split
    (augmented) and the validation and train-eval splits (eval transform)."""

    def __init__(self, folder: ImageFolder, indices: torch.Tensor | None, transform: v2.Transform):
        self.folder, self.transform = folder, transform
        self.indices = indices.tolist() if indices is not None else range(len(folder))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.folder[self.indices[i]]
        return self.transform(image), label


def transforms(cfg: DictConfig, train: bool) -> v2.Transform:
    size = cfg.image_size
    if train:
        geometry = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(size / 0.875)), v2.CenterCrop(size)]
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if cfg.normalize == "standard":
        to_tensor.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    elif cfg.normalize != "none":
        raise ValueError(f"data.normalize={cfg.normalize!r}; valid choices: none, standard")
    return v2.Compose(geometry + to_tensor)


class ImageNetDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.train = self.val = self.test = self.train_eval = None
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        cfg, root = self.cfg, Path(self.cfg.root)
        looked_in = [absolute(root / "train"), absolute(root / "val")]
        if not all(p.is_dir() for p in looked_in):
            raise DataUnavailable("imagenet", looked_in, HOW_IMAGENET, reason="folder missing")
        with unavailable_on_failure("imagenet", looked_in, HOW_IMAGENET):  # e.g. no class folders
            train_folder, test_folder = ImageFolder(root / "train"), ImageFolder(root / "val")
        train_idx, val_idx = split_indices(
            len(train_folder), cfg.val_size, cfg.train_subset, self.seed
        )
        train_tf, eval_tf = transforms(cfg, train=True), transforms(cfg, train=False)
        self.train = Transformed(train_folder, train_idx, train_tf)
        self.val = Transformed(train_folder, val_idx, eval_tf)
        self.train_eval = Transformed(train_folder, train_idx, eval_tf)
        self.test = Transformed(test_folder, None, eval_tf)
        self.input_shape = (3, cfg.image_size, cfg.image_size)
        self.num_classes = len(train_folder.classes)

    def _loader(self, dataset: Dataset, train: bool = False) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test)

    def train_eval_dataloader(self) -> DataLoader:
        """The training split, eval transform, stored order: for the final train error."""
        return self._loader(self.train_eval)


@DATASETS.register("imagenet")
def imagenet(cfg: DictConfig, seed: int) -> ImageNetDataModule:
    return ImageNetDataModule(cfg, seed)
