"""Feedback alignment (Lillicrap et al. 2016; sfa paper Eq. 1–3).

Backward through layer l uses a fixed random B_l in place of W_lᵀ:
    δh_{l-1} = (B_lᵀ δa_l) ⊙ φ′(a_{l-1}),   ΔW_l = δa_l h_{l-1}ᵀ.
Every Linear/Conv2d of the model (timm models included) is converted in place by
:func:`bench.feedback.replaced.convert_to_feedback`; B is a buffer drawn per layer.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.replaced import convert_to_feedback, feedback_layers
from bench.options import FEEDBACK_INITS, AlgorithmOptions, ClassVar, Literal, opt


class FAOptions(AlgorithmOptions):
    names: ClassVar[tuple[str, ...]] = ("fa",)

    feedback_init: Literal[FEEDBACK_INITS] = opt("gaussian", "draw of the fixed feedback B: gaussian (σ, the papers' "
                                                             "plain init) | xavier | kaiming | uniform")
    feedback_sigma: float = opt(0.05, "σ of the gaussian/uniform draw of B", gt=0)


@RULES.register("fa")
class FeedbackAlignment(AlgorithmModule):
    def setup_rule(self) -> None:
        self.converted = convert_to_feedback(self.model, self.opts.feedback_init, self.opts.feedback_sigma,
                                             seed=int(self.cfg.seed) + 1)
        if not self.converted:
            raise ValueError(f"fa: model {self.cfg.model.name} has no Linear/Conv2d layer to convert")
        self.layers = feedback_layers(self.model)
        # Embeddings are lookups, not products with an input that a feedback matrix could replace:
        # they keep their plain update (the rows of ∂L/∂E that the tokens select).
        self.kept = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.Embedding)]
        logging.getLogger(__name__).info("fa: converted %d layers of %s: %s%s", len(self.converted),
                                         self.cfg.model.name, ", ".join(self.converted),
                                         f"; left as they are (Embedding): {', '.join(self.kept)}" if self.kept else "")

    @contextmanager
    def true_gradient(self):
        for layer in self.layers.values():
            layer.use_feedback = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.use_feedback = True

    def feedback_weight_pairs(self):
        return {name: (layer.weight, layer.feedback) for name, layer in self.layers.items()}
