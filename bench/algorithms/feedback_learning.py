"""Feedback that learns to match the forward weights: Kolen–Pollack and weight mirrors
(Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019, "Deep learning without weight transport";
the ``ResNet, KP`` and ``FA+WM`` comparison rows of rlra Table 4).

Both are FA (replaced backward, :mod:`bench.feedback.replaced`) whose buffer B — stored in W's
shape, so "B = W" means "the backward uses Wᵀ" — changes between steps. B is never a Parameter:
its update is applied in place by the rule, identically on every DDP rank (it depends only on
the all-reduced W and on noise from an identically seeded generator).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.algorithms.base import RULES
from bench.algorithms.feedback_alignment import FAOptions, FeedbackAlignment
from bench.feedback.noise import SharedNoise
from bench.feedback.replaced import FALocallyConnected2d
from bench.options import ClassVar, opt


class KPOptions(FAOptions):
    names: ClassVar[tuple[str, ...]] = ("kp",)

    kp_decay: float = opt(1.0e-4, "λ: B − W decays by (1 − ηλ) per step; equal to weight_decay under sgd it is "
                                  "Akrout et al.'s rule exactly", ge=0)


class WMOptions(FAOptions):
    names: ClassVar[tuple[str, ...]] = ("wm",)

    mirror_every: int = opt(1, "a mirror phase after every this many optimizer steps; 0 = never", ge=0)
    mirror_batch: int = opt(64, "noise samples per layer per mirror phase", ge=1)
    mirror_rate: float = opt(0.01, "α: B ← (1 − α)B + α·yxᵀ/n", gt=0, le=1)
    mirror_size: int = opt(4, "convs: noise images of mirror_size × mirror_size output positions (unpadded)", ge=1)


class _LearnedFeedback(FeedbackAlignment):
    def feedback_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Buffers are looked up each time: ``.to(device)`` replaces buffer tensors (not Parameters).
        layers = list(self.layers.values())
        return [layer.weight for layer in layers], [layer.feedback for layer in layers]


@RULES.register("kp")
class KolenPollack(_LearnedFeedback):
    """Kolen–Pollack (Kolen & Pollack 1994; Akrout et al. 2019 Eq. 9–10): B receives the same
    update as W, and both decay. With plain SGD and weight decay λ on W,

        ΔW = −η(∇_W J + λW),   ΔB = −η(∇_W J + λB)   ⇒   B − W ← (1 − ηλ)(B − W),

    so B converges to W (the backward to Wᵀ) geometrically. It is implemented in that last form,
    which holds for any optimizer: before the step B ← B − W_t (the probe has already read B),
    after it B ← W_{t+1} + (1 − η_t λ)·(B_t − W_t), i.e. B gets exactly W's update plus the decay
    of its own difference. λ = ``kp_decay``; set it equal to ``weight_decay`` (optimizer ``sgd``)
    for Akrout et al.'s rule exactly. η_t is the optimizer's current learning rate (schedulers
    included). Two in-place foreach ops around the step; nothing is allocated.
    """

    def setup_rule(self) -> None:
        super().setup_rule()
        self.kp_decay = self.opts.kp_decay
        self._kp_lr: float | None = None

    @torch.no_grad()
    def kp_before_step(self, optimizer) -> None:
        weights, feedback = self.feedback_pairs()
        self._kp_lr = float(optimizer.param_groups[0]["lr"])
        torch._foreach_sub_(feedback, weights)  # B now holds D = B − W_t

    @torch.no_grad()
    def kp_after_step(self) -> None:
        if self._kp_lr is None:  # the step was skipped before the hook ran (e.g. divergence)
            return
        weights, feedback = self.feedback_pairs()
        torch._foreach_mul_(feedback, 1.0 - self._kp_lr * self.kp_decay)
        torch._foreach_add_(feedback, weights)
        self._kp_lr = None

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls callbacks (the alignment probe) first, then this hook.
        super().on_before_optimizer_step(optimizer)
        self.kp_before_step(optimizer)

    def after_step(self) -> None:
        super().after_step()
        self.kp_after_step()


@RULES.register("wm")
class WeightMirrors(_LearnedFeedback):
    """Weight mirrors (Akrout et al. 2019 §4): in a mirror phase each layer is driven by white
    noise x ~ N(0, I); its output is y = W x (bias left out: it is uncorrelated with x) and B
    learns from the correlation y xᵀ, whose expectation is W. Each mirror phase (every
    ``mirror_every`` steps, after the optimizer step) updates

        B ← (1 − α) B + α · Ŵ,   Ŵ = y xᵀ / n   (n = ``mirror_batch`` noise samples),

    Akrout et al.'s ΔB = η y xᵀ − λB with ησ² = λ = α = ``mirror_rate``, so B → W in expectation.
    For a convolution the noise is an image of m × m output positions (``mirror_size`` = m)
    convolved *without padding*, so every kernel offset sees the same number of input pixels and
    Ŵ = conv2d_weight(x, y) / (n·m²) is unbiased. A locally-connected layer is a dense layer
    W_l per output position l, so each position is mirrored as one: its own white-noise patches
    x_l (n × C_in·k·k), y_l = W_l x_l, Ŵ_l = y_l x_lᵀ / n (independent patches, where the patches
    of one noise image would overlap and meet the zero padding at the border, which biases Ŵ_l).
    Noise comes from one generator seeded with
    ``seed + 104729`` on every rank (DDP-identical); its state is checkpointed.
    """

    MIRROR_SEED_OFFSET = 104729

    def setup_rule(self) -> None:
        super().setup_rule()
        a: WMOptions = self.opts
        self.mirror_every, self.mirror_batch = a.mirror_every, a.mirror_batch
        self.mirror_rate, self.mirror_size = a.mirror_rate, a.mirror_size
        self.mirror_noise = self.add_noise_stream("mirror", SharedNoise(int(self.cfg.seed) + self.MIRROR_SEED_OFFSET))
        self._mirror_steps = 0

    @torch.no_grad()
    def mirror(self) -> None:
        """One mirror phase over every converted layer."""
        n, m, alpha = self.mirror_batch, self.mirror_size, self.mirror_rate
        for layer in self.layers.values():
            w, b = layer.weight, layer.feedback
            gen = self.mirror_noise.generator(w.device)
            if w.ndim == 2:
                x = torch.randn(n, w.shape[1], generator=gen, device=w.device, dtype=w.dtype)
                estimate = F.linear(x, w).t().mm(x).div_(n)
            elif isinstance(layer, FALocallyConnected2d):  # w: (positions, C_out, K)
                x = torch.randn(w.shape[0], n, w.shape[2], generator=gen, device=w.device, dtype=w.dtype)
                estimate = torch.bmm(torch.bmm(x, w.transpose(1, 2)).transpose(1, 2), x).div_(n)
            else:
                (kh, kw), (sh, sw), (dh, dw) = w.shape[2:], layer.stride, layer.dilation
                size = (dh * (kh - 1) + 1 + sh * (m - 1), dw * (kw - 1) + 1 + sw * (m - 1))
                x = torch.randn(n, w.shape[1] * layer.groups, *size, generator=gen, device=w.device, dtype=w.dtype)
                y = F.conv2d(x, w, None, layer.stride, 0, layer.dilation, layer.groups)
                estimate = torch.nn.grad.conv2d_weight(x, w.shape, y, layer.stride, 0, layer.dilation, layer.groups)
                estimate.div_(n * y.shape[2] * y.shape[3])
            b.mul_(1.0 - alpha).add_(estimate, alpha=alpha)

    def after_step(self) -> None:
        super().after_step()
        self._mirror_steps += 1
        if self.mirror_every > 0 and self._mirror_steps % self.mirror_every == 0:
            self.mirror()

    # The mirror stream is checkpointed by the base class (add_noise_stream); the phase counter here.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mirror"] = {"steps": self._mirror_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._mirror_steps = int((checkpoint.get("mirror") or {}).get("steps", 0))
