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
