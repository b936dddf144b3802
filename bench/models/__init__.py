"""The model zoo. Importing this package registers every model in ``MODELS``.

Every module in this folder is imported, so adding a model is adding a file.
"""
import importlib
import pkgutil

from bench.models.base import MODELS, ZooModel, create_model, point_sizes

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODELS", "ZooModel", "create_model", "point_sizes"]
