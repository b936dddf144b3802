"""A random stream every DDP rank draws identically, whose state travels in the checkpoint.

Rules that inject noise (BP+Noise, weight mirrors) must not draw from the global RNG. If they did,
ranks would disagree, and a resumed run would not continue the stream, which breaks the DDP
equivalence and exact-resume guarantees. Each noise source is seeded from the run seed plus
its own offset, so two sources never share a stream.
"""
from __future__ import annotations

import torch


class SharedNoise:
    def __init__(self, seed: int):
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None  # state loaded before the device was known

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        return self._generator

    def state(self) -> torch.Tensor | None:
        return self._generator.get_state() if self._generator is not None else self._pending

    def load(self, state: torch.Tensor | None) -> None:
        self._generator, self._pending = None, state

    def randn_rows(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, I) shaped like ``like`` (its rows: this rank's part of the batch), drawn for the whole
        global batch and sliced to this rank's rows, so DDP ranks draw what one process draws."""
        rank, world = rank_and_world()
        rows = like.shape[0]
        full = torch.randn((world * rows, *like.shape[1:]), generator=self.generator(like.device),
                           device=like.device, dtype=like.dtype)
        return full[rank * rows:(rank + 1) * rows] if world > 1 else full


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
