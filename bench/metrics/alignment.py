"""Alignment measures between a rule's signals and backprop's (defined once, used for every rule).

Each returns a 0-d (or per-sample) float64 tensor, so a caller can compute many and read them
back with one device sync.
"""
from __future__ import annotations

import math

import torch


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between two tensors seen as flat vectors (90° if either is zero)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denom = a.norm() * b.norm()
    cos = torch.where(denom > 0, a.dot(b) / denom.clamp_min(1e-300), torch.zeros((), dtype=a.dtype, device=a.device))
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def per_sample_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launay et al. Eq. 6 per sample: angle between δh_i (rule) and c_i (BP), one per row."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def norm_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖rule‖ / ‖BP‖ (Moskovitz et al. Fig. 2); inf when BP's is zero."""
    nb = b.double().norm()
    return torch.where(nb > 0, a.double().norm() / nb.clamp_min(1e-300), torch.full((), math.inf, dtype=torch.float64, device=b.device))
