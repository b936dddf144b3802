"""A batch iterator over tensors already in memory, sharded for DDP by construction.

Small datasets (everything but ImageNet) fit in memory, so a ``torch.utils.data.DataLoader``
with its sampler, collate function and worker pool is pure overhead: the benchmark times the
training loop, and per-batch Python work would be charged to every rule alike but would blur
the ratios against backprop. :class:`InMemoryLoader` does one ``index_select`` per batch.

Sharding is part of the epoch order rather than a sampler Lightning injects: a *global* batch
is ``batch_size * world_size`` consecutive entries of the epoch order and rank ``r`` serves the
``r``-th slice. Hence ``world_size`` processes at batch ``b`` see, step by step, exactly the
samples one process sees at batch ``world_size * b``: the property the DDP-equals-single-process
tests of every rule rely on.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 4  # random-crop padding of the standard CIFAR augmentation


def draw_crop_flip(n: int, generator: torch.Generator) -> Tensor:
    """Per-sample ``(dy, dx, flip)`` for a whole epoch, as an ``(n, 3)`` int tensor.

    Drawn up front and indexed by position in the epoch order, so a sample's augmentation does
    not depend on how the order is split across ranks.
    """
    shifts = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n, 1), generator=generator)
    return torch.cat([shifts, flips], dim=1)


def crop_flip(x: Tensor, params: Tensor) -> Tensor:
    """Random crop with zero padding ``PAD`` then horizontal flip, for a batch ``(B, C, H, W)``.

    One gather does both: output pixel ``(i, j)`` reads padded pixel ``(dy + i, dx + j)``, or
    ``(dy + i, dx + W-1-j)`` when flipped. The padding is zero in the stored (already
    normalized) space.
    """
    b, c, h, w = x.shape
    dy, dx, flip = params.unbind(1)
    rows = dy[:, None] + torch.arange(h)
    cols = torch.arange(w).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None].bool(), w - 1 - cols, cols)
    flat_index = rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).flatten(2)
    return padded.gather(2, flat_index.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


class InMemoryLoader:
    """Iterable of ``(x, y)`` batches over in-memory tensors.

    ``train=True``: the epoch order is ``randperm`` from ``Generator().manual_seed(seed +
    epoch())``, so it is a pure function of (seed, epoch) and a resumed run replays it; the last
    incomplete global batch is dropped, and ``augment`` applies :func:`crop_flip`.
    ``train=False``: the order is the stored order and every sample is served exactly once
    across ranks; the last, partial global batch is split evenly over the ranks (a rank whose
    share is empty, when fewer samples are left than ranks, serves one batch less).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        train: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        augment: bool = False,
    ):
        if train and len(y) < batch_size * world_size:
            raise ValueError(
                f"training set has {len(y)} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rank, self.world_size = rank, world_size
        self.train, self.seed, self.epoch, self.augment = train, seed, epoch, augment

    def _spans(self) -> list[tuple[int, int]]:
        """``(lo, hi)`` positions in the epoch order that this rank serves, one per batch."""
        n, w, r = len(self.y), self.world_size, self.rank
        global_batch = self.batch_size * w
        end = n - n % global_batch if self.train else n
        spans = []
        for start in range(0, end, global_batch):
            size = min(global_batch, end - start)  # == global_batch except for a partial last
            lo, hi = start + r * size // w, start + (r + 1) * size // w
            if hi > lo:
                spans.append((lo, hi))
        return spans

    def __len__(self) -> int:
        return len(self._spans())

    def __iter__(self):
        n = len(self.y)
        params = None
        if self.train:
            generator = torch.Generator().manual_seed(self.seed + self.epoch())
            order = torch.randperm(n, generator=generator)
            if self.augment:
                params = draw_crop_flip(n, generator)
        else:
            order = torch.arange(n)
        for lo, hi in self._spans():
            idx = order[lo:hi]
            x = self.x.index_select(0, idx)
            if params is not None:
                x = crop_flip(x, params[lo:hi])
            yield x, self.y.index_select(0, idx)
