"""Feedback points: capture (and optionally cut the graph at) chosen module outputs.

Direct-projection rules (DFA, DRTP, GrAPE) cut the graph between points so that no gradient
crosses a point boundary: the tap stores the point's output h_i (still attached to the layer
that produced it) and hands a detached copy downstream. A rule then adds ⟨h_i, stopgrad(B_i e)⟩
to the loss and one backward gives every layer its local update (docs/architecture.md, "The .grad contract").

The alignment probe reuses the same tap in capture-only mode to read teaching signals δh_i
(``retain_grad`` on the captured tensors), so there is one hook mechanism, not two.
Hooks are only registered while they have work to do, so BP pays nothing between probes.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class PointTap:
    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"feedback point {missing[0]!r} is not a submodule of {type(model).__name__}")
        self.names = list(names)
        self._modules = [modules[n] for n in names]
        self._handles: list = []
        self._cut = False
        self._capture = False
        self.outputs: list[torch.Tensor] = []

    def _hook(self, module, inputs, output):
        if self._capture or self._cut:
            self.outputs.append(output)
        if self._cut:
            return output.detach()
        return None

    def _sync(self) -> None:
        want = self._cut or self._capture
        if want and not self._handles:
            self._handles = [m.register_forward_hook(self._hook) for m in self._modules]
        elif not want and self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []

    @property
    def cut(self) -> bool:
        return self._cut

    @cut.setter
    def cut(self, value: bool) -> None:
        self._cut = bool(value)
        self._sync()

    @property
    def capture(self) -> bool:
        return self._capture

    @capture.setter
    def capture(self, value: bool) -> None:
        self._capture = bool(value)
        self._sync()

    def clear(self) -> None:
        self.outputs = []

    @contextmanager
    def settings(self, cut: bool | None = None, capture: bool | None = None):
        old = (self._cut, self._capture)
        try:
            if cut is not None:
                self._cut = cut
            if capture is not None:
                self._capture = capture
            self._sync()
            yield self
        finally:
            self._cut, self._capture = old
            self._sync()
