"""Sign-concordant feedback and the BP controls of Moskovitz, Litwin-Kumar & Abbott 2018 (sfa,
"Feedback alignment in deep convolutional networks").

Rules (``configs/algorithm/<name>.yaml`` documents every option):

* ``usf_init`` — FA with uniform sign-concordant feedback, Init. method (sfa Eq. 4):
  ``B_t = |B_0| ⊙ sign(W_t)``.
* ``usf_sn`` — strict normalisation (sfa Eq. 5): ``B_t = ‖W_t‖₂ · sign(W_t) / ‖sign(W_t)‖₂``.
* ``ss`` — sign symmetry (Liao et al. 2015; Xiao et al. 2018, the ``SS`` row of rlra Table 4):
  ``B_t = sign(W_t)``. The same mechanism as uSF (one class, ``sign_scale: unit``).
* ``bp_const`` — backprop with the forward-weight norms fixed (sfa Eq. 10, "BP Const.").
* ``bp_noise`` — backprop plus zero-mean Gaussian noise on the update (sfa §5.3, "BP + Noise").
* ``bp_align`` — cross-entropy + λ Σ‖W − V‖² towards fixed random V (sfa Eq. 9, "BP + Alignment").

Options shared by every rule of this file (:class:`WeightOptions`, applied by :class:`WeightConstraints`):

* ``const_norm`` — after every step rescale each layer to ``‖W_0‖₂`` (sfa Eq. 10, §5.4);
* ``ei`` / ``ei_fraction`` / ``ei_epsilon`` — E/I: after ``ei_fraction`` of training (5 % in
  sfa §4) freeze every weight's sign by clipping it at ``±ei_epsilon`` after every step
  (sfa §3.1 and §5.5);
* ``manhattan`` — Batch Manhattan (Liao et al. 2015, discussed in sfa §5.1): the update is
  ``sign(∂J/∂W)`` for every parameter.

"Weights" are every trainable parameter with ≥ 2 dimensions (Linear matrices, conv kernels),
the same set the alignment probe reports; biases and norm scales are left alone.
"""
from __future__ import annotations

import math

import torch

from bench.algorithms.backprop import Backprop
from bench.algorithms.base import RULES
from bench.algorithms.feedback_alignment import FeedbackAlignment
from bench.feedback.init import feedback_tensor
from bench.feedback.noise import SharedNoise
from bench.options import FEEDBACK_INITS, AlgorithmOptions, ClassVar, Literal, opt


class WeightOptions(AlgorithmOptions):
    names: ClassVar[tuple[str, ...]] = ("bp_const",)  # BP Const. turns const_norm on in its config

    const_norm: bool = opt(False, "Const (sfa Eq. 10): after every step rescale each layer to its initial ‖W_0‖₂")
    ei: bool = opt(False, "E/I (sfa §3.1, §5.5): freeze every weight's sign after ei_fraction of training")
    ei_fraction: float = opt(0.05, "fraction of the run's optimizer steps before the signs freeze (5 % in sfa §4)", ge=0, le=1)
    ei_epsilon: float = opt(1.0e-6, "frozen weights are clipped at +ε (excitatory) or −ε (inhibitory), never 0", gt=0)
    manhattan: bool = opt(False, "Batch Manhattan (Liao et al. 2015; sfa §5.1): the update is sign(∂J/∂W)")


class SignOptions(WeightOptions):
    names: ClassVar[tuple[str, ...]] = ("usf_init", "usf_sn", "ss")

    sign_scale: Literal["init", "sn", "unit"] = opt("init", "init: |B_0|⊙sign(W) (sfa Eq. 4) | sn: ‖W‖·sign(W)/‖sign(W)‖ "
                                                            "(Eq. 5) | unit: sign(W)")
    feedback_init: Literal[FEEDBACK_INITS] = opt("kaiming", "|B_0|: kaiming = variance 1/n_out (sfa §5.1) | xavier | "
                                                            "gaussian (σ) | uniform")
    feedback_sigma: float = opt(0.05, "σ of the gaussian/uniform draw", gt=0)


class BPNoiseOptions(WeightOptions):
    names: ClassVar[tuple[str, ...]] = ("bp_noise",)

    noise_scale: float = opt(1.0, "noise std / gradient std (1: variance ≈ that of the BP gradient, as in sfa §5.3)", ge=0)


class BPAlignOptions(WeightOptions):
    names: ClassVar[tuple[str, ...]] = ("bp_align",)

    align_lambda: float = opt(1.0e-3, "λ of sfa Eq. 9 (0.001 in the paper)", ge=0)
    target_init: Literal[FEEDBACK_INITS] = opt("gaussian", "V's draw: gaussian (σ) | xavier | kaiming | uniform")
    target_sigma: float = opt(0.05, "σ of the gaussian/uniform draw of V", gt=0)


class WeightConstraints:
    """Const (sfa Eq. 10), E/I (sfa §3.1) and Batch Manhattan (Liao et al. 2015) for any rule.

    Mixed in *before* the rule class; the rule's ``setup_rule`` must call
    :meth:`setup_weight_options` after it has converted the model.
    """

    def setup_weight_options(self) -> None:
        a: WeightOptions = self.opts
        self.const_norm, self.ei, self.manhattan = a.const_norm, a.ei, a.manhattan
        self.ei_fraction, self.ei_epsilon = a.ei_fraction, a.ei_epsilon
        self.constrained = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        if self.const_norm:  # ‖W_0‖₂ per layer, saved with the checkpoint
            self.register_buffer("w0_norms", torch.stack(torch._foreach_norm([p.detach() for p in self.constrained])))
        if self.ei:
            # Frozen signs (±1 in W's dtype so the clip is three in-place ops, no temporaries),
            # the step counter and the frozen flag all live in the checkpoint.
            for i, p in enumerate(self.constrained):
                self.register_buffer(f"ei_sign_{i}", torch.ones_like(p.detach()))
            self.register_buffer("ei_frozen", torch.zeros((), dtype=torch.bool))
            self.register_buffer("ei_steps", torch.zeros((), dtype=torch.long))
        self.total_steps: int | None = None  # set from the trainer on first use; tests set it directly

    # ------------------------------------------------------------------ E/I
    def ei_signs(self) -> list[torch.Tensor]:
        return [getattr(self, f"ei_sign_{i}") for i in range(len(self.constrained))]

    def _total_steps(self) -> int:
        if self.total_steps is None:
            self.total_steps = int(self.trainer.estimated_stepping_batches)
        return self.total_steps

    @torch.no_grad()
    def _apply_ei(self) -> None:
        self.ei_steps += 1
        if not bool(self.ei_frozen):
            if int(self.ei_steps) < math.ceil(self.ei_fraction * self._total_steps()):
                return
            for s, p in zip(self.ei_signs(), self.constrained):
                s.copy_(p.sign()).add_(p == 0)  # a weight at exactly 0 freezes as excitatory (+1)
            self.ei_frozen.fill_(True)
        eps = self.ei_epsilon
        for s, p in zip(self.ei_signs(), self.constrained):
            p.mul_(s).clamp_(min=eps).mul_(s)  # s·max(s·w, ε): the frozen sign, at least ε away from 0

    # ------------------------------------------------------------------ Const
    @torch.no_grad()
    def _apply_const(self) -> None:
        norms = torch._foreach_norm(self.constrained)
        scales = torch._foreach_div(list(self.w0_norms.unbind()), norms)
        torch._foreach_mul_(self.constrained, scales)

    # ------------------------------------------------------------------ hooks
    def on_after_backward(self) -> None:
        # After the DDP all-reduce (it completes inside backward), before the probe reads .grad.
        # Under fp16 loss scaling the grads are still scaled here: sign(g) is then unscaled to
        # ±1/scale, which Adam (scale-invariant up to its ε) does not notice; bf16/fp32 are exact.
        super().on_after_backward()
        if self.manhattan:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_sign_(grads)

    def after_step(self) -> None:
        super().after_step()
        # E/I first: rescaling by a positive factor never flips a sign, so both invariants hold.
        if self.ei:
            self._apply_ei()
        if self.const_norm:
            self._apply_const()


class SignFeedback(WeightConstraints, FeedbackAlignment):
    """FA whose feedback B follows the sign of the forward weights (sfa §3.1).

    ``sign_scale``:
      * ``init``: ``B_t = |B_0| ⊙ sign(W_t)`` (sfa Eq. 4), |B_0| drawn by ``feedback_init``;
      * ``sn``:   ``B_t = ‖W_t‖₂ · sign(W_t)/‖sign(W_t)‖₂`` (sfa Eq. 5), per layer, ‖·‖₂ the
        Frobenius norm of the whole matrix or kernel;
      * ``unit``: ``B_t = sign(W_t)`` (Liao et al. 2015's uSF; Xiao et al. 2018's sign symmetry).

    B is derived from W in each training forward, right after the layer's product with W
    (``layer.derive``, :mod:`bench.feedback.replaced`), in place into the existing buffer, so it
    always matches the weights the backward runs with — also after a resume, a Const/E/I
    projection or a user's edit — and a layer whose δx is never needed (the first) costs nothing.
    A forward under ``no_grad`` leaves B alone (no backward will use it), so anything else that
    reads B (the probe's ∠(W, B), tests) calls :meth:`refresh_feedback` first. Init uses
    |B_t| = |B_0|: ``B.copysign_(W)`` is the whole update (no stored |B_0|). sign(0) is taken as
    ±1 (the sign bit of ±0.0), so a weight at exactly 0 keeps a ±|B_0| feedback where Eq. 4
    gives 0, and under SN ‖sign(W)‖₂ = √numel always (so ‖B‖₂ = ‖W‖₂ exactly). Exact zeros are
    rare (a few in ResNet-18's 11M draws) and E/I clips weights away from 0.
    """

    def setup_rule(self) -> None:
        super().setup_rule()
        self.sign_scale = self.opts.sign_scale
        derive = {"init": _derive_init, "sn": _derive_sn, "unit": _derive_unit}[self.sign_scale]
        for layer in self.layers.values():
            layer.derive = derive
        self.setup_weight_options()
        self.refresh_feedback()

    @torch.no_grad()
    def refresh_feedback(self) -> None:
        """Write every layer's B from its W now (the backward does it lazily for the layers it uses)."""
        for layer in self.layers.values():
            layer.derive(layer.weight, layer.feedback)

    def feedback_weight_pairs(self):
        self.refresh_feedback()
        return super().feedback_weight_pairs()


# B from W in one in-place pass over B: a copysign of a magnitude onto W — |B_0| (B's own current
# magnitude) for Init, the layer's ‖W‖₂/√numel for SN, 1 for unit. Called by the forward, where
# grad mode is already off (and by refresh_feedback, under no_grad), so no no_grad wrapper: its
# enter/exit would be paid per layer per step. One copysign pass beat two integer passes
# (W & sign bit, | magnitude) in place (docs/architecture.md, M1).
def _derive_init(w: torch.Tensor, b: torch.Tensor) -> None:
    b.copysign_(w)


def _derive_sn(w: torch.Tensor, b: torch.Tensor) -> None:
    torch.copysign(_frobenius_norm(w).mul_(1.0 / math.sqrt(w.numel())), w, out=b)


def _derive_unit(w: torch.Tensor, b: torch.Tensor) -> None:
    torch.copysign(torch.ones((), dtype=b.dtype, device=b.device), w, out=b)


def _frobenius_norm(w: torch.Tensor) -> torch.Tensor:
    """‖W‖₂ of a whole layer. For fp32/fp64 a BLAS dot of the flat weight with itself, which is
    faster than vector_norm (docs/architecture.md, M2). Half precision goes through vector_norm,
    which accumulates in fp32 (a bf16 dot accumulates in bf16: 0.1 % off at 640k entries)."""
    if w.dtype in (torch.float32, torch.float64) and w.is_contiguous():
        flat = w.view(-1)
        return torch.dot(flat, flat).sqrt_()
    return torch.linalg.vector_norm(w, dtype=torch.float32)


for _name in ("usf_init", "usf_sn", "ss"):
    RULES.register(_name)(SignFeedback)


@RULES.register("bp_const")
class BackpropConst(WeightConstraints, Backprop):
    """Backprop with every layer's norm held at ‖W_0‖₂ after each step (sfa Eq. 10, "BP Const.").
    Its config turns ``const_norm`` on; the E/I and Manhattan options work here too."""

    def setup_rule(self) -> None:
        super().setup_rule()
        self.setup_weight_options()


@RULES.register("bp_noise")
class BackpropNoise(WeightConstraints, Backprop):
    """Backprop + zero-mean Gaussian noise on the learning signal (sfa §5.3, "BP + Noise").

    Per parameter tensor, after backward: ``g ← g + s·σ_g·ξ``, ξ ~ N(0, I), σ_g² the (biased)
    variance of the entries of the BP gradient g, s = ``noise_scale``. With s = 1 the noise
    variance equals the gradient variance, as in the paper, and ∠(g + noise, g) ≈ 45°.

    Added to the averaged gradient (``on_after_backward`` runs after DDP's all-reduce) from one
    generator seeded with ``seed + 7919`` on every rank, so DDP and a single process
    draw the same noise; its state is checkpointed so a resumed run continues the same stream.
    """

    NOISE_SEED_OFFSET = 7919

    def setup_rule(self) -> None:
        super().setup_rule()
        self.noise_scale = self.opts.noise_scale
        self.noise = self.add_noise_stream("bp_noise", SharedNoise(int(self.cfg.seed) + self.NOISE_SEED_OFFSET))
        self.setup_weight_options()

    @torch.no_grad()
    def on_after_backward(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and self.noise_scale:
            gen = self.noise.generator(grads[0].device)
            for g in grads:
                std = g.float().var(correction=0).sqrt() if g.numel() > 1 else g.new_zeros((), dtype=torch.float32)
                noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=torch.float32)
                g.add_((noise * (self.noise_scale * std)).to(g.dtype))
        super().on_after_backward()  # Manhattan (if on) acts on the noisy update


@RULES.register("bp_align")
class BackpropAlignment(WeightConstraints, Backprop):
    """Backprop on ``J = CE + λ Σ_l Σ_ij (w_ij − v_ij)²`` with fixed random V (sfa Eq. 9,
    "BP + Alignment"), λ = ``align_lambda`` (0.001 in the paper). V has each weight's shape, is
    drawn by ``target_init``/``target_sigma`` (bench.feedback.init) from a generator seeded with
    ``seed + 1`` (every DDP rank draws the same V) and is a buffer. The reported loss is the CE
    alone; the probe's "true gradient" is the CE gradient, so its update angle measures how far
    the alignment term pulls the update away from BP (sfa Fig. 3c)."""

    def setup_rule(self) -> None:
        super().setup_rule()
        a: BPAlignOptions = self.opts
        self.align_lambda = a.align_lambda
        self.setup_weight_options()
        gen = torch.Generator().manual_seed(int(self.cfg.seed) + 1)
        for i, p in enumerate(self.constrained):
            v = feedback_tensor(tuple(p.shape), a.target_init, a.target_sigma, gen)
            self.register_buffer(f"align_target_{i}", v.to(p.dtype))

    def align_targets(self) -> list[torch.Tensor]:
        return [getattr(self, f"align_target_{i}") for i in range(len(self.constrained))]

    def objective(self, x, y):
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        penalty = sum(((w - v) ** 2).sum() for w, v in zip(self.constrained, self.align_targets()))
        return loss + self.align_lambda * penalty, logits, loss
