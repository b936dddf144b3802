"""Direct feedback alignment (Nøkland 2016) with the unified feedback matrix of Launay et al. 2020.

Each feedback point h_i receives the global error e = ∂L/∂ŷ through a fixed B_i:
    δa_i = (B_i e) ⊙ φ′(a_i),   ΔW_i = δa_i h_{i-1}ᵀ      (Nøkland Eq. 3; Launay Eq. 4)
with B_i the normalised slices of one matrix (Launay Eq. 7–8, see bench/feedback/direct.py).
The graph is cut at every point, so nothing propagates backward through the network: the
surrogate L + Σ_i ⟨h_i, stopgrad(B_i e)⟩ gives each layer its local gradient in one backward,
and the output layer its true local gradient.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.direct import DirectFeedback
from bench.models.base import point_sizes


@RULES.register("dfa")
class DirectFeedbackAlignment(AlgorithmModule):
    def setup_rule(self) -> None:
        a = self.cfg.algorithm
        if self.tap is None or not self.tap.names:
            raise ValueError(f"dfa: model {self.cfg.model.name} exposes no feedback points")
        granularity = str(a.get("granularity", "micro"))
        sizes = list(point_sizes(self.model, self.input_shape, granularity).values())
        self.feedback = DirectFeedback(sizes, self.num_classes, unified=a.unified, normalize=a.normalize,
                                       init=a.feedback_init, seed=int(self.cfg.seed) + 1)
        self.tap.cut = True

    def objective(self, x, y):
        self.tap.clear()
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        points = self.tap.outputs
        if not points:  # inside true_gradient(): plain backprop
            return loss, logits, loss
        error = torch.autograd.grad(loss, logits, retain_graph=True)[0].reshape(-1, logits.shape[-1])
        surrogate = loss
        for h, (signal, scale) in zip(points, self.feedback.project(error.detach())):
            # ⟨h, B_i e⟩ as one dot product, scaled as a scalar: its backward hands exactly
            # scale·U_i e = B_i e to h, with no extra pass over the signal.
            surrogate = surrogate + scale * torch.dot(h.reshape(-1), signal.reshape(-1))
        return surrogate, logits, loss

    @contextmanager
    def true_gradient(self):
        with self.tap.settings(cut=False):
            yield
