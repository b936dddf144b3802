"""Local representation alignment: recursive LRA (rec-LRA) and pairwise LRA-E.

rec-LRA — Ororbia, Mali, Kifer & Giles, *Large-scale gradient-free deep learning with recursive
local representation alignment*, 2020, arXiv:2002.03911, §3.2–3.3 and appendix
Algorithms 1 and 2. The model is split into *regions* i (Algorithm 2), each with a pre-activation
h_i (carrying a graph to the region's own parameters only), a post-activation z_i = φ_i(h_i) and
a vector of error units e_i next to z_i. An *error-wiring graph* says which region's error units
feed which: d_i = E_{j→i} e_j. Starting at the output L (Algorithm 2, COMPUTESIGNALS), top-down:

    e_L = z_L − y                                                 (φ_L = softmax; Eq. 4)
    d_i = E_{j→i} e_j           for the source j of i             (Alg. 2 line 25; Eq. 3)
    y_i = φ_i(h_i − β d_i),  e_i = z_i − y_i                      (Eq. 3–4)
    ΔW_{k→i} = e_i z_kᵀ           — no φ′ anywhere, so sign units train   (Eq. 5; Alg. 2 line 8)
    ΔE_{j→i} = −γ d_i e_jᵀ                                        (Eq. 6)

and parameters move as θ ← θ − λΔθ through the configured optimizer (Adam in the paper).
``error_update: state`` selects the appendix's alternative ΔE_{j→i} = γ z_i e_jᵀ ("proved useful
for the MNIST/FMNIST experiments"; it is also LRA-E's rule: E tracks the transpose of W_j's update).
Algorithm 2 line 11 prints ΔE = −γ e_i d_jᵀ, whose shape is not E's; Eq. 6 (and Algorithm 1
lines 29/31) is what is implemented.

**The sign of ΔE.** Eq. 5's ΔW = e_i z_kᵀ is the gradient of the discrepancy ½‖z_i − y_i‖², so
it is subtracted. Applied the same way, Eq. 6 gives E ← E + λγ d_i e_jᵀ and the displacement
d_i = E e_j grows along itself every step (by λγ‖e_j‖² d_i under plain SGD). The appendix derives
∂D/∂E ≈ β e_i e_jᵀ ≈ β² (φ′ ⊙ d_i) e_jᵀ (e_i ≈ β φ′ ⊙ d_i) and says the rule works "provided that we
multiply it by −γ/β": that is Eq. 6 up to φ′, and descending D with it means E ← E − λγ d_i e_jᵀ,
which shrinks d_i. Both readings are offered: ``displacement`` (Eq. 6 stepped like ΔW, the
default the large-scale tables ran with) and ``displacement_descent``; the rlra-1 table's
decisions record the measurement between them.

**Wiring built from the model** (``wiring``):

* MLP, plain CNN and locally-connected net (``mlp``, ``cnn``, ``sfa_mnist``, ``lcnet``): one
  region per Linear/Conv2d/LocallyConnected2d layer ℓ = 1…L. With recursion depth D = ``recursion_depth`` and skip gap g = ``skip_gap``, hidden
  layer ℓ has level k = the smallest k < D with ℓ mod g^(D−k) = 0, else D. A level-k < D layer
  is fed from the nearest layer above it of a lower level (the output has level 0); a level-D
  layer from ℓ+1. D = 2 is Algorithm 1 exactly (E_{L→ℓ} if ℓ mod g = 0, else E_{ℓ+1→ℓ}), the
  default; D = 1 (or g = 1) wires every layer straight from the output. Algorithm 1's
  RUNMODEL also adds a residual z_{ℓ-g} every g layers: that is a model choice, not the rule's
  (the rlra-1 MLPs are plain), so the zoo model's own forward runs. An LC layer's output is a
  map like a conv layer's (error synapses into and between LC maps follow ``map_synapse``), and
  its update is the paper's "same as that used for fully-connected weights" (appendix, rlra-2's
  CNN = Bartunov et al.'s LC net): ΔW_l = e_l p_lᵀ per position l with p_l the receptive field,
  i.e. ``LocallyConnected2d.local_update(e, patches)``, which is what ∂⟨e, h⟩/∂W is for h = W p.
* ResNet (``timm:resnet18``, ``presnet18``; §3.3): error units at the stem's output and at every
  residual block's output, all wired from the output (E_{L→i}, level 1: the block outputs are
  the "meta-representations"). Then the recursion enters each block (``block_update``):
    - ``rlra`` (default): a level-2 region at the block's inner map (``act1``), fed from the
      block's output error units through an error synapse into the conv map; conv1 (+bn1)
      learns from e_{act1}, conv2 (+bn2, + the projection shortcut) from e_{act2}, each on
      detached inputs: no gradient crosses a region.
    - ``local_bp``: the paper's stated alternative (§3.3, "employ a procedure like backprop
      (treating the block's output error neuron vector as a proxy for ∂L/∂z_i)"): one region per
      block whose h is the whole block (pre-``act2`` residual sum) on its detached input; the
      block's error units are backpropagated inside the block only. As for every region, no φ′
      of the unit the errors sit on (act2) enters; inside the block local BP includes act1′.

**Error synapses** (``error_synapses``, ``nn.Parameter`` s of this module, stepped by the
configured optimizer and all-reduced by DDP). Into or out of a vector (the output, a dense
layer): a dense matrix E (|z_i| × |z_j|), the paper's (appendix: E_{L→i} is |y_L| × |z_i|).
Between two conv maps a dense matrix would be |z_i|·|z_j| floats (65,536² for ResNet-18's first
stage), so ``map_synapse`` picks

* ``conv`` (default): E_{j→i} is a k×k convolution C_j → C_i (k = ``synapse_kernel``, "same"
  padding), d_i = E ⊛ resize(e_j) with e_j resized to z_i's H×W (nearest upsampling, or average
  pooling when j is larger); ΔE = −γ d_i e_jᵀ becomes the kernel's correlation of −γ d_i with e_j;
* ``lowrank``: E = U Vᵀ (U: |z_i| × r, V: |z_j| × r, r = ``synapse_rank``), d_i = U (Vᵀ e_j); the
  update is Eq. 6 taken through the factors (ΔU = −γ d_i (Vᵀe_j)ᵀ, ΔV = −γ e_j (Uᵀd_i)ᵀ);
* ``dense``: the literal matrix (small maps only).

:meth:`RecursiveLRA.error_synapse_memory` reports their bytes per kind; ``bench perf --only rlra``
lists them per model.

**Pseudo-convolution** (§3.3, pResNet-18 in bench/models/pseudo_conv.py): a region whose h is a
pseudo-conv's output gets the paper's Δw_ℓ^m = Σ_{i,j} (e_ℓ * φ_r(z_{ℓ-1}^m + n^m))[i, j] (summed
over the batch too, then averaged like every update): the surrogate below has exactly that
gradient for the combination weights and none for the fixed noise maps (a buffer). With the
block's BatchNorm after the pseudo-conv, e_ℓ reaches the pseudo-conv's output through that norm's
own (local) backward.

Options (configs/algorithm/rlra.yaml): β, γ, D, g, elastic error units
e = α_e(z − y) + (1 − α_e) sign(z − y) with α_e for level-1 units (at the end of a skip synapse
from the output, or at a block output; appendix 0.19) and deeper units (appendix 0.24) — 1.0
(plain z − y) by default —, κ_ℓ region weights of the total discrepancy (Eq. 2), and the
initialisation of E (σ-Gaussian for the MLPs, unit Gaussian for the ResNets; appendix). Update
re-projection Nm(Δ, c) is the general ``algorithm.max_grad_norm`` of every rule; it applies to the
error synapses too ("any parameter update matrix").

LRA-E — Ororbia & Mali, *Biologically motivated algorithms for propagating local target
representations*, AAAI 2019: the same targets and updates with pairwise synapses only
(d_ℓ = E_{ℓ+1→ℓ} e_{ℓ+1} for every ℓ) and ΔE_{ℓ+1→ℓ} = γ z_ℓ e_{ℓ+1}ᵀ = γ (ΔW_{ℓ+1})ᵀ.

How the update reaches ``.grad`` (docs/architecture.md, "The .grad contract"): every region runs on its detached input,
and the surrogate

    S = (1/B) Σ_i κ_i ⟨stopgrad(e_i), h_i⟩  +  (1/B) Σ_{j→i} ⟨stopgrad(s_i), E_{j→i}(stopgrad(e_j))⟩

with s_i = −γ d_i (Eq. 6) or γ z_i (``state``) has ∂S/∂W_i = κ_i e_i z_kᵀ for a linear region and
∂S/∂E_{j→i} = s_i e_jᵀ, averaged over the batch B like the loss of every other rule (so DDP's
mean over ranks is the mean over the global batch). The output's e_L = softmax − onehot is
B·∂CE/∂h_L, so its update equals backprop's.

Alignment probe: the model is never modified (no hooks, no cuts — the rule runs the model's own
modules region by region), so :meth:`true_gradient` has nothing to switch off and the probe's
backprop pass is the plain network. The update angle is reported for every weight of the model;
the E matrices are not model weights and have no backprop counterpart. The teaching signal at
each feedback point is the error unit e_i (DESIGN): when the regions' units are exactly the
tap's points (MLP, CNN, ResNet with ``block_update: rlra`` at micro granularity), this rule hands
the tap leaf copies of z_i whose ``.grad`` is e_i/B (backprop's scale; angles ignore it anyway).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.deliver import deliver
from bench.feedback.init import feedback_tensor
from bench.models.locally_connected import LocallyConnected2d
from bench.models.structure import ResidualBlock, Structure, run, structure_of
from bench.options import FEEDBACK_INITS, AlgorithmOptions, ClassVar, ConfigError, Literal, opt

@dataclass
class Stage:
    """One layer ℓ of a sequential net: h_ℓ = norm(linear(z_{ℓ-1})), z_ℓ = act(h_ℓ), then ``post``.

    ``linear`` is the layer's Linear (or, for the plain CNN, its Conv2d; for LCNet, its
    LocallyConnected2d). Read from a plain block of the model's structure view."""

    linear: nn.Module
    norms: list = field(default_factory=list)
    act: nn.Module | None = None
    act_name: str | None = None
    post: list = field(default_factory=list)  # dropout (pooling, flatten) after the activation


def parse_stages(model: nn.Module, convs: bool = False) -> tuple[list[nn.Module], list[Stage]]:
    """A sequential zoo net from its structure view (``model.structure().chain()``): its input
    steps and one stage per block. ``convs`` admits Conv2d and locally-connected layers (the zoo
    cnn and lcnet); without it every layer must be a Linear (the zoo mlp)."""
    what = "a sequential mlp, cnn or lcnet" if convs else "a sequential mlp of Linear layers"
    layer_types = (nn.Linear, nn.Conv2d, LocallyConnected2d) if convs else (nn.Linear,)
    try:
        pre, blocks = structure_of(model).chain()
        for b in blocks:
            if b.before:
                raise ValueError(f"block {b.name!r} runs {b.before[0].name} before its layer")
            if not isinstance(b.layer, layer_types):
                raise ValueError(f"block {b.name!r} has a {type(b.layer).__name__}")
            odd = [s.name for s in b.steps if s.role in ("shortcut", "other")]
            if odd:
                raise ValueError(f"block {b.name!r} has {odd[0]}, neither a norm, an activation, pooling nor dropout")
    except ValueError as exc:
        raise ValueError(f"{type(model).__name__} is not {what} ({exc}); this rule is implemented for "
                         f"{'mlp, cnn, lcnet and the timm/p ResNet-18' if convs else 'the zoo mlp'}") from None
    stages = [Stage(linear=b.layer, norms=b.norms, act=b.act, act_name=b.act_name, post=[s.fn for s in b.post])
              for b in blocks]
    if len(stages) < 2 or stages[-1].act is not None or any(s.act is None for s in stages[:-1]):
        raise ValueError(f"{type(model).__name__}: expected [layer → (norm) → activation]+ → Linear, "
                         "got a different layout; rec-LRA needs each hidden layer's φ")
    return [s.fn for s in pre], stages


def elastic(diff: torch.Tensor, alpha: float) -> torch.Tensor:
    """Elastic error units (appendix): α_e(z − y) + (1 − α_e) sign(z − y); α_e = 1 is plain z − y."""
    if alpha == 1.0:
        return diff
    return alpha * diff + (1.0 - alpha) * torch.sign(diff)


def _is_resnet(view: Structure) -> bool:
    return any(isinstance(b, ResidualBlock) for b in view.blocks)


class SequentialRegions:
    """MLP / plain CNN: one region per layer (Algorithm 1's layers ℓ = 1…L)."""

    def __init__(self, model: nn.Module):
        self.pre, self.stages = parse_stages(model, convs=True)
        self.names = [s.act_name for s in self.stages[:-1]] + ["output"]
        self.acts = [s.act for s in self.stages]

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

    def wiring(self, depth: int, gap: int, pairwise: bool) -> dict[int, tuple[int, int]]:
        """{ℓ: (source j, level)} for the hidden layers; see the module docstring."""
        L = len(self.stages)
        if pairwise:
            return {l: (l + 1, 2) for l in range(1, L)}

        def level(l: int) -> int:
            for k in range(1, depth):
                if l % gap ** (depth - k) == 0:
                    return k
            return depth

        levels = {l: level(l) for l in range(1, L)}
        levels[L] = 0
        out = {}
        for l in range(1, L):
            k = levels[l]
            if depth == 1:
                out[l] = (L, 1)
            elif k < depth:
                out[l] = (min(j for j in range(l + 1, L + 1) if levels[j] < k), k)
            else:
                out[l] = (l + 1, k)
        return out


class ResNetRegions:
    """timm ResNet-18 / pResNet-18 (basic blocks): stem, block outputs (and inner maps), output.

    Every piece comes from the model's structure view: the stem block, each
    :class:`~bench.models.structure.ResidualBlock`'s inner steps and the head."""

    def __init__(self, model: nn.Module, block_update: str):
        view = structure_of(model)
        self.local_bp = block_update == "local_bp"
        (self.stem,) = view.stages[0].blocks
        self.views = [b for st in view.stages[1:] for b in st.blocks]
        if any(not isinstance(b, ResidualBlock) for b in self.views):
            bad = next(b for b in self.views if not isinstance(b, ResidualBlock))
            raise ValueError(f"rec-LRA supports ResNets of basic blocks; {bad.name} is a {bad.kind} block")
        self.head = view.head
        self.blocks = [(b.name, b.module) for b in self.views]
        self.names, self.acts = [self.stem.act_name], [self.stem.act]
        for b in self.views:
            if not self.local_bp:
                self.names.append(f"{b.name}.act1")
                self.acts.append(b.act1)
            self.names.append(f"{b.name}.act2")
            self.acts.append(b.act2)
        self.names.append("output")
        self.acts.append(None)

    def forward_layers(self, x: torch.Tensor):
        """The ResNet's forward, region by region on detached inputs: [(input, h_i, z_i)], logits."""
        stem, head = self.stem, self.head
        layers = []
        h = stem.preactivation(x)
        with torch.no_grad():
            z = stem.act(h)
            out = run(stem.post, z)
        layers.append((x, h, z))
        for blk in self.views:
            x_b = out
            if self.local_bp:  # local BP inside the block: one graph from the block input to h
                h = blk.outer(blk.mid(blk.act1(blk.inner(x_b))), x_b)
            else:
                h1 = blk.inner(x_b)
                with torch.no_grad():
                    z1 = blk.act1(h1)
                    a = blk.mid(z1)
                layers.append((x_b, h1, z1))
                h = blk.outer(a, x_b)
            with torch.no_grad():
                out = blk.act2(h)
            layers.append((x_b, h, out))
        feats = run(head.before, out)
        layers.append((feats, head.layer(feats), None))
        return layers

    def wiring(self, depth: int, gap: int, pairwise: bool) -> dict[int, tuple[int, int]]:
        """Stem and block outputs from the output (level 1); inner maps from their block (level 2)."""
        L = len(self.names)
        if pairwise:
            return {i: (i + 1, 2) for i in range(1, L)}
        out = {}
        for i, name in enumerate(self.names[:-1], start=1):
            if name.endswith(".act1") and name != "net.act1":
                out[i] = (i + 1, 2) if depth >= 2 else (L, 1)
            else:
                out[i] = (L, 1)
        return out


class LRAOptions(AlgorithmOptions):
    """What rec-LRA and LRA-E share. LRA-E's defaults follow Ororbia & Mali 2019 and its authors'
    code (β = 0.1, γ = 1, E tracks Wᵀ: ``error_update: state``); its config sets them."""

    names: ClassVar[tuple[str, ...]] = ("lra_e",)

    beta: float = opt(0.1205, "β of Eq. 3, the displacement's weight in y = φ(h − β d) (appendix: 0.1205)", ge=0)
    # Not the scheduler's `gamma` (AlgorithmOptions), hence the name.
    error_gamma: float = opt(0.1524, "γ of Eq. 6, the error synapses' rate factor (appendix: 0.1524)", ge=0)
    # Eq. 6's sign is ambiguous (module docstring, "The sign of ΔE"): displacement applies ΔE like
    # ΔW (θ ← θ − λΔθ), which grows ‖E e‖; displacement_descent applies it the other way, the
    # appendix's derived descent direction on the discrepancy, which shrinks it.
    error_update: Literal["displacement", "displacement_descent", "state"] = opt(
        "displacement", "displacement: ΔE_{j→i} = −γ d_i e_jᵀ (Eq. 6), stepped like ΔW | displacement_descent: "
                        "the same ΔE stepped the other way | state: ΔE_{j→i} = γ z_i e_jᵀ (LRA-E's)")
    # A dense |z_i|×|z_j| matrix is infeasible between two conv or locally-connected maps.
    map_synapse: Literal["conv", "lowrank", "dense"] = opt(
        "conv", "error synapses between two maps: conv (k×k on e_j resized to z_i's H×W) | lowrank (U Vᵀ) | dense")
    # 1 (a per-position channel mix) is faster than k = 3 on ResNet-18 and needs 1/9 of the
    # conv-synapse memory (results/perf/rlra.csv); the paper leaves conv synapses open.
    synapse_kernel: int = opt(1, "k of a conv error synapse (odd; 'same' padding)", ge=1)
    synapse_rank: int = opt(16, "r of a low-rank error synapse", ge=1)
    block_update: Literal["rlra", "local_bp"] = opt(
        "rlra", "ResNets (§3.3): rlra = a level-2 region at each block's inner map | local_bp = backprop of the "
                "block's error units inside the block (the paper's alternative)")
    alpha_depth2: float = opt(1.0, "elastic α_e of units fed by a pairwise synapse E_{ℓ+1→ℓ} (appendix: 0.24); 1 = plain e = z − y", gt=0)
    kappa: list[float] = opt([], "κ_ℓ of Eq. 2 per layer, input → output (scales ΔW_ℓ); [] = all 1")
    error_init: Literal[("unit", *FEEDBACK_INITS)] = opt(
        "gaussian", "error synapses: gaussian N(0, σ²) (the MLP protocol) | unit N(0, 1) (the ResNets) | xavier | kaiming | uniform")
    error_sigma: float = opt(0.05, "σ of the error synapses for gaussian/uniform (the paper tunes σ in [0.025, 0.1])", gt=0)
    # Where Eq. 3–4's target and error units live. The text compares the target y_i = φ(h_i − βd_i)
    # with the activity z_i (activity, the default). With φ = sign that error is non-zero only where
    # the displacement flips a unit (|h_i| < β|d_i|); comparing pre-activations instead gives
    # e_i = h_i − (h_i − βd_i) = βd_i at every unit. rlra-1's decisions record the measurement.
    target_space: Literal["activity", "preactivation"] = opt(
        "activity", "error units: activity = z − φ(h − βd) (Eq. 3–4) | preactivation = h − (h − βd) = βd")
    # Off by default: the first step compiles (tens of seconds cold, a few from inductor's disk
    # cache) and a new batch shape recompiles once; the speed-up is in results/perf/rlra.csv.
    compile: bool = opt(False, "torch.compile the closed-form update of a dense MLP (hash-neutral)")

    def check(self, cfg) -> None:
        if self.synapse_kernel % 2 == 0:
            raise ConfigError(f"algorithm.synapse_kernel={self.synapse_kernel} is not valid; expected an odd int ≥ 1")


class RlraOptions(LRAOptions):
    names: ClassVar[tuple[str, ...]] = ("rlra",)

    # The paper's ResNets use g = 2; its CNN's best is g = 2 (Table 5 right).
    skip_gap: int = opt(2, "g of Algorithm 1: layer ℓ gets E_{L→ℓ} when ℓ mod g = 0, else E_{ℓ+1→ℓ}; 1 = all from the output", ge=1)
    recursion_depth: int = opt(2, "D: layers with ℓ mod g^(D−k) = 0 get level k < D (D = 2 is Algorithm 1)", ge=1)
    alpha_depth1: float = opt(1.0, "elastic α_e of units fed by a skip synapse from the output (appendix: 0.19); 1 = plain", gt=0)

    def check(self, cfg) -> None:
        if cfg.model.name == "mlp" and self.skip_gap > int(cfg.model.depth):
            raise ConfigError(f"algorithm.skip_gap={self.skip_gap} is not valid; the mlp has {cfg.model.depth} hidden "
                              f"layers, so a gap above {cfg.model.depth} wires no skip synapse (use 1…{cfg.model.depth})")


@RULES.register("rlra")
class RecursiveLRA(AlgorithmModule):
    """rec-LRA, Algorithm 2 on an error-wiring graph built from the model; see the module docstring."""

    pairwise_only = False  # LRA-E sets True

    def setup_rule(self) -> None:
        a: LRAOptions = self.opts
        # γ is ``error_gamma``: ``algorithm.gamma`` is the lr scheduler's decay factor.
        self.beta, self.gamma = a.beta, a.error_gamma
        # LRA-E wires pairwise synapses only, so it has no skip gap, depth or skip-fed units.
        self.skip_gap, self.depth, self.alpha_depth1 = ((1, 1, 1.0) if self.pairwise_only
                                                        else (a.skip_gap, a.recursion_depth, a.alpha_depth1))
        self.alpha_depth2 = a.alpha_depth2
        self.preactivation_targets = a.target_space == "preactivation"
        self.state_rule = a.error_update == "state"
        # the factor c of ΔE = c·d_i e_jᵀ handed to the optimizer (which subtracts it)
        self.displacement_factor = self.gamma if a.error_update == "displacement_descent" else -self.gamma
        self.map_synapse, self.block_update = a.map_synapse, a.block_update
        self.kernel, self.rank = a.synapse_kernel, a.synapse_rank
        self.regions = (ResNetRegions(self.model, self.block_update) if _is_resnet(structure_of(self.model))
                        else SequentialRegions(self.model))
        self.acts = self.regions.acts
        L = len(self.acts)
        kappa = [float(k) for k in a.kappa]
        if kappa and len(kappa) != L:
            raise ValueError(f"algorithm.kappa has {len(kappa)} values; the model has {L} regions (or give [] for all 1)")
        self.kappa = kappa or [1.0] * L
        wiring = self.regions.wiring(self.depth, self.skip_gap, self.pairwise_only)
        # source[i] = j with d_i = E_{j→i} e_j (1-based regions, L = output); level 1 = fed from a skip.
        self.source = {i: j for i, (j, _) in wiring.items()}
        self.level = {i: k for i, (_, k) in wiring.items()}
        self.shapes = self._region_shapes()
        init = a.error_init
        self._init = ("gaussian" if init == "unit" else init, 1.0 if init == "unit" else a.error_sigma)
        generator = torch.Generator().manual_seed(int(self.cfg.seed) + 1)
        self.kinds, synapses = {}, {}
        for i, j in sorted(self.source.items(), reverse=True):
            kind = self.kinds[(j, i)] = self._kind(j, i)
            synapses.update(self._make_synapse(j, i, kind, generator))
        self.error_synapses = nn.ParameterDict(synapses)
        self.points = self.regions.names[:-1]
        # Dense MLP regions (Linear, no norm: the update needs no backward through anything)
        # take the closed form of ∂S/∂θ; everything else differentiates S with autograd.
        self.closed_form = (isinstance(self.regions, SequentialRegions) and set(self.kinds.values()) <= {"dense"}
                            and all(isinstance(s.linear, nn.Linear) and not s.norms for s in self.regions.stages))
        # torch.compile (inductor) of the closed-form update: one generated kernel per chain of
        # elementwise ops instead of ~60 Python-dispatched ops per step (bench perf --only rlra)
        self.compile_update = a.compile
        if self.compile_update and not self.closed_form:
            raise ValueError("algorithm.compile applies to the closed-form update of a dense MLP (Linear layers, "
                             "no norms, dense error synapses); this model differentiates the surrogate with autograd")
        # state rule, pairwise E_{ℓ+1→ℓ} where layer ℓ+1's input is z_ℓ itself (nothing after φ_ℓ):
        # ΔE is ΔW_{ℓ+1}ᵀ rescaled (closed form only)
        self._shared_state = ({l for l, j in self.source.items() if j == l + 1 and not self.regions.stages[l - 1].post
                               and self.kappa[j - 1] != 0} if self.closed_form and self.state_rule else set())

    # ------------------------------------------------------------------ error synapses
    @torch.no_grad()
    def _region_shapes(self) -> dict[int, tuple[int, ...]]:
        """Per-sample shape of z_i for every region (one dry forward in eval mode)."""
        was_training = self.model.training
        try:
            self.model.eval()
            layers = self.regions.forward_layers(torch.zeros(2, *self.input_shape))
        finally:
            self.model.train(was_training)
        return {i: tuple((z if z is not None else h).shape[1:]) for i, (_, h, z) in enumerate(layers, start=1)}

    def _kind(self, j: int, i: int) -> str:
        maps = len(self.shapes[i]) == 3 and len(self.shapes[j]) == 3
        return self.map_synapse if maps else "dense"

    def _make_synapse(self, j: int, i: int, kind: str, generator) -> dict[str, nn.Parameter]:
        init, sigma = self._init
        size_i, size_j = (int(torch.Size(self.shapes[n]).numel()) for n in (i, j))
        if kind == "dense":
            return {self.key(j, i): nn.Parameter(feedback_tensor((size_i, size_j), init, sigma, generator))}
        if kind == "conv":
            shape = (self.shapes[i][0], self.shapes[j][0], self.kernel, self.kernel)
            return {self.key(j, i): nn.Parameter(feedback_tensor(shape, init, sigma, generator))}
        # low rank: E = U Vᵀ with V ~ N(0, 1/r), so E's entries have U's variance
        u = feedback_tensor((size_i, self.rank), init, sigma, generator)
        v = torch.randn((size_j, self.rank), generator=generator) / self.rank ** 0.5
        return {f"{self.key(j, i)}_u": nn.Parameter(u), f"{self.key(j, i)}_v": nn.Parameter(v)}

    @staticmethod
    def key(j: int, i: int) -> str:
        return f"{j}_to_{i}"

    def error_matrix(self, j: int, i: int) -> torch.Tensor:
        """E_{j→i} (|z_i| × |z_j| dense, or C_i × C_j × k × k conv): d_i = E_{j→i} e_j."""
        return self.error_synapses[self.key(j, i)]

    def transmit(self, j: int, i: int, e: torch.Tensor) -> torch.Tensor:
        """d_i = E_{j→i} e_j, with a graph to the synapse only (e_j is detached)."""
        kind = self.kinds[(j, i)]
        if kind == "dense":
            d = e.flatten(1) @ self.error_matrix(j, i).t()
        elif kind == "lowrank":
            k = self.key(j, i)
            d = (e.flatten(1) @ self.error_synapses[f"{k}_v"]) @ self.error_synapses[f"{k}_u"].t()
        else:
            size = self.shapes[i][1:]
            if tuple(e.shape[2:]) != size:
                e = (F.interpolate(e, size=size, mode="nearest") if e.shape[2] < size[0]
                     else F.adaptive_avg_pool2d(e, size))
            return F.conv2d(e, self.error_matrix(j, i), padding=self.kernel // 2)
        return d if d.dim() == 1 + len(self.shapes[i]) else d.view(-1, *self.shapes[i])

    # ------------------------------------------------------------------ one step
    def forward_layers(self, x: torch.Tensor):
        """[(input_i, h_i, z_i)] per region, input → output; the last entry's h is the logits."""
        return self.regions.forward_layers(x)

    def error_units(self, layers, y: torch.Tensor):
        """Algorithm 2 COMPUTEERRORNEURONS: targets, error units and displacements, top-down.

        Returns (errors, targets, displacements) as {i: tensor} plus the E-surrogate terms
        [(s_i, d_i)] whose ⟨stopgrad(s_i), d_i⟩ has gradient s_i e_jᵀ with respect to E_{j→i}.
        Every source lies above its target, so one top-down sweep visits each region after its source.
        """
        L = len(self.acts)
        h_L = layers[-1][1].detach()
        with torch.no_grad():
            probs = torch.softmax(h_L.float(), dim=-1).to(h_L.dtype)
            targets = {L: F.one_hot(y, probs.shape[-1]).to(probs.dtype)}
            errors = {L: probs - targets[L]}  # e_L = z_L − y (φ_L = softmax)
        displacements, e_terms = {}, []
        for l in range(L - 1, 0, -1):
            j = self.source[l]
            d = self.transmit(j, l, errors[j])  # graph to E only: errors are detached
            _, h, z = layers[l - 1]
            with torch.no_grad():
                shifted = h.detach() - self.beta * d.detach()
                target = shifted if self.preactivation_targets else self.acts[l - 1](shifted)
                # Level 1: the unit ends a skip synapse from the output (Alg. 1 line 17) or sits at
                # a block output; deeper: it ends a pairwise synapse inside a block (line 19).
                alpha = self.alpha_depth1 if self.level[l] == 1 else self.alpha_depth2
                errors[l] = elastic((h.detach() if self.preactivation_targets else z) - target, alpha)
                targets[l] = target
                displacements[l] = d.detach()
                signal = self.gamma * z if self.state_rule else self.displacement_factor * d.detach()
            e_terms.append((signal, d))
        return errors, targets, displacements, e_terms

    def objective(self, x, y):
        if self.closed_form and not (self.tap is not None and self.tap.capture):
            return self._closed_form_objective(x, y)
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

    def _closed_form_objective(self, x, y):
        """The same step with ∂S/∂θ written out (dense MLP regions): ΔW_ℓ = (κ_ℓ/B) e_ℓᵀ z_{ℓ-1},
        Δb_ℓ = (κ_ℓ/B) Σ_b e_ℓ, ΔE_{j→i} = (1/B) s_iᵀ e_j, computed with no autograd graph at all and
        handed to ``.grad`` by :func:`bench.feedback.deliver.deliver` inside ``manual_backward``, so
        DDP's gradient hooks, loss scaling, re-projection and the optimizer see it like any gradient
        (without DDP or an fp16 scaler it is assigned to ``.grad`` at once, which is cheaper). The scalars
        ride on the narrow operand of each matmul and h − βd is one fused ``sub``, and
        with the ``state`` rule a pairwise ΔE_{ℓ+1→ℓ} = (γ/B) z_ℓᵀ e_{ℓ+1} is (γ/κ_{ℓ+1}) ΔW_{ℓ+1}ᵀ, the
        same matmul (LRA-E's observation): this is what brings the update to backprop's time
        (``bench perf --only rlra``). Equal to autograd of S up to float rounding (tests by hand)."""
        updates = self._closed_form_updates
        if self.compile_update:  # compiled on first use (a compiled callable does not pickle)
            updates = getattr(self, "_compiled_updates", None)
            if updates is None:
                updates = self._compiled_updates = torch.compile(self._closed_form_updates)
        grads, params, logits, loss = updates(x, y)
        return deliver(grads, params, self._trainer, logits), logits, loss

    @torch.no_grad()
    def _closed_form_updates(self, x, y):
        """(grads, params, logits, loss) of one closed-form step, no autograd (compiled when asked)."""
        layers = self.forward_layers(x)
        logits = layers[-1][1]
        loss = self.loss_fn(logits, y)
        L, rows = len(layers), logits.shape[0]
        errors = {L: torch.softmax(logits.float(), dim=-1).to(logits.dtype)}  # e_L = z_L − y:
        errors[L].index_put_((torch.arange(rows, device=y.device), y), errors[L].new_tensor(-1.0), accumulate=True)
        disp = {}
        for l in range(L - 1, 0, -1):  # Algorithm 1, top-down (every source lies above its target)
            j = self.source[l]
            _, h, z = layers[l - 1]
            disp[l] = d = errors[j].mm(self.error_matrix(j, l).t())
            if self.preactivation_targets:
                diff = d * self.beta  # h − (h − βd)
            elif isinstance(self.acts[l - 1], nn.Tanh):
                # z − tanh(h − βd) as z + 1 − 2σ(2(h − βd)): torch.tanh is 2–4× slower than
                # torch.sigmoid on the AVX2 CPU build (|difference| ≤ 3e-7)
                diff = torch.sub(h, d, alpha=self.beta).mul_(2).sigmoid_().mul_(-2).add_(z).add_(1)
            else:
                diff = z - self.acts[l - 1](torch.sub(h, d, alpha=self.beta))
            errors[l] = elastic(diff, self.alpha_depth1 if self.level[l] == 1 else self.alpha_depth2)
        params, grads, dW = [], [], {}
        for l, (z_in, _, _) in enumerate(layers, start=1):
            lin = self.regions.stages[l - 1].linear
            # the scale rides on e (B × n), not on ΔW: addmm(…, beta=0, alpha) first copies its
            # ignored input into the result, +60 % on the 784-wide first layer
            scaled = errors[l].mul(self.kappa[l - 1] / rows)
            dW[l] = torch.mm(scaled.t(), z_in)
            params.append(lin.weight)
            grads.append(dW[l])
            if lin.bias is not None:
                params.append(lin.bias)
                grads.append(scaled.sum(0))
        for l in range(L - 1, 0, -1):
            j, E = self.source[l], self.error_matrix(self.source[l], l)
            params.append(E)
            if l in self._shared_state:  # a transposed view: delivery puts it in E's layout
                grads.append(dW[j].t().mul(self.gamma / self.kappa[j - 1]))
                continue
            # ΔE_{j→l} = (c/B) s_lᵀ e_j with s_l = z_l (state) or d_l (Eq. 6, c = −γ)
            signal, c = (layers[l - 1][2], self.gamma) if self.state_rule else (disp[l], self.displacement_factor)
            grads.append(_outer_sum(signal, errors[j], c / rows))
        return grads, params, logits, loss

    def _hand_signals_to_tap(self, layers, errors, rows) -> None:
        """Probe step: the tap's points get leaf copies of z_ℓ whose ``.grad`` becomes e_ℓ/B."""
        if list(self.tap.names) != self.points:
            self.tap.clear()  # a different point layout: no signal angles for this rule
            return
        self.tap.outputs = [layers[l - 1][2].detach().requires_grad_(True) for l in range(1, len(self.acts))]

    @contextmanager
    def true_gradient(self):
        # Nothing to switch off: the rule never alters the model, so model(x) is plain backprop.
        yield

    # ------------------------------------------------------------------ memory
    def error_synapse_floats(self) -> int:
        """Number of error-synapse parameters (issue 5: report their memory per model)."""
        return sum(p.numel() for p in self.error_synapses.values())

    def error_synapse_memory(self) -> dict[str, int]:
        """Bytes of the error synapses per kind (dense, conv, lowrank) and in total."""
        out = dict.fromkeys(("dense", "conv", "lowrank"), 0)
        for key, p in self.error_synapses.items():
            j, i = (int(v) for v in key.split("_")[0:3:2])
            out[self.kinds[(j, i)]] += p.numel() * p.element_size()
        out["total"] = sum(out.values())
        return out


def _outer_sum(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · aᵀ b (rows summed). MKL's AᵀB is much slower when B is narrow (an output error,
    10 columns; docs/architecture.md, M4) than the same product taken as (BᵀA)ᵀ, so the narrow side goes first; the result
    may then be a transposed view, which delivery copies into the parameter's layout."""
    if b.shape[1] < a.shape[1]:
        return torch.mm(b.t(), a).mul_(scale).t()
    return torch.mm(a.t(), b).mul_(scale)


@RULES.register("lra_e")
class LRAE(RecursiveLRA):
    """LRA-E (Ororbia & Mali 2019): pairwise error synapses E_{ℓ+1→ℓ} only, no skip wiring.

    Defaults (configs/algorithm/lra_e.yaml) follow that paper and its authors' code:
    β = 0.1, γ = 1 and ΔE_{ℓ+1→ℓ} = γ z_ℓ e_{ℓ+1}ᵀ (``error_update: state``).
    """

    pairwise_only = True
