"""Alignment measures between a rule's signals and backprop's (defined once, used for every rule)."""
from __future__ import annotations

import math

import torch


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors seen as flat vectors (90° if either is zero)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 90.0
    cos = torch.clamp(a.dot(b) / denom, -1.0, 1.0)
    return math.degrees(math.acos(float(cos)))


def per_sample_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launay et al. Eq. 6 per sample: angle between δh_i (rule) and c_i (BP), one per row."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def norm_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖rule‖ / ‖BP‖ (Moskovitz et al. Fig. 2); inf when BP's is zero."""
    nb = float(b.double().norm())
    return float(a.double().norm()) / nb if nb > 0 else math.inf
