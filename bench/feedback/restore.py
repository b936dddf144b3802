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
