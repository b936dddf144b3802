"""Tensors put back as they were: an extra forward (the probe's replay, a forward-mode pass) must
not move running statistics or other state."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch


@contextmanager
def restoring(tensors: Iterable[torch.Tensor]):
    """Copy ``tensors`` on entry and write the copies back on exit."""
    saved = [(t, t.detach().clone()) for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RNG state a forward on ``device`` draws from (dropout masks): CPU, and CUDA when there."""
    device = torch.device(device)
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def replaying(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device):
    """Run the body from ``state`` (see :func:`rng_state`), so it draws the same dropout masks as the
    pass that started there; the global RNG is left as it was."""
    device = torch.device(device)
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
