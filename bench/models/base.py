"""Model-zoo protocol and registry.

Every zoo model is an ``nn.Module`` that also answers two questions rules need:

* ``feedback_points(granularity)``: the ordered (input → output) dotted names of submodules whose
  *outputs* are feedback points. ``"micro"`` is after every layer's nonlinearity (Launay et al.
  2020 recommend measuring there); ``"macro"`` is after every block. The output layer is never
  a point: it always receives the true local gradient of the loss.
* ``structure()``: its stages, blocks and each block's inner layers
  (:mod:`bench.models.structure`). Rules that run a model piece by piece read this view; they
  never walk the model's (or timm's) modules themselves.

Which layers a replaced-backward rule converts is :func:`bench.feedback.replaced.convert_to_feedback`'s
business (its ``CONVERTERS``), not the model's.

A point module must be *called once per forward*, because rules hook its output.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.models.structure import Structure, sequential_structure
from bench.registry import Registry

MODELS: Registry = Registry("model")


class ZooModel(nn.Module):
    """Base class; subclasses set ``self._points = {"micro": [...], "macro": [...]}``."""

    _points: dict[str, list[str]]

    def feedback_points(self, granularity: str = "micro") -> list[str]:
        if granularity not in self._points:
            raise ValueError(
                f"model {type(self).__name__} has no {granularity!r} feedback points; "
                f"valid choices: {', '.join(sorted(self._points))}"
            )
        return list(self._points[granularity])

    def structure(self) -> Structure:
        """Stages, blocks, inner layers and feedback points, built from the current submodules.

        The default reads the zoo's sequential convention (``features`` + ``flatten`` (+ ``hidden``)
        + ``classifier``, role-named keys: :func:`~bench.models.structure.sequential_structure`);
        any other layout overrides this."""
        if all(hasattr(self, k) for k in ("features", "flatten", "classifier")):
            return sequential_structure(self)
        raise NotImplementedError(f"{type(self).__name__} has no structure view: give it a structure() "
                                  "(bench/models/structure.py)")


def create_model(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> ZooModel:
    """Build ``cfg.name`` from the registry. ``cfg`` is the resolved ``model`` config section."""
    builder = MODELS.get(str(cfg.name))
    params = {k: v for k, v in dict(cfg).items() if k != "name"}
    model = builder(input_shape=tuple(input_shape), num_classes=int(num_classes), **params)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def point_sizes(model: ZooModel, input_shape: tuple[int, ...], granularity: str = "micro") -> dict[str, int]:
    """Size l_i of every feedback point *per row of the error*, measured with one dry forward.

    A row is one sample for a classifier and one token for a language model (whose logits are
    (B, T, V)): direct-projection rules send each row of e = ∂L/∂ŷ to the matching row of h_i,
    so l_i is what a feedback matrix B_i (l_i × e) must cover (dfa Table 1).
    """
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in model.feedback_points(granularity)
    ]
    was_training = model.training
    try:
        model.eval()
        batch = 2
        logits = model(torch.zeros((batch, *input_shape), dtype=getattr(model, "input_dtype", torch.float32)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rows = logits.numel() // logits.shape[-1]
    return {name: outputs[name].numel() // rows for name in model.feedback_points(granularity)}


def is_language_model(model) -> bool:
    """Token ids in, (B, T, V) logits out: the zoo's transformer (``input_dtype = torch.long``)."""
    return getattr(model, "input_dtype", None) is torch.long
