"""One file per rule family; importing this package registers every rule in ``RULES``.

Every module in this folder is imported, so adding a rule family is adding a file.
"""
import importlib
import pkgutil

from bench.algorithms.base import RULES, AlgorithmModule

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RULES", "AlgorithmModule"]
