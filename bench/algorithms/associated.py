"""Associated Learning (AL), sequential: every component's two local losses in one step.

Kao & Chen, *Associated Learning: Decomposing End-to-end Backpropagation Based on Autoencoders and
Target Propagation*, Neural Computation 2021, arXiv:1906.05560, §4; the authors' TensorFlow code
(github.com/SamYWK/Associated_Learning, ``*/models.py`` and ``*/main.py``).

On a folded model (bench/models/associated.py, K components), one step on (x, y) is

    s_0 = x, t_0 = onehot(y)
    for i = 1 … K:  s_i = f_i(s_{i−1}.detach()),  t_i = g_i(t_{i−1}.detach())
        associated loss   A_i = MSE(b_i(s_i), t_i.detach())     → trains f_i, b_i      (Eq. 3)
        autoencoder loss  E_i = MSE(h_i(t_i), t_{i−1})          → trains g_i, h_i      (Eq. 6)

with MSE the mean over batch and units (``tf.losses.mean_squared_error`` in the authors' code).

Weighting and optimisers. The authors give every loss its own Adam (``train_steps`` and
``rev_train_steps``), the encoder/decoder losses at twice the forward learning rate
(``inv_learning_rate: lr * 2`` in ``main.py``). Every parameter here belongs to exactly one loss,
so one Adam over all parameters with two parameter groups (f, b at ``lr``; g, h at
``inverse_lr_scale · lr``) takes exactly the per-loss optimisers' steps (Adam's state is per
element), and the losses are summed with weight 1: S = Σ_i (A_i + E_i). ∂S/∂θ is each
parameter's own loss gradient, and it reaches ``.grad`` through one ``manual_backward`` — the
suite's .grad contract, so DDP, resume and the probe work unchanged.

Inference is Eq. 8, the model's ``forward``: ŷ = h_1 ∘ … ∘ h_K ∘ b_K ∘ f_K ∘ … ∘ f_1 (x), whose
output is a sigmoid score per class; the reported loss is MSE(ŷ, onehot(y)) (the authors' last
autoencoder loss) and the error is argmax(ŷ) ≠ y.

Probe. The "true gradient" is the gradient of the end-to-end loss of the inference path,
MSE(Eq. 8 (x), onehot(y)), which reaches the f's, b_K and the h's (the affiliated g's and lower
bridges have none and are not reported). The update angle of f_i compares A_i's gradient with
it; the teaching-signal angle at s_i compares ∂A_i/∂s_i with the end-to-end ∂/∂s_i. Every epoch
the mean A_i and E_i of each component are logged as ``al/assoc_<i>`` and ``al/ae_<i>`` (i from 1).

The pipelined trainer (bench/run/pipeline.py) runs the same :meth:`FoldedNet.component_losses`
on one worker per component group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.algorithms.base import RULES, AlgorithmModule
from bench.options import AlgorithmOptions, ClassVar, ConfigError, opt


class ALOptions(AlgorithmOptions):
    """Defaults follow the authors' code: Adam, lr 1e-4 (1e-3 for the ResNets, set per table), the
    g/h losses at 2× the forward rate."""

    names: ClassVar[tuple[str, ...]] = ("al",)

    inverse_lr_scale: float = opt(2.0, "learning rate of g and h ÷ that of f and b (authors: inv_learning_rate = 2·lr)", gt=0)
    milestone_gammas: list[float] = opt(
        [], "multistep: one decay factor per milestone (empty: gamma at each); authors: 0.1, 0.1, 0.1, 0.5", gt=0, le=1)
    delay: int = opt(0, "pipelined trainer: a component applies its update for mini-batch k after its forward of "
                        "k + delay (0 = exactly sequential AL)", ge=0)
    workers: int = opt(0, "pipelined trainer: worker processes (contiguous component groups); 0 = one per component", ge=0)

    def check(self, cfg) -> None:
        if self.milestone_gammas and len(self.milestone_gammas) != len(self.milestones):
            raise ConfigError(f"algorithm.milestone_gammas={list(self.milestone_gammas)} needs one factor per milestone "
                              f"(algorithm.milestones={list(self.milestones)})")
        model = str(cfg.model.name)
        if not model.startswith("al_") or model.endswith("_bp"):
            raise ConfigError(f"algorithm.name=al trains the folded models (al_mlp, al_cnn, al_resnet20, al_resnet32, "
                              f"al_vgg); model.name={model} is not one")


@RULES.register("al")
class AssociatedLearning(AlgorithmModule):
    """Sequential AL on a :class:`bench.models.associated.FoldedNet`; see the module docstring."""

    def setup_rule(self) -> None:
        from bench.models.associated import FoldedNet

        if not isinstance(self.model, FoldedNet) or self.model.twin:
            raise ValueError(f"al: trains the folded models (al_mlp, al_cnn, al_resnet20, al_resnet32, al_vgg), "
                             f"not {type(self.model).__name__}")
        K = self.model.K
        self.register_buffer("_al_sums", torch.zeros(2 * K + 1), persistent=False)  # A_1..A_K, E_1..E_K, steps

    def onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(torch.get_default_dtype())

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MSE of Eq. 8's class scores against the one-hot label (the end-to-end loss of the inference path)."""
        return F.mse_loss(logits, self.onehot(y).to(logits.dtype))

    def objective(self, x, y):
        net, K = self.model, self.model.K
        s, t = x, self.onehot(y).to(x.dtype)
        surrogate, assoc, ae = 0.0, [], []
        for i in range(K):
            s, t, a, e = net.component_losses(i, s, t)
            assoc.append(a)
            ae.append(e)
            surrogate = surrogate + a + e
        with torch.no_grad():  # Eq. 8 on this batch, for the train metrics (no extra f pass)
            logits = net.decode(net.top(s))
            loss = self.loss_fn(logits, y)
            self._al_sums += torch.stack([*assoc, *ae, torch.ones((), device=x.device, dtype=self._al_sums.dtype)]).detach().to(self._al_sums.dtype)
        return surrogate, logits, loss

    def configure_optimizers(self):
        """As the base, with two parameter groups: f, b at lr; g, h at inverse_lr_scale · lr."""
        out = super().configure_optimizers()
        opt = out["optimizer"] if isinstance(out, dict) else out
        a: ALOptions = self.opts
        fwd = [p for n, p in self.model.named_parameters() if n.startswith(("f.", "b."))]
        inv = [p for n, p in self.model.named_parameters() if n.startswith(("g.", "h."))]
        # rebuild the optimiser with the same class and defaults over the two groups
        defaults = {k: v for k, v in opt.defaults.items()}
        opt = type(opt)([{"params": fwd, "lr": a.lr}, {"params": inv, "lr": a.lr * a.inverse_lr_scale}], **defaults)
        if not isinstance(out, dict):
            return opt
        if a.scheduler == "multistep" and a.milestone_gammas:
            milestones, gammas = list(a.milestones), list(a.milestone_gammas)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, MilestoneFactors(milestones, gammas))
        else:
            sched = type(out["lr_scheduler"])(opt, **_scheduler_args(out["lr_scheduler"]))
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_train_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._al_sums.clone(), reduce_op="mean") if self.trainer.world_size > 1 else self._al_sums
        K, n = self.model.K, float(sums[-1])
        if n > 0:
            values = {f"al/assoc_{i + 1}": sums[i] / n for i in range(K)}
            values.update({f"al/ae_{i + 1}": sums[K + i] / n for i in range(K)})
            self.log_dict(values, on_epoch=True, sync_dist=False)
        self._al_sums.zero_()
        super().on_train_epoch_end()


class MilestoneFactors:
    """LambdaLR factor: the product of the decay factors of every milestone already passed
    (the authors decay × 0.1 at 40, 60, 80 % of training and × 0.5 at 90 %)."""

    def __init__(self, milestones: list[int], gammas: list[float]):
        self.milestones, self.gammas = milestones, gammas

    def __call__(self, epoch: int) -> float:
        f = 1.0
        for m, g in zip(self.milestones, self.gammas):
            if epoch >= m:
                f *= g
        return f


def _scheduler_args(sched) -> dict:
    if isinstance(sched, torch.optim.lr_scheduler.StepLR):
        return {"step_size": sched.step_size, "gamma": sched.gamma}
    if isinstance(sched, torch.optim.lr_scheduler.MultiStepLR):
        return {"milestones": sorted(sched.milestones.elements()), "gamma": sched.gamma}
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return {"factor": sched.factor, "patience": sched.patience}
    raise AssertionError(type(sched))


def make_optimizer(model, opts: ALOptions, params_of=None):
    """The optimiser the pipelined trainer gives one worker: the same class, groups and settings
    as :meth:`AssociatedLearning.configure_optimizers`, over the worker's components only."""
    names = dict(model.named_parameters()) if params_of is None else params_of
    fwd = [p for n, p in names.items() if n.startswith(("f.", "b."))]
    inv = [p for n, p in names.items() if n.startswith(("g.", "h."))]
    groups = [{"params": fwd, "lr": opts.lr}, {"params": inv, "lr": opts.lr * opts.inverse_lr_scale}]
    fast = {"fused": True}
    if opts.optimizer == "adam":
        return torch.optim.Adam(groups, lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay, **fast)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay, **fast)
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay, **fast)
