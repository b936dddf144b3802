"""Replaced-backward layers: the backward pass uses a feedback tensor B where backprop uses W.

This is the one mechanism behind FA (Lillicrap et al. 2016) and every rule that only changes
*which* B is used (uSF / sign symmetry, Kolen–Pollack, weight mirrors): those rules update the
``feedback`` buffer, the layers stay the same.

Forward is the ordinary op; backward returns
  δx = B-transposed-op(δy)   (Linear: δy·B, Conv: conv_transpose with B)
  ΔW = the ordinary weight gradient (depends on x and δy only),
so the weight update reaches the optimizer as ``.grad`` through autograd (DESIGN contract).
B is a buffer, never a Parameter, so optimizers and DDP never touch it. A rule whose B is a
function of W (uSF, sign symmetry) sets ``layer.derive``: the forward writes B from W in place
right after its own product with W, while W is still in cache, and only when δx will be needed
(grad enabled and the input requires it: never for the first layer, nor under no_grad), so no
separate pass over every B runs each step, and B is read while W is still in cache (deriving it
in the backward, where W has left the cache, was measurably slower: docs/architecture.md, M1).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.feedback.init import feedback_tensor
from bench.models.locally_connected import LocallyConnected2d


class _FALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, derive):
        out = F.linear(x, weight, bias)
        if derive is not None and ctx.needs_input_grad[0]:
            derive(weight, feedback)
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out.dtype != feedback.dtype or x.dtype != feedback.dtype:
            return _fa_linear_backward_mixed(x, feedback, grad_out, need_x, need_w, need_b and ctx.has_bias)
        x_shape = x.shape
        if grad_out.dim() != 2:  # (batch, tokens, features) → rows of features
            grad_out, x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_out.mm(feedback).view(x_shape) if need_x else None
        grad_w = grad_out.t().mm(x) if need_w else None
        grad_b = grad_out.sum(0) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_b, None, None


def _fa_linear_backward_mixed(x, feedback, grad_out, need_x, need_w, need_b):
    """Under autocast the forward ran in low precision: compute in δ's dtype and return each
    gradient in its input's dtype. Kept off the fp32 path, where every extra op is overhead."""
    dtype = grad_out.dtype
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_out.matmul(feedback.to(dtype)).to(x.dtype) if need_x else None
    grad_w = g2.t().mm(x.reshape(-1, x.shape[-1]).to(dtype)).to(feedback.dtype) if need_w else None
    grad_b = g2.sum(0).to(feedback.dtype) if need_b else None
    return grad_x, grad_w, grad_b, None, None


class _FAConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, derive, stride, padding, dilation, groups):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if derive is not None and ctx.needs_input_grad[0]:
            derive(weight, feedback)
        ctx.save_for_backward(x, feedback)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # One fused aten call: δx is computed with B in the weight slot; ΔW depends only on x, δy.
        dtype = grad_out.dtype  # autocast: compute in δ's dtype, return each grad in its input's
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x.to(dtype), feedback.to(dtype), [feedback.shape[0]] if has_bias else None,
            stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, need_b and has_bias],
        )
        cast = lambda g, like: g.to(like.dtype) if g is not None else None  # noqa: E731
        return cast(grad_x, x), cast(grad_w, feedback), cast(grad_b, feedback), None, None, None, None, None, None


class FeedbackLayer:
    """Mixin: ``use_feedback`` switches between the rule (B) and true backprop (W)."""

    use_feedback: bool = True
    feedback: torch.Tensor
    # derive(W, B): writes B from W in place; called by the forward, only when δx will be needed
    derive: Callable[[torch.Tensor, torch.Tensor], None] | None = None


class FALinear(nn.Linear, FeedbackLayer):
    def forward(self, x):
        if self.use_feedback:
            return _FALinearFn.apply(x, self.weight, self.bias, self.feedback, self.derive)
        return F.linear(x, self.weight, self.bias)


class FAConv2d(nn.Conv2d, FeedbackLayer):
    def forward(self, x):
        if self.use_feedback:
            return _FAConv2dFn.apply(x, self.weight, self.bias, self.feedback, self.derive, self.stride,
                                     self._explicit_padding, self.dilation, self.groups)
        return super().forward(x)


class _FALocallyConnectedFn(torch.autograd.Function):
    """Forward: the LC layer. Backward: δp_l = B_lᵀ δz_l folded back onto the input (B where
    backprop uses W, Lillicrap et al. 2016 FA), ΔW_l = δz_l p_lᵀ and Δb the ordinary gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, derive, layer):
        out = LocallyConnected2d.forward(layer, x)
        if derive is not None and ctx.needs_input_grad[0]:  # as FALinear: W is still in cache
            derive(weight, feedback)
        ctx.save_for_backward(x, feedback)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad_out.flatten(2).permute(2, 1, 0)  # (L, C_out, B)
        grad_x = grad_w = grad_b = None
        if need_w:
            grad_w = LocallyConnected2d.local_update(grad_out, layer.patches(x))
        if need_x:
            patch_grad = torch.bmm(feedback.transpose(1, 2), grad).permute(2, 1, 0)  # (B, K, L)
            grad_x = F.fold(patch_grad, layer.in_size, layer.kernel_size, padding=layer.padding, stride=layer.stride)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def fa_locally_connected(layer: LocallyConnected2d, feedback: torch.Tensor) -> "FALocallyConnected2d":
    """The FA twin of ``layer`` sharing its Parameters, with fixed feedback ``B`` (shaped like
    ``weight``): its converter in :data:`CONVERTERS`."""
    new = FALocallyConnected2d.__new__(FALocallyConnected2d)
    nn.Module.__init__(new)
    for key in ("in_channels", "out_channels", "in_size", "kernel_size", "stride", "padding", "out_size"):
        setattr(new, key, getattr(layer, key))
    new.weight, new.bias = layer.weight, layer.bias
    new.register_buffer("feedback", feedback.to(layer.weight.dtype).to(layer.weight.device))
    new.train(layer.training)
    return new


class FALocallyConnected2d(LocallyConnected2d, FeedbackLayer):
    """LC layer whose backward sends δ through the fixed ``feedback`` B instead of W (FA);
    ``use_feedback = False`` is plain backprop (the alignment probe's reference)."""

    def forward(self, x):
        if self.use_feedback:
            return _FALocallyConnectedFn.apply(x, self.weight, self.bias, self.feedback, self.derive, self)
        return super().forward(x)


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"cannot convert a Conv2d with padding_mode={conv.padding_mode!r}")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("cannot convert a padding='same' Conv2d with an even kernel")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def _converted(layer: nn.Module, feedback: torch.Tensor) -> nn.Module:
    """A FA twin of ``layer`` that shares its Parameters (so optimizers built later see them)."""
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):  # built on the meta device: its own weights are never allocated
        new = FALinear(layer.in_features, layer.out_features, has_bias, device="meta")
    else:
        new = FAConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                       layer.padding, layer.dilation, layer.groups, has_bias, layer.padding_mode, device="meta")
        new._explicit_padding = _explicit_padding(layer)
    new.weight, new.bias = layer.weight, layer.bias
    new.register_buffer("feedback", feedback.to(layer.weight.dtype).to(layer.weight.device))
    new.train(layer.training)
    return new


def _dense_twin(layer: nn.Module, init: str, sigma: float, generator: torch.Generator) -> nn.Module:
    return _converted(layer, feedback_tensor(tuple(layer.weight.shape), init, sigma, generator))


def _lc_twin(layer: LocallyConnected2d, init: str, sigma: float, generator: torch.Generator) -> nn.Module:
    # untied weights (positions, out, in·k·k): each position is a dense layer of its own,
    # so each gets its own draw with that layer's fan-in and fan-out
    positions, out_ch, fan_in = layer.weight.shape
    feedback = torch.stack([feedback_tensor((out_ch, fan_in), init, sigma, generator) for _ in range(positions)])
    return fa_locally_connected(layer, feedback)


# The layer types a replaced-backward rule converts, and how: (layer, init, sigma, generator) → its
# FA twin. Subclasses match too (timm's Linear and Conv2d). The conversion tests are generated
# from this table, so a new entry is tested with every converting rule.
CONVERTERS: dict[type, Callable[..., nn.Module]] = {
    nn.Linear: _dense_twin,
    nn.Conv2d: _dense_twin,
    LocallyConnected2d: _lc_twin,
}


def converter_for(module: nn.Module) -> Callable[..., nn.Module] | None:
    return next((fn for kind, fn in CONVERTERS.items() if isinstance(module, kind)), None)


def convert_to_feedback(model: nn.Module, init: str = "gaussian", sigma: float = 0.05,
                        seed: int = 0, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every layer of a type in :data:`CONVERTERS` (``nn.Linear``, ``nn.Conv2d`` and their
    subclasses, e.g. timm's, and Bartunov et al.'s locally-connected layer) in place.

    Works on any ``nn.Module`` tree. B for each layer is drawn from one generator seeded with
    ``seed`` in module order, so every DDP rank builds the same B without a broadcast.
    Returns the dotted names it converted (the "report"); layers in ``skip`` are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full in skip or isinstance(child, FeedbackLayer):
                continue
            convert = converter_for(child)
            if convert is not None:
                setattr(parent, child_name, convert(child, init, sigma, generator))
                converted.append(full)
    return converted


def feedback_layers(model: nn.Module) -> dict[str, FeedbackLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FeedbackLayer)}
