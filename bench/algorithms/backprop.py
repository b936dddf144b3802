"""Backpropagation (Rumelhart et al. 1986): the reference rule; its update angle is 0 by definition."""
from __future__ import annotations

from bench.algorithms.base import RULES, AlgorithmModule


@RULES.register("bp")
class Backprop(AlgorithmModule):
    """The update is ∂L/∂θ: :meth:`AlgorithmModule.objective` is the loss itself."""
