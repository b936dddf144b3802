"""Target propagation (TP) and difference target propagation (DTP) with learned inverses.

Lee, Zhang, Fischer & Bengio, *Difference target propagation*, ECML-PKDD 2015 (Algorithm 1; the
authors' code ``conti_dtp.py``), and Bartunov, Santoro, Richards, Marris, Hinton & Lillicrap,
*Assessing the scalability of biologically-motivated deep learning algorithms and architectures*,
NeurIPS 2018 (§2.1.2, Eq. 2, Algorithm 1). The rlra paper (arXiv:2002.03911) quotes its "TP" rows from
Bartunov et al. (ref. [5]): Table 2's 28.69/39.47 and Table 5's 98.34/94.56 are their
"DTP, parallel" (CIFAR locally connected; ImageNet); Table 1's MNIST 0.00/1.86 is their 5×256
"AO-SDTP, alternating" cell, its FMNIST cell comes from Ororbia & Mali 2019 (ref. [41]).

For an MLP z_ℓ = f_ℓ(z_{ℓ-1}) = φ(W_ℓ z_{ℓ-1} + b_ℓ) (ℓ = 1…L−1, z_0 = x) with logits
h_L = W_L z_{L-1} + b_L, each layer ℓ ≥ 2 up to the top target layer T owns a learned inverse

    g_ℓ(s) = ψ(V_ℓ s + c_ℓ) ≈ f_ℓ⁻¹(s),   s = z_ℓ (or h_L for ℓ = L)     (Bartunov §2.1.2)

and one step is (all targets are constants, "stopgrad", for every loss below):

    first target     ẑ_T = s_T − η ∂ℓ_n/∂s_T                 (Lee Alg. 1; Bartunov: α)
      T = L−1 (``first_target: penultimate``, Lee's DTP: one layer of backprop from the loss)
      T = L   (``first_target: output``: the logits' own target, carried down by a learned g_L,
               so no gradient crosses W_L — Bartunov's SDTP with a gradient step for the label)
    TP               ẑ_{ℓ-1} = g_ℓ(ẑ_ℓ)                                          (Bartunov, "TP")
    DTP              ẑ_{ℓ-1} = z_{ℓ-1} + g_ℓ(ẑ_ℓ) − g_ℓ(z_ℓ)                      (Bartunov Eq. 2)
    inverse loss     L^inv_ℓ = ‖g_ℓ(f_ℓ(z_{ℓ-1} + ε)) − (z_{ℓ-1} + ε)‖²,  ε ~ N(0, σ²)
                     (noise-preserving, Lee's and Bartunov's DTP; ``denoising`` compares with
                     z_{ℓ-1}, Bartunov's SDTP appendix)                   — trains V_ℓ, c_ℓ only
    forward loss     L_ℓ = ‖f_ℓ(z_{ℓ-1}) − ẑ_ℓ‖² for ℓ < L on the detached input;  L_L = CE
                     (the output layer trains on the task loss: Lee Alg. 1, Bartunov Alg. 1)

with ‖·‖² summed over units and averaged over the batch (``mse`` of Lee's code), and ℓ_n the
loss of example n (η is a per-example step: Lee's code uses the batch-mean loss, so its α = 0.33
at batch 100 is η = 0.0033; defining η per example keeps the targets independent of the batch
size and of how DDP splits it). Forward and inverse losses are minimised in parallel, one step
each per batch (Bartunov's "parallel" schedule; Lee's code alternates whole epochs).

How the update reaches ``.grad`` (docs/architecture.md, "The .grad contract"): every layer runs on its detached input
and the surrogate S = CE + Σ_ℓ L_ℓ + λ_inv Σ_ℓ L^inv_ℓ is differentiated once; each term reaches
only its own layer's W_ℓ, b_ℓ or V_ℓ, c_ℓ. The inverses are this module's parameters
(``inverses``), so the configured optimizer steps them, checkpoints hold them and DDP all-reduces
them. The corruption noise comes from one rank-shared stream (bench.feedback.noise): every rank
draws the noise of the whole global batch and keeps its own slice, so DDP at batch b equals one
process at batch world·b, and the stream's state is checkpointed.

With exact inverses g_ℓ = f_ℓ⁻¹ the difference correction vanishes and DTP's targets are TP's:
ẑ_{ℓ-1} = f_ℓ⁻¹(ẑ_ℓ). As η → 0 the displacement becomes z_ℓ − ẑ_ℓ = η J_ℓ⁻¹ ∂ℓ/∂s_T with J_ℓ the
Jacobian ∂s_T/∂z_ℓ, where backprop has J_ℓᵀ ∂ℓ/∂s_T: DTP follows BP when the layer Jacobians are
close to orthogonal (Lee's orthogonal initialisation; Meulemans et al. 2020 call the general case
Gauss–Newton-like). tests/test_target_prop.py checks this limit.

Alignment probe: the model is never modified, so :meth:`true_gradient` has nothing to switch off.
The update angle is reported for every W_ℓ (the inverses have no backprop counterpart); the
output layer's update is backprop's. The teaching signal at each hidden feedback point is the
error unit e_ℓ = z_ℓ − ẑ_ℓ (DESIGN: "for target rules, the teaching signal is the error unit").
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from bench.algorithms.base import RULES, AlgorithmModule
from bench.algorithms.rlra import parse_stages
from bench.callbacks.probe import preserved_buffers
from bench.feedback.noise import SharedNoise
from bench.models.activations import make_activation
from bench.models.mlp import init_linear
from bench.options import ACTIVATIONS, WEIGHT_INITS, AlgorithmOptions, ClassVar, Literal, opt


class DTPOptions(AlgorithmOptions):
    """Defaults: Bartunov et al. 2018's best DTP-parallel setting for the 5×256 tanh MNIST MLP (their
    Table 5), the architecture of rlra-1, whose TP row quotes their DTP."""

    names: ClassVar[tuple[str, ...]] = ("dtp", "tp")

    # Per example, so batch- and DDP-independent. Lee's code: α = 0.328 on the batch-mean loss at
    # batch 100, i.e. η = 0.0033; Bartunov tunes α in [0.01, 0.2] on the batch mean, batch size not
    # given. On the rlra-1 FMNIST smoke run (10,000 images, 1 epoch) η = 0.005 and 0.05 gave 26.18 %
    # and 26.14 % test error.
    target_lr: float = opt(0.005, "η of the first target ẑ = z − η ∂ℓ_n/∂z, per example", gt=0)
    # Bartunov's best for DTP-parallel, MNIST FC (0.361), Lee's code 0.360.
    noise: float = opt(0.36, "σ of the corruption ε ~ N(0, σ²) that trains the inverses", ge=0)
    # Bartunov's best DTP-parallel MNIST FC run had inverse lr ≈ forward lr (7.68e-4 vs 7.57e-4);
    # under Adam a constant λ_inv does not change the step, under SGD it scales it.
    inverse_weight: float = opt(1.0, "λ_inv on Σ L^inv_ℓ (the inverses share the optimizer and its lr)", ge=0)
    first_target: Literal["penultimate", "output"] = opt(
        "penultimate", "penultimate: ẑ_{L-1} from the loss gradient through W_L (Lee Alg. 1, Bartunov's DTP) | "
                       "output: ĥ_L = h_L − η ∂ℓ/∂h_L carried down by a learned g_L (Bartunov's SDTP, gradient step)")
    inverse_loss: Literal["preserving", "denoising"] = opt(
        "preserving", "preserving: ‖g(f(z+ε)) − (z+ε)‖² (Lee, Bartunov's DTP) | denoising: ‖g(f(z+ε)) − z‖² (SDTP)")
    inverse_activation: Literal[("same", *ACTIVATIONS)] = opt(
        "same", "ψ of g_ℓ(s) = ψ(V s + c): same = the model's hidden φ (Lee's code; Bartunov: σ_l) | an activation")
    inverse_init: Literal[WEIGHT_INITS] = opt("xavier", "init of the inverses (Bartunov: Glorot & Bengio)")
    inverse_sigma: float = opt(0.05, "σ for inverse_init: gaussian (the rlra-1 σ)", gt=0)


@RULES.register("dtp")
class DifferenceTargetProp(AlgorithmModule):
    """DTP (Lee et al. 2015; Bartunov et al. 2018 Eq. 2) on the zoo MLP; see the module docstring."""

    difference = True  # TP sets False: ẑ_{ℓ-1} = g_ℓ(ẑ_ℓ)
    NOISE_SEED_OFFSET = 6151
    INIT_SEED_OFFSET = 3

    def setup_rule(self) -> None:
        a: DTPOptions = self.opts
        try:
            self.pre, self.stages = parse_stages(self.model)
        except ValueError as exc:
            raise ValueError(f"{self.cfg.algorithm.name}: target propagation runs on the zoo's sequential mlp "
                             f"(learned inverses per Linear → φ layer); {type(self.model).__name__}: {exc}") from None
        L = len(self.stages)
        self.target_lr, self.noise_sigma, self.inverse_weight = a.target_lr, a.noise, a.inverse_weight
        first, inv_loss = a.first_target, a.inverse_loss
        self.denoising = inv_loss == "denoising"
        # T: the layer whose target comes from the loss gradient; inverses g_2 … g_T below it.
        self.top = L - 1 if first == "penultimate" else L
        if self.top < 1:
            raise ValueError("target propagation needs at least one hidden layer")
        act = a.inverse_activation
        if act == "same":  # ψ = the hidden layers' φ, so g_ℓ's output lies where z_{ℓ-1} does
            act = str(self.cfg.model.get("activation", "tanh"))
        init = a.inverse_init
        slope = float(self.cfg.model.get("slope", 0.01))
        sizes = {l: self.stages[l - 1].linear.out_features for l in range(1, L + 1)}
        inverses = {}
        # A private seed: the inverses are the same whatever else drew from the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.seed) + self.INIT_SEED_OFFSET)
            for l in range(2, self.top + 1):
                lin = nn.Linear(sizes[l], sizes[l - 1])
                init_linear(lin, init, float(a.inverse_sigma))
                inverses[str(l)] = nn.Sequential(lin, make_activation(act, slope))
        self.inverses = nn.ModuleDict(inverses)
        self.noise = self.add_noise_stream("tp_noise", SharedNoise(int(self.cfg.seed) + self.NOISE_SEED_OFFSET))
        self.points = [s.act_name for s in self.stages[:-1]]
        self._stateful_norms = any(len(list(n.buffers())) for s in self.stages for n in s.norms)

    def inverse(self, l: int) -> nn.Module:
        """g_ℓ: the state of layer ℓ (z_ℓ, or the logits for ℓ = L) → z_{ℓ-1}."""
        return self.inverses[str(l)]

    # ------------------------------------------------------------------ one step
    def stage_forward(self, l: int, z: torch.Tensor) -> torch.Tensor:
        """f_ℓ without the dropout after it: φ(norm(W_ℓ z + b_ℓ)), or the logits for ℓ = L."""
        s = self.stages[l - 1]
        h = s.linear(z)
        for norm in s.norms:
            h = norm(h)
        return h if s.act is None else s.act(h)

    def forward_layers(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the model layer by layer on detached inputs: [(z_{ℓ-1}, s_ℓ)], s_ℓ = z_ℓ or logits.

        s_ℓ carries a graph to W_ℓ, b_ℓ (through φ: the local loss trains through the layer's own
        nonlinearity) and nothing below. The same modules run in the same order as ``model(x)``,
        so dropout masks match a replay of the step (the probe's BP pass). The last layer's input
        is a leaf that requires grad when the first target is the penultimate layer's, so the
        per-example gradient ∂ℓ_n/∂z_{L-1} is one backward through W_L.
        """
        z = x
        for m in self.pre:
            z = m(z)
        layers, L = [], len(self.stages)
        for l, s in enumerate(self.stages, start=1):
            z_in = z.detach()
            if l == L and self.top == L - 1:
                z_in.requires_grad_(True)
            out = self.stage_forward(l, z_in)
            layers.append((z_in, out))
            z = out
            for m in s.post:
                z = m(z)
        return layers

    def first_target(self, layers, loss_sum: torch.Tensor) -> torch.Tensor:
        """ẑ_T = s_T − η ∂ℓ_n/∂s_T, per example (``loss_sum`` = Σ_n ℓ_n)."""
        T, L = self.top, len(self.stages)
        state = layers[L - 1][0] if T == L - 1 else layers[L - 1][1]
        (grad,) = torch.autograd.grad(loss_sum, state, retain_graph=True)
        return (state - self.target_lr * grad).detach()

    @torch.no_grad()
    def propagate_targets(self, layers, top_target: torch.Tensor) -> dict[int, torch.Tensor]:
        """Targets {ℓ: ẑ_ℓ} for ℓ = T down to 1: TP ẑ_{ℓ-1} = g_ℓ(ẑ_ℓ), DTP adds z_{ℓ-1} − g_ℓ(z_ℓ)."""
        targets = {self.top: top_target}
        for l in range(self.top, 1, -1):
            g = self.inverse(l)
            state, below = layers[l - 1][1].detach(), layers[l - 2][1].detach()
            targets[l - 1] = below + g(targets[l]) - g(state) if self.difference else g(targets[l])
        return targets

    def corruption(self, like: torch.Tensor) -> torch.Tensor:
        """ε ~ N(0, σ²) for this rank's rows, drawn for the whole global batch from the shared stream."""
        return self.noise.randn_rows(like) * self.noise_sigma

    def inverse_losses(self, layers) -> dict[int, torch.Tensor]:
        """L^inv_ℓ = mean_n ‖g_ℓ(f_ℓ(c)) − c‖², c = z_{ℓ-1} + ε (or − z_{ℓ-1} when denoising).

        f_ℓ runs without a graph (the inverse loss trains V_ℓ, c_ℓ only) and leaves BatchNorm
        running statistics as they were: the noisy batch is not data the forward pass saw.
        Noise is drawn in the order ℓ = 2, 3, …, T.
        """
        losses = {}
        for l in range(2, self.top + 1):
            clean = layers[l - 2][1].detach()
            corrupted = clean + self.corruption(clean) if self.noise_sigma > 0 else clean
            with torch.no_grad(), (preserved_buffers(self.model) if self._stateful_norms else nullcontext()):
                encoded = self.stage_forward(l, corrupted)
            goal = clean if self.denoising else corrupted
            losses[l] = (self.inverse(l)(encoded) - goal).pow(2).sum() / clean.shape[0]
        return losses

    def objective(self, x, y):
        layers = self.forward_layers(x)
        logits = layers[-1][1]
        loss = self.loss_fn(logits, y)
        rows = logits.shape[0]
        targets = self.propagate_targets(layers, self.first_target(layers, loss * rows))
        surrogate = loss  # the output layer trains on the task loss (its input is detached)
        for l in range(1, len(self.stages)):
            surrogate = surrogate + (layers[l - 1][1] - targets[l]).pow(2).sum() / rows
        inv = self.inverse_losses(layers)
        if inv:
            surrogate = surrogate + self.inverse_weight * sum(inv.values())
        if self.tap is not None and self.tap.capture:
            surrogate = surrogate + self._hand_signals_to_tap(layers, targets, rows)
        return surrogate, logits, loss

    def _hand_signals_to_tap(self, layers, targets, rows) -> torch.Tensor:
        """Probe step: the tap's points get leaf copies of z_ℓ whose ``.grad`` becomes e_ℓ/B."""
        if list(self.tap.names) != self.points:
            self.tap.clear()  # a different point layout: no signal angles for this rule
            return layers[0][1].new_zeros(())
        self.tap.outputs = [layers[l - 1][1].detach().requires_grad_(True) for l in range(1, len(self.stages))]
        return sum(torch.dot((layers[l - 1][1] - targets[l]).detach().reshape(-1), p.reshape(-1)) / rows
                   for l, p in enumerate(self.tap.outputs, start=1))

    @contextmanager
    def true_gradient(self):
        # Nothing to switch off: the rule never alters the model, so model(x) is plain backprop.
        yield


@RULES.register("tp")
class TargetProp(DifferenceTargetProp):
    """Vanilla TP (Bengio 2014; Lee et al. 2015; Bartunov et al. 2018 "TP"): ẑ_{ℓ-1} = g_ℓ(ẑ_ℓ),
    no difference correction, so errors of the learned inverses enter the targets directly."""

    difference = False
