"""Equilibrium propagation (EP) — Scellier & Bengio, *Equilibrium propagation: bridging the gap
between energy-based models and backpropagation*, Frontiers in Computational Neuroscience 11:24
(2017); the E-Prop row of rlra Table 1.

The zoo MLP is read as a layered continuous Hopfield network: units s = (s_1 … s_L) (hidden
layers, then the output layer s_L), the input s_0 = x clamped, and layer ℓ's ``nn.Linear``
(W_ℓ, b_ℓ) is the symmetric coupling between layers ℓ−1 and ℓ plus layer ℓ's bias. Its energy
(paper §2, the continuous Hopfield energy restricted to the layered graph) and cost are

    E(s)   = ½ Σ_{ℓ≥1} ‖s_ℓ‖² − Σ_{ℓ≥1} ρ(s_ℓ)ᵀ W_ℓ ρ(s_{ℓ−1}) − Σ_{ℓ≥1} b_ℓᵀ ρ(s_ℓ),   ρ(s) = clip(s, 0, 1)
    C(s)   = ½ ‖s_L − y‖²                        (y one-hot)
    F(s)   = E(s) + β C(s)                        (total energy)

with the hard sigmoid ρ of the paper (§5). One training step:

1. free phase: s ← clip(s − ε ∂E/∂s, 0, 1), ``n_free`` times from s = 0 → the free fixed
   point s⁰ (the prediction is argmax s⁰_L);
2. nudged ("weakly clamped") phase: s ← clip(s − ε ∂F/∂s, 0, 1), ``n_nudged`` times from s⁰
   → s^β;
3. update (§2):  ΔW_ℓ ∝ (1/β) (ρ(s^β_ℓ) ρ(s^β_{ℓ−1})ᵀ − ρ(s⁰_ℓ) ρ(s⁰_{ℓ−1})ᵀ),
   Δb_ℓ ∝ (1/β) (ρ(s^β_ℓ) − ρ(s⁰_ℓ)).

Theorem 1 of the paper (§3): as β → 0 this is −∂/∂θ C(s⁰(θ)), the gradient of the cost at the free
fixed point. The states are projected onto [0, 1] after each step (the authors' code:
``T.clip(layer + epsilon*dot, 0, 1)``), so ρ(s) = s on every state and the step is
s_ℓ ← clip((1 − ε) s_ℓ + ε (W_ℓ s_{ℓ−1} + b_ℓ + W_{ℓ+1}ᵀ s_{ℓ+1}) [+ εβ (y − s_L) at the output]),
i.e. ∂E/∂s_ℓ in closed form with ρ′ = 1 on the closed box (Theano's ``clip`` derivative at the
bounds, see :func:`rho`). All layers update synchronously from the previous state,
vectorised over the batch; the input's term W_1 ρ(x) + b_1 is computed once per phase.
:meth:`state_grad` gives ∂F/∂s by ``torch.func.grad`` of the energy, for checks and diagnostics.
A fixed point is a stationary point of the box-constrained problem: s = clip(s − ∂F/∂s, 0, 1)
(∂F/∂s = 0 on unsaturated units only).

Option (``random_sign``): the sign of β is drawn at random (±1, equal odds) every step, as in the
authors' training script (bscellier/Towards-a-Biologically-Plausible-Backprop, ``train_model.py``:
"choose the sign of beta at random"). The estimate's leading bias is odd in β, so it cancels on
average over the two signs.

How the update reaches ``.grad`` (docs/architecture.md, "The .grad contract"): the surrogate is the paper's own expression,

    S = (1/β) · mean_batch [ E_θ(stopgrad s^β) − E_θ(stopgrad s⁰) ],

whose gradient with respect to (W_ℓ, b_ℓ) is exactly −ΔW_ℓ, −Δb_ℓ of step 3, batch-averaged like
every rule's loss (so DDP's mean over ranks is the mean over the global batch), and the configured
optimizer steps it (Adam in rlra-1; the paper uses plain SGD with per-layer rates).

Model mapping: the zoo MLP supplies the Linear layers only. Its activation modules are *not*
used (every EP unit uses ρ = hard sigmoid), so ``model.activation`` does not affect this rule;
batch norm and dropout have no place in the energy and are refused (:class:`ConfigError`), as
is any model that is not a plain ``Flatten → [Linear → φ]* → Linear`` MLP. The input enters as
ρ(x): pixels in [0, 1] (``data.normalize: none``, rlra-1's protocol) pass unchanged.

Evaluation: :meth:`predict` runs the free phase; the metrics' "logits" are the settled output
states s⁰_L, and :meth:`loss_fn` is the cost C (batch mean), the quantity EP descends.

What "BP gradient" means for EP (alignment probe): the true gradient of the reported loss, i.e.
∂C(s⁰_L)/∂θ where s⁰ is produced by the same ``n_free`` projected steps from s = 0 —
backpropagation through time through the free phase (recurrent backprop; Ernoult et al. 2019
show EP's updates match it). :meth:`true_gradient` swaps the model's forward for that
differentiable settle, so the probe's ``model(x)`` + ``loss_fn`` + autograd give it on the same
weights. Update angles and norm ratios are reported for every W_ℓ; there are no teaching-signal
angles (no feed-forward point activations exist in a settled network).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.noise import SharedNoise
from bench.models.structure import structure_of
from bench.options import AlgorithmOptions, ClassVar, ConfigError, opt


class EPropOptions(AlgorithmOptions):
    names: ClassVar[tuple[str, ...]] = ("eprop",)

    # The authors' value for their 2- and 3-hidden-layer nets (0.5 for 1 hidden layer;
    # bscellier/Towards-a-Biologically-Plausible-Backprop, train_model.py); rlra-1's net is deeper.
    beta: float = opt(1.0, "nudging strength β (nonzero: the update divides by β)")
    # As the authors' training script does for every net ("choose the sign of beta at random"): the
    # estimate's O(β) bias is odd in β, so it cancels on average.
    random_sign: bool = opt(True, "draw β's sign at random (±1) every step")
    epsilon: float = opt(0.5, "step size ε of the relaxation (the paper's value for every net)", gt=0, le=1)
    # The authors use 20 / 150 / 500 for 1 / 2 / 3 hidden layers, but start each free phase from
    # "persistent particles" (the example's state at the previous epoch), which needs a per-example
    # index our batches do not carry and which validation/test could not use. Measured on the
    # rlra-1 net (5×256, σ = 0.05) at init, FMNIST batch of 256: mean |s − clip(s − ∂E/∂s)| is
    # 1.3e-3 after 100 steps (5.7e-4 after 200, 1.7e-4 after 500), the energy within 0.7 % of its
    # 500-step value. 100 is the compromise a 2-core CPU affords.
    n_free: int = opt(100, "free-phase relaxation steps from s = 0", ge=1)
    # The authors use 4 / 6 / 8 for 1 / 2 / 3 hidden layers (two more per layer, enough for the
    # nudge to reach the first layer at ε = 0.5); 5 hidden layers → 12.
    n_nudged: int = opt(12, "nudged-phase relaxation steps", ge=1)
    # Laborieux, Ernoult, Scellier, Bengio, Grollier & Querlioz, "Scaling equilibrium propagation to
    # deep ConvNets by drastically reducing its gradient estimator bias" (Frontiers in Neuroscience
    # 2021, arXiv:2006.03824), Eq. 7: nudge by +β and by −β from s⁰ and difference the two. The
    # O(β) bias cancels exactly (not only on average, as random_sign does), and so does any drift
    # of an unconverged free phase, which is the same in both nudged phases.
    nudging: Literal["one_sided", "symmetric"] = opt(
        "one_sided", "one_sided: s^β − s⁰ (Scellier & Bengio); symmetric: (s^β − s^−β)/2 (Laborieux et al. 2021)")
    # zero is the paper's start. feedforward starts the free phase from the clipped feed-forward
    # pass s_ℓ = clip(W_ℓ s_{ℓ−1} + b_ℓ, 0, 1), which is the fixed point when the top-down terms
    # vanish, so fewer relaxation steps reach a given residual (O'Connor, Gavves & Welling 2019,
    # "Initialized equilibrium propagation for backprop-free training", learn a separate network for
    # this; here it is the same weights, which costs one forward pass).
    free_init: Literal["zero", "feedforward"] = opt("zero", "the free phase's starting state")

    def check(self, cfg) -> None:
        if self.beta == 0.0:
            raise ConfigError("algorithm.beta=0.0 is not valid; expected a nonzero float (the update divides by β)")


def rho(s: torch.Tensor) -> torch.Tensor:
    """Hard sigmoid ρ(s) = 0 ∨ s ∧ 1 (paper §5), with ρ′ = 1 on the *closed* box [0, 1].

    That is Theano's ``clip`` derivative, which the authors' code relies on: with torch's
    ``clamp`` (ρ′ = 0 at 0 and 1) a unit resting at 0 would feel no drive and never leave it.
    """
    return torch.where((s >= 0) & (s <= 1), s, torch.clamp(s, 0.0, 1.0))


def parse_linears(model: nn.Module, model_name: str) -> tuple[list[nn.Module], list[nn.Linear]]:
    """The zoo MLP's input steps (Flatten) and its Linear layers W_1 … W_L, read from the model's
    structure view (``model.structure().chain()``); refuse anything else."""
    unsupported = ConfigError(f"algorithm eprop: model {model_name!r} is not supported; equilibrium propagation "
                              f"runs on a layered energy built from the zoo's mlp (model.name=mlp)")
    try:
        pre, blocks = structure_of(model).chain()
    except ValueError:
        raise unsupported from None
    for step in [*pre, *(s for b in blocks for s in b.steps)]:
        if step.role in ("norm", "dropout"):
            raise ConfigError(f"algorithm eprop: the Hopfield energy has no place for {type(step.fn).__name__}; "
                              f"use model.batchnorm=false, model.dropout=0.0 and model.input_dropout=0.0")
        if step.role == "layer" and not isinstance(step.fn, nn.Linear):
            raise unsupported
        if step.role not in ("layer", "act", "flatten"):  # pooling, shortcuts, other functions
            raise ConfigError(f"algorithm eprop: model {model_name!r} has {step.name} ({step.role}); "
                              f"only the zoo's plain mlp is supported")
    # each block's φ module is not used: EP's units use ρ instead
    linears = [b.layer for b in blocks]
    if not linears:
        raise ConfigError(f"algorithm eprop: model {model_name!r} has no Linear layers")
    return [s.fn for s in pre], linears


@RULES.register("eprop")
class EquilibriumPropagation(AlgorithmModule):
    """Equilibrium propagation on the zoo MLP read as a layered Hopfield energy (module docstring)."""

    SIGN_SEED_OFFSET = 15485863  # β's sign stream: its own seed, never shared with another rule's noise

    def setup_rule(self) -> None:
        a: EPropOptions = self.opts
        self.pre, self.linears = parse_linears(self.model, str(self.cfg.model.name))
        self.beta, self.epsilon = a.beta, a.epsilon
        self.n_free, self.n_nudged = a.n_free, a.n_nudged
        self.random_sign = a.random_sign
        self.nudging, self.free_init = a.nudging, a.free_init
        # Not the global RNG: its state after Lightning's setup differs between a DDP run and a
        # single-process one (tests/test_ddp.py failed with it), and a resumed run must continue
        # the stream (bench/feedback/noise.py).
        self.sign_stream = self.add_noise_stream("ep_sign", SharedNoise(int(self.cfg.seed) + self.SIGN_SEED_OFFSET))

    # ------------------------------------------------------------------ energy model
    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.pre:
            x = m(x)
        return x

    def zero_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_zeros(x.shape[0], lin.out_features) for lin in self.linears]

    def energy(self, x: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """E(s) per sample (shape B), through the model's own Linear modules (so it carries a graph
        to W_ℓ, b_ℓ when they require grad): ½Σ‖s_ℓ‖² − Σ ρ(s_ℓ)ᵀ(W_ℓ ρ(s_{ℓ−1}) + b_ℓ)."""
        below = rho(x)
        total = x.new_zeros(x.shape[0])
        for lin, s in zip(self.linears, states):
            r = rho(s)
            total = total + 0.5 * (s * s).sum(-1) - (r * lin(below)).sum(-1)
            below = r
        return total

    def cost(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """C = ½‖s_L − y‖² per sample, y one-hot."""
        return 0.5 * (out - F.one_hot(y, out.shape[-1]).to(out.dtype)).pow(2).sum(-1)

    def state_grad(self, x: torch.Tensor, states: list[torch.Tensor], beta: float = 0.0,
                   y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """∂F/∂s (F = E + βC) per sample, by ``torch.func.grad`` of the summed energy."""
        def total(ss):
            value = self.energy(x, ss)
            if beta:
                value = value + beta * self.cost(ss[-1], y)
            return value.sum()

        return [g.detach() for g in torch.func.grad(total)([s.detach() for s in states])]

    def settle(self, x: torch.Tensor, states: list[torch.Tensor], steps: int, beta: float = 0.0,
               target: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``steps`` projected gradient steps s ← clip(s − ε ∂F/∂s, 0, 1), all layers at once.

        Differentiable in W, b and x when autograd records (the probe's BPTT); under no_grad it
        is the plain relaxation. ∂E/∂s_ℓ = s_ℓ − (W_ℓ s_{ℓ−1} + b_ℓ + W_{ℓ+1}ᵀ s_{ℓ+1}) on the
        box (ρ(s) = s, ρ′ = 1), and β∂C/∂s_L = β (s_L − y).
        """
        eps, L = self.epsilon, len(self.linears)
        weights = [lin.weight for lin in self.linears]
        # The clamped input's drive on layer 1 does not change during a phase.
        bottom = self.linears[0](rho(x))
        s = list(states)
        for _ in range(steps):
            drives = []
            for l in range(L):
                d = bottom if l == 0 else self.linears[l](s[l - 1])
                if l + 1 < L:
                    d = d + s[l + 1] @ weights[l + 1]
                drives.append(d)
            if beta:
                drives[-1] = drives[-1] + beta * (target - s[-1])
            # Under autocast (bf16-mixed) the Linear drives come out in bf16 while the states stay in
            # their own dtype: the relaxation keeps the states' precision (make gpu-check found it).
            s = [torch.clamp(torch.lerp(sl, d.to(sl.dtype), eps), 0.0, 1.0) for sl, d in zip(s, drives)]
        return s

    def feedforward_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s_ℓ = clip(W_ℓ s_{ℓ−1} + b_ℓ, 0, 1) from s_0 = ρ(x): the fixed point without top-down terms."""
        states, below = [], rho(x)
        for lin in self.linears:
            below = torch.clamp(lin(below), 0.0, 1.0)
            states.append(below)
        return states

    def free_phase(self, x: torch.Tensor) -> list[torch.Tensor]:
        start = self.feedforward_states(x) if self.free_init == "feedforward" else self.zero_states(x)
        return self.settle(x, start, self.n_free)

    # ------------------------------------------------------------------ one step
    def ep_beta(self) -> float:
        """β for this step: ±β with equal odds under ``random_sign``, drawn on the host from a
        stream every DDP rank draws identically (no device sync)."""
        if not self.random_sign:
            return self.beta
        heads = bool(torch.randint(0, 2, (), generator=self.sign_stream.generator(torch.device("cpu"))))
        return self.beta if heads else -self.beta

    def phases(self, x: torch.Tensor, y: torch.Tensor, beta: float):
        """(s⁰, s^β, reference): the free fixed point, the nudged one reached from it, and the state
        the update differences against — s⁰ (one-sided) or s^−β (symmetric). No graph."""
        with torch.no_grad():
            free = self.free_phase(x)
            target = F.one_hot(y, free[-1].shape[-1]).to(free[-1].dtype)
            nudged = self.settle(x, free, self.n_nudged, beta, target)
            reference = self.settle(x, free, self.n_nudged, -beta, target) if self.nudging == "symmetric" else free
        return free, nudged, reference

    def objective(self, x, y):
        x = self.flatten(x)
        beta = self.ep_beta()
        free, nudged, reference = self.phases(x, y, beta)
        # ∂S/∂θ = (1/β)(∂E/∂θ(s^β) − ∂E/∂θ(s⁰)) = −(1/β)(ρ(s^β_ℓ)ρ(s^β_{ℓ−1})ᵀ − ρ(s⁰_ℓ)ρ(s⁰_{ℓ−1})ᵀ);
        # symmetric: the reference is s^−β and the distance between the two nudges is 2β.
        span = 2 * beta if self.nudging == "symmetric" else beta
        surrogate = (self.energy(x, nudged) - self.energy(x, reference)).mean() / span
        logits = free[-1]
        # The loss does not enter the surrogate: it is returned for metrics and the divergence guard.
        return surrogate, logits, self.loss_fn(logits, y)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cost C = ½‖s_L − y‖² averaged over the batch (the paper's objective, not CE)."""
        return self.cost(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).mean()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The free phase's settled output states s⁰_L (the paper classifies by their argmax)."""
        x = self.flatten(x)
        with torch.no_grad():
            return self.free_phase(x)[-1]

    def _settled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The free phase with autograd recording: ``model(x)`` inside :meth:`true_gradient`."""
        x = self.flatten(x)
        with torch.enable_grad():
            return self.free_phase(x)[-1]

    @contextmanager
    def true_gradient(self):
        # The reference gradient is ∂C(s⁰_L)/∂θ by BPTT through the free phase: the model's
        # forward becomes that settle while the probe measures (an instance attribute shadows
        # the class's forward; deleting it restores the feed-forward MLP).
        self.model.forward = self._settled_forward
        try:
            yield
        finally:
            del self.model.forward
