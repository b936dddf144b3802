"""Cumulative sign flips of the forward weights since initialisation (sfa §5.5, Figure 5).

sfa Figure 5 (bottom) plots "the proportion of weights that had changed signs since
initialization": a weight counts from the first step at which its sign differs from its sign at
initialisation and keeps counting if it later flips back (a *cumulative* fraction). The sign test
is ``w > 0``: E/I clips frozen weights to ±ε, never to 0, so a weight at exactly 0 only occurs
by chance and is read as negative.

The quantities, as recorded in ``probe.csv`` (by :mod:`bench.callbacks.sign_flips`):

  signs/flipped/<layer>   fraction of that layer's weights flipped at least once since init
  signs/flipped_all       the same over all weights (matrices and kernels) of the model
"""
from __future__ import annotations

import torch

PREFIX = "signs/flipped/"
TOTAL = "signs/flipped_all"


class SignFlips:
    """Ever-flipped masks of a list of named weights, against their signs when constructed."""

    def __init__(self, named_weights: list[tuple[str, torch.Tensor]]):
        self.names = [name.removesuffix(".weight") for name, _ in named_weights]
        self.weights = [w for _, w in named_weights]
        self.positive0 = [w.detach() > 0 for w in self.weights]
        self.flipped = [torch.zeros_like(p) for p in self.positive0]
        self._scratch = [torch.empty_like(p) for p in self.positive0]
        self.total = sum(w.numel() for w in self.weights)

    @torch.no_grad()
    def update(self) -> None:
        """Mark every weight whose sign now differs from its initial sign (three in-place ops)."""
        for w, pos0, flipped, scratch in zip(self.weights, self.positive0, self.flipped, self._scratch):
            torch.gt(w, 0, out=scratch)
            scratch.ne_(pos0)
            flipped.logical_or_(scratch)

    @torch.no_grad()
    def fractions(self) -> dict[str, float]:
        """{signs/flipped/<layer>: fraction, signs/flipped_all: fraction} with one host transfer."""
        if not self.weights:
            return {}
        counts = torch.stack([f.sum() for f in self.flipped]).double()
        sizes = torch.tensor([f.numel() for f in self.flipped], dtype=torch.float64, device=counts.device)
        values = torch.cat([counts / sizes, (counts.sum() / self.total).reshape(1)]).tolist()
        return {**{f"{PREFIX}{name}": v for name, v in zip(self.names, values)}, TOTAL: values[-1]}

    def state_dict(self) -> dict:
        return {"names": list(self.names), "positive0": [p.cpu() for p in self.positive0],
                "flipped": [f.cpu() for f in self.flipped]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"sign-flip state is for layers {state['names']}, this model has {self.names}")
        for mine, saved in zip(self.positive0 + self.flipped, list(state["positive0"]) + list(state["flipped"])):
            mine.copy_(saved)
