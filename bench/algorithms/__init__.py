"""One file per rule family; importing this package registers every rule in ``RULES``."""
from bench.algorithms import backprop, direct_feedback, feedback_alignment  # noqa: F401
from bench.algorithms.base import RULES, AlgorithmModule

__all__ = ["RULES", "AlgorithmModule"]
