"""Gradients of the loss through a rule's backward and through backprop's, on the same weights.

One pass, shared by the alignment probe (:mod:`bench.callbacks.probe`, every ``probe.every``
steps of a run) and the computed sfa-fig2 table (:mod:`bench.results.computed`, a network at
initialisation): a forward of the zoo model with the rule's feedback points captured, then
``torch.autograd.grad`` of the loss into fresh tensors, so ``.grad`` is never touched. With
``true=True`` the pass runs inside the rule's :meth:`~bench.algorithms.base.AlgorithmModule.true_gradient`
(converted layers use Wᵀ, no cuts or injections): that is the backprop gradient.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def layer_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Layer weights (matrices and kernels) that train; biases and norm scales are left out."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


def loss_gradients(module, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], *,
                   true: bool) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(∂L/∂p for p in ``params``, ∂L/∂h_i for each feedback point h_i of ``module.tap``) on one
    forward of ``module.model`` on (x, y), L = ``module.loss_fn``. ``true``: backprop's gradient
    (inside ``module.true_gradient()``); otherwise whatever the model's backward gives as the rule
    left it (for FA, through the converted layers' B). Unreached tensors get ``None``. The tap is
    cleared before and after, so no activation outlives the call."""
    tap = module.tap
    with (module.true_gradient() if true else nullcontext()):
        if tap is not None:
            tap.clear()
        with (tap.settings(capture=True) if tap is not None else nullcontext()):
            logits = module.model(x)
        points = list(tap.outputs) if tap is not None else []
        loss = module.loss_fn(logits, y)
        grads = torch.autograd.grad(loss, list(params) + points, allow_unused=True)
    if tap is not None:
        tap.clear()
    return list(grads[: len(params)]), list(grads[len(params):])


def first_layer_ratios(module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(‖∂J/∂W¹‖_BP / ‖ΔW¹‖_rule, ‖∂J/∂x¹‖_BP / ‖δx¹‖_rule) on one batch (sfa Eq. 8, Figure 2).

    W¹ is the model's first weight matrix and x¹ its first feedback point (the first hidden
    layer's output). The rule's pass is its ordinary backward (for FA: through the converted
    layers' B); the BP pass is the same forward inside the rule's ``true_gradient()`` (Wᵀ).
    The norms are taken in the gradients' own dtype (float32), as sfa-fig2's committed CSV was."""
    weight = layer_weights(module.model)[0][1]
    (rule_w,), rule_h = loss_gradients(module, x, y, [weight], true=False)
    (bp_w,), bp_h = loss_gradients(module, x, y, [weight], true=True)
    return float(bp_w.norm() / rule_w.norm()), float(bp_h[0].norm() / rule_h[0].norm())
