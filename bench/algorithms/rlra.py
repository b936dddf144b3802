"""Local representation alignment: recursive LRA (rec-LRA) and pairwise LRA-E.

rec-LRA — Ororbia, Mali, Kifer & Giles, *Large-scale gradient-free deep learning with recursive
local representation alignment* (file 000 in the papers folder), §3.2 and appendix Algorithm 1.
For an MLP z_ℓ = φ_ℓ(h_ℓ), h_ℓ = W_ℓ z_{ℓ-1} (ℓ = 1…L, z_0 = x, φ_L = softmax), one step is:

    e_L = z_L − y                                                 (Alg. 1 line 14; Eq. 4)
    d_ℓ = E_{L→ℓ} e_L   if ℓ mod g = 0   (skip-error synapse)     (Alg. 1 lines 16–17)
    d_ℓ = E_{ℓ+1→ℓ} e_{ℓ+1}   otherwise  (pairwise synapse)        (Alg. 1 line 19)
    y_ℓ = φ_ℓ(h_ℓ − β d_ℓ),  e_ℓ = z_ℓ − y_ℓ                      (Alg. 1 line 20; Eq. 3–4)
    ΔW_ℓ = e_ℓ z_{ℓ-1}ᵀ           — no φ′ anywhere, so sign units train   (Eq. 5; line 26)
    ΔE_{j→i} = −γ d_i e_jᵀ                                        (Eq. 6; lines 29, 31)

and parameters move as θ ← θ − λΔθ through the configured optimizer (Adam in the paper).
The forward pass is the zoo model's own: Algorithm 1's RUNMODEL also adds a residual z_{ℓ-g} to
every g-th layer, which is a model choice, not the rule's (the rlra-1 MLPs are plain). With
g = 1 every ℓ satisfies ℓ mod g = 0, so Algorithm 1 read literally wires every layer straight
from the output (the appendix calls g = 1 "pair-wise"; that wiring is LRA-E below).
Algorithm 1 indexes E by its source layer and writes ``d_{ℓ-1}`` for the synapse into ℓ−1; that
is Eq. 6 with i = ℓ−1, which is what is implemented. ``error_update: state`` selects the
appendix's alternative ΔE_{j→i} = γ z_i e_jᵀ ("proved useful for the MNIST/FMNIST
experiments"; it is also LRA-E's rule: E tracks the transpose of W_j's update).

Options (configs/algorithm/rlra.yaml): β, γ, skip gap g, elastic error units
e = α_e(z − y) + (1 − α_e) sign(z − y) with α_e for depth 1 (units at the end of a skip synapse
E_{L→ℓ}, ℓ mod g = 0) and depth 2 (units at the end of a pairwise synapse E_{ℓ+1→ℓ}) — appendix, 0.19 and 0.24 for the CNNs and
ResNets, 1.0 (plain z − y) by default —, κ_ℓ layer weights of the total discrepancy (Eq. 2),
and the initialisation of E (σ-Gaussian for the MLPs, unit Gaussian for the ResNets; appendix).
Update re-projection Nm(Δ, c) is the general ``algorithm.max_grad_norm`` of every rule; it
applies to the error synapses too ("any parameter update matrix").

LRA-E — Ororbia & Mali, *Biologically motivated algorithms for propagating local target
representations*, AAAI 2019: the same targets and updates with pairwise synapses only
(d_ℓ = E_{ℓ+1→ℓ} e_{ℓ+1} for every ℓ) and ΔE_{ℓ+1→ℓ} = γ z_ℓ e_{ℓ+1}ᵀ = γ (ΔW_{ℓ+1})ᵀ.

How the update reaches ``.grad`` (DESIGN.md, "targets"): every layer runs on its detached input,
and the surrogate

    S = (1/B) Σ_ℓ κ_ℓ ⟨stopgrad(e_ℓ), W_ℓ stopgrad(z_{ℓ-1}) + b_ℓ⟩  +  (1/B) Σ_{j→i} ⟨stopgrad(s_i), E_{j→i} stopgrad(e_j)⟩

with s_i = −γ d_i (Eq. 6) or γ z_i (``state``) has ∂S/∂W_ℓ = κ_ℓ e_ℓ z_{ℓ-1}ᵀ and
∂S/∂E_{j→i} = s_i e_jᵀ, averaged over the batch B like the loss of every other rule (so DDP's
mean over ranks is the mean over the global batch). The output layer's e_L = softmax − onehot is
B·∂CE/∂h_L, so its update equals backprop's. The E matrices are ``nn.Parameter`` s of this module
(``error_synapses``), stepped by the configured optimizer and all-reduced by DDP.

Alignment probe: the model is never modified (no hooks, no cuts — the rule runs the model's own
layers one by one), so :meth:`true_gradient` has nothing to switch off and the probe's backprop
pass is the plain network. The update angle is reported for every weight matrix W_ℓ; the E
matrices are not model weights and have no backprop counterpart. The teaching signal at each
feedback point (the hidden post-activations z_ℓ) is the error unit e_ℓ, as the DESIGN prescribes
for target rules: when the probe captures signals, this rule hands the tap leaf copies of z_ℓ
whose ``.grad`` is e_ℓ/B (the same scale as backprop's ∂L/∂z_ℓ; angles ignore the scale anyway).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.init import FEEDBACK_INITS, feedback_tensor

NORMS = (nn.BatchNorm1d, nn.LayerNorm)


@dataclass
class Stage:
    """One layer ℓ of a sequential MLP: h_ℓ = norm(linear(z_{ℓ-1})), z_ℓ = act(h_ℓ), then ``post``."""

    linear: nn.Linear
    norms: list = field(default_factory=list)
    act: nn.Module | None = None
    act_name: str | None = None
    post: list = field(default_factory=list)  # dropout after the activation


def parse_stages(model: nn.Module) -> tuple[list[nn.Module], list[Stage]]:
    """Split a zoo MLP's ``net`` (nn.Sequential) into input modules and per-layer stages."""
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential):
        raise ValueError(f"{type(model).__name__} is not a sequential MLP (no nn.Sequential `net`); "
                         "rec-LRA/LRA-E are implemented for the zoo's mlp (residual and conv wiring: issue 5)")
    pre, stages = [], []
    for name, m in net.named_children():
        if isinstance(m, nn.Linear):
            stages.append(Stage(linear=m))
        elif not stages:
            pre.append(m)  # Flatten, input dropout
        elif stages[-1].act is None and isinstance(m, NORMS):
            stages[-1].norms.append(m)
        elif stages[-1].act is None and not isinstance(m, nn.Dropout):
            stages[-1].act, stages[-1].act_name = m, f"net.{name}"
        else:
            stages[-1].post.append(m)
    if len(stages) < 2 or stages[-1].act is not None or any(s.act is None for s in stages[:-1]):
        raise ValueError(f"{type(model).__name__}: expected [Linear → (norm) → activation]+ → Linear, "
                         "got a different layout; rec-LRA needs each hidden layer's φ")
    return pre, stages


def elastic(diff: torch.Tensor, alpha: float) -> torch.Tensor:
    """Elastic error units (appendix): α_e(z − y) + (1 − α_e) sign(z − y); α_e = 1 is plain z − y."""
    if alpha == 1.0:
        return diff
    return alpha * diff + (1.0 - alpha) * torch.sign(diff)


@RULES.register("rlra")
class RecursiveLRA(AlgorithmModule):
    """rec-LRA, Algorithm 1 (depth 2, skip gap g) on the zoo MLP; see the module docstring."""

    pairwise_only = False  # LRA-E sets True

    def setup_rule(self) -> None:
        a = self.cfg.algorithm
        self.pre, self.stages = parse_stages(self.model)
        # γ is ``error_gamma``: ``algorithm.gamma`` is the lr scheduler's decay factor (base.yaml).
        self.beta, self.gamma = float(a.beta), float(a.error_gamma)
        self.skip_gap = int(a.skip_gap)
        if self.skip_gap < 1:
            raise ValueError(f"algorithm.skip_gap must be ≥ 1, got {self.skip_gap}")
        self.alpha_depth1, self.alpha_depth2 = float(a.alpha_depth1), float(a.alpha_depth2)
        if str(a.error_update) not in ("displacement", "state"):
            raise ValueError(f"unknown algorithm.error_update {a.error_update!r}; valid choices: displacement, state")
        self.state_rule = str(a.error_update) == "state"
        L = len(self.stages)
        kappa = [float(k) for k in a.kappa]
        if kappa and len(kappa) != L:
            raise ValueError(f"algorithm.kappa has {len(kappa)} values; the model has {L} layers (or give [] for all 1)")
        self.kappa = kappa or [1.0] * L
        # Error wiring: source[ℓ] = j such that d_ℓ = E_{j→ℓ} e_j (1-based layers, L = output).
        self.source = {l: self.wire(l, L) for l in range(1, L)}
        sizes = {l: self.stages[l - 1].linear.out_features for l in range(1, L + 1)}
        init = str(a.error_init)
        if init not in ("unit", *FEEDBACK_INITS):
            raise ValueError(f"unknown algorithm.error_init {init!r}; valid choices: unit, {', '.join(FEEDBACK_INITS)}")
        sigma = 1.0 if init == "unit" else float(a.error_sigma)
        generator = torch.Generator().manual_seed(int(self.cfg.seed) + 1)
        self.error_synapses = nn.ParameterDict({
            self.key(j, l): nn.Parameter(feedback_tensor((sizes[l], sizes[j]), "gaussian" if init == "unit" else init,
                                                         sigma, generator))
            for l, j in sorted(self.source.items(), reverse=True)})
        self.points = [s.act_name for s in self.stages[:-1]]

    def wire(self, l: int, L: int) -> int:
        """Algorithm 1, lines 16–19: skip synapse from the output when ℓ mod g = 0, else from ℓ+1."""
        if self.pairwise_only:
            return l + 1
        return L if l % self.skip_gap == 0 else l + 1

    @staticmethod
    def key(j: int, i: int) -> str:
        return f"{j}_to_{i}"

    def error_matrix(self, j: int, i: int) -> torch.Tensor:
        """E_{j→i} (|z_i| × |z_j|): d_i = E_{j→i} e_j."""
        return self.error_synapses[self.key(j, i)]

    # ------------------------------------------------------------------ one step
    def forward_layers(self, x: torch.Tensor):
        """Run the model layer by layer on detached inputs: [(z_{ℓ-1}, h_ℓ, z_ℓ)] and the logits.

        Only h_ℓ = W_ℓ z_{ℓ-1} + b_ℓ carries a graph (to W_ℓ, b_ℓ); φ runs without one, so no φ′
        can enter any update. The same modules run in the same order as ``model(x)``, so dropout
        masks match a replay of the step (the probe's BP pass).
        """
        z = x
        for m in self.pre:
            z = m(z)
        layers = []
        for s in self.stages:
            z_in = z.detach()
            h = s.linear(z_in)
            for norm in s.norms:
                h = norm(h)
            if s.act is None:
                layers.append((z_in, h, None))
                break
            with torch.no_grad():
                z_out = s.act(h)
                z = z_out
                for m in s.post:
                    z = m(z)
            layers.append((z_in, h, z_out))
        return layers

    def error_units(self, layers, y: torch.Tensor):
        """Algorithm 1 CALCERRNEURONS: targets, error units and displacements, top-down.

        Returns (errors, targets, displacements) as {ℓ: tensor} plus the E-surrogate terms
        [(s_i, d_i)] whose ⟨stopgrad(s_i), d_i⟩ has gradient s_i e_jᵀ with respect to E_{j→i}.
        """
        L = len(self.stages)
        h_L = layers[-1][1].detach()
        with torch.no_grad():
            probs = torch.softmax(h_L.float(), dim=-1).to(h_L.dtype)
            targets = {L: F.one_hot(y, probs.shape[-1]).to(probs.dtype)}
            errors = {L: probs - targets[L]}  # e_L = z_L − y (φ_L = softmax)
        displacements, e_terms = {}, []
        for l in range(L - 1, 0, -1):
            j = self.source[l]
            d = errors[j] @ self.error_matrix(j, l).t()  # graph to E only: errors are detached
            _, h, z = layers[l - 1]
            with torch.no_grad():
                target = self.stages[l - 1].act(h.detach() - self.beta * d.detach())
                # Depth 1: the unit ends a skip synapse from the output (Alg. 1 line 17); depth 2:
                # it ends a pairwise synapse inside a block (line 19), whatever its source layer.
                skip = not self.pairwise_only and l % self.skip_gap == 0
                alpha = self.alpha_depth1 if skip else self.alpha_depth2
                errors[l] = elastic(z - target, alpha)
                targets[l] = target
                displacements[l] = d.detach()
                signal = self.gamma * z if self.state_rule else -self.gamma * d.detach()
            e_terms.append((signal, d))
        return errors, targets, displacements, e_terms

    def objective(self, x, y):
        layers = self.forward_layers(x)
        logits = layers[-1][1]
        loss = self.loss_fn(logits, y)
        errors, _, _, e_terms = self.error_units(layers, y)
        rows = logits.shape[0]
        surrogate = logits.new_zeros(())
        for l, (_, h, _) in enumerate(layers, start=1):
            # ⟨stopgrad(κ e_ℓ), h_ℓ⟩ as one dot product: ∂/∂W_ℓ = κ_ℓ e_ℓ z_{ℓ-1}ᵀ, ∂/∂b_ℓ = κ_ℓ e_ℓ.
            surrogate = surrogate + (self.kappa[l - 1] / rows) * torch.dot(errors[l].reshape(-1), h.reshape(-1))
        for signal, d in e_terms:
            surrogate = surrogate + torch.dot(signal.reshape(-1), d.reshape(-1)) / rows
        if self.tap is not None and self.tap.capture:
            self._hand_signals_to_tap(layers, errors, rows)
            surrogate = surrogate + sum(torch.dot(errors[l].reshape(-1), p.reshape(-1)) / rows
                                        for l, p in enumerate(self.tap.outputs, start=1))
        # The loss does not enter the surrogate: it is returned for metrics and the divergence guard.
        return surrogate, logits, loss

    def _hand_signals_to_tap(self, layers, errors, rows) -> None:
        """Probe step: the tap's points get leaf copies of z_ℓ whose ``.grad`` becomes e_ℓ/B."""
        if list(self.tap.names) != self.points:
            self.tap.clear()  # a different point layout: no signal angles for this rule
            return
        self.tap.outputs = [layers[l - 1][2].detach().requires_grad_(True) for l in range(1, len(self.stages))]

    @contextmanager
    def true_gradient(self):
        # Nothing to switch off: the rule never alters the model, so model(x) is plain backprop.
        yield

    def error_synapse_floats(self) -> int:
        """Memory of the error synapses in floats (issue 5: report it per model)."""
        return sum(p.numel() for p in self.error_synapses.values())


@RULES.register("lra_e")
class LRAE(RecursiveLRA):
    """LRA-E (Ororbia & Mali 2019): pairwise error synapses E_{ℓ+1→ℓ} only, no skip wiring.

    Defaults (configs/algorithm/lra_e.yaml) follow that paper and its authors' code:
    β = 0.1, γ = 1 and ΔE_{ℓ+1→ℓ} = γ z_ℓ e_{ℓ+1}ᵀ (``error_update: state``).
    """

    pairwise_only = True
