"""The rule base class: one LightningModule per credit-assignment rule, manual optimization.

The contract every rule keeps (docs/architecture.md, "The .grad contract"): the weight update reaches the optimizer as ``.grad``
and is produced by autograd inside ``manual_backward``. A rule therefore implements only

* :meth:`setup_rule` — convert layers, build feedback matrices, hook feedback points;
* :meth:`objective` — a scalar whose gradient *is* the rule's update (for BP: the loss);
* :meth:`true_gradient` — a context that switches the rule off in place, so the alignment
  probe can compute the true backprop gradient on the same weights without a model copy.

Everything else — optimizer and scheduler from config, torchmetrics top-1/top-5 error and loss,
the divergence guard, update re-projection — lives here once.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import DictConfig
from torch import nn

from bench.feedback.noise import SharedNoise
from bench.feedback.points import PointTap
from bench.feedback.restore import replaying
from bench.metrics.classification import macro_scores
from bench.models.base import is_language_model
from bench.options import AlgorithmOptions, declared
from bench.registry import Registry

RULES: Registry = Registry("algorithm")


# Checkpoint keys under which rules wrote their noise stream before the registry existed
# (checkpoint["noise_streams"]): old run folders resume through them. (key path, stream name).
LEGACY_NOISE_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("noise_generator",), "bp_noise"),         # bp_noise (sign_feedback.py)
    (("tp_noise_generator",), "tp_noise"),      # the target-propagation rules (target_prop.py)
    (("eprop_sign_generator",), "ep_sign"),     # ep's random β sign (equilibrium.py)
    (("mirror", "generator"), "mirror"),        # wm's mirror phase (feedback_learning.py)
)


@dataclass(frozen=True)
class ProbeStep:
    """A training step as the alignment probe replays it: the batch and the RNG state the rule's
    forward started from (CPU, and the batch's CUDA device when it is on one), so the backprop
    pass draws the same dropout masks."""

    x: torch.Tensor
    y: torch.Tensor
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None

    def replayed_rng(self):
        """Run the body from this step's RNG state; the global RNG is left as it was."""
        return replaying((self.cpu_rng, self.cuda_rng), self.x.device)


class AlgorithmModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, model: nn.Module, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.model = model
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        self.status = "running"
        # The rule's typed options (bench/options.py; each rule declares its own next to its class).
        self.opts: AlgorithmOptions = declared("algorithm", str(cfg.algorithm.name)).from_config(cfg.algorithm)
        self.tap = (PointTap(model, model.feedback_points(self.opts.granularity))
                    if hasattr(model, "feedback_points") else None)
        # Hot-path settings as plain attributes: an OmegaConf lookup costs a noticeable share of a
        # small model's step (docs/architecture.md, M5).
        self.probe_every = int(cfg.probe.every)
        self.probe_signals = bool(cfg.probe.signals)
        self.guard_every = int(cfg.guard.every)
        self.max_grad_norm = self.opts.max_grad_norm
        self._probe_requested = False
        self._probe_step: ProbeStep | None = None
        self.noise_streams: dict[str, SharedNoise] = {}  # add_noise_stream; checkpointed here
        self.probe_seconds = 0.0  # written by the alignment probe, read by the epoch timer
        # ModuleDict keys may not shadow nn.Module attributes ("train"), hence the suffix.
        self.metrics = nn.ModuleDict({f"{s}_m": self._split_metrics(s) for s in ("val", "test", "train_eval")})
        self.register_buffer("_train_sums", torch.zeros(4), persistent=False)  # loss·n, top-1 hits, top-5 hits, n
        self._pending: list = []
        self._pending_elements = 0
        self.setup_rule()

    # ------------------------------------------------------------------ rule API
    def setup_rule(self) -> None:
        """Prepare the rule (convert layers, draw feedback). Runs once, before the optimizer exists."""

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (surrogate, logits, loss); ∂surrogate/∂θ is the rule's update. Default: backprop."""
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        return loss, logits, loss

    @contextmanager
    def true_gradient(self):
        """Switch the rule off in place (converted layers use Wᵀ, no cuts or injections)."""
        yield

    def after_backward(self) -> None:
        """Hook after the rule's backward, before re-projection and the step (e.g. gradient masks)."""

    def after_step(self) -> None:
        """Hook after ``optimizer.step()`` (e.g. weight constraints)."""

    def add_noise_stream(self, name: str, stream: SharedNoise) -> SharedNoise:
        """Register a rule's own random stream (bench/feedback/noise.py) under ``name``; its state is
        saved in and restored from the checkpoint by this class, so a resumed run continues it.
        Returns ``stream``."""
        if name in self.noise_streams:
            raise ValueError(f"noise stream {name!r} is already registered")
        self.noise_streams[name] = stream
        return stream

    def feedback_weight_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (W, B)} for rules with a per-layer feedback tensor; the probe reports ∠(W, B)."""
        return {}

    # ------------------------------------------------------------------ metrics
    def _split_metrics(self, split: str) -> nn.ModuleDict:
        metrics = {"loss": torchmetrics.MeanMetric(),
                   "acc1": torchmetrics.classification.MulticlassAccuracy(self.num_classes, top_k=1, average="micro", validate_args=False)}
        if self.num_classes > 5:
            metrics["acc5"] = torchmetrics.classification.MulticlassAccuracy(self.num_classes, top_k=5, average="micro", validate_args=False)
        # rlra Table 5 (middle): precision, recall and F1 from the test confusion matrix; not for a
        # language model, whose V×V matrix (V the vocabulary) would not fit in memory
        if split == "test" and not is_language_model(self.model):
            metrics["confmat"] = torchmetrics.classification.MulticlassConfusionMatrix(self.num_classes, validate_args=False)
        return nn.ModuleDict(metrics)

    def _update_metrics(self, split: str, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        m = self.metrics[f"{split}_m"]
        flat_logits, flat_y = logits.detach().reshape(-1, logits.shape[-1]), y.reshape(-1)
        m["loss"].update(loss.detach(), weight=flat_y.numel())
        m["acc1"].update(flat_logits, flat_y)
        if "acc5" in m:
            m["acc5"].update(flat_logits, flat_y)
        if "confmat" in m:
            m["confmat"].update(flat_logits.argmax(-1), flat_y)

    # Running train metrics are plain on-device sums rather than torchmetrics: an update costs
    # ~15 small kernels, about the forward pass of a small MLP, on every step. Batches are
    # queued and reduced together, so the per-step cost is one list append.
    PENDING_ELEMENTS = 1 << 20

    def _queue_train(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        self._pending.append((logits.detach(), y, loss.detach()))
        self._pending_elements += logits.numel()
        if self._pending_elements >= self.PENDING_ELEMENTS:
            self._flush_train()

    @torch.no_grad()
    def _flush_train(self) -> None:
        if not self._pending:
            return
        logits = torch.cat([l.reshape(-1, l.shape[-1]) for l, _, _ in self._pending])
        y = torch.cat([t.reshape(-1) for _, t, _ in self._pending])
        counts = torch.tensor([t.numel() for _, t, _ in self._pending], device=logits.device, dtype=torch.float32)
        losses = torch.stack([l.float() for _, _, l in self._pending])
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]
        self._train_sums += torch.stack([(losses * counts).sum(), hits[:, 0].sum().float(),
                                         hits.any(-1).sum().float(), counts.sum()])
        self._pending, self._pending_elements = [], 0

    def _log_train(self) -> None:
        self._flush_train()
        sums = self.trainer.strategy.reduce(self._train_sums.clone(), reduce_op="sum")
        self._train_sums.zero_()
        n = float(sums[3])
        if n == 0:
            return
        values = {"train/loss": sums[0] / n, "train/err1": 100.0 * (1.0 - sums[1] / n)}
        if self.num_classes > 5:
            values["train/err5"] = 100.0 * (1.0 - sums[2] / n)
        self.log_dict(values, on_epoch=True, sync_dist=False)

    def _log_split(self, split: str, prefix: str | None = None) -> dict[str, float]:
        m, prefix = self.metrics[f"{split}_m"], prefix or split
        values = {f"{prefix}/loss": m["loss"].compute(), f"{prefix}/err1": 100.0 * (1.0 - m["acc1"].compute())}
        if "acc5" in m:
            values[f"{prefix}/err5"] = 100.0 * (1.0 - m["acc5"].compute())
        if "confmat" in m:
            values.update({f"{prefix}/{k}": v for k, v in macro_scores(m["confmat"].compute()).items()})
        if is_language_model(self.model):  # perplexity = exp(mean next-token cross-entropy)
            values[f"{prefix}/ppl"] = torch.exp(values[f"{prefix}/loss"])
        for metric in m.values():
            metric.reset()
        # torchmetrics already synchronised across ranks in compute()
        self.log_dict(values, on_epoch=True, sync_dist=False)
        return values

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> Any:
        a = self.opts
        # Every parameter of the rule module: the model's, and any the rule owns itself (rec-LRA's
        # error synapses), so the configured optimizer steps them all and DDP averages them all.
        params = [p for p in self.parameters() if p.requires_grad]
        # Fused kernels exist for CPU and CUDA float tensors and are the fastest implementation.
        fast = {"fused": True} if all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params) else {"foreach": True}
        if a.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=a.lr, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay, **fast)
        elif a.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=a.lr, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay, **fast)
        elif a.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay, **fast)
        else:  # the declaration's choices (AlgorithmOptions.optimizer) are checked before the run starts
            raise AssertionError(a.optimizer)
        if a.scheduler == "none":
            return opt
        if a.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=a.step_size, gamma=a.gamma)
        elif a.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(a.milestones), gamma=a.gamma)
        elif a.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=a.gamma, patience=a.patience)
        elif a.scheduler == "noam":  # stepped every optimizer step (training_step), lr = algorithm.lr × the Noam factor
            sched = torch.optim.lr_scheduler.LambdaLR(opt, noam_factor(int(self.cfg.model.get("n_embd", 512)), a.warmup))
        else:
            raise AssertionError(a.scheduler)
        return {"optimizer": opt, "lr_scheduler": sched}

    # ------------------------------------------------------------------ alignment probe
    # The probe (bench/callbacks/probe.py) and the rule talk through probe_requested and
    # probe_step(): the rule decides and prepares, the probe measures at on_before_optimizer_step.
    def probe_due(self) -> bool:
        """Whether the probe schedule (``probe.every``) falls on the current global step."""
        return self.probe_every > 0 and self.global_step % self.probe_every == 0

    @property
    def probe_requested(self) -> bool:
        """True while the current training step is one the probe is to measure (its objective ran
        through :meth:`probed_objective`); set at the start of every training step."""
        return self._probe_requested

    def probe_step(self) -> ProbeStep:
        """The batch and RNG state of the last step run through :meth:`probed_objective`."""
        if self._probe_step is None:
            raise RuntimeError("no probed step: probe_step() is valid after probed_objective()")
        return self._probe_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self._probe_requested = self.probe_due()
        opt.zero_grad(set_to_none=True)
        surrogate, logits, loss = self.probed_objective(x, y) if self._probe_requested else self.objective(x, y)
        self.manual_backward(surrogate)
        if self.tap is not None and not self._probe_requested:
            self.tap.clear()  # drop references to this step's activations; the probe clears its own
        self.after_backward()
        # Checked before re-projection and clipping, which would spread one non-finite gradient over
        # every parameter (and hide which one it was); a diverged step is never applied.
        if self.guard_every and batch_idx % self.guard_every == 0 and self._diverged(loss):
            return None
        if self.max_grad_norm is not None:
            reproject_(self.parameters(), self.max_grad_norm)
        if self.opts.clip_grad_norm is not None:  # Launay et al.'s LM: clip_grad_norm_(·, 0.5), after DDP's average
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.opts.clip_grad_norm)
        opt.step()  # the alignment probe runs inside, at on_before_optimizer_step
        if self.opts.scheduler == "noam":
            self.lr_schedulers().step()
        self.after_step()
        self._queue_train(logits, y, loss)
        return None

    def probed_objective(self, x: torch.Tensor, y: torch.Tensor):
        """:meth:`objective` on a step the alignment probe will measure: remember the batch and RNG
        state (the probe replays this exact step, dropout masks included, in BP mode) and keep the
        teaching signal δh_i that the backward will leave on each feedback point."""
        self._probe_step = ProbeStep(x, y, torch.get_rng_state(), torch.cuda.get_rng_state() if x.is_cuda else None)
        capture = self.tap is not None and self.probe_signals
        if capture:
            self.tap.clear()
            self.tap.capture = True
        surrogate, logits, loss = self.objective(x, y)
        if capture:
            self.tap.capture = False
            for h in self.tap.outputs:
                h.retain_grad()
        return surrogate, logits, loss

    def _diverged(self, loss: torch.Tensor) -> bool:
        """Divergence guard hook: whether this step's loss or gradients went non-finite (the step is
        then skipped). The checking, the record and the stop are the ``DivergenceGuard`` callback's
        (bench/callbacks/divergence.py), which attaches itself here; without it there is no guard."""
        guard = getattr(self, "divergence_guard", None)
        return guard is not None and guard.check(self, loss)

    def on_train_epoch_end(self) -> None:
        self._log_train()
        sched = self.lr_schedulers()
        if sched is None or self.opts.scheduler == "noam":  # noam steps per optimizer step
            return
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            val_loss = self.trainer.callback_metrics.get("val/loss")
            if val_loss is not None:
                sched.step(val_loss)
        else:
            sched.step()

    # ------------------------------------------------------------------ resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # RNG streams (dropout masks, probe replays) continue exactly where they stopped.
        checkpoint["rng"] = {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                             "status": self.status}
        # The rule's own streams (noise injection, weight mirrors, EP's β sign), by name.
        if self.noise_streams:
            checkpoint["noise_streams"] = {name: s.state() for name, s in self.noise_streams.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        saved = checkpoint.get("noise_streams")
        if saved is None:  # written before the registry: each rule's own key (LEGACY_NOISE_KEYS)
            saved = {}
            for path, name in LEGACY_NOISE_KEYS:
                value = checkpoint
                for part in path:
                    value = value.get(part) if isinstance(value, dict) else None
                if value is not None:
                    saved[name] = value
        # A stream missing from the checkpoint starts again from its seed, as it did before.
        for name, stream in self.noise_streams.items():
            stream.load(saved.get(name))

    # ------------------------------------------------------------------ evaluation
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The logits a trained model answers with. Feed-forward rules use the zoo model's forward;
        rules whose prediction is something else (an energy model's settled state) override it."""
        return self.model(x)

    def _eval_step(self, split: str, batch) -> None:
        x, y = batch
        logits = self.predict(x)
        self._update_metrics(split, logits, y, self.loss_fn(logits, y))

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_split("val")
        else:
            for metric in self.metrics["val_m"].values():
                metric.reset()

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        # dataloader 0 is the test set, 1 (optional) the training set in eval mode (final train error)
        self._eval_step("test" if dataloader_idx == 0 else "train_eval", batch)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")
        if self.metrics["train_eval_m"]["acc1"].update_count:
            self._log_split("train_eval", "final_train")


@torch.no_grad()
def reproject_(params, max_norm: float) -> None:
    """Nm(Δ, c) of the rlra appendix: rescale each update tensor whose norm exceeds c onto the ball."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    for g, n in zip(grads, norms):
        g.mul_(torch.clamp(max_norm / (n + 1e-12), max=1.0))


def noam_factor(d_model: int, warmup: int):
    """The Noam schedule's multiplier at step t (1-based): d^-0.5 · min(t^-0.5, t · warmup^-1.5)
    (Vaswani et al. 2017; Launay et al. 2020's NoamOpt with factor 1 when algorithm.lr = 1)."""
    def factor(step: int) -> float:
        t = step + 1  # LambdaLR counts from 0; the first update is step 1
        return d_model ** -0.5 * min(t ** -0.5, t * warmup ** -1.5)
    return factor
