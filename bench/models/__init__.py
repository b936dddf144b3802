"""The model zoo. Importing this package registers every model in ``MODELS``."""
from bench.models import alexnet, cnn, mlp, timm_models, transformer  # noqa: F401  (registration)
from bench.models.base import MODELS, ZooModel, create_model, point_sizes

__all__ = ["MODELS", "ZooModel", "create_model", "point_sizes"]
