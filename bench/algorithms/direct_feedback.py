"""Direct projection: DFA, sign-DFA and DRTP, with the unified feedback matrix of Launay et al. 2020.

Each feedback point h_i receives a global signal s through a fixed B_i:
    δa_i = (B_i s) ⊙ φ′(a_i),   ΔW_i = δa_i h_{i-1}ᵀ
  * DFA      (Nøkland 2016 Eq. 3; Launay Eq. 4):  s = e = ∂L/∂ŷ
  * sign-DFA (Frenkel et al. 2021):               s = sign(e) / N
  * DRTP     (Frenkel et al. 2021):               s = −y* / N  (the one-hot target; the minus sign
    makes s match the sign of e at initialisation, where the softmax is near uniform and e ≈ ŷ − y*)
(N rows in the batch: every variant's update is a batch mean, like DFA's.)
with B_i the normalised slices of one matrix (Launay Eq. 7–8, see bench/feedback/direct.py).

The graph is cut at every point, so nothing propagates backward through the network: the
surrogate L + Σ_i ⟨h_i, stopgrad(B_i s)⟩ gives each layer its local gradient in one backward,
and the output layer its true local gradient. ``micro`` points sit after every nonlinearity;
``macro`` points after every block, so a block trains by local backprop from its injected signal.

Options beyond the paper's rule: ``bottleneck_layer``/``bottleneck_neurons`` reproduce the dfa
paper's bottleneck experiment (§4.2: a fixed random set of a layer's neurons never receives an
update), and ``feedback_device`` keeps the feedback matrix and the projection on another device
(Launay §2.3: multi-GPU memory relief).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.direct import DirectFeedback
from bench.feedback.noise import rank_and_world
from bench.models.base import point_sizes
from bench.options import AlgorithmOptions, ClassVar, ConfigError, Literal, opt


class DirectOptions(AlgorithmOptions):
    names: ClassVar[tuple[str, ...]] = ("dfa", "sdfa", "drtp")

    feedback_init: Literal["gaussian", "uniform"] = opt("gaussian", "U_ij ~ N(0, 1) (Launay Eq. 7) | U(-1, 1)·√3 (same variance)")
    normalize: bool = opt(True, "B = U/√(l_max·e), slice i rescaled by √(l_max/l_i) (Launay Eq. 7–8)")
    unified: bool = opt(True, "one matrix sliced per layer (Launay §3.1) vs one independent matrix per layer")
    feedback_device: str | None = opt(None, "e.g. cuda:1: keep B and the projection on another device (Launay §2.3)")
    bottleneck_layer: str | None = opt(None, "dfa §4.2 bottleneck: a layer name (e.g. net.3) whose neurons are masked")
    bottleneck_neurons: int = opt(-1, "trainable neurons kept in bottleneck_layer (drawn once); -1 = off", ge=-1)
    error_at: Literal["logits", "hidden"] = opt(
        "logits", "where the projected error e is taken: logits = ∂L/∂ŷ (vocabulary-sized for a language model) | "
                  "hidden = ∂L/∂(input of the output projection lm_head), per token (Launay et al. 2020's default)")

    # Launay et al.'s code (lightonai/principled-dfa-training, dfatools/models.py) projects the raw
    # per-sample softmax − onehot, never divided by the batch, while the output layer keeps the mean
    # loss's gradient: its hidden updates are batch-size times ours at the same learning rate.
    error_reduction: Literal["mean", "sum"] = opt(
        "mean", "hidden updates: mean = the batch mean, as the loss's gradient | sum = summed over the batch "
                "(Launay et al.'s code; the output layer keeps the mean)")

    def check(self, cfg) -> None:
        if self.error_reduction == "sum" and self.error_at == "hidden":
            raise ConfigError("algorithm.error_reduction=sum is not valid with algorithm.error_at=hidden; "
                              "expected error_reduction=mean (the summed form is Launay et al.'s classifier code)")
        if self.error_at == "hidden":
            if self.name == "drtp":
                raise ConfigError("algorithm.error_at=hidden is not valid for drtp: DRTP projects the one-hot target, "
                                  "which lives at the logits")
            if str(cfg.model.name) != "transformer":
                raise ConfigError(f"algorithm.error_at=hidden is not valid for model.name={cfg.model.name}; it needs a "
                                  f"model whose output projection is named (transformer: lm_head)")

@RULES.register("dfa")
class DirectFeedbackAlignment(AlgorithmModule):
    signal = "error"

    def setup_rule(self) -> None:
        a: DirectOptions = self.opts
        if self.tap is None or not self.tap.names:
            raise ValueError(f"{a.name}: model {self.cfg.model.name} exposes no feedback points")
        sizes = list(point_sizes(self.model, self.input_shape, a.granularity).values())
        self.error_at = a.error_at
        error_size = self.num_classes
        if a.error_at == "hidden":
            self.head = getattr(self.model, "lm_head")
            error_size = self.head.in_features
            self.head.register_forward_pre_hook(self._inject_at_head)
        self.feedback = DirectFeedback(sizes, error_size, unified=a.unified, normalize=a.normalize,
                                       init=a.feedback_init, seed=int(self.cfg.seed) + 1)
        self.feedback_device = a.feedback_device
        self.error_reduction = a.error_reduction
        self.tap.cut = True
        self._setup_bottleneck(a.bottleneck_layer, a.bottleneck_neurons)

    def _setup_bottleneck(self, layer: str | None, neurons: int) -> None:
        """Launay §4.2: zero the gradient of all but ``neurons`` output neurons of ``layer``, chosen
        once at initialisation; those weights never change, yet the forward pass is intact."""
        self.bottleneck: list[torch.nn.Parameter] = []
        if not layer or neurons < 0:
            return
        modules = dict(self.model.named_modules())
        if layer not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            raise ValueError(f"bottleneck_layer {layer!r} is not a layer of the model; valid choices: {', '.join(linear)}")
        module = modules[layer]
        out_features = module.weight.shape[0]
        if neurons > out_features:
            raise ValueError(f"bottleneck_neurons={neurons} exceeds the {out_features} neurons of {layer}")
        keep = torch.zeros(out_features, dtype=torch.bool)
        keep[torch.randperm(out_features, generator=torch.Generator().manual_seed(int(self.cfg.seed) + 2))[:neurons]] = True
        self.register_buffer("bottleneck_keep", keep)
        self.bottleneck = [p for p in (module.weight, module.bias) if p is not None]

    def after_backward(self) -> None:
        for param in self.bottleneck:
            if param.grad is not None:
                param.grad.mul_(self.bottleneck_keep.view(-1, *([1] * (param.grad.dim() - 1))).to(param.grad.dtype))

    def on_fit_start(self) -> None:
        if self.feedback_device:  # Lightning moved every buffer to the model's device; move these back
            self.feedback.to(self.feedback_device)

    def global_signal(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """The signal every point receives, one row per sample (or token).

        sign(e) and −y* are divided by the number of rows like e = ∂(mean loss)/∂ŷ is, so every
        variant's update is a batch mean: the learning rate means the same across variants and
        DDP's gradient averaging gives the single-process update.
        """
        rows = logits.numel() // logits.shape[-1]
        if self.signal == "target":
            return F.one_hot(y.reshape(-1), logits.shape[-1]).to(logits.dtype).mul_(-1.0 / rows)
        error = torch.autograd.grad(loss, logits, retain_graph=True)[0].reshape(-1, logits.shape[-1])
        return torch.sign(error).mul_(1.0 / rows) if self.signal == "sign_error" else error

    def _inject_at_head(self, module, args):
        """``error_at: hidden``: the output projection reads its input through :class:`_InjectAtHead`,
        whose backward receives e = ∂L/∂(head input) per token and hands B_i e to every point."""
        points = self.tap.outputs
        if not (self.tap.cut and points) or not torch.is_grad_enabled():
            return None
        return (_InjectAtHead.apply(self, args[0], *points),)

    def objective(self, x, y):
        self.tap.clear()
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        points = self.tap.outputs
        if not points:  # inside true_gradient(): plain backprop
            return loss, logits, loss
        if self.error_at == "hidden":  # the head's pre-hook already wired the injection
            return loss, logits, loss
        signal = self.global_signal(logits, y, loss).detach()
        if self.error_reduction == "sum":
            # × the global batch: DDP's mean over ranks of per-rank sums is then the global sum
            rows = logits.numel() // logits.shape[-1]
            signal = signal * (rows * rank_and_world()[1])
        if self.feedback_device:
            signal = signal.to(self.feedback_device)
        surrogate = loss
        for h, (projected, scale) in zip(points, self.feedback.project(signal)):
            # ⟨h, B_i s⟩ as one dot product, scaled as a scalar: its backward hands exactly
            # scale·U_i s = B_i s to h, with no extra pass over the projection.
            surrogate = surrogate + scale * torch.dot(h.reshape(-1), projected.to(h.device).reshape(-1))
        return surrogate, logits, loss

    @contextmanager
    def true_gradient(self):
        with self.tap.settings(cut=False):
            yield


class _InjectAtHead(torch.autograd.Function):
    """Identity on the output projection's input x (B, T, d); its backward gets e = ∂L/∂x (the
    head's true backward, one pass, no second autograd call) and returns, besides e for x itself
    (so a final norm before the head still learns), B_i s for every feedback point h_i, with s = e
    (DFA) or sign(e)/rows (sign-DFA), one row per token. The points are inputs of this node only
    so that autograd carries B_i s into each block's own backward."""

    @staticmethod
    def forward(ctx, rule, x, *points):
        ctx.rule = rule
        ctx.shapes = [p.shape for p in points]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        rule = ctx.rule
        error = grad.reshape(-1, grad.shape[-1])
        if rule.signal == "sign_error":
            error = torch.sign(error).mul_(1.0 / error.shape[0])
        if rule.feedback_device:
            error = error.to(rule.feedback_device)
        out = [(projected * scale).to(grad.device).reshape(shape)
               for (projected, scale), shape in zip(rule.feedback.project(error.detach()), ctx.shapes)]
        return (None, grad, *out)


@RULES.register("sdfa")
class SignDirectFeedbackAlignment(DirectFeedbackAlignment):
    """sign-DFA: project sign(e) (Frenkel et al. 2021's sDFA)."""

    signal = "sign_error"


@RULES.register("drtp")
class DirectRandomTargetProjection(DirectFeedbackAlignment):
    """DRTP (Frenkel et al. 2021): project the target −y*; needs neither the output nor the error."""

    signal = "target"
