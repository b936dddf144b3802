"""PEPITA: two forward passes, the second on an error-modulated input, and no backward pass.

Dellaferrera & Kreiman 2022, "Error-driven input modulation: solving the credit assignment problem
without a backward pass" (ICML 2022, arXiv:2201.11665), with the options of Srinivasan, Mignacco,
Sorbaro, Refinetti, Cooper, Kreiman & Dellaferrera 2023, "Forward learning with top-down feedback:
empirical and analytical characterization" (arXiv:2302.05440). Values are read from the authors'
code: ``GiorgiaD/PEPITA`` (``main_pytorch.py``, ``models.py``) and ``ravifrancesco/PEPITA``
(``pepita/models/FCnet.py``, ``FCNetMirror.py``, ``layers/Normalization.py``).

Per step, with e = softmax(ŷ) − y* (one row per sample):

1. first pass on x: activities h_l, output ŷ, error e;
2. second pass on x^err = x − F e, F a fixed d_in × classes matrix drawn uniform in
   ±0.05·√(6/d_in) (GiorgiaD ``main_pytorch.py``: ``(rand·2·sd − sd)·Bstd``, sd = √(6/d_in),
   Bstd = 0.05). Their code adds F e; F is symmetric in distribution, so the sign only flips F;
   the papers write x − F e, as here. The same dropout masks in both passes (the step's RNG
   state is replayed), and norm layers' running statistics updated once;
3. updates, as ``.grad`` (the optimiser subtracts them), divided by the batch like the authors'
   ``delta_w / batch_size``:
       ΔW_1 = (h_1 − h_1^err) ⊗ x^err,   ΔW_l = (h_l − h_l^err) ⊗ h_{l−1}^err,
       ΔW_L = e^err ⊗ h_{L−1}^err  (``output_error: modulated``, the default)
   where h_{l−1}^err is what layer l actually received in the second pass (after dropout).
   The last layer: GiorgiaD ``main_pytorch.py`` uses the *modulated* error
   (``delta_w = -mod_error.T @ mod_layers_act[-2]``), the original PEPITA, so that is the default;
   Srinivasan et al.'s ``FCnet.py`` uses the first-pass error e (``dwl = e.T @ ...``), available
   as ``output_error: first``. Biases (absent in the authors' nets, present in the zoo MLP) get
   the same rule with a constant input of 1: Δb_l = Σ_b (h_l − h_l^err).

Srinivasan et al.'s options:

* ``weight_mirror``: F = B_1 B_2 … B_L, one matrix per layer (d_in × n_1, …, n_{L−1} × classes),
  each moved towards its forward layer by weight mirroring (FCNetMirror.py): with noise
  x_n = σ·N(0, 1), mean-subtracted, B_l ← (1 − λ)B_l + η x_nᵀ φ_l(W_l x_n)/batch after every step
  (φ_l the layer's nonlinearity, softmax for the last), η = 0.1, λ = 0.5 (FCNetMirror's defaults),
  σ = 0.1. Initial std of each B_l: (0.05·√(2/d_in)/√(Π inner widths))^{1/L}, FCNetMirror's formula
  for L = 2, so that the product has the original F's scale.
* ``normalize_activity``: every hidden activity is divided by its Frobenius norm over the batch,
  X/‖X‖ (``layers/Normalization.py``), in both passes and at evaluation (it is part of the net).

MLP only, as in the paper ("does not yet apply to convolutional networks", GrAPE §4.1): any other
model is refused in one line when the config is composed.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.deliver import GradSlots, backward_is_watched, deliver
from bench.feedback.forward_gradient import preserved_norm_stats
from bench.feedback.noise import SharedNoise
from bench.options import AlgorithmOptions, ClassVar, ConfigError, Literal, opt
from bench.feedback.restore import replaying, rng_state

SUPPORTED_MODELS = ("mlp",)


class PEPITAOptions(AlgorithmOptions):
    names: ClassVar[tuple[str, ...]] = ("pepita",)

    feedback_scale: float = opt(0.05, "F ~ U(±s·√(6/d_in)) (GiorgiaD/PEPITA Bstd = 0.05)", gt=0)
    output_error: Literal["modulated", "first"] = opt(
        "modulated", "last layer's error: modulated = second pass (Dellaferrera & Kreiman) | first = first pass (Srinivasan et al.)")
    weight_mirror: bool = opt(False, "F = Π B_l with weight-mirrored B_l (Srinivasan et al. 2023)")
    mirror_lr: float = opt(0.1, "weight mirroring: learning rate η", ge=0)
    mirror_decay: float = opt(0.5, "weight mirroring: decay λ of B_l per step", ge=0, le=1)
    mirror_noise: float = opt(0.1, "weight mirroring: std σ of the noise input", gt=0)
    normalize_activity: bool = opt(False, "divide every hidden activity by its norm over the batch (Srinivasan et al. 2023)")

    def check(self, cfg: Any) -> None:
        model, supported = str(cfg.model.name), ("mlp",)  # SUPPORTED_MODELS (the scanned body sees only literals)
        if model not in supported:
            raise ConfigError(f"algorithm.name=pepita is not supported on model.name={model}: PEPITA is defined for "
                              f"fully connected nets only (valid choices: {', '.join(supported)})")


@RULES.register("pepita")
class PEPITA(AlgorithmModule):
    MIRROR_SEED = 15485863

    def setup_rule(self) -> None:
        a: PEPITAOptions = self.opts
        name = str(self.cfg.model.name)
        if name not in SUPPORTED_MODELS or not hasattr(self.model, "net"):
            raise ValueError(f"pepita: model {name} is not supported (PEPITA is defined for fully connected nets only)")
        self.linears = [m for m in self.model.net if isinstance(m, nn.Linear)]
        modules = dict(self.model.named_modules())
        self.acts = [modules[p] for p in self.model.feedback_points("micro")]
        if len(self.acts) != len(self.linears) - 1:
            raise ValueError(f"pepita: model {name} does not have one activation per hidden layer")
        d_in, classes = self.linears[0].in_features, self.linears[-1].out_features
        gen = torch.Generator().manual_seed(int(self.cfg.seed) + 1)
        if a.weight_mirror:
            widths = [d_in] + [l.out_features for l in self.linears]
            inner = math.prod(widths[1:-1])
            std = (a.feedback_scale * math.sqrt(2.0 / d_in) / math.sqrt(inner)) ** (1.0 / len(self.linears))
            for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
                self.register_buffer(f"mirror_{i}", torch.randn(n_in, n_out, generator=gen) * std)
            self.mirror_stream = self.add_noise_stream("mirror", SharedNoise(int(self.cfg.seed) + self.MIRROR_SEED))
        else:
            bound = a.feedback_scale * math.sqrt(6.0 / d_in)
            self.register_buffer("input_feedback", (torch.rand(d_in, classes, generator=gen) * 2 - 1) * bound)
        self._grad_slots = GradSlots()
        self._recording = False
        self._inputs: list[torch.Tensor] = []
        self._acts: list[torch.Tensor] = []
        # Where the second pass may start after the first Linear (nothing random between the input
        # and it, e.g. no input dropout): see :meth:`_modulated_pass`.
        net = list(self.model.net)
        first = net.index(self.linears[0])
        self._resume_at = first + 1 if all(isinstance(m, nn.Flatten) for m in net[:first]) else None
        for layer in self.linears:
            layer.register_forward_pre_hook(self._record_input)
        self._first_out: torch.Tensor | None = None  # the first Linear's output of the recorded pass
        self.linears[0].register_forward_hook(self._record_first_output)
        for act in self.acts:
            act.register_forward_hook(self._record_activity)

    def _record_first_output(self, module, inputs, output):
        if self._recording:
            self._first_out = output

    def _record_input(self, module, inputs):
        if self._recording:
            self._inputs.append(inputs[0])

    def _record_activity(self, module, inputs, output):
        if self.opts.normalize_activity:
            output = output / output.norm().clamp_min(1e-12)
        if self._recording:
            self._acts.append(output)
        return output if self.opts.normalize_activity else None

    def input_feedback_matrix(self) -> torch.Tensor:
        """F (d_in × classes)."""
        if not self.opts.weight_mirror:
            return self.input_feedback
        f = self.mirror_0
        for i in range(1, len(self.linears)):
            f = f.mm(getattr(self, f"mirror_{i}"))
        return f

    def _pass(self, x: torch.Tensor):
        self._inputs, self._acts = [], []
        self._recording = True
        try:
            logits = self.model(x)
        finally:
            self._recording = False
        return logits, self._inputs, self._acts

    def _modulated_pass(self, x_err: torch.Tensor, e: torch.Tensor, first_out: torch.Tensor):
        """The second pass. Its first layer is linear in the input, so W_1 x^err + b_1 =
        (W_1 x + b_1) − (W_1 F) e: the first pass's pre-activation minus a product over the classes,
        instead of a product over the input dimension (the largest of the MLP). Equal to running the
        net on x^err up to float rounding (tests/test_pepita.py); the rest of the net runs as usual."""
        if self._resume_at is None:
            return self._pass(x_err)
        w1 = self.linears[0].weight
        # (W_1 F)ᵀ as Fᵀ W_1ᵀ: the classes-wide operand first is the faster product (architecture M4)
        a1 = torch.addmm(first_out, e, self.input_feedback_matrix().to(w1.dtype).t().mm(w1.t()), alpha=-1)
        self._inputs, self._acts = [x_err.reshape(x_err.shape[0], -1)], []
        self._recording = True
        try:
            out = a1
            for module in list(self.model.net)[self._resume_at:]:
                out = module(out)
        finally:
            self._recording = False
        return out, self._inputs, self._acts

    def updated_parameters(self) -> list[torch.Tensor]:
        """Every Linear's weight, then its bias when it has one, in layer order."""
        return [p for layer in self.linears for p in (layer.weight, layer.bias) if p is not None]

    @torch.no_grad()
    def updates(self, x: torch.Tensor, y: torch.Tensor, slots: list[tuple[torch.Tensor, bool]] | None = None):
        """(logits, loss, [(ΔW_l, Δb_l)] per Linear) of one PEPITA step on (x, y), nothing applied.

        ``slots`` (one ``(tensor, accumulate)`` per tensor of :meth:`updated_parameters`, from
        :class:`~bench.feedback.deliver.GradSlots`) makes each update land in that tensor, added to
        it when ``accumulate``, instead of in a new one."""
        rng = rng_state(x.device)
        with (self.tap.settings(capture=False) if self.tap is not None else torch.no_grad()):
            logits, _, h = self._pass(x)
            first_out, self._first_out = self._first_out, None
            loss = self.loss_fn(logits, y)
            onehot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
            e = torch.softmax(logits, -1).sub_(onehot)
            x_err = x - e.mm(self.input_feedback_matrix().t()).reshape_as(x)
            with replaying(rng, x.device), preserved_norm_stats(self.model):  # the same dropout masks in both passes
                logits_err, inputs_err, h_err = self._modulated_pass(x_err, e, first_out)
        e_err = torch.softmax(logits_err, -1).sub_(onehot)
        out_error = e_err if self.opts.output_error == "modulated" else e
        n = x.shape[0]
        # h_l − h_l^err in place: the first pass's activities are not needed after this
        deltas = [a.sub_(b).reshape(n, -1) for a, b in zip(h, h_err)] + [out_error]
        slot = iter(slots) if slots is not None else None
        result = []
        for layer, d, inp in zip(self.linears, deltas, inputs_err):
            inp = inp.reshape(n, -1)
            if slot is None:
                # 1/n rides in the product (addmm's alpha), not in a pass over either operand
                dw = torch.addmm(x.new_zeros(()), d.t(), inp, beta=0, alpha=1.0 / n)
                db = d.sum(0).div_(n) if layer.bias is not None else None
            else:
                dw, accumulate = next(slot)
                dw.addmm_(d.t(), inp, beta=1.0 if accumulate else 0.0, alpha=1.0 / n)
                db = None
                if layer.bias is not None:
                    db, accumulate = next(slot)
                    if accumulate:
                        db.add_(d.sum(0), alpha=1.0 / n)
                    else:
                        torch.sum(d, 0, out=db).div_(n)
            result.append((dw, db))
        return logits, loss, result

    def objective(self, x, y):
        """The updates reach ``.grad`` without a backward pass of the weights (PEPITA has none):
        written in place through :class:`~bench.feedback.deliver.GradSlots`, or, when DDP's hooks or
        fp16 loss scaling watch the backward, through :func:`bench.feedback.deliver.deliver`."""
        params = self.updated_parameters()
        if not backward_is_watched(self._trainer):
            slots = self._grad_slots.slots(params)
            logits, loss, _ = self.updates(x, y, slots)
            self._grad_slots.install(params, slots)
            return logits.new_zeros((), requires_grad=True), logits, loss
        logits, loss, updates = self.updates(x, y)
        grads = [g for dw, db in updates for g in (dw, db) if g is not None]
        return deliver(grads, params, self._trainer, logits), logits, loss

    @torch.no_grad()
    def after_step(self) -> None:
        a: PEPITAOptions = self.opts
        if not a.weight_mirror:
            return
        n = int(getattr(self, "_last_batch", 64))
        for i, layer in enumerate(self.linears):
            w = layer.weight
            gen = self.mirror_stream.generator(w.device)
            xn = a.mirror_noise * torch.randn(n, w.shape[1], generator=gen, device=w.device, dtype=w.dtype)
            xn = xn - xn.mean()
            yn = F.linear(xn, w)
            yn = self.acts[i](yn) if i < len(self.acts) else torch.softmax(yn, -1)
            b = getattr(self, f"mirror_{i}")
            b.mul_(1.0 - a.mirror_decay).add_(xn.t().mm(yn) / n, alpha=a.mirror_lr)

    def training_step(self, batch, batch_idx):
        self._last_batch = int(batch[0].shape[0])
        return super().training_step(batch, batch_idx)
