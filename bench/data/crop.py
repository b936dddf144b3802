"""Random square crops for training, the centre crop for evaluation (``data.crop: S``).

sfa Table 2 trains CIFAR-10 Model 1 on 24×24×3 crops of the 32×32 images ("cropped as part of
data augmentation to increase the size of the training set"); the convention it follows (the
TensorFlow CIFAR-10 tutorial's LeNet-style net) evaluates on the 24×24 centre crop. Every split
the model sees is S×S, so the model is built for S×S inputs.

Crop offsets are drawn per *position in the epoch order* from a generator seeded by
(seed, epoch), like the loader's pad-and-flip augmentation: two DDP ranks at batch b crop exactly
what one process at batch 2b crops, and a resumed epoch replays its crops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.data.loader import InMemoryLoader

CROP_SEED_OFFSET = 0x5EED  # the crop stream is apart from the order/flip stream of the same epoch


def crop_at(x: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """``x[i, :, top_i:top_i+size, left_i:left_i+size]`` for every sample i, as one gather."""
    b = x.shape[0]
    rows = (top[:, None] + torch.arange(size))[:, None, :, None]
    cols = (left[:, None] + torch.arange(size))[:, None, None, :]
    return x[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


class CropLoader(InMemoryLoader):
    """:class:`InMemoryLoader` whose batches are cropped to ``size``×``size``: random offsets
    when training, the centre otherwise (after any pad-and-flip augmentation)."""

    def __init__(self, *args, size: int, **kwargs):
        super().__init__(*args, **kwargs)
        h, w = self.x.shape[-2:]
        if not 0 < size <= min(h, w):
            raise ValueError(f"data.crop={size} must lie in [1, {min(h, w)}] for {h}×{w} images")
        self.size = size

    def __iter__(self):
        h, w = self.x.shape[-2:]
        s = self.size
        if not self.train:
            for x, y in super().__iter__():
                yield x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], y
            return
        n = len(self.y)
        generator = torch.Generator().manual_seed(self.seed + self.epoch() + CROP_SEED_OFFSET)
        top = torch.randint(0, h - s + 1, (n,), generator=generator)
        left = torch.randint(0, w - s + 1, (n,), generator=generator)
        for (lo, hi), (x, y) in zip(self._spans(), super().__iter__()):
            yield crop_at(x, top[lo:hi], left[lo:hi], s), y


class CropMixin:
    """Mixed in before an :class:`~bench.data.base.InMemoryDataModule`: serve ``data.crop``
    crops and report the cropped input shape (the model is built from it)."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        size = int(self.cfg.crop)
        c, h, w = self.train[0].shape[1:]
        if not 0 < size <= min(h, w):
            raise ValueError(f"data.crop={size} must lie in [1, {min(h, w)}] for {h}×{w} {self.cfg.name} images")
        self.input_shape = (c, size, size)

    def _loader(self, split, train: bool = False):
        loader = super()._loader(split, train)
        return CropLoader(loader.x, loader.y, loader.batch_size, rank=loader.rank, world_size=loader.world_size,
                          train=loader.train, seed=loader.seed, epoch=loader.epoch, augment=loader.augment,
                          size=int(self.cfg.crop))


def with_crop(cls: type, cfg) -> type:
    """``cls`` itself, or ``cls`` serving ``data.crop`` crops when the config asks for them."""
    if cfg.get("crop") is None:
        return cls
    return type(f"Cropped{cls.__name__}", (CropMixin, cls), {})
