"""Activation functions of the zoo, including the non-differentiable ones the papers train.

``sign`` has zero derivative almost everywhere. BP-family rules need *some* φ′, so it uses the
straight-through estimator 1{|x| ≤ 1} (Bengio et al. 2013; hard-tanh derivative). Rules that
need no φ′ (rec-LRA) never call backward through it, so the estimator never touches their update.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.options import ACTIVATIONS  # the names a config may choose, declared once


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class Sign(nn.Module):
    def forward(self, x):
        return _SignSTE.apply(x)


class Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def make_activation(name: str, slope: float = 0.01) -> nn.Module:
    """``slope`` is leaky ReLU's negative slope; any value is allowed (dfa-2 uses −0.5)."""
    table = {
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "elu": nn.ELU,
        "sigmoid": nn.Sigmoid,
        "sign": Sign,
        "abs": Abs,
        "identity": nn.Identity,
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope=slope),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; valid choices: {', '.join(ACTIVATIONS)}")
    return table[name]()
