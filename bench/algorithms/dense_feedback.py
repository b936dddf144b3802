"""Dense feedback alignment (DenseFA; Moskovitz, Litwin-Kumar & Abbott 2018, sfa §4 and Table 1),
the "skipped" random backpropagation of Baldi, Sadowski & Lu 2016 ("Learning in the machine:
random backpropagation and the deep learning channel", SRBP, extended there to skips from any
downstream layer): FA plus residual feedback from *every* downstream layer.

With feedback points h_i (after each nonlinearity, as for DFA) and pre-activations a_k = W_k x_k of
the converted layers k, the teaching signal at h_i is

    δh_i = B_{k(i)}ᵀ δa_{k(i)}  +  Σ_{k > k(i)} C_{k,i} δa_k,        δa_k = δh_{k-1}-path ⊙ φ′,

where k(i) is the layer that reads h_i (the adjacent FA path of sfa Eq. 3, the replaced backward
of :mod:`bench.feedback.replaced`) and C_{k,i} are fixed random matrices from every later layer k,
the output layer included (δa_L = e = ∂L/∂ŷ: with only that skip, δh_i is FA + DFA). ΔW_k =
δa_k x_kᵀ as in FA. The C_{k,·} of one source layer k are the direct-projection mechanism of
:mod:`bench.feedback.direct` (DFA's: one unified matrix sliced per target, Launay Eq. 7–8
normalisation), with the source's δa_k in place of DFA's global error.

The skips are attached in the forward pass: each converted layer's output passes through an
identity whose backward also sends C_{k,i} δa_k to every earlier point h_i (not the adjacent one),
so a single backward computes all δ's in order, each δa_k complete before it is sent on.

Memory is Σ_k l_max(k)·l_k floats (sfa §4: it "precluded their use on the larger models"), so the
rule refuses a model whose matrices exceed ``max_feedback_mb``, and it needs a chain of layers
(each converted layer read by the next through exactly one feedback point): in a branching net
(ResNet's downsample shortcuts) "the layer that reads h_i" is not one layer.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from bench.algorithms.base import RULES
from bench.algorithms.feedback_alignment import FAOptions, FeedbackAlignment
from bench.feedback.direct import DirectFeedback
from bench.feedback.points import PointTap
from bench.options import FEEDBACK_INITS, ClassVar, ConfigError, Literal, opt


class DenseFAOptions(FAOptions):
    names: ClassVar[tuple[str, ...]] = ("dense_fa",)

    feedback_init: Literal[FEEDBACK_INITS] = opt("kaiming", "the adjacent FA matrices B: kaiming (variance 1/n_out, "
                                                            "sfa §5.1) | xavier | gaussian (σ) | uniform")
    skip_init: Literal["gaussian", "uniform"] = opt("gaussian", "skip matrices U_ij ~ N(0, 1) | U(-√3, √3) (same variance)")
    normalize: bool = opt(True, "C_{k,i} = U/√(l_i·l_k), DFA's normalisation (Launay Eq. 7–8) with the source size as e")
    unified: bool = opt(True, "one matrix per source layer sliced per target (Launay §3.1), vs one per (source, target)")
    max_feedback_mb: float = opt(1024.0, "refuse a model whose skip matrices exceed this (sfa §4: memory precluded "
                                         "large models)", gt=0)


class _SkipFeedback(torch.autograd.Function):
    """Identity on a layer output a_k; its backward also hands C_{k,i} δa_k to each target h_i."""

    @staticmethod
    def forward(ctx, output, feedback, *targets):
        ctx.feedback = feedback
        ctx.shapes = [t.shape for t in targets]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):
        rows = grad_out.shape[0]
        projected = ctx.feedback.project(grad_out.reshape(rows, -1))
        grads = [(p * s).view(shape) for (p, s), shape in zip(projected, ctx.shapes)]
        return (grad_out, None, *grads)


@RULES.register("dense_fa")
class DenseFeedbackAlignment(FeedbackAlignment):
    def setup_rule(self) -> None:
        super().setup_rule()  # FA: every Linear/Conv2d converted, the adjacent path
        a: DenseFAOptions = self.opts
        if self.tap is None or not self.tap.names:
            raise ConfigError(f"dense_fa: model {self.cfg.model.name} exposes no feedback points")
        granularity = a.granularity
        self.points = PointTap(self.model, self.model.feedback_points(granularity))
        layer_sizes, targets = self._chain(granularity)
        mb = 4 * sum(max(sizes) * l for l, sizes in zip(layer_sizes, targets) if sizes) / 2 ** 20
        if mb > a.max_feedback_mb:
            raise ConfigError(f"dense_fa: the skip matrices of {self.cfg.model.name} at input {list(self.input_shape)} "
                              f"need {mb:.0f} MB > algorithm.max_feedback_mb={a.max_feedback_mb} "
                              f"(sfa §4: DenseFA's memory precludes large models)")
        # One direct-projection feedback per source layer with targets, seeded apart from FA's B.
        self.skips = nn.ModuleList()
        self._skip_of: dict[int, int] = {}
        for k, (l_k, sizes) in enumerate(zip(layer_sizes, targets)):
            if sizes:
                self._skip_of[k] = len(self.skips)
                self.skips.append(DirectFeedback(sizes, l_k, unified=a.unified, normalize=a.normalize,
                                                 init=a.skip_init, seed=int(self.cfg.seed) + 1009 * (k + 2)))
        self._ordered = list(self.layers.values())
        self._active = True
        self._hooks = [layer.register_forward_hook(self._skip_hook) for layer in self._ordered]
        self._layer_index = {id(layer): k for k, layer in enumerate(self._ordered)}

    @torch.no_grad()
    def _chain(self, granularity: str) -> tuple[list[int], list[list[int]]]:
        """One dry forward: the per-sample output size of every converted layer and the sizes of
        the points it sends skips to; raises unless layers and points alternate L P L P … L."""
        events: list[tuple[str, str, int]] = []
        names = {id(m): n for n, m in self.layers.items()}
        point_names = {id(m): n for n, m in self.model.named_modules() if n in self.points.names}
        handles = [m.register_forward_hook(lambda m, i, o: events.append(("L", names[id(m)], o[0].numel())))
                   for m in self.layers.values()]
        handles += [m.register_forward_hook(lambda m, i, o: events.append(("P", point_names[id(m)], o[0].numel())))
                    for m in self.points._modules]
        was_training = self.model.training
        try:
            self.model.eval()
            self.model(torch.zeros((1, *self.input_shape)))
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        kinds = "".join(kind for kind, _, _ in events)
        if kinds != "LP" * (len(kinds) // 2) + "L":
            where = next((f"{events[i][1]} runs right after {events[i - 1][1]}" for i in range(1, len(events))
                          if events[i][0] == events[i - 1][0]), "its layers and feedback points do not alternate")
            raise ConfigError(f"dense_fa needs a chain of layers, each read through one feedback point; "
                              f"{self.cfg.model.name} branches ({where}) — use fa or dfa")
        if [n for k, n, _ in events if k == "L"] != list(self.layers):
            raise ConfigError(f"dense_fa: {self.cfg.model.name} runs its layers out of module order")
        layers = [size for kind, _, size in events if kind == "L"]
        points = [size for kind, _, size in events if kind == "P"]
        return layers, [points[: max(k - 1, 0)] for k in range(len(layers))]

    def _skip_hook(self, layer, inputs, output):
        if not self._active or not self.points.outputs:
            return None
        k = self._layer_index[id(layer)]
        if k not in self._skip_of:
            return None
        targets = self.points.outputs[: k - 1]
        return _SkipFeedback.apply(output, self.skips[self._skip_of[k]], *targets)

    def objective(self, x, y):
        self.points.clear()
        self.points.capture = self._active
        try:
            return super().objective(x, y)
        finally:
            self.points.capture = False
            self.points.clear()

    @contextmanager
    def true_gradient(self):
        self._active = False
        try:
            with super().true_gradient():
                yield
        finally:
            self._active = True

    def skip_matrix(self, source: str, target: int) -> torch.Tensor:
        """C_{k,i} (l_i × l_k) from layer ``source`` to point ``target``, normalised: for tests."""
        k = list(self.layers).index(source)
        return self.skips[self._skip_of[k]].matrix_for(target)
