"""Direct-projection feedback: the global error e is sent straight to every feedback point.

Launay, Poli & Krzakala 2020, §3.1: one *unified* random matrix for the largest point,
sliced for the others,
    B   = U / √(l_max · e)             (Eq. 7, U_ij ~ N(0, 1))
    B_i = √(l_max / l_i) · B[:l_i, :]   (Eq. 8)
so the feedback memory is l_max·e floats instead of Σ l_i·e. ``unified=False`` draws an
independent matrix per point (the naive layout) for comparison.

A point of per-sample size l_i (C·H·W for a conv map, d per token for a transformer) receives
B_i e for each row of e (a sample, or a token for a language model).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bench.feedback.init import feedback_tensor


class DirectFeedback(nn.Module):
    def __init__(self, sizes: list[int], error_size: int, unified: bool = True, normalize: bool = True,
                 init: str = "gaussian", seed: int = 0):
        super().__init__()
        self.sizes, self.error_size, self.unified = list(sizes), int(error_size), unified
        generator = torch.Generator().manual_seed(seed)
        l_max = max(self.sizes)
        # Eq. 7–8 fold into one scale per point: √(l_max/l_i)/√(l_max·e) = 1/√(l_i·e).
        self.scales = [1.0 / math.sqrt(l * self.error_size) if normalize else 1.0 for l in self.sizes]
        if unified:
            self.register_buffer("matrix", feedback_tensor((l_max, self.error_size), init, 1.0, generator))
        else:
            for i, l in enumerate(self.sizes):
                self.register_buffer(f"matrix_{i}", feedback_tensor((l, self.error_size), init, 1.0, generator))

    def matrix_for(self, i: int) -> torch.Tensor:
        """B_i (l_i × e), with the normalisation applied: for tests and the probe, not the hot path."""
        raw = self.matrix[: self.sizes[i]] if self.unified else getattr(self, f"matrix_{i}")
        return raw * self.scales[i]

    def project(self, error: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """[(U_i e, scale_i)] for every point: B_i e = scale_i · U_i e, of shape (rows, l_i).

        The scale is returned apart so a caller can apply it to a scalar instead of a tensor.
        """
        if self.unified:
            # One matmul for all points: the slices of e·Uᵀ are the slices' projections.
            full = error.mm(self.matrix.t())
            return [(full[:, :l], s) for l, s in zip(self.sizes, self.scales)]
        return [(error.mm(getattr(self, f"matrix_{i}").t()), s) for i, s in enumerate(self.scales)]

    def memory(self) -> dict[str, int]:
        """Feedback-matrix sizes in floats: stored, naive Σ l_i·e and unified l_max·e (dfa Table 1)."""
        stored = sum(b.numel() for b in self.buffers())
        return {"stored": stored, "naive": sum(self.sizes) * self.error_size,
                "unified": max(self.sizes) * self.error_size}


def feedback_memory(model: nn.Module, input_shape: tuple[int, ...], error_size: int,
                    granularity: str = "micro", bytes_per_float: int = 4) -> dict:
    """Feedback-matrix memory of direct projection on ``model`` (dfa Table 1), without building it.

    Returns the per-point sizes l_i (per row of e), the naive Σ l_i·e and the unified l_max·e, in
    floats and in bytes.
    """
    from bench.models.base import point_sizes  # models import feedback code, not the other way round

    sizes = point_sizes(model, tuple(input_shape), granularity)
    naive, unified = sum(sizes.values()) * error_size, max(sizes.values()) * error_size
    return {"points": sizes, "error_size": error_size,
            "naive_floats": naive, "unified_floats": unified,
            "naive_bytes": naive * bytes_per_float, "unified_bytes": unified * bytes_per_float}
