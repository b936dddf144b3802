"""Handing precomputed updates to ``.grad``: for rules whose update is not the gradient of anything
autograd can build cheaply (closed-form rec-LRA, PEPITA).

``manual_backward(surrogate)`` must still put each update in ``.grad`` the way a gradient gets
there, because two things watch the backward pass: DDP all-reduces in gradient hooks, and fp16
mixed precision scales the surrogate (its scaler later divides every ``.grad``). When either is
present, the surrogate is one autograd node (:class:`_Deliver`) whose backward returns the updates
(times the incoming scale). When neither is, the updates are assigned at once and the surrogate is
a bare leaf: one AccumulateGrad node per parameter through the engine was a measurable share of a
closed-form step (docs/architecture.md, M3).

:class:`GradSlots` goes one step further for a rule that can write each update straight into its
destination (PEPITA's outer products, ``addmm_``): the update lands in ``.grad`` when it exists
(added, as AccumulateGrad adds), else in a buffer the rule keeps from step to step, which then
becomes ``.grad``. A freshly allocated multi-megabyte update costs page faults on its first touch
(glibc returns large freed blocks to the system): 2,830 minor faults per step on the grape-1 MLP,
against 0 with the buffers (docs/architecture.md, M8). Like an optimizer's state, the buffer is
reused: a callback that keeps a ``.grad`` beyond the optimizer step must clone it.
"""
from __future__ import annotations

import torch


def backward_is_watched(trainer) -> bool:
    """Whether updates must reach ``.grad`` through autograd (DDP's hooks, or fp16 loss scaling)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def deliver(grads: list[torch.Tensor], params: list[torch.Tensor], trainer, like: torch.Tensor) -> torch.Tensor:
    """A surrogate whose ``manual_backward`` leaves ``grads[i]`` in ``params[i].grad`` (added to
    what is there, as AccumulateGrad does). ``like`` gives the bare leaf its device and dtype."""
    if backward_is_watched(trainer):
        return _Deliver.apply(grads, *params)
    for p, g in zip(params, grads):
        if p.grad is not None:
            p.grad.add_(g)
        elif g.stride() != p.stride():  # the layout contract AccumulateGrad enforces on the other path:
            p.grad = torch.empty_like(p).copy_(g)  # the fused optimizers read .grad in p's layout
        else:
            p.grad = g
    return like.new_zeros((), requires_grad=True)


class _Deliver(torch.autograd.Function):
    """One autograd node whose backward hands precomputed updates to the given parameters."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        # ``manual_backward`` may scale the surrogate (mixed-precision loss scaling): follow it.
        if grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            grads = torch._foreach_mul(grads, grad_out)
        return (None, *grads)


class GradSlots:
    """Where a rule writes its updates when nothing watches the backward (:func:`backward_is_watched`).

    ``slots(params)`` gives, per parameter, ``(tensor, accumulate)``: its ``.grad`` and True when
    one exists, else a kept buffer in the parameter's layout and False (the caller overwrites it).
    ``install(params, slots)`` then makes each buffer the parameter's ``.grad``."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def slots(self, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
        out = []
        for p in params:
            if p.grad is not None:
                out.append((p.grad, True))
                continue
            buf = self._buffers.get(id(p))
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device \
                    or buf.stride() != p.stride():
                buf = self._buffers[id(p)] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append((buf, False))
        return out

    @staticmethod
    def install(params: list[torch.Tensor], slots: list[tuple[torch.Tensor, bool]]) -> None:
        for p, (t, accumulated) in zip(params, slots):
            if not accumulated:
                p.grad = t
