"""Initialisation of fixed feedback weights B (sfa §5.1; Launay et al. Eq. 7)."""
from __future__ import annotations

import math

import torch

from bench.options import FEEDBACK_INITS  # the names a config may choose, declared once


def feedback_tensor(shape: tuple[int, ...], init: str, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A fixed random tensor of ``shape`` (out, in, *kernel) drawn from ``generator``.

    * ``gaussian``: N(0, σ²), the papers' plain initialisation;
    * ``xavier``: N(0, 2/(fan_in + fan_out)) (Glorot);
    * ``kaiming``: N(0, 1/fan_out): the error travels backward through B, whose fan-in is the
      layer's fan-out, so this preserves its variance (sfa §5.1: feedback variance 1/n_out);
    * ``uniform``: U(-√3σ, √3σ), same variance as ``gaussian``.
    """
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_out, fan_in = shape[0] * receptive, (shape[1] if len(shape) > 1 else 1) * receptive
    if init == "gaussian":
        std = sigma
    elif init == "xavier":
        std = math.sqrt(2.0 / (fan_in + fan_out))
    elif init == "kaiming":
        std = math.sqrt(1.0 / fan_out)
    elif init == "uniform":
        return (torch.rand(shape, generator=generator) * 2 - 1) * (math.sqrt(3.0) * sigma)
    else:
        raise ValueError(f"unknown feedback_init {init!r}; valid choices: {', '.join(FEEDBACK_INITS)}")
    return torch.randn(shape, generator=generator) * std
